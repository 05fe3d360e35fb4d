package main

import (
	"log"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"snapmount/nbd"
)

// detachGrace is how long a mount detached with files still open serves
// them, once its reads fail, before the process ends anyway.
const detachGrace = time.Second

// drainWait is how long a mount told to stop serves files still open
// while its server answers: readers in progress finish their reads.
const drainWait = 10 * time.Second

// endMount ends the mount when the process is told to stop (SIGINT,
// SIGTERM; 'snapmount umount' sends SIGTERM when readers wait for a
// server that does not answer). stuck reports whether the readers wait
// for a server that does not answer (see mountStats.waitsForServer).
//
// Readers stuck on the server get EIO at once (the client closes), so
// they can close the file and the mount can go. Healthy readers are not
// failed: if a file is still open, the mount is detached lazily (its name
// goes; open files keep working) and served until the last file closes,
// for drainWait at most, failing the reads as soon as the server stops
// answering. Then the process returns; its exit closes /dev/fuse, which
// makes the kernel abort the connection, so what still holds the file
// gets ENOTCONN rather than a process that never ends. A second signal
// ends the process at once (see main).
func endMount(srv *fuse.Server, client *nbd.Client, dir string, logger *log.Logger, unmounted <-chan struct{}, stuck func() bool) {
	failed := stuck()
	if failed {
		client.Close()
	}
	if err := srv.Unmount(); err == nil { // go-fuse retries for a while
		<-unmounted
		return
	}
	if failed {
		logger.Printf("a file in %s is still open: detaching the mount; its reads fail from now on", dir)
	} else {
		logger.Printf("a file in %s is still open: detaching the mount; open files are served until closed, for %v at most", dir, drainWait)
	}
	if err := fusermount("-u", "-z", dir); err != nil {
		logger.Printf("lazy unmount %s: %v", dir, err)
	}
	end := time.NewTimer(detachGrace)
	if !failed {
		end.Reset(drainWait)
	}
	defer end.Stop()
	watch := time.NewTicker(stuckWait / 4)
	defer watch.Stop()
	for {
		select {
		case <-unmounted:
			return
		case <-watch.C:
			if !failed && stuck() {
				logger.Printf("the server of %s does not answer: failing the reads of the files still open", dir)
				client.Close()
				failed = true
				end.Reset(detachGrace)
			}
		case <-end.C:
			logger.Printf("ending the mount process with %s still open: the kernel aborts the FUSE connection", dir)
			return
		}
	}
}
