package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// emptyTarget makes path an empty (sparse) image of cfg.size bytes for
// writers, so every write run starts from the same state. It truncates
// in place, so servers that have the file open keep their handle.
func (b *bench) emptyTarget(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	err = f.Truncate(b.cfg.size)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// serveGroup: nbdcopy reading and writing through snapmount serve against
// nbdkit file, and the writer's cost of copy-before-write.
func (b *bench) serveGroup() {
	random := b.randomImage("random.img")
	target := filepath.Join(b.cfg.dir, "target.img")
	if err := b.emptyTarget(target); err != nil {
		fatalf("%v", err)
	}
	ssock := filepath.Join(b.cfg.dir, fmt.Sprintf("serve-%d.sock", time.Now().UnixNano()))
	serve := b.start(ssock, b.cfg.bin, "serve", "--no-tcp", "--socket", ssock, "--snapshot-linger", "0s", "random="+random, "target="+target)
	defer serve.stop()
	kr := b.nbdkit(random)
	defer kr.stop()
	kt := b.nbdkit(target)
	defer kt.stop()

	read := func(uri string) func() (float64, error) {
		return func() (float64, error) {
			secs, err := timed("nbdcopy", "-C", "4", uri, "null:")
			return throughput(b.cfg.size, secs, err)
		}
	}
	b.measure(&row{Group: "serve", Figure: "nbdcopy reads 4 conns", Unit: "MB/s", Higher: true, AnchorIs: "nbdkit file", Target: ">= 1.0x"},
		read(unixURI("random", ssock)), read(unixURI("", kr.sock)))
	// A snapshot nobody writes to holds no preserved blocks: reading it
	// should cost what reading the live image costs.
	b.measure(&row{Group: "serve", Figure: "nbdcopy reads NAME@snapshot, no writer", Unit: "MB/s", Higher: true,
		AnchorIs: "nbdkit file", Target: ">= 1.0x", AltIs: "NAME@live", AltTarget: ">= 0.95x"},
		read(unixURI("random@snapshot", ssock)), read(unixURI("", kr.sock)), read(unixURI("random@live", ssock)))

	write := func(uri string) func() (float64, error) {
		return func() (float64, error) {
			// Same starting state for both servers: an empty image.
			if err := b.emptyTarget(target); err != nil {
				return 0, err
			}
			secs, err := timed("nbdcopy", "-C", "4", "--flush", random, uri)
			return throughput(b.cfg.size, secs, err)
		}
	}
	b.measure(&row{Group: "serve", Figure: "nbdcopy writes 4 conns (+flush)", Unit: "MB/s", Higher: true, AnchorIs: "nbdkit file", Target: ">= 1.0x"},
		write(unixURI("target", ssock)), write(unixURI("", kt.sock)))

	// Copy-before-write: the same writer with one snapshot alive. The
	// snapshot is held by a mount of target@snapshot; first touch copies
	// every old block aside, a second pass finds them preserved.
	first := &row{Group: "serve", Figure: "writer, one snapshot alive, first touch", Unit: "MB/s", Higher: true, AnchorIs: "no snapshot", Target: ">= 0.5x"}
	again := &row{Group: "serve", Figure: "writer, one snapshot alive, blocks preserved", Unit: "MB/s", Higher: true, AnchorIs: "no snapshot", Target: "~1.0x"}
	writeOnce := func() (float64, error) {
		secs, err := timed("nbdcopy", "-C", "4", "--flush", random, unixURI("target", ssock))
		return throughput(b.cfg.size, secs, err)
	}
	for i := 0; i < b.cfg.runs; i++ {
		// Without a snapshot (the target holds data already: overwrite).
		if v, err := writeOnce(); err == nil {
			first.Anchor = append(first.Anchor, v)
			again.Anchor = append(again.Anchor, v)
		} else {
			b.logf("writer without snapshot: %v", err)
		}
		dir := b.newMountDir(b.self())
		out, err := exec.Command(b.cfg.bin, "mount", unixURI("target@snapshot", ssock), dir).CombinedOutput()
		if err != nil {
			b.logf("mounting a snapshot: %v: %s", err, out)
			continue
		}
		for _, r := range []*row{first, again} {
			if v, err := writeOnce(); err == nil {
				r.Ours = append(r.Ours, v)
			} else {
				b.logf("writer with snapshot: %v", err)
			}
		}
		exec.Command(b.cfg.bin, "umount", dir).Run()
		os.Remove(dir)
	}
	b.rows = append(b.rows, first, again)
}
