package cache

import (
	"cmp"
	"context"
	"errors"
	"io"
	"slices"
	"sync"
	"testing"

	"snapmount/test/testenv"
)

// A sequential reader is served from readahead after its second read: the
// window starts at two blocks, grows while the reader keeps up, never
// exceeds the maximum, and requests never exceed MaxRequest. Until
// MissWarmup bytes were fetched, readahead requests are at most
// MaxMissRequest, as a read's own misses are (a fresh server connection
// pays for large requests in fresh memory); after it they merge up to
// MaxRequest.
func TestReadaheadSequential(t *testing.T) {
	const bs = 4096
	const maxWindow = 16 * bs
	const maxReq = 8 * bs
	const warmup = 32 * bs
	data := pattern(256 * bs)
	src := newMemSource(data)
	c := newTestCache(t, asVec(src), int64(len(data)), Options{
		BlockSize: bs, MaxBytes: 256 * bs, MaxRequest: maxReq, MaxMissRequest: bs, MissWarmup: warmup, MaxReadahead: maxWindow,
	})
	const reads = 64
	for i := range int64(reads) {
		readOK(t, c, data, i*bs, bs)
		idle(c) // let readahead land, so each read is a hit, not a join
		st := c.Stats()
		if ahead := st.ReadaheadBlocks - st.ReadaheadUsed; ahead*bs > maxWindow {
			t.Fatalf("after read %d, %d blocks prefetched and unread; window max is %d", i, ahead, maxWindow/bs)
		}
	}
	st := c.Stats()
	checkStats(t, st, map[string]int64{
		"Misses": 2, "Hits": reads - 2, "InflightJoins": 0, "ReadaheadUsed": reads - 2, "ReadaheadWasted": 0,
	})
	calls := src.Calls()
	// Readahead runs beside the demand fetch: order by offset.
	slices.SortFunc(calls, func(a, b call) int { return cmp.Compare(a.off, b.off) })
	if calls[0] != (call{0, bs, 1}) || calls[1] != (call{bs, bs, 1}) {
		t.Fatalf("first requests %v, want the two demand reads", calls[:2])
	}
	ra := calls[2:]
	if ra[0] != (call{2 * bs, bs, 1}) || ra[1] != (call{3 * bs, bs, 1}) {
		t.Fatalf("first readahead %+v, want blocks 2-3 (a two-block window) one block each (warm-up)", ra[:2])
	}
	biggest, before := int64(0), int64(2*bs)
	for i, cl := range ra {
		if cl.n > maxReq {
			t.Fatalf("readahead request %+v exceeds MaxRequest", cl)
		}
		// Everything fetched when this request started lies before it.
		if cl.n > bs && before < warmup {
			t.Fatalf("readahead request %+v merges blocks with only %d bytes before it, during the %d-byte warm-up", cl, before, warmup)
		}
		if i > 0 && cl.off != ra[i-1].off+ra[i-1].n {
			t.Fatalf("readahead requests %v are not contiguous", ra)
		}
		biggest = max(biggest, cl.n)
		before += cl.n
	}
	if biggest != maxReq {
		t.Fatalf("largest readahead request %d bytes; the window never grew to MaxRequest", biggest)
	}
	if int64(len(ra)) != st.SourceReads-2 || int64(len(ra)) > warmup/bs+reads/4 {
		t.Fatalf("%d readahead requests for %d blocks: not merged after the warm-up", len(ra), st.ReadaheadBlocks)
	}
}

// Readahead stops at the end of the source.
func TestReadaheadAtEnd(t *testing.T) {
	const bs = 4096
	data := pattern(10*bs + 123)
	src := newMemSource(data) // the fake fails any request past the end
	c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs})
	for off := int64(0); off < int64(len(data)); off += bs {
		readOK(t, c, data, off, bs)
		idle(c)
	}
	readOK(t, c, data, 0, len(data)+100)
	checkStats(t, c.Stats(), map[string]int64{"Errors": 0, "Misses": 2, "ReadaheadWasted": 0})
}

// Random reads never trigger readahead.
func TestReadaheadNotOnRandomReads(t *testing.T) {
	const bs = 4096
	data := pattern(1024 * bs)
	src := newMemSource(data)
	c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs})
	// Blocks 4k in shuffled order: no read starts within a few blocks of
	// where another ended.
	order := []int64{37, 3, 200, 11, 150, 90, 4, 255, 60, 128, 17, 201, 99, 36, 2, 180}
	for _, k := range order {
		readOK(t, c, data, 4*k*bs, bs)
		idle(c)
	}
	checkStats(t, c.Stats(), map[string]int64{
		"ReadaheadBlocks": 0, "SourceReads": int64(len(order)), "Misses": int64(len(order)),
	})
}

// Several interleaved sequential streams each get their own readahead.
func TestReadaheadInterleavedStreams(t *testing.T) {
	const bs = 4096
	const streams = numStreams
	const per = 32
	data := pattern(streams * 64 * bs)
	// Windows small enough that all streams' readahead fits the budget.
	c := newTestCache(t, asVec(newMemSource(data)), int64(len(data)), Options{BlockSize: bs, MaxBytes: 1 << 20, MaxReadahead: 8 * bs})
	for i := range int64(per) {
		for s := range int64(streams) {
			readOK(t, c, data, (s*64+i)*bs, bs)
			idle(c)
		}
	}
	checkStats(t, c.Stats(), map[string]int64{
		"Misses": 2 * streams, "Hits": (per - 2) * streams, "ReadaheadUsed": (per - 2) * streams,
	})
}

// Readahead blocks evicted before anyone read them count as wasted.
func TestReadaheadWasted(t *testing.T) {
	const bs = 4096
	data := pattern(128 * bs)
	c := newTestCache(t, asVec(newMemSource(data)), int64(len(data)), Options{BlockSize: bs, MaxBytes: 8 * bs})
	readOK(t, c, data, 0, bs)
	readOK(t, c, data, bs, bs) // readahead of blocks 2-3
	idle(c)
	checkStats(t, c.Stats(), map[string]int64{"ReadaheadBlocks": 2})
	for k := int64(2); k < 10; k++ { // far apart: no stream, no readahead
		readOK(t, c, data, 10*k*bs, bs)
	}
	checkStats(t, c.Stats(), map[string]int64{
		"Evictions": 4, "ReadaheadWasted": 2, "ReadaheadUsed": 0, "ReadaheadBlocks": 2, "CachedBytes": 8 * bs,
	})
}

// Readahead may not evict blocks readahead fetched that nobody has read
// yet; demand reads may.
func TestReadaheadReserveSparesUnreadReadahead(t *testing.T) {
	const bs = 4096
	data := pattern(16 * bs)
	c := newTestCache(t, asVec(newMemSource(data)), int64(len(data)), Options{BlockSize: bs, MaxBytes: 4 * bs, MaxReadahead: -1})
	c.readaheadCap = 4 * bs
	readOK(t, c, data, 0, 4*bs)
	for _, idx := range []int64{0, 1} { // pretend readahead fetched these
		b := c.pinForTest(idx)
		b.readahead.Store(true)
		c.readaheadBytes.Add(bs)
		c.unpin(b)
	}
	if got := c.reserve(3, true); got != 2 {
		t.Fatalf("readahead reserved %d blocks, want 2 (blocks 2 and 3 evicted)", got)
	}
	if !c.resident(0) || !c.resident(1) || c.resident(2) || c.resident(3) {
		t.Fatal("readahead evicted an unread readahead block")
	}
	if got := c.reserve(1, false); got != 1 {
		t.Fatalf("demand reserved %d blocks, want 1", got)
	}
	c.unreserve(3)
	checkStats(t, c.Stats(), map[string]int64{"ReadaheadWasted": 1, "Evictions": 3})
}

// At most readaheadPerStream requests per stream and readaheadWorkers in
// all are outstanding; the rest is skipped, not queued.
func TestReadaheadConcurrencyBounds(t *testing.T) {
	const bs = 4096
	t.Run("per stream", func(t *testing.T) {
		data := pattern(64 * bs)
		src := newMemSource(data)
		src.hold = func(off int64) bool { return off >= 2*bs } // hold readahead only
		src.entered = make(chan call, 16)
		src.gate = make(chan struct{})
		c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs, MaxRequest: bs})
		readOK(t, c, data, 0, bs)
		readOK(t, c, data, bs, bs) // two one-block readahead requests: the limit
		testenv.Receive(t, src.entered, "a read to reach the source")
		testenv.Receive(t, src.entered, "a read to reach the source")
		// Continue the stream into the held blocks; the window would grow
		// and ask for more, but the stream has its two requests out. The
		// read itself gives up at once.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := c.ReadAtContext(ctx, make([]byte, bs), 2*bs); !errors.Is(err, context.Canceled) {
			t.Fatalf("read of a held block got %v, want context.Canceled", err)
		}
		if n := c.ra.outstanding(); n != readaheadPerStream {
			t.Fatalf("%d readahead requests outstanding, want %d", n, readaheadPerStream)
		}
		close(src.gate)
		idle(c)
		checkStats(t, c.Stats(), map[string]int64{"ReadaheadBlocks": 2})
	})
	t.Run("warm-up", func(t *testing.T) {
		// Requests of one block (MaxMissRequest) where MaxRequest is
		// four: a stream may have four times as many outstanding.
		const scale = 4
		data := pattern(256 * bs)
		src := newMemSource(data)
		src.hold = func(off int64) bool { return off >= 2*bs }
		src.entered = make(chan call, 16)
		src.gate = make(chan struct{})
		c := newTestCache(t, asVec(src), int64(len(data)), Options{
			BlockSize: bs, MaxRequest: scale * bs, MaxMissRequest: bs, MissWarmup: 1 << 30, MaxReadahead: 64 * bs,
		})
		await := func(n int) { // n more requests reach the source
			for range n {
				if cl := testenv.Receive(t, src.entered, "a readahead request to reach the source"); cl.n != bs {
					t.Fatalf("readahead request %+v during the warm-up, want one block", cl)
				}
			}
		}
		readOK(t, c, data, 0, bs)
		readOK(t, c, data, bs, bs) // a two-block window: blocks 2 and 3
		await(2)
		// Continue the stream into the held blocks, so that the window
		// grows; each read gives up at once.
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		for k, more := range []int{3, 0, 3} { // blocks 4-6, then 7-9 (the bound)
			c.ReadAtContext(ctx, make([]byte, bs), int64(2+k)*bs)
			await(more)
		}
		if n := c.ra.outstanding(); n != readaheadPerStream*scale {
			t.Fatalf("%d readahead requests outstanding, want %d", n, readaheadPerStream*scale)
		}
		close(src.gate)
		idle(c)
	})
	t.Run("all streams", func(t *testing.T) {
		data := pattern(numStreams * 16 * bs)
		src := newMemSource(data)
		src.hold = func(off int64) bool { return off%(16*bs) >= 2*bs }
		src.entered = make(chan call, 16)
		src.gate = make(chan struct{})
		c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs})
		for s := range int64(numStreams) {
			readOK(t, c, data, s*16*bs, 2*bs)
			readOK(t, c, data, (s*16+2)*bs-bs/2, bs/2) // continues: wants readahead
		}
		for range readaheadWorkers {
			testenv.Receive(t, src.entered, "a read to reach the source")
		}
		if n := c.ra.outstanding(); n != readaheadWorkers {
			t.Fatalf("%d readahead requests outstanding, want %d", n, readaheadWorkers)
		}
		close(src.gate)
		idle(c)
		checkStats(t, c.Stats(), map[string]int64{"ReadaheadBlocks": 2 * readaheadWorkers})
	})
}

// Close stops readahead that is waiting on the source and waits for it.
func TestCloseStopsReadahead(t *testing.T) {
	const bs = 4096
	data := pattern(64 * bs)
	src := newMemSource(data)
	src.hold = func(off int64) bool { return off >= 2*bs }
	src.entered = make(chan call, 16)
	src.gate = make(chan struct{}) // never opened
	c := New(asVec(src), int64(len(data)), Options{BlockSize: bs})
	readOK(t, c, data, 0, bs)
	readOK(t, c, data, bs, bs)
	testenv.Receive(t, src.entered, "readahead to reach the source")
	c.Close() // returns only once the readahead goroutine is done
	if n := c.ra.outstanding(); n != 0 {
		t.Fatalf("%d readahead requests still outstanding after Close", n)
	}
	if c.bufs.live() != 0 {
		t.Fatalf("%d buffers live after Close", c.bufs.live())
	}
	checkStats(t, c.Stats(), map[string]int64{"Errors": 0, "ReadaheadBlocks": 0})
}

// Sequential readers running flat out, no waiting between reads: reads
// join readahead in flight, the data is right and the budget holds.
func TestReadaheadConcurrentStreams(t *testing.T) {
	const bs = 4096
	const budget = 32 * bs
	data := pattern(512 * bs)
	for _, kind := range sourceKinds {
		t.Run(kind.name, func(t *testing.T) {
			c := newTestCache(t, kind.wrap(newMemSource(data)), int64(len(data)), Options{
				BlockSize: bs, MaxBytes: budget, MaxRequest: 4 * bs,
			})
			var wg sync.WaitGroup
			for s := range 4 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for off := int64(s * 128 * bs); off < int64(s+1)*128*bs; off += 3000 {
						p := make([]byte, 3000)
						n, err := c.ReadAt(p, off)
						end := min(off+3000, int64(len(data)))
						if (err != nil && err != io.EOF) || string(p[:n]) != string(data[off:end]) {
							t.Errorf("ReadAt(3000 at %d) = %d, %v", off, n, err)
							return
						}
					}
				}()
			}
			testenv.Wait(t, &wg, "the readers to finish")
			idle(c)
			st := c.Stats()
			if st.CachedBytes > budget || c.bufs.live() > budget/bs {
				t.Fatalf("cached %d bytes in %d buffers; budget %d", st.CachedBytes, c.bufs.live(), budget)
			}
			if st.ReadaheadUsed == 0 || st.ReadaheadUsed > st.ReadaheadBlocks {
				t.Fatalf("readahead used %d of %d blocks", st.ReadaheadUsed, st.ReadaheadBlocks)
			}
		})
	}
}

// A read that finds its block still being prefetched waits for that
// fetch: a join, and the readahead counts as used.
func TestReadaheadJoined(t *testing.T) {
	const bs = 4096
	data := pattern(64 * bs)
	src := newMemSource(data)
	src.hold = func(off int64) bool { return off >= 2*bs }
	src.entered = make(chan call, 2)
	src.gate = make(chan struct{})
	c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs})
	joined := make(chan int64, 1)
	c.hookJoined = func(idx int64) { joined <- idx }
	readOK(t, c, data, 0, bs)
	readOK(t, c, data, bs, bs)
	testenv.Receive(t, src.entered, "the readahead of blocks 2-3 to reach the source")
	done := make(chan struct{})
	go func() {
		defer close(done)
		readOK(t, c, data, 2*bs, bs)
	}()
	if idx := testenv.Receive(t, joined, "a read to join the fetch in flight"); idx != 2 {
		t.Fatalf("joined block %d, want 2", idx)
	}
	close(src.gate)
	testenv.Receive(t, done, "the reader to finish")
	idle(c)
	// The read of block 2 also grew the window: blocks 4-6 were prefetched.
	checkStats(t, c.Stats(), map[string]int64{
		"InflightJoins": 1, "ReadaheadUsed": 1, "Misses": 2, "Hits": 0, "ReadaheadBlocks": 5,
	})
}

// The first read of a prefetched block is its first use, not a second
// chance: a one-pass sequential reader's blocks go before blocks read
// twice.
func TestReadaheadFirstUseIsNotAHit(t *testing.T) {
	const bs = 4096
	data := pattern(16 * bs)
	c := newTestCache(t, asVec(newMemSource(data)), int64(len(data)), Options{BlockSize: bs, MaxBytes: 4 * bs, MaxReadahead: -1})
	readOK(t, c, data, 0, 4*bs)
	b := c.pinForTest(0) // pretend readahead fetched block 0
	b.readahead.Store(true)
	c.readaheadBytes.Add(bs)
	c.unpin(b)
	readOK(t, c, data, 0, 2*bs) // first use of block 0, second read of block 1
	readOK(t, c, data, 8*bs, bs)
	if c.resident(0) || !c.resident(1) || !c.resident(2) {
		t.Fatal("the once-read prefetched block outlived a block read twice or a newer one")
	}
	checkStats(t, c.Stats(), map[string]int64{"ReadaheadUsed": 1, "ReadaheadWasted": 0, "Evictions": 1})
}

// Large reads are the kernel's readahead, several in flight, so they may
// arrive further out of order and still continue their stream, up to
// lateReads behind its end (overtaken by the rest of what is in flight);
// small reads that far off do not.
func TestReadaheadSlackForLargeReads(t *testing.T) {
	const bs = 4096
	data := pattern(256 * bs)
	c := newTestCache(t, asVec(newMemSource(data)), int64(len(data)), Options{BlockSize: bs})
	const large = 4 * bs
	c.ra.observe(0, large) // a stream ending at one read
	if !c.ra.continues(5*large, large) {
		t.Fatal("a 4-block read four reads past the stream's end does not continue it")
	}
	if c.ra.continues(6*large, large) {
		t.Fatal("a 4-block read five reads past the stream's end continues it")
	}
	c.ra.observe(200*bs, large) // a stream ending at block 204
	if !c.ra.continues(204*bs-lateReads*large, large) {
		t.Fatalf("a 4-block read %d reads behind the stream's end does not continue it", lateReads)
	}
	if c.ra.continues(204*bs-(lateReads+1)*large-bs, large) {
		t.Fatalf("a 4-block read more than %d reads behind the stream's end continues it", lateReads)
	}
	c.ra.observe(100*bs, bs) // a stream of 1-block reads
	if c.ra.continues(104*bs, bs) {
		t.Fatal("a 1-block read three reads past a stream's end continues it")
	}
	if c.ra.continues(97*bs, bs) {
		t.Fatal("a 1-block read three reads behind a stream's end continues it")
	}
}

// outstanding returns how many readahead requests are running.
func (r *readahead) outstanding() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.inflight
}
