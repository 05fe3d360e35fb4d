// Command snapmount mounts a read-only, point-in-time snapshot of a live
// disk image as a single file through FUSE, and serves the image to its
// writer over NBD in parallel. See README.md.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
)

func main() {
	// SNAPMOUNT_CPUPROFILE=FILE writes a CPU profile of the whole run, to
	// find where time goes in benchmarks (go tool pprof FILE).
	if path := os.Getenv("SNAPMOUNT_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "snapmount: SNAPMOUNT_CPUPROFILE:", err)
			os.Exit(exitUsage)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, "snapmount: SNAPMOUNT_CPUPROFILE:", err)
			os.Exit(exitUsage)
		}
		defer func() {
			pprof.StopCPUProfile()
			f.Close()
		}()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() {
		// The first signal starts a clean stop; a second one, which the
		// default action now takes, ends the process at once.
		<-ctx.Done()
		stop()
	}()
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if code != exitOK {
		pprof.StopCPUProfile()
		os.Exit(code)
	}
}
