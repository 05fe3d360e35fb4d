// Command snapmount mounts a read-only, point-in-time snapshot of a live
// disk image as a single file through FUSE, and serves the image to its
// writer over NBD in parallel. See README.md.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
