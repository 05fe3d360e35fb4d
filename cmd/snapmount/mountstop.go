package main

import (
	"log"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"snapmount/nbd"
)

// detachGrace is how long a mount detached with files still open serves
// them before the process ends anyway.
const detachGrace = time.Second

// endMount ends the mount when the process is told to stop (SIGINT,
// SIGTERM; 'snapmount umount' sends SIGTERM when readers wait for a
// server that does not answer), whatever its readers do: reads waiting
// for the server fail with EIO at once (the client closes), so their
// readers can close the file and the mount can go. If a file stays open,
// the mount is detached lazily and the process returns after
// detachGrace; its exit closes /dev/fuse, which makes the kernel abort
// the connection, so what still holds the file gets ENOTCONN rather than
// a process that never ends.
func endMount(srv *fuse.Server, client *nbd.Client, dir string, logger *log.Logger, unmounted <-chan struct{}) {
	client.Close()
	if err := srv.Unmount(); err == nil { // go-fuse retries for a while
		<-unmounted
		return
	}
	logger.Printf("a file in %s is still open: detaching the mount; its reads fail from now on", dir)
	if err := fusermount("-u", "-z", dir); err != nil {
		logger.Printf("lazy unmount %s: %v", dir, err)
	}
	select {
	case <-unmounted:
	case <-time.After(detachGrace):
		logger.Printf("ending the mount process with %s still open: the kernel aborts the FUSE connection", dir)
	}
}
