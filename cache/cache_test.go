package cache

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"snapmount/test/testenv"
)

// Reads of every alignment and length, straddling blocks, through the
// short last block, at and past the end, return what os.File.ReadAt
// returns for the same file: bytes, count and io.EOF alike. Each read is
// done on a cold cache, then again warm.
func TestReadAtLikeOSFile(t *testing.T) {
	const bs = 4096
	const size = 5*bs + 1234 // short last block
	data := pattern(size)
	path := filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	type rd struct {
		off int64
		n   int
	}
	reads := []rd{
		{0, 0}, {0, 1}, {0, bs}, {0, bs + 1}, {1, bs}, {bs - 1, 2}, {bs, 3 * bs},
		{100, 4*bs + 17}, {size - 1, 1}, {size - 1, 2}, {size - 1234, 1234},
		{size - 1234, 5000}, {size - 10, bs}, {size, 1}, {size, 0}, {size + 100, 10},
		{0, size}, {0, size + 1}, {3, size * 2},
	}
	r := rand.New(rand.NewPCG(1, 2))
	for range 200 {
		reads = append(reads, rd{r.Int64N(size + 10), r.IntN(3 * bs)})
	}
	for _, kind := range sourceKinds {
		for _, ra := range []int64{-1, 0} {
			t.Run(kind.name+map[int64]string{-1: "/no-readahead", 0: "/readahead"}[ra], func(t *testing.T) {
				for _, rd := range reads {
					c := New(kind.wrap(newMemSource(data)), size, Options{BlockSize: bs, MaxBytes: 64 * bs, MaxReadahead: ra})
					for _, pass := range []string{"cold", "warm"} {
						want := make([]byte, rd.n)
						wantN, wantErr := f.ReadAt(want, rd.off)
						got := make([]byte, rd.n)
						gotN, gotErr := c.ReadAt(got, rd.off)
						if gotN != wantN || gotErr != wantErr || string(got[:gotN]) != string(want[:wantN]) {
							t.Fatalf("%s ReadAt(%d bytes at %d) = %d, %v; os.File gives %d, %v (data equal: %v)",
								pass, rd.n, rd.off, gotN, gotErr, wantN, wantErr, string(got[:gotN]) == string(want[:wantN]))
						}
					}
					c.Close()
				}
			})
		}
	}
}

func TestReadAtNegativeOffset(t *testing.T) {
	c := newTestCache(t, asPlain(newMemSource(pattern(8192))), 8192, Options{BlockSize: 4096})
	n, err := c.ReadAt(make([]byte, 10), -1)
	if n != 0 || !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("ReadAt at -1 = %d, %v; want 0 and EINVAL", n, err)
	}
}

// The first read misses and fetches once; the same read again is served
// from memory without touching the source.
func TestHitsAndMisses(t *testing.T) {
	const bs = 4096
	data := pattern(16 * bs)
	src := newMemSource(data)
	c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})

	readOK(t, c, data, 100, 3*bs) // touches blocks 0..3
	checkStats(t, c.Stats(), map[string]int64{
		"Misses": 4, "Hits": 0, "SourceReads": 1, "BytesFetched": 4 * bs, "CachedBytes": 4 * bs,
	})
	readOK(t, c, data, 0, 4*bs)
	readOK(t, c, data, 5, 10)
	checkStats(t, c.Stats(), map[string]int64{
		"Misses": 4, "Hits": 5, "SourceReads": 1, "BytesFetched": 4 * bs, "Evictions": 0,
	})
	if got := len(src.Calls()); got != 1 {
		t.Fatalf("source saw %d requests, want 1", got)
	}
}

// A 1 MiB read of 8 missing 128 KiB blocks is one source request: through
// VectorReader straight into the 8 block buffers, otherwise one ReadAt.
// MaxRequest splits runs, and so does MaxMissRequest (the smaller wins)
// until MissWarmup bytes were fetched; a block already cached splits a run
// in two.
func TestMergeMisses(t *testing.T) {
	const bs = 128 * kib
	data := pattern(4 << 20)
	for _, tc := range []struct {
		name       string
		wrap       func(*memSource) io.ReaderAt
		maxRequest int
		maxMiss    int
		warmup     int64
		warm       []int64 // blocks read first
		want       []call
	}{
		{"vector", asVec, 0, 0, 0, nil, []call{{0, 1 << 20, 8}}},
		{"plain", asPlain, 0, 0, 0, nil, []call{{0, 1 << 20, 1}}},
		{"ctx", asCtx, 0, 0, 0, nil, []call{{0, 1 << 20, 1}}},
		{"max request", asVec, 512 * kib, 0, 0, nil, []call{{0, 512 * kib, 4}, {512 * kib, 512 * kib, 4}}},
		{"max request not a block multiple", asVec, 300 * kib, 0, 0, nil, []call{
			{0, 256 * kib, 2}, {256 * kib, 256 * kib, 2}, {512 * kib, 256 * kib, 2}, {768 * kib, 256 * kib, 2}}},
		{"max miss request in warm-up", asVec, 0, 256 * kib, 1 << 30, nil, []call{
			{0, 256 * kib, 2}, {256 * kib, 256 * kib, 2}, {512 * kib, 256 * kib, 2}, {768 * kib, 256 * kib, 2}}},
		{"max miss request in warm-up, cached block", asVec, 0, 256 * kib, 1 << 30, []int64{3}, []call{
			{3 * bs, bs, 1}, {0, 2 * bs, 2}, {2 * bs, bs, 1}, {4 * bs, 2 * bs, 2}, {6 * bs, 2 * bs, 2}}},
		{"max miss request after warm-up", asVec, 0, 256 * kib, bs, []int64{3}, []call{{3 * bs, bs, 1}, {0, 3 * bs, 3}, {4 * bs, 4 * bs, 4}}},
		{"max request below max miss request", asVec, 512 * kib, 1 << 20, 1 << 30, nil, []call{{0, 512 * kib, 4}, {512 * kib, 512 * kib, 4}}},
		{"cached block splits run", asVec, 0, 0, 0, []int64{3}, []call{{3 * bs, bs, 1}, {0, 3 * bs, 3}, {4 * bs, 4 * bs, 4}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newMemSource(data)
			c := newTestCache(t, tc.wrap(src), int64(len(data)), Options{BlockSize: bs, MaxRequest: tc.maxRequest, MaxMissRequest: tc.maxMiss, MissWarmup: tc.warmup, MaxReadahead: -1})
			for _, idx := range tc.warm {
				readOK(t, c, data, idx*bs, bs)
			}
			readOK(t, c, data, 0, 1<<20)
			got := src.Calls()
			// Fetches of separate runs run concurrently: compare as sets.
			if len(got) != len(tc.want) {
				t.Fatalf("source requests %v, want %v", got, tc.want)
			}
			for _, w := range tc.want {
				found := false
				for _, g := range got {
					found = found || g == w
				}
				if !found {
					t.Fatalf("source requests %v, want %v", got, tc.want)
				}
			}
			checkStats(t, c.Stats(), map[string]int64{
				"Misses": 8, "Hits": int64(len(tc.warm)), // warm-up misses included
			})
		})
	}
}

// MaxRequest below the block size: each block takes several requests.
func TestMaxRequestBelowBlockSize(t *testing.T) {
	const bs = 16 * kib
	data := pattern(4 * bs)
	for _, kind := range sourceKinds {
		t.Run(kind.name, func(t *testing.T) {
			src := newMemSource(data)
			c := newTestCache(t, kind.wrap(src), int64(len(data)), Options{BlockSize: bs, MaxRequest: 4 * kib, MaxReadahead: -1})
			readOK(t, c, data, 0, 2*bs)
			calls := src.Calls()
			if len(calls) != 8 {
				t.Fatalf("%d source requests, want 8", len(calls))
			}
			for _, cl := range calls {
				if cl.n != 4*kib {
					t.Fatalf("request %+v larger than MaxRequest", cl)
				}
			}
		})
	}
}

// Many readers of one missing block: one source read; the others join it.
func TestOneFetchPerBlock(t *testing.T) {
	const bs = 4096
	const readers = 16
	data := pattern(4 * bs)
	for _, kind := range sourceKinds {
		t.Run(kind.name, func(t *testing.T) {
			src := newMemSource(data)
			src.entered = make(chan call, 1)
			src.gate = make(chan struct{})
			c := newTestCache(t, kind.wrap(src), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})
			joined := make(chan int64, readers)
			c.hookJoined = func(idx int64) { joined <- idx }

			var wg sync.WaitGroup
			read := func() {
				defer wg.Done()
				p := make([]byte, 100)
				if n, err := c.ReadAt(p, bs+50); n != 100 || err != nil || string(p) != string(data[bs+50:bs+150]) {
					t.Errorf("ReadAt = %d, %v, data ok %v", n, err, string(p) == string(data[bs+50:bs+150]))
				}
			}
			wg.Add(1)
			go read()
			testenv.Receive(t, src.entered, "the fetch to reach the source (the gate holds it)")
			for range readers - 1 {
				wg.Add(1)
				go read()
			}
			for range readers - 1 {
				testenv.Receive(t, joined, "a read to join the fetch in flight")
			}
			close(src.gate)
			testenv.Wait(t, &wg, "the readers to finish")
			checkStats(t, c.Stats(), map[string]int64{"SourceReads": 1, "Misses": 1, "InflightJoins": readers - 1})
		})
	}
}

// A reader whose context ends stops waiting with ctx's error; the fetch
// it started goes on for the reader still waiting, and is cached.
func TestCancelledReaderLeavesFetchRunning(t *testing.T) {
	const bs = 4096
	data := pattern(4 * bs)
	for _, kind := range sourceKinds {
		t.Run(kind.name, func(t *testing.T) {
			src := newMemSource(data)
			src.entered = make(chan call, 1)
			src.gate = make(chan struct{})
			c := newTestCache(t, kind.wrap(src), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})
			joined := make(chan int64, 1)
			c.hookJoined = func(idx int64) { joined <- idx }

			ctx, cancel := context.WithCancel(context.Background())
			firstErr := make(chan error, 1)
			go func() {
				_, err := c.ReadAtContext(ctx, make([]byte, bs), 0)
				firstErr <- err
			}()
			testenv.Receive(t, src.entered, "a read to reach the source")
			secondDone := make(chan struct{})
			go func() {
				defer close(secondDone)
				readOK(t, c, data, 0, bs)
			}()
			testenv.Receive(t, joined, "a read to join the fetch in flight")

			// The reader that started the fetch runs it and gives up:
			// the fetch is not cancelled, the reader is held by the
			// source like everyone else.
			cancel()
			select {
			case err := <-firstErr:
				t.Fatalf("the reader running the fetch returned (%v) while the source held it", err)
			case <-secondDone:
				t.Fatal("the other reader returned while the fetch was still held")
			default:
			}
			close(src.gate)
			testenv.Receive(t, secondDone, "the second reader to finish")
			if err := testenv.Receive(t, firstErr, "the first reader's result"); err != nil {
				t.Fatalf("the cancelled reader that ran the fetch got %v; it had its data", err)
			}
			readOK(t, c, data, 0, bs) // cached
			checkStats(t, c.Stats(), map[string]int64{"SourceReads": 1, "Misses": 1, "InflightJoins": 1, "Hits": 1})
		})
	}
}

// The same the other way round: the waiter gives up, the reader that
// started the fetch gets its data.
func TestCancelledWaiter(t *testing.T) {
	const bs = 4096
	data := pattern(4 * bs)
	src := newMemSource(data)
	src.entered = make(chan call, 1)
	src.gate = make(chan struct{})
	c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})
	joined := make(chan int64, 2)
	c.hookJoined = func(idx int64) { joined <- idx }

	firstDone := make(chan struct{})
	go func() {
		defer close(firstDone)
		readOK(t, c, data, 0, 2*bs)
	}()
	testenv.Receive(t, src.entered, "a read to reach the source")
	ctx, cancel := context.WithCancel(context.Background())
	waiterErr := make(chan error, 1)
	go func() {
		n, err := c.ReadAtContext(ctx, make([]byte, 2*bs), 0)
		if n != 0 {
			t.Errorf("cancelled waiter read %d bytes, want 0", n)
		}
		waiterErr <- err
	}()
	testenv.Receive(t, joined, "the waiter to join the fetch of block 0")
	testenv.Receive(t, joined, "the waiter to join the fetch of block 1")
	cancel()
	if err := testenv.Receive(t, waiterErr, "the waiter's result"); !errors.Is(err, context.Canceled) {
		t.Fatalf("waiter got %v, want context.Canceled", err)
	}
	close(src.gate)
	testenv.Receive(t, firstDone, "the first reader to finish")
	checkStats(t, c.Stats(), map[string]int64{"SourceReads": 1, "Misses": 2, "InflightJoins": 2})
}

// A source error reaches the reader wrapped with the offset, still
// matching errors.Is and errors.As, and is not cached: the next read
// asks the source again.
func TestSourceErrorNotCached(t *testing.T) {
	const bs = 4096
	data := pattern(8 * bs)
	for _, kind := range sourceKinds {
		t.Run(kind.name, func(t *testing.T) {
			src := newMemSource(data)
			failures := 1
			var mu sync.Mutex
			src.fail = func(off, n int64) error {
				mu.Lock()
				defer mu.Unlock()
				if failures > 0 && off <= 2*bs && 2*bs < off+n {
					failures--
					return &requestError{errno: syscall.EIO}
				}
				return nil
			}
			c := newTestCache(t, kind.wrap(src), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})
			readOK(t, c, data, 0, bs) // block 0 cached

			p := make([]byte, 3*bs)
			n, err := c.ReadAt(p, 0) // block 0 hit, blocks 1-2 fail together
			if !errors.Is(err, syscall.EIO) {
				t.Fatalf("error %v does not match syscall.EIO", err)
			}
			var re *requestError
			if !errors.As(err, &re) || re.errno != syscall.EIO {
				t.Fatalf("error %v does not unwrap to the source's *requestError", err)
			}
			if !strings.Contains(err.Error(), "offset 4096") {
				t.Errorf("error %q does not name the offset", err)
			}
			if n != bs || string(p[:n]) != string(data[:n]) {
				t.Errorf("read %d bytes before the failing block, want %d", n, bs)
			}
			checkStats(t, c.Stats(), map[string]int64{"Errors": 1, "CachedBytes": bs})

			readOK(t, c, data, 0, 3*bs)
			checkStats(t, c.Stats(), map[string]int64{"Errors": 1, "SourceReads": 3, "Misses": 5, "Hits": 2})
		})
	}
}

// A source that breaks the io.ReaderAt contract with a short read and no
// error gets io.ErrUnexpectedEOF, not a silent hole.
func TestShortSourceRead(t *testing.T) {
	c := newTestCache(t, shortReader{}, 8192, Options{BlockSize: 4096, MaxReadahead: -1})
	if _, err := c.ReadAt(make([]byte, 10), 0); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("got %v, want io.ErrUnexpectedEOF", err)
	}
}

type shortReader struct{}

func (shortReader) ReadAt(p []byte, off int64) (int, error) { return len(p) / 2, nil }

// CLOCK evicts the block not read for longest, never more than the
// budget is held, and a hit refreshes a block.
func TestEviction(t *testing.T) {
	const bs = 4096
	data := pattern(16 * bs)
	src := newMemSource(data)
	c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs, MaxBytes: 4 * bs, MaxReadahead: -1})
	for idx := range int64(4) {
		readOK(t, c, data, idx*bs, bs)
	}
	readOK(t, c, data, 0, bs) // block 0 is recent again
	readOK(t, c, data, 4*bs, bs)
	checkStats(t, c.Stats(), map[string]int64{"Evictions": 1, "CachedBytes": 4 * bs, "Misses": 5, "Hits": 1})
	for _, idx := range []int64{0, 2, 3, 4} {
		if !c.resident(idx) {
			t.Errorf("block %d was evicted", idx)
		}
	}
	if c.resident(1) {
		t.Error("block 1, the least recently used, is still cached")
	}
	readOK(t, c, data, 5*bs, 2*bs) // evicts 2 and 3
	if c.resident(2) || c.resident(3) || !c.resident(0) {
		t.Error("wrong blocks evicted for the second miss")
	}
	checkStats(t, c.Stats(), map[string]int64{"Evictions": 3, "CachedBytes": 4 * bs})
}

// resident reports whether block idx is in the cache, not in flight.
func (c *Cache) resident(idx int64) bool {
	sh := c.shardOf(idx)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	b := sh.blocks[idx]
	return b != nil && b.fetch == nil
}

// With a budget too small for a read, the blocks that do not fit go
// straight from the source into the caller's buffer: correct data, and
// the budget holds.
func TestReadLargerThanBudget(t *testing.T) {
	const bs = 4096
	data := pattern(32 * bs)
	for _, kind := range sourceKinds {
		t.Run(kind.name, func(t *testing.T) {
			src := newMemSource(data)
			c := newTestCache(t, kind.wrap(src), int64(len(data)), Options{BlockSize: bs, MaxBytes: 4 * bs, MaxReadahead: -1})
			readOK(t, c, data, 10, 20*bs)
			st := c.Stats()
			if st.CachedBytes > 4*bs || c.bufs.live() > 4 {
				t.Fatalf("cached %d bytes in %d buffers, budget %d", st.CachedBytes, c.bufs.live(), 4*bs)
			}
			checkStats(t, st, map[string]int64{"Misses": 21})
		})
	}
}

// A budget smaller than one block caches nothing and still reads.
func TestBudgetBelowOneBlock(t *testing.T) {
	data := pattern(5 * 4096)
	c := newTestCache(t, asPlain(newMemSource(data)), int64(len(data)), Options{BlockSize: 4096, MaxBytes: 100})
	readOK(t, c, data, 1000, 3*4096)
	readOK(t, c, data, 1000, 3*4096)
	if c.bufs.live() != 0 {
		t.Fatalf("%d buffers allocated with a budget below one block", c.bufs.live())
	}
	checkStats(t, c.Stats(), map[string]int64{"Hits": 0, "Misses": 8, "SourceReads": 2})
}

// Many goroutines read random ranges of a source much larger than the
// budget: every byte is right, and at no time did the cache hold more
// buffers than the budget allows (the pool only makes a buffer when none
// is free, so its total is the high-water mark).
func TestConcurrentReadsStayInBudget(t *testing.T) {
	const bs = 4096
	const budget = 16 * bs
	data := pattern(256 * bs)
	for _, kind := range []struct {
		name string
		wrap func(*memSource) io.ReaderAt
	}{{"plain", asPlain}, {"vec", asVec}, {"alloc", asAlloc}} {
		t.Run(kind.name, func(t *testing.T) {
			src := newMemSource(data)
			c := newTestCache(t, kind.wrap(src), int64(len(data)), Options{BlockSize: bs, MaxBytes: budget, MaxRequest: 4 * bs})
			var wg sync.WaitGroup
			for g := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(g), 7))
					for i := range 300 {
						var off int64
						if g%2 == 0 { // sequential readers feed readahead
							off = int64(i*3*bs+g*bs) % int64(len(data))
						} else {
							off = r.Int64N(int64(len(data)))
						}
						n := 1 + r.IntN(3*bs)
						p := make([]byte, n)
						got, err := c.ReadAt(p, off)
						end := min(off+int64(n), int64(len(data)))
						if (err != nil && err != io.EOF) || string(p[:got]) != string(data[off:end]) {
							t.Errorf("ReadAt(%d at %d) = %d, %v; data ok %v", n, off, got, err, string(p[:got]) == string(data[off:end]))
							return
						}
					}
				}()
			}
			testenv.Wait(t, &wg, "the readers to finish")
			idle(c)
			st := c.Stats()
			if st.CachedBytes > budget || c.bufs.live() > budget/bs {
				t.Fatalf("cached %d bytes, %d buffers made; budget %d bytes", st.CachedBytes, c.bufs.live(), budget)
			}
			if st.Hits+st.Misses+st.InflightJoins+st.ZeroHits == 0 || st.Evictions == 0 {
				t.Fatalf("implausible counters %+v", st)
			}
		})
	}
}

// A fetched block of zeros keeps no buffer and is served as zeros later.
func TestZeroBlockHoldsNoMemory(t *testing.T) {
	const bs = 4096
	data := make([]byte, 12*bs)
	copy(data[4*bs:], pattern(bs)) // block 4 has data
	src := newMemSource(data)
	c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs, MaxBytes: 4 * bs, MaxReadahead: -1})
	// Memory is reserved before the data shows it is zero, so read in
	// pieces that fit the budget.
	for off := 0; off < len(data); off += 2 * bs {
		readOK(t, c, data, int64(off), 2*bs)
	}
	checkStats(t, c.Stats(), map[string]int64{"Misses": 12, "CachedBytes": bs, "Evictions": 0, "SourceReads": 6})
	readOK(t, c, data, 0, len(data))
	checkStats(t, c.Stats(), map[string]int64{"ZeroHits": 11, "Hits": 1, "SourceReads": 6, "Evictions": 0})
}

// Disabled: every read goes to the source, split at MaxRequest; nothing
// is kept; counters still move.
func TestDisabled(t *testing.T) {
	const bs = 4096
	data := pattern(64 * bs)
	src := newMemSource(data)
	c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs, MaxRequest: 8 * bs, Disabled: true})
	for range 2 {
		readOK(t, c, data, 100, 20*bs)
	}
	readOK(t, c, data, int64(len(data))-10, 100) // EOF through the pass-through
	calls := src.Calls()
	want := []call{{100, 8 * bs, 1}, {100 + 8*bs, 8 * bs, 1}, {100 + 16*bs, 4 * bs, 1}}
	want = append(want, want...)
	want = append(want, call{int64(len(data)) - 10, 10, 1})
	if len(calls) != len(want) {
		t.Fatalf("source requests %v, want %v", calls, want)
	}
	for i := range want {
		if calls[i] != want[i] {
			t.Fatalf("source requests %v, want %v", calls, want)
		}
	}
	checkStats(t, c.Stats(), map[string]int64{
		"SourceReads": 7, "Hits": 0, "Misses": 43, "CachedBytes": 0, "BytesFetched": 40*bs + 10,
	})
	if c.bufs.live() != 0 {
		t.Fatal("Disabled cache allocated block buffers")
	}
}

// Close cancels running fetches, waits for them, frees the blocks, and
// makes later reads fail.
func TestClose(t *testing.T) {
	const bs = 4096
	data := pattern(64 * bs)
	src := newMemSource(data)
	src.entered = make(chan call, 100)
	src.gate = make(chan struct{}) // never opened: only Close can end the fetch
	c := New(asVec(src), int64(len(data)), Options{BlockSize: bs})
	readErr := make(chan error, 1)
	go func() {
		_, err := c.ReadAt(make([]byte, bs), 0)
		readErr <- err
	}()
	testenv.Receive(t, src.entered, "a read to reach the source")
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := testenv.Receive(t, readErr, "the read's result"); !errors.Is(err, ErrClosed) {
		t.Fatalf("read during Close got %v, want ErrClosed", err)
	}
	if _, err := c.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("read after Close got %v, want ErrClosed", err)
	}
	if _, err := c.SeekData(context.Background(), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("SeekData after Close got %v, want ErrClosed", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if st := c.Stats(); st.CachedBytes != 0 || c.bufs.live() != 0 {
		t.Fatalf("after Close: %d bytes cached, %d buffers live", st.CachedBytes, c.bufs.live())
	}
	if st := c.Stats(); st.Errors != 0 {
		t.Fatalf("a read cancelled by Close counted as a source error")
	}
}

// Close frees resident blocks; a buffer pinned by a reader at the time is
// freed when the reader is done with it.
func TestCloseFreesMemory(t *testing.T) {
	const bs = 4096
	data := pattern(16 * bs)
	c := New(asVec(newMemSource(data)), int64(len(data)), Options{BlockSize: bs, MaxReadahead: -1})
	readOK(t, c, data, 0, 8*bs)
	b := c.pinForTest(3)
	c.Close()
	if c.bufs.live() != 1 {
		t.Fatalf("%d buffers live after Close with one pinned, want 1", c.bufs.live())
	}
	c.unpin(b)
	if c.bufs.live() != 0 {
		t.Fatalf("%d buffers live after the last reader, want 0", c.bufs.live())
	}
}

func (c *Cache) pinForTest(idx int64) *block {
	var s slot
	if !c.lookup(idx, &s) {
		panic("block not cached")
	}
	return s.b
}

// A pinned block (a reader is copying out of it) is never evicted.
func TestPinnedBlockNotEvicted(t *testing.T) {
	const bs = 4096
	data := pattern(16 * bs)
	c := newTestCache(t, asVec(newMemSource(data)), int64(len(data)), Options{BlockSize: bs, MaxBytes: 2 * bs, MaxReadahead: -1})
	readOK(t, c, data, 0, 2*bs)
	b := c.pinForTest(0)
	readOK(t, c, data, 4*bs, bs) // must evict block 1, not 0
	if !c.resident(0) || c.resident(1) {
		t.Fatal("the pinned block was evicted")
	}
	c.unpin(b)
}

// The counters marshal with snake_case names (snapmount stats prints them).
func TestStatsJSON(t *testing.T) {
	c := newTestCache(t, asVec(newMemSource(pattern(8192))), 8192, Options{BlockSize: 4096, MaxBytes: 1 << 20})
	readOK(t, c, pattern(8192), 0, 100)
	b, err := json.Marshal(c.Stats())
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]int64
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for key, want := range map[string]int64{
		"hits": 0, "misses": 1, "zero_hits": 0, "inflight_joins": 0, "source_reads": 1,
		"bytes_fetched": 4096, "readahead_blocks": 0, "readahead_used": 0, "readahead_wasted": 0,
		"evictions": 0, "cached_bytes": 4096, "max_bytes": 1 << 20, "block_size": 4096, "errors": 0,
		"alloc_queries": 0, "uncached": 0,
	} {
		if got, ok := m[key]; !ok || got != want {
			t.Errorf("%s = %d (present %v), want %d; JSON %s", key, got, ok, want, b)
		}
	}
	if len(m) != 16 {
		t.Errorf("JSON has %d fields, want 16: %s", len(m), b)
	}
}

// Zero blocks hold no data but are still bounded in number.
func TestZeroBlocksBounded(t *testing.T) {
	const bs = 4096
	const blocks = 400
	src := newMemSource(make([]byte, blocks*bs))
	c := newTestCache(t, asVec(src), blocks*bs, Options{BlockSize: bs, MaxBytes: 4 * bs, MaxReadahead: -1})
	for off := int64(0); off < blocks*bs; off += 2 * bs {
		readOK(t, c, src.data, off, 2*bs)
	}
	st := c.Stats()
	if c.entries != c.maxEntries || st.Evictions != blocks-c.maxEntries {
		t.Fatalf("%d blocks kept, %d evicted; want the bound %d kept", c.entries, st.Evictions, c.maxEntries)
	}
	checkStats(t, st, map[string]int64{"CachedBytes": 0, "Misses": blocks})
}

// Close while readers run: each read returns right data or ErrClosed,
// nothing panics or races, and no memory is left.
func TestCloseDuringReads(t *testing.T) {
	const bs = 4096
	data := pattern(256 * bs)
	for _, kind := range sourceKinds {
		t.Run(kind.name, func(t *testing.T) {
			c := New(kind.wrap(newMemSource(data)), int64(len(data)), Options{BlockSize: bs, MaxBytes: 32 * bs})
			var wg sync.WaitGroup
			started := make(chan struct{}, 8)
			for g := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(g), 9))
					for i := 0; ; i++ {
						if i == 10 {
							started <- struct{}{}
						}
						off := r.Int64N(int64(len(data)))
						p := make([]byte, 1+r.IntN(4*bs))
						n, err := c.ReadAt(p, off)
						if errors.Is(err, ErrClosed) {
							return
						}
						end := min(off+int64(len(p)), int64(len(data)))
						if (err != nil && err != io.EOF) || string(p[:n]) != string(data[off:end]) {
							t.Errorf("ReadAt(%d at %d) = %d, %v", len(p), off, n, err)
							return
						}
					}
				}()
			}
			for range 8 {
				testenv.Receive(t, started, "the readers to start")
			}
			c.Close()
			testenv.Wait(t, &wg, "the readers to finish")
			if c.bufs.live() != 0 {
				t.Fatalf("%d buffers live after Close and the last reader", c.bufs.live())
			}
		})
	}
}
