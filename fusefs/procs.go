package fusefs

import (
	"sync/atomic"
	"time"
)

// procGovernor runs the Go scheduler with one processor while reads arrive
// one at a time, and with all of them as soon as two overlap
// (Options.SerialProcs).
//
// Why: with more than one processor, every goroutine made runnable (a
// reader whose reply another goroutine read, a new go-fuse reader) wakes
// an idle processor's thread, which finds nothing to do and sleeps again,
// and go-fuse's readers block in read(2) holding processors, which the
// runtime's monitor takes back every 20 µs. A single reader, one read at a
// time, pays for all that and gains nothing from the second processor. On
// the benchmark VM (2 vCPUs, where every context switch traps to the
// hypervisor) one processor cut the mount's CPU per 4 KiB random read by
// 25-35% and the time by 15-20%, and the first 64 MiB of a fresh mount in
// 64 KiB reads took 106-123 ms against 211-279 (measured when a reader
// goroutine handed every NBD reply over; now that callers read their own,
// 4 or 6 processors were still slower than one); but one processor for
// good cost cold sequential reads 10-20%, so overlapping reads get them
// all back at once.
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

// enter counts a read in; a read that overlaps another while on one
// processor asks for all of them (without waiting for the change).
func (g *procGovernor) enter() {
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

// leave counts a read out.
func (g *procGovernor) leave() { g.inflight.Add(-1) }

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
