package main

// The mount process's Go runtime: garbage collection and processors.

import (
	"runtime"
	"runtime/debug"
	"sync/atomic"
	"time"
)

// mountGCPercent is the mount process's GOGC unless its environment sets
// one. Its Go heap (go-fuse's and the client's buffers; cached blocks live
// outside it, in slabs) is just over 4 MiB by the time the file is
// readable, where GOGC=100 would collect first: at 200 no collection
// delays the start, and the peak RSS of a long read does not grow.
const mountGCPercent = 200

// mountMemoryLimit is the mount process's soft limit on the Go runtime's
// memory (debug.SetMemoryLimit) unless its environment sets GOMEMLIMIT.
// Cached blocks live outside it, in slabs the cache budget bounds; inside
// it, go-fuse's buffers (a request buffer of the largest read per
// request in flight, and a reply buffer per read even when the reply is
// lent from cache blocks). Under many reads in flight GOGC=200 let the
// heap grow to three times that, well past what the process needs: the
// limit makes the collector run earlier there instead, and leaves the
// start-up (a 4-5 MiB heap) untouched.
const mountMemoryLimit = 32 << 20

// tuneMountRuntime sets the mount process's garbage collection to
// mountGCPercent unless getenv("GOGC") is set, its soft memory limit to
// mountMemoryLimit unless getenv("GOMEMLIMIT") is set, and its Go
// processors to one more than the runtime's default unless
// getenv("GOMAXPROCS") is set; it returns the processor count.
//
// Why one more processor: go-fuse keeps a reader blocked in read(2) on
// /dev/fuse whenever it can, and a goroutine in a system call holds its
// processor until the runtime's monitor takes it back: with as many
// processors as CPUs, overlapping reads wait for that, and with one more
// they do not, while single reads cost the same. (While reads come one at
// a time, a root mount runs on one processor: procGovernor.)
func tuneMountRuntime(getenv func(string) string) (procs int) {
	if getenv("GOGC") == "" {
		debug.SetGCPercent(mountGCPercent)
	}
	if getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(mountMemoryLimit)
	}
	if getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 1)
	}
	return runtime.GOMAXPROCS(0)
}

// procGovernor runs the Go scheduler with one processor while reads arrive
// one at a time, and with all of them as soon as two overlap. It counts
// the file's reads as their fusefs.ReadObserver.
//
// Why: with more than one processor, every goroutine made runnable (a
// reader whose reply another goroutine read, a new go-fuse reader) wakes
// an idle processor's thread, which finds nothing to do and sleeps again,
// and go-fuse's readers block in read(2) holding processors, which the
// runtime's monitor keeps taking back; a single reader, one read at a
// time, pays for all that and gains nothing from a second processor. But
// one processor for good slows cold sequential reads, so overlapping
// reads get them all back at once. It governs only mounts whose kernel
// readahead window could be raised (root): there a sequential reader shows
// as several reads at once, while with the kernel's 128 KiB window the
// cache's own readahead runs beside reads that come one at a time, and
// one processor slowed it.
type procGovernor struct {
	full     int           // processors while reads overlap: GOMAXPROCS at start
	set      func(int)     // runtime.GOMAXPROCS, or a test's recorder
	interval time.Duration // how long reads must not overlap before going to one

	inflight atomic.Int32
	peak     atomic.Int32  // most reads in flight at once since the last tick
	one      atomic.Bool   // running with one processor
	raise    chan struct{} // reads overlap while on one processor
}

// serialInterval is how long reads must come one at a time before the
// mount drops to one processor. Each change stops the world briefly, so
// changes are at most a few per second.
const serialInterval = 100 * time.Millisecond

func newProcGovernor(full int, interval time.Duration, set func(int)) *procGovernor {
	return &procGovernor{full: full, set: set, interval: interval, raise: make(chan struct{}, 1)}
}

// ReadStarted counts a read in; a read that overlaps another while on one
// processor asks for all of them (without waiting for the change).
func (g *procGovernor) ReadStarted() {
	n := g.inflight.Add(1)
	for p := g.peak.Load(); n > p && !g.peak.CompareAndSwap(p, n); p = g.peak.Load() {
	}
	if n >= 2 && g.one.Load() {
		select {
		case g.raise <- struct{}{}:
		default:
		}
	}
}

// ReadEnded counts a read out.
func (g *procGovernor) ReadEnded() { g.inflight.Add(-1) }

// governProcs starts g, until stop is closed, on a mount whose kernel
// readahead window is at least 1 MiB (the mount raised it: root), and
// reports whether it did; see procGovernor for why only there.
func governProcs(g *procGovernor, kernelReadahead int64, stop <-chan struct{}) bool {
	if kernelReadahead < 1<<20 || g.full <= 1 {
		return false
	}
	go g.run(stop)
	return true
}

// run governs until stop is closed, then leaves all processors in place.
func (g *procGovernor) run(stop <-chan struct{}) {
	t := time.NewTicker(g.interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			g.setOne(false)
			return
		case <-g.raise:
			g.setOne(false)
		case <-t.C:
			g.tick()
		}
	}
}

// tick ends an interval: one processor if no two reads overlapped in it.
// The next interval's peak starts at the reads in flight now.
func (g *procGovernor) tick() {
	if g.peak.Swap(g.inflight.Load()) <= 1 {
		g.setOne(true)
	}
}

func (g *procGovernor) setOne(one bool) {
	if g.one.Load() == one {
		return
	}
	g.one.Store(one)
	if one {
		g.set(1)
	} else {
		g.set(g.full)
	}
}
