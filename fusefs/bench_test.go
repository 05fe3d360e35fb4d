package fusefs

import (
	"path/filepath"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"snapmount/test/testenv"
)

// The benchmarks read a mount of constReader (no copy, no latency) from
// this process, so they measure the FUSE path alone. For dd and fio, use
// the "mount" helper described at TestMain.

// benchMount mounts a 64 GiB constReader file and opens it with flags.
func benchMount(b *testing.B, flags int) int {
	b.Helper()
	if runtime.GOMAXPROCS(0) < 2 {
		b.Skip("reading our own mount needs GOMAXPROCS >= 2 (see the package doc on deadlocks)")
	}
	testenv.RequireFUSE(b)
	dir := b.TempDir()
	server, err := Mount(dir, constReader{}, Options{Name: "file", Size: 64 << 30})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := server.Unmount(); err != nil {
			b.Errorf("Unmount: %v", err)
		}
	})
	fd, err := unix.Open(filepath.Join(dir, "file"), unix.O_RDONLY|flags, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { unix.Close(fd) })
	return fd
}

// BenchmarkSequentialRead reads 1 MiB at a time through the page cache, each
// iteration from a part of the file not read before (cold).
func BenchmarkSequentialRead(b *testing.B) {
	fd := benchMount(b, 0)
	buf := make([]byte, 1<<20)
	b.SetBytes(int64(len(buf)))
	var off int64
	for b.Loop() {
		if _, err := unix.Pread(fd, buf, off); err != nil {
			b.Fatal(err)
		}
		off = (off + int64(len(buf))) % (64 << 30)
	}
}

// BenchmarkDirectRead4K measures one FUSE round trip: a 4 KiB O_DIRECT read.
func BenchmarkDirectRead4K(b *testing.B) {
	fd := benchMount(b, unix.O_DIRECT)
	buf := testenv.AlignedBuf(4096)
	b.SetBytes(int64(len(buf)))
	var off int64
	for b.Loop() {
		if _, err := unix.Pread(fd, buf, off); err != nil {
			b.Fatal(err)
		}
		off = (off + 1<<20 + 4096) % (64 << 30)
	}
}
