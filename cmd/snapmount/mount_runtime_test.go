package main

import (
	"math"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"testing"
	"time"

	"snapmount/fusefs"
	"snapmount/test/testenv"
)

// The mount process collects at mountGCPercent, bounds the runtime's
// memory softly at mountMemoryLimit and runs with one Go processor more
// than the default, unless GOGC, GOMEMLIMIT or GOMAXPROCS say otherwise.
func TestTuneMountRuntime(t *testing.T) {
	prevGC := debug.SetGCPercent(100)
	prevLimit := debug.SetMemoryLimit(math.MaxInt64)
	prevProcs := runtime.GOMAXPROCS(0)
	t.Cleanup(func() {
		debug.SetGCPercent(prevGC)
		debug.SetMemoryLimit(prevLimit)
		runtime.GOMAXPROCS(prevProcs)
	})

	got := tuneMountRuntime(func(string) string { return "" })
	if gc := debug.SetGCPercent(100); gc != mountGCPercent {
		t.Errorf("without GOGC: GC percent %d, want %d", gc, mountGCPercent)
	}
	if limit := debug.SetMemoryLimit(math.MaxInt64); limit != mountMemoryLimit {
		t.Errorf("without GOMEMLIMIT: memory limit %d, want %d", limit, mountMemoryLimit)
	}
	if got != prevProcs+1 || runtime.GOMAXPROCS(0) != prevProcs+1 {
		t.Errorf("without GOMAXPROCS: %d processors (returned %d), want %d", runtime.GOMAXPROCS(0), got, prevProcs+1)
	}

	runtime.GOMAXPROCS(prevProcs)
	got = tuneMountRuntime(func(k string) string {
		switch k {
		case "GOGC":
			return "50"
		case "GOMEMLIMIT":
			return "1GiB"
		case "GOMAXPROCS":
			return "1"
		}
		return ""
	})
	if gc := debug.SetGCPercent(100); gc != 100 {
		t.Errorf("with GOGC set: GC percent changed to %d", gc)
	}
	if limit := debug.SetMemoryLimit(math.MaxInt64); limit != math.MaxInt64 {
		t.Errorf("with GOMEMLIMIT set: memory limit changed to %d", limit)
	}
	if got != prevProcs || runtime.GOMAXPROCS(0) != prevProcs {
		t.Errorf("with GOMAXPROCS set: %d processors (returned %d), want %d unchanged", runtime.GOMAXPROCS(0), got, prevProcs)
	}
}

// The governor drops to one processor after an interval without
// overlapping reads, asks for all of them the moment two reads overlap,
// stays there while they keep overlapping, and gives them back at stop.
func TestProcGovernor(t *testing.T) {
	var set []int
	g := newProcGovernor(4, time.Hour, func(n int) { set = append(set, n) })

	g.tick() // an interval with no reads
	g.ReadStarted()
	g.ReadEnded()
	g.ReadStarted()
	g.tick() // one read at a time, one still in flight
	if !slices.Equal(set, []int{1}) {
		t.Fatalf("after serial reads: GOMAXPROCS set to %v, want [1]", set)
	}
	select {
	case <-g.raise:
		t.Fatal("a single read in flight asked for more processors")
	default:
	}

	g.ReadStarted() // overlaps the one in flight
	select {
	case <-g.raise:
		g.setOne(false) // what run does
	default:
		t.Fatal("overlapping reads did not ask for more processors")
	}
	if !slices.Equal(set, []int{1, 4}) {
		t.Fatalf("after overlapping reads: GOMAXPROCS set to %v, want [1 4]", set)
	}
	g.ReadEnded()
	g.tick() // the interval saw two at once: stay
	g.ReadEnded()
	g.tick() // the next interval started with one in flight, then none
	if !slices.Equal(set, []int{1, 4, 1}) {
		t.Fatalf("after the overlap ended: GOMAXPROCS set to %v, want [1 4 1]", set)
	}

	stop := make(chan struct{})
	close(stop)
	g.run(stop)
	if !slices.Equal(set, []int{1, 4, 1, 4}) {
		t.Fatalf("after stop: GOMAXPROCS set to %v, want [1 4 1 4]", set)
	}
}

// setsOf returns a GOMAXPROCS setter that also reports every change.
func setsOf(sets chan<- int) func(int) {
	return func(n int) {
		runtime.GOMAXPROCS(n)
		sets <- n
	}
}

// waitSet waits until the governor sets GOMAXPROCS to want.
func waitSet(t *testing.T, sets <-chan int, want int, what string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case n := <-sets:
			if n == want {
				return
			}
		case <-deadline:
			t.Fatalf("%s: the governor did not set GOMAXPROCS to %d within 10 s (it is %d)", what, want, runtime.GOMAXPROCS(0))
		}
	}
}

// On a root mount (whose readahead window the mount raised) the governor
// runs the process with one Go processor while reads come one at a time,
// with all of them while two overlap, and gives them back at stop.
func TestProcGovernorOnMount(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.SkipOrFail(t, "the governor applies only where the mount can raise the kernel's readahead window: run as root")
	}
	testenv.RequireFUSE(t)
	before := runtime.GOMAXPROCS(0)
	full := max(before, 2)
	runtime.GOMAXPROCS(full)
	t.Cleanup(func() { runtime.GOMAXPROCS(before) })
	sets := make(chan int, 64)
	g := newProcGovernor(full, serialInterval, setsOf(sets))
	gate := testenv.NewGate(2)
	dir := t.TempDir()
	srv, err := fusefs.Mount(dir, gate, fusefs.Options{Name: "disk", Size: 1 << 20, Reads: g})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
		}
	})
	kra, err := fusefs.KernelReadahead(dir)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	if !governProcs(g, kra, stop) {
		t.Fatalf("the governor did not start on a root mount (kernel readahead %d KiB)", kra>>10)
	}
	waitSet(t, sets, 1, "with no reads")

	finish := testenv.HoldReads(t, filepath.Join(dir, "disk"), gate, 2)
	waitSet(t, sets, full, "with two reads in flight")
	finish()
	waitSet(t, sets, 1, "after the reads")
	close(stop)
	waitSet(t, sets, full, "after stop")
}

// Without a raised readahead window (no root) the governor stays off.
func TestProcGovernorOnlyWithRaisedReadahead(t *testing.T) {
	g := newProcGovernor(4, time.Hour, func(int) { t.Error("GOMAXPROCS changed") })
	stop := make(chan struct{})
	defer close(stop)
	if governProcs(g, 128<<10, stop) {
		t.Error("the governor started with the kernel's 128 KiB readahead window")
	}
	if governProcs(newProcGovernor(1, time.Hour, nil), 4<<20, stop) {
		t.Error("the governor started with one processor to govern")
	}
}
