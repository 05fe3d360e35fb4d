package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// BenchmarkServeNbdcopy compares nbdcopy reading and writing an image
// through "snapmount serve" and through "nbdkit file" in the same run, and
// measures the writer's cost of copy-before-write with one snapshot alive
// (first touch of every block, then a rewrite). Run it without -race:
//
//	go test -run '^$' -bench ServeNbdcopy -benchtime 3x ./test/
//
// SNAPMOUNT_BENCH_SIZE sets the image size in MiB (default 1024).
func BenchmarkServeNbdcopy(b *testing.B) {
	if raceEnabled {
		b.Skip("benchmarks of a -race build measure the race detector")
	}
	requireCmd(b, "nbdcopy", "nbdkit")
	size := int64(1 << 30)
	if s := os.Getenv("SNAPMOUNT_BENCH_SIZE"); s != "" {
		mib, err := strconv.Atoi(s)
		if err != nil {
			b.Fatalf("SNAPMOUNT_BENCH_SIZE=%q: %v", s, err)
		}
		size = int64(mib) << 20
	}
	dir := b.TempDir()
	src := filepath.Join(dir, "src.img")
	writeRandomImage(b, src, size, 1)
	kimg, simg := filepath.Join(dir, "k.img"), filepath.Join(dir, "s.img")
	copyFile(b, src, kimg)
	copyFile(b, src, simg)
	ksock, _ := startNbdkit(b, shortTempDir(b), "file", kimg)
	ssock, _ := startServe(b, "s.img="+simg)
	kuri, suri := unixURI("", ksock), unixURI("s.img", ssock)

	timeIt := func(args ...string) float64 {
		start := time.Now()
		mustRun(b, "nbdcopy", args...)
		return float64(size) / time.Since(start).Seconds() / 1e6
	}
	var kr, sr, kw, sw, cbwFirst, cbwRetouch float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		kr += timeIt(kuri, "null:")
		sr += timeIt(suri, "null:")
		sw += timeIt(src, suri)
		kw += timeIt(src, kuri)

		snap := dialRawNBD(b, ssock)
		snap.goExport("s.img@snapshot")
		cbwFirst += timeIt(src, suri)
		cbwRetouch += timeIt(src, suri)
		snap.c.Close()
	}
	n := float64(b.N)
	b.ReportMetric(kr/n, "nbdkit-read-MB/s")
	b.ReportMetric(sr/n, "serve-read-MB/s")
	b.ReportMetric(sr/kr, "read-ratio")
	b.ReportMetric(kw/n, "nbdkit-write-MB/s")
	b.ReportMetric(sw/n, "serve-write-MB/s")
	b.ReportMetric(sw/kw, "write-ratio")
	b.ReportMetric(cbwFirst/n, "cbw-first-touch-MB/s")
	b.ReportMetric(cbwRetouch/n, "cbw-retouch-MB/s")
	fmt.Fprintf(os.Stderr, "serve vs nbdkit (%d MiB): read %.0f vs %.0f MB/s (%.2fx), write %.0f vs %.0f MB/s (%.2fx); writer with a snapshot: first touch %.0f MB/s, rewrite %.0f MB/s\n",
		size>>20, sr/n, kr/n, sr/kr, sw/n, kw/n, sw/kw, cbwFirst/n, cbwRetouch/n)
}
