package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// sparseImage returns data whose given ranges are zeros (everything else
// a pattern) and a fake whose Allocation reports exactly those ranges.
func sparseImage(size int64, zeros ...Extent) ([]byte, *memSource) {
	data := pattern(int(size))
	for _, z := range zeros {
		clear(data[z.Offset:z.End()])
	}
	src := newMemSource(data)
	src.zeros = zeros
	return data, src
}

func zeroExt(off, end int64) Extent { return Extent{Offset: off, Length: end - off, Zero: true} }

// Blocks entirely inside holes are served as zeros without a transfer;
// one allocation query covers the whole small image; a block only partly
// in a hole is fetched.
func TestHolesServedWithoutTransfer(t *testing.T) {
	const bs = 4096
	const size = 64 * bs
	for _, kind := range []struct {
		name string
		wrap func(*memSource) io.ReaderAt
	}{{"vec", asAlloc}, {"plain", func(m *memSource) io.ReaderAt { return allocPlainSource{plainSource{m}} }}} {
		t.Run(kind.name, func(t *testing.T) {
			data, src := sparseImage(size, zeroExt(2*bs, 10*bs), zeroExt(20*bs+100, 30*bs))
			c := newTestCache(t, kind.wrap(src), size, Options{BlockSize: bs, MaxReadahead: -1})
			readOK(t, c, data, 0, size)
			// Zero blocks: 2-9 and 21-29; data: 0-1, 10-20, 30-63.
			checkStats(t, c.Stats(), map[string]int64{
				"ZeroHits": 17, "Misses": 47, "AllocQueries": 1, "SourceReads": 3,
				"BytesFetched": 47 * bs, "CachedBytes": 47 * bs,
			})
			want := []call{{0, 2 * bs, 0}, {10 * bs, 11 * bs, 0}, {30 * bs, 34 * bs, 0}}
			for _, w := range want {
				found := false
				for _, g := range src.Calls() {
					found = found || (g.off == w.off && g.n == w.n)
				}
				if !found {
					t.Errorf("no source request for [%d, +%d); requests %v", w.off, w.n, src.Calls())
				}
			}
			readOK(t, c, data, 0, size)
			checkStats(t, c.Stats(), map[string]int64{"ZeroHits": 34, "Hits": 47, "SourceReads": 3, "AllocQueries": 1})
		})
	}
}

// The allocation map is asked for in 64 MiB windows, lazily: reads in
// one window ask once, a read in the next window asks again.
func TestAllocQueriedPerWindow(t *testing.T) {
	const size = 4 * allocWindow
	src := newMemSource(make([]byte, size)) // all zeros, reported as such
	src.zeros = []Extent{zeroExt(0, size)}
	c := newTestCache(t, asAlloc(src), size, Options{MaxReadahead: -1})
	p := make([]byte, 1<<20)
	for _, off := range []int64{0, 10 << 20, allocWindow - 1<<20, allocWindow + 5<<20, allocWindow + 6<<20} {
		if _, err := c.ReadAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": 2, "SourceReads": 0, "ZeroHits": 5 * 8})
	// A miss just before a window's end asks for a whole window from
	// there, not for the sliver up to the boundary.
	if _, err := c.ReadAt(p, 3*allocWindow-1<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := c.ReadAt(p, 3*allocWindow+1<<20); err != nil { // known by now
		t.Fatal(err)
	}
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": 3})
}

// Readers missing in one window at once share one query.
func TestAllocOneQueryPerWindow(t *testing.T) {
	const bs = 4096
	const readers = 8
	data, src := sparseImage(64*bs, zeroExt(32*bs, 64*bs))
	src.allocEnter = make(chan struct{}, 1)
	src.allocGate = make(chan struct{})
	c := newTestCache(t, asAlloc(src), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})
	waiting := make(chan struct{}, readers)
	c.alloc.hookWait = func() { waiting <- struct{}{} }
	var wg sync.WaitGroup
	for i := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			readOK(t, c, data, int64(i)*8*bs, bs)
		}()
		if i == 0 {
			testenv.Receive(t, src.allocEnter, "an allocation query to reach the source")
		}
	}
	for range readers - 1 {
		testenv.Receive(t, waiting, "a reader to wait for the allocation query")
	}
	close(src.allocGate)
	testenv.Wait(t, &wg, "the readers to finish")
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": 1, "ZeroHits": 4, "Misses": 4})
}

// An allocator that answers a few extents at a time is asked again from
// where its answer ended, and the answers are merged.
func TestAllocPartialAnswers(t *testing.T) {
	const bs = 4096
	const size = 32 * bs
	data, src := sparseImage(size, zeroExt(4*bs, 8*bs), zeroExt(12*bs, 16*bs), zeroExt(20*bs, 24*bs))
	src.maxExt = 1
	c := newTestCache(t, asAlloc(src), size, Options{BlockSize: bs, MaxReadahead: -1})
	readOK(t, c, data, 0, size)
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": 7, "ZeroHits": 12, "Misses": 20})
	readOK(t, c, data, 0, size)
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": 7, "SourceReads": 4})
}

// An allocator that says it is unsupported is not asked again; reads go
// on as if there were no allocation information.
func TestAllocUnsupported(t *testing.T) {
	const bs = 4096
	data := pattern(16 * bs)
	src := newMemSource(data)
	src.allocErr = fmt.Errorf("fake: no base:allocation: %w", errors.ErrUnsupported)
	c := newTestCache(t, asAlloc(src), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})
	readOK(t, c, data, 0, bs)
	readOK(t, c, data, 8*bs, bs)
	if off, err := c.SeekHole(context.Background(), 0); off != int64(len(data)) || err != nil {
		t.Fatalf("SeekHole(0) = %d, %v; want the end", off, err)
	}
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": 1, "Misses": 2, "Errors": 0})
}

// An allocator that keeps failing is given up on after a few tries; a
// failure never fails the read.
func TestAllocFailing(t *testing.T) {
	const bs = 4096
	data := pattern(16 * bs)
	src := newMemSource(data)
	src.allocErr = &requestError{errno: syscall.EIO}
	c := newTestCache(t, asAlloc(src), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})
	for i := range int64(6) {
		readOK(t, c, data, 2*i*bs, bs)
	}
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": allocMaxFailures, "Misses": 6})
}

// A reader cancelled while the allocation query it waits for runs gets
// ctx's error.
func TestAllocCancelled(t *testing.T) {
	const bs = 4096
	data, src := sparseImage(16*bs, zeroExt(8*bs, 16*bs))
	src.allocEnter = make(chan struct{}, 1)
	src.allocGate = make(chan struct{})
	c := newTestCache(t, asAlloc(src), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := c.ReadAtContext(ctx, make([]byte, bs), 0)
		errc <- err
	}()
	testenv.Receive(t, src.allocEnter, "an allocation query to reach the source")
	cancel()
	if err := testenv.Receive(t, errc, "the read's result"); !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	close(src.allocGate)
	readOK(t, c, data, 0, 16*bs)
	checkStats(t, c.Stats(), map[string]int64{"ZeroHits": 8, "Misses": 8})
}

func TestSeekDataHole(t *testing.T) {
	const bs = 4096
	const size = 100 * bs
	zeros := []Extent{zeroExt(10*bs, 20*bs), zeroExt(50*bs+100, 60*bs), zeroExt(90*bs, size)}
	type seek struct {
		off      int64
		data     int64 // -1: ENXIO
		hole     int64 // -1: ENXIO
		readable bool
	}
	seeks := []seek{
		{0, 0, 10 * bs, true},
		{5, 5, 10 * bs, true},
		{10 * bs, 20 * bs, 10 * bs, true},
		{15 * bs, 20 * bs, 15 * bs, true},
		{20 * bs, 20 * bs, 50*bs + 100, true},
		{50*bs + 99, 50*bs + 99, 50*bs + 100, true},
		{50*bs + 100, 60 * bs, 50*bs + 100, true},
		{60 * bs, 60 * bs, 90 * bs, true},
		{90 * bs, -1, 90 * bs, true},
		{size - 1, -1, size - 1, true},
		{size, -1, -1, true},
		{size + 5, -1, -1, true},
	}
	for _, maxExt := range []int{0, 1} {
		t.Run(fmt.Sprintf("maxExt=%d", maxExt), func(t *testing.T) {
			_, src := sparseImage(size, zeros...)
			src.maxExt = maxExt
			c := newTestCache(t, asAlloc(src), size, Options{BlockSize: bs})
			ctx := context.Background()
			for _, s := range seeks {
				gotData, err := c.SeekData(ctx, s.off)
				if s.data < 0 {
					if !errors.Is(err, syscall.ENXIO) {
						t.Errorf("SeekData(%d) = %d, %v; want ENXIO", s.off, gotData, err)
					}
				} else if gotData != s.data || err != nil {
					t.Errorf("SeekData(%d) = %d, %v; want %d", s.off, gotData, err, s.data)
				}
				gotHole, err := c.SeekHole(ctx, s.off)
				if s.hole < 0 {
					if !errors.Is(err, syscall.ENXIO) {
						t.Errorf("SeekHole(%d) = %d, %v; want ENXIO", s.off, gotHole, err)
					}
				} else if gotHole != s.hole || err != nil {
					t.Errorf("SeekHole(%d) = %d, %v; want %d", s.off, gotHole, err, s.hole)
				}
			}
			if _, err := c.SeekData(ctx, -1); !errors.Is(err, syscall.EINVAL) {
				t.Errorf("SeekData(-1) = %v, want EINVAL", err)
			}
		})
	}
}

// Seeking walks the map a seek window per query.
func TestSeekAcrossWindows(t *testing.T) {
	const size = 4 * seekWindow
	const dataAt = 2*seekWindow + 12345
	src := newMemSource(nil)
	src.size = size
	src.zeros = []Extent{zeroExt(0, dataAt), zeroExt(dataAt+4096, size)}
	c := newTestCache(t, asAlloc(src), size, Options{})
	ctx := context.Background()
	if off, err := c.SeekData(ctx, 0); off != dataAt || err != nil {
		t.Fatalf("SeekData(0) = %d, %v; want %d", off, err, dataAt)
	}
	if off, err := c.SeekHole(ctx, dataAt); off != dataAt+4096 || err != nil {
		t.Fatalf("SeekHole(%d) = %d, %v; want %d", dataAt, off, err, dataAt+4096)
	}
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": 3, "SourceReads": 0})
	if _, err := c.SeekData(ctx, dataAt+4096); !errors.Is(err, syscall.ENXIO) {
		t.Fatalf("SeekData after the last data = %v, want ENXIO", err)
	}
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": 4})
}

// Without allocation information all of the file is data.
func TestSeekWithoutAllocator(t *testing.T) {
	const size = 10000
	c := newTestCache(t, asVec(newMemSource(make([]byte, size))), size, Options{})
	ctx := context.Background()
	if off, err := c.SeekData(ctx, 123); off != 123 || err != nil {
		t.Errorf("SeekData(123) = %d, %v; want 123", off, err)
	}
	if off, err := c.SeekHole(ctx, 123); off != size || err != nil {
		t.Errorf("SeekHole(123) = %d, %v; want %d", off, err, size)
	}
	if _, err := c.SeekData(ctx, size); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("SeekData(size) = %v, want ENXIO", err)
	}
	if _, err := c.SeekHole(ctx, size); !errors.Is(err, syscall.ENXIO) {
		t.Errorf("SeekHole(size) = %v, want ENXIO", err)
	}
}

// Readahead skips holes: nothing is fetched for them.
func TestReadaheadSkipsHoles(t *testing.T) {
	const bs = 4096
	data, src := sparseImage(64*bs, zeroExt(4*bs, 64*bs))
	c := newTestCache(t, asAlloc(src), int64(len(data)), Options{BlockSize: bs})
	for i := range int64(16) {
		readOK(t, c, data, i*bs, bs)
		idle(c)
	}
	checkStats(t, c.Stats(), map[string]int64{
		"Misses": 2, "ReadaheadBlocks": 2, "ReadaheadUsed": 2, "ZeroHits": 12, "SourceReads": 3,
	})
}

// AllocatedBytes is the size less the holes the source reports (ranges
// that only read as zeros still take storage), learned from start to end
// in several queries when answers are short; what the source did not
// report on counts as allocated.
func TestAllocatedBytes(t *testing.T) {
	const mib = 1 << 20
	const size = 96 * mib
	src := &memSource{size: size, maxExt: 2, zeros: []Extent{
		{Offset: 1 * mib, Length: 9 * mib, Zero: true, Hole: true},
		{Offset: 20 * mib, Length: 1 * mib, Zero: true},
		{Offset: 30 * mib, Length: 66 * mib, Zero: true, Hole: true},
	}}
	src.allocGate = make(chan struct{})
	c := newTestCache(t, asAlloc(src), size, Options{BlockSize: 4096})

	// Nothing known yet: all of it counts.
	done, cancel := context.WithCancel(context.Background())
	cancel()
	if got, final := c.AllocatedBytes(done); got != size || final {
		t.Fatalf("AllocatedBytes before the source answered: %d, final %v; want %d, not final", got, final, size)
	}
	close(src.allocGate)
	if got, final := c.AllocatedBytes(context.Background()); got != size-9*mib-66*mib || !final {
		t.Fatalf("AllocatedBytes = %d, final %v; want %d, final", got, final, size-9*mib-66*mib)
	}
	if n := c.Stats().AllocQueries; n < 3 {
		t.Errorf("%d allocation queries: the two-extent answers cannot have covered the map", n)
	}
	// Learned once: later calls ask nothing.
	before := src.AllocCalls()
	c.LearnAllocation()
	c.AllocatedBytes(context.Background())
	if after := src.AllocCalls(); after != before {
		t.Errorf("%d more allocation queries after the map was learned", after-before)
	}
}

func TestAllocatedBytesUnknown(t *testing.T) {
	const size = 1 << 20
	src := &memSource{size: size, allocErr: errors.ErrUnsupported}
	c := newTestCache(t, asAlloc(src), size, Options{BlockSize: 4096})
	if got, final := c.AllocatedBytes(context.Background()); got != size || !final {
		t.Errorf("a source that cannot say: AllocatedBytes = %d, final %v; want all %d, final", got, final, size)
	}
	// Without an Allocator at all, the same.
	plain := newTestCache(t, asPlain(newMemSource(make([]byte, size))), size, Options{BlockSize: 4096})
	if got, _ := plain.AllocatedBytes(context.Background()); got != size {
		t.Errorf("no Allocator: AllocatedBytes = %d, want %d", got, size)
	}
}

// Close ends a walk the source holds up.
func TestLearnAllocationClose(t *testing.T) {
	src := &memSource{size: 1 << 30, allocEnter: make(chan struct{}, 1), allocGate: make(chan struct{})}
	c := New(asAlloc(src), src.size, Options{BlockSize: 4096})
	c.LearnAllocation()
	<-src.allocEnter
	closed := make(chan struct{})
	go func() {
		c.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(30 * time.Second):
		t.Fatal("Close did not return within 30 s while a walk's query was held")
	}
	if got, _ := c.AllocatedBytes(context.Background()); got != src.size {
		t.Errorf("after Close: AllocatedBytes = %d, want %d", got, src.size)
	}
}
