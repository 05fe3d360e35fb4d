package test

import (
	"os"
	"path/filepath"
	"testing"

	"snapmount/test/testenv"
)

// BenchmarkCopy copies one image from one nbdkit server with snapmount
// copy and with nbdcopy, 4 connections each, to a file; compare the two
// MB/s figures (make bench prints the ratio from alternated runs).
func BenchmarkCopy(b *testing.B) {
	testenv.RequireCmd(b, "nbdkit", "nbdcopy")
	dir := testenv.ShortTempDir(b)
	image := filepath.Join(dir, "disk.img")
	const size = 256 << 20
	writeRandomImage(b, image, size, 1)
	sock, _ := startNbdkit(b, dir, "-r", "file", image)
	uri := unixURI("", sock)
	out := filepath.Join(dir, "out.img")
	for _, c := range []struct {
		name string
		cmd  []string
	}{
		{"snapmount", []string{snapmountBin, "copy", "--conns", "4", uri, out}},
		{"nbdcopy", []string{"nbdcopy", "-C", "4", uri, out}},
	} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(size)
			for i := 0; i < b.N; i++ {
				os.Remove(out)
				mustRun(b, c.cmd[0], c.cmd[1:]...)
			}
		})
	}
}
