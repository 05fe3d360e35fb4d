package test

import (
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"

	"snapmount/test/testenv"
)

var logRead = regexp.MustCompile(`connection=\d+ Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+)`)

// logReads returns the offset and length of every Read in an nbdkit log
// filter's file.
func logReads(t testing.TB, path string) [][2]int64 {
	t.Helper()
	var reads [][2]int64
	for _, m := range logMatches(t, path, logRead) {
		off, _ := strconv.ParseInt(m[1], 16, 64)
		n, _ := strconv.ParseInt(m[2], 16, 64)
		reads = append(reads, [2]int64{off, n})
	}
	return reads
}

// A fresh mount sends a read's misses to the server in pieces of at most
// 256 KiB (nbdkit faults in fresh memory for large requests on new
// connections), however large the read: one 1 MiB O_DIRECT read becomes
// at least four NBD reads, none larger than 256 KiB.
func TestMountFirstMissesGoInPieces(t *testing.T) {
	testenv.RequireFUSE(t)
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 16<<20, 12)
	logfile := filepath.Join(dir, "requests.log")
	sock, srv := startNbdkit(t, dir, "-r", "--filter=log", "file", image, "logfile="+logfile)
	mnt := mountDir(t, dir, "mnt")
	mountSM(t, unixURI("", sock), mnt)

	const n = 1 << 20
	buf, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE) // aligned for O_DIRECT
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(buf)
	f, err := os.OpenFile(filepath.Join(mnt, "nbd"), os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	unmountSM(t, mnt)
	srv.stop()

	var covered int64
	reads := logReads(t, logfile)
	for _, r := range reads {
		if r[1] > 256<<10 {
			t.Errorf("NBD read of %d bytes at %d on a fresh mount, want at most 256 KiB", r[1], r[0])
		}
		if r[0] < n {
			covered += min(r[1], n-r[0])
		}
	}
	if len(reads) < 4 || covered < n {
		t.Fatalf("NBD reads %v do not cover the 1 MiB read in pieces", reads)
	}
}
