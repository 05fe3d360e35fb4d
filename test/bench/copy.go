package main

import (
	"os"
	"path/filepath"
	"syscall"
)

// copyGroup: snapmount copy against nbdcopy from the same nbdkit server,
// both writing a file in the same directory.
func (b *bench) copyGroup() {
	image := b.randomImage("random.img")
	k := b.nbdkit(image, "-r")
	defer k.stop()
	uri := unixURI("", k.sock)
	out := filepath.Join(b.cfg.dir, "copy.out")
	copyOnce := func(name string, args ...string) func() (float64, error) {
		return func() (float64, error) {
			os.Remove(out)
			syscall.Sync()
			secs, err := timed(name, args...)
			return throughput(b.cfg.size, secs, err)
		}
	}
	b.measure(&row{Group: "copy", Figure: "export to a file, 4 connections", Unit: "MB/s", Higher: true, AnchorIs: "nbdcopy", Target: ">= 1.0x"},
		copyOnce(b.cfg.bin, "copy", "--conns", "4", uri, out),
		copyOnce("nbdcopy", "-C", "4", uri, out))
	b.measure(&row{Group: "copy", Figure: "export to a file with SHA-256", Unit: "MB/s", Higher: true, AnchorIs: "nbdcopy+sha256sum", Target: "(forensic path)"},
		copyOnce(b.cfg.bin, "copy", "--sha256", uri, out),
		copyOnce("sh", "-c", "nbdcopy -C 4 '"+uri+"' - | tee '"+out+"' | sha256sum >/dev/null"))
	os.Remove(out)
}
