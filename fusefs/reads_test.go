package fusefs

import (
	"path/filepath"
	"sync"
	"testing"

	"snapmount/test/testenv"
)

// readCounter counts what Options.Reads is told.
type readCounter struct {
	mu                      sync.Mutex
	inflight, peak, started int
}

func (c *readCounter) ReadStarted() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.started++
	c.inflight++
	c.peak = max(c.peak, c.inflight)
}

func (c *readCounter) ReadEnded() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.inflight--
}

func (c *readCounter) counts() (inflight, peak, started int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.inflight, c.peak, c.started
}

// Options.Reads is told of every read as it starts and ends: two reads
// held by the reader are two in flight, and none are once they returned.
func TestReadsInFlight(t *testing.T) {
	gate := testenv.NewGate(2)
	var reads readCounter
	dir := testMount(t, gate, Options{Name: "disk", Size: 1 << 20, Reads: &reads})

	finish := testenv.HoldReads(t, filepath.Join(dir, "disk"), gate, 2)
	if inflight, _, _ := reads.counts(); inflight != 2 {
		t.Errorf("with two reads held in the reader: %d in flight, want 2", inflight)
	}
	finish()
	if inflight, peak, started := reads.counts(); inflight != 0 || peak != 2 || started != 2 {
		t.Errorf("after the reads: %d in flight, at most %d, %d started; want 0, 2, 2", inflight, peak, started)
	}
}
