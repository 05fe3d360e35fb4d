package fusefs

import (
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

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

	f, err := os.OpenFile(filepath.Join(dir, "disk"), os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	errs := make(chan error, 2)
	for i := range 2 {
		go func() {
			_, err := f.ReadAt(testenv.AlignedBuf(4096), int64(i)*65536)
			errs <- err
		}()
	}
	for range 2 {
		select {
		case <-gate.Entered:
		case <-time.After(10 * time.Second):
			t.Fatal("two O_DIRECT reads did not both reach the reader within 10 s")
		}
	}
	if inflight, _, _ := reads.counts(); inflight != 2 {
		t.Errorf("with two reads held in the reader: %d in flight, want 2", inflight)
	}
	gate.Open()
	for range 2 {
		select {
		case err := <-errs:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the reads did not return within 10 s of the gate opening")
		}
	}
	if inflight, peak, started := reads.counts(); inflight != 0 || peak != 2 || started != 2 {
		t.Errorf("after the reads: %d in flight, at most %d, %d started; want 0, 2, 2", inflight, peak, started)
	}
}
