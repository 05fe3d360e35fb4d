package test

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
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
	testenv.RequireCmd(b, "nbdcopy", "nbdkit")
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
	ksock, kp := startNbdkit(b, testenv.ShortTempDir(b), "file", kimg)
	ssock, sp := startServe(b, "--snapshot-linger", "0", "s.img="+simg)
	kuri, suri := unixURI("", ksock), unixURI("s.img", ssock)

	// Wall-clock MB/s, and the server's CPU time per GiB, which neighbours
	// on a shared machine disturb less.
	timeIt := func(p *proc, cpu *time.Duration, args ...string) float64 {
		// Start each run with no dirty pages, so that one run's writeback
		// does not slow the next.
		syscall.Sync()
		c0 := procCPU(b, p)
		start := time.Now()
		mustRun(b, "nbdcopy", args...)
		mbs := float64(size) / time.Since(start).Seconds() / 1e6
		*cpu += procCPU(b, p) - c0
		return mbs
	}
	var kr, sr, kw, sw, cbwFirst, cbwRetouch float64
	var krCPU, srCPU, kwCPU, swCPU, ignore time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		kr += timeIt(kp, &krCPU, kuri, "null:")
		sr += timeIt(sp, &srCPU, suri, "null:")
		sw += timeIt(sp, &swCPU, src, suri)
		kw += timeIt(kp, &kwCPU, src, kuri)

		snap := dialRawNBD(b, ssock)
		snap.goExport("s.img@snapshot")
		cbwFirst += timeIt(sp, &ignore, src, suri)
		cbwRetouch += timeIt(sp, &ignore, src, suri)
		snap.c.Close()
	}
	n := float64(b.N)
	perGiB := func(d time.Duration) float64 { return float64(d.Milliseconds()) / n / (float64(size) / (1 << 30)) }
	b.ReportMetric(perGiB(krCPU), "nbdkit-read-cpu-ms/GiB")
	b.ReportMetric(perGiB(srCPU), "serve-read-cpu-ms/GiB")
	b.ReportMetric(perGiB(kwCPU), "nbdkit-write-cpu-ms/GiB")
	b.ReportMetric(perGiB(swCPU), "serve-write-cpu-ms/GiB")
	b.ReportMetric(kr/n, "nbdkit-read-MB/s")
	b.ReportMetric(sr/n, "serve-read-MB/s")
	b.ReportMetric(sr/kr, "read-ratio")
	b.ReportMetric(kw/n, "nbdkit-write-MB/s")
	b.ReportMetric(sw/n, "serve-write-MB/s")
	b.ReportMetric(sw/kw, "write-ratio")
	b.ReportMetric(cbwFirst/n, "cbw-first-touch-MB/s")
	b.ReportMetric(cbwRetouch/n, "cbw-retouch-MB/s")
	fmt.Fprintf(os.Stderr, "serve vs nbdkit (%d MiB, %d runs): read %.0f vs %.0f MB/s (%.2fx, server CPU %.0f vs %.0f ms/GiB), write %.0f vs %.0f MB/s (%.2fx, server CPU %.0f vs %.0f ms/GiB); writer with a snapshot: first touch %.0f MB/s, rewrite %.0f MB/s\n",
		size>>20, b.N, sr/n, kr/n, sr/kr, perGiB(srCPU), perGiB(krCPU), sw/n, kw/n, sw/kw, perGiB(swCPU), perGiB(kwCPU), cbwFirst/n, cbwRetouch/n)
}

// procCPU is the user+system CPU time a running process has used so far.
func procCPU(t testing.TB, p *proc) time.Duration {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the parenthesised command name; utime and stime are
	// fields 14 and 15 of the whole line, in clock ticks (100 per second).
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}
