package cache

import (
	"bytes"
	"testing"
)

// scanCache is a cache that recognises streams but does not prefetch,
// as the mount runs it when the kernel reads ahead: evictions then follow
// the reads exactly, so the tests are deterministic. opt adds options.
func scanCache(t *testing.T, src *memSource, size, bs, budgetBlocks int64, opt Options) *Cache {
	opt.BlockSize, opt.MaxBytes, opt.MaxReadahead = int(bs), budgetBlocks*bs, 4*bs
	c := newTestCache(t, asVec(src), size, opt)
	c.SetMaxReadahead(0)
	return c
}

// scanKeepLimit is the most blocks a scan may keep cached with a budget
// of budget blocks: the scan share, the first read's 2 blocks (not yet a
// stream) and the 2-block read in progress when the share was reached,
// plus one.
func scanKeepLimit(budget int64) int64 { return budget/scanShare + 2 + 2 + 1 }

// scanThrough reads the first n blocks sequentially in 2-block reads: a
// stream from its second read on.
func scanThrough(t *testing.T, c *Cache, data []byte, bs, n int64) {
	t.Helper()
	for off := int64(0); off < n*bs; off += 2 * bs {
		readOK(t, c, data, off, int(2*bs))
	}
	idle(c)
}

// scannedCache returns a cache of budget blocks of 4 KiB (and opt) over
// an export of n blocks, its source and data, after one scan of the whole
// export.
func scannedCache(t *testing.T, n, budget int64, opt Options) (*Cache, *memSource, []byte) {
	t.Helper()
	const bs = 4096
	data := pattern(int(n * bs))
	src := newMemSource(data)
	c := scanCache(t, src, int64(len(data)), bs, budget, opt)
	scanThrough(t, c, data, bs, n)
	return c, src, data
}

// A long sequential read must not flush what other reads use: blocks read
// twice (a working set) survive a scan of many times the budget.
func TestScanKeepsWorkingSet(t *testing.T) {
	const bs = 4096
	data := pattern(256 * bs)
	src := newMemSource(data)
	c := scanCache(t, src, int64(len(data)), bs, 16, Options{})
	hot := []int64{200, 210, 220, 230}
	for range 2 {
		for _, b := range hot {
			readOK(t, c, data, b*bs, bs)
		}
	}
	scanThrough(t, c, data, bs, 128)
	before := len(src.Calls())
	for _, b := range hot {
		readOK(t, c, data, b*bs, bs)
	}
	if n := len(src.Calls()) - before; n != 0 {
		t.Fatalf("the working set was flushed by the scan: %d source reads to read it again", n)
	}
	if st := c.Stats(); st.CachedBytes > 16*bs {
		t.Fatalf("cached %d bytes, budget %d", st.CachedBytes, 16*bs)
	}
}

// A scan of an export larger than the cache recycles its own most recent
// blocks once they hold 1/scanShare of the budget, so its start stays
// cached for a second pass (plain CLOCK, like LRU, keeps its end, and a
// second pass then misses everywhere). The first read is not yet known to
// be a stream, so the kept part starts at its second.
func TestScanKeepsItsStart(t *testing.T) {
	const bs, budget = 4096, 64
	c, src, data := scannedCache(t, 256, budget, Options{})
	before := len(src.Calls())
	readOK(t, c, data, 2*bs, budget/scanShare*bs)
	if n := len(src.Calls()) - before; n != 0 {
		t.Fatalf("the start of the scan was evicted: %d source reads to read blocks 2-%d again", n, 2+budget/scanShare-1)
	}
}

// Such a scan does not grow into the rest of the budget: it reuses its
// buffers, so a long first pass touches little fresh memory.
func TestScanRecyclesBeforeTheBudgetIsFull(t *testing.T) {
	const bs, budget = 4096, 64
	c, _, _ := scannedCache(t, 256, budget, Options{})
	limit := scanKeepLimit(budget)
	if st := c.Stats(); st.CachedBytes > limit*bs {
		t.Fatalf("a scan of 256 blocks kept %d blocks cached, want at most %d of a %d-block budget", st.CachedBytes/bs, limit, budget)
	}
	if n := c.bufs.live(); int64(n) > limit {
		t.Fatalf("a scan of 256 blocks made %d block buffers, want at most %d", n, limit)
	}
}

// A scan of an export that fits in the budget is kept whole.
func TestScanOfASmallExportStaysCached(t *testing.T) {
	c, src, data := scannedCache(t, 48, 64, Options{})
	before := len(src.Calls())
	readOK(t, c, data, 0, len(data))
	if n := len(src.Calls()) - before; n != 0 {
		t.Fatalf("a scan of an export that fits in the cache lost blocks: %d source reads to read it again", n)
	}
}

// Through the mount, reads are lent (ReadSlices) and the kernel keeps
// several in flight, so the newest scan blocks are pinned when the next
// read needs memory: recycling must look past them.
func TestScanRecyclesPastPinnedReads(t *testing.T) {
	const bs, budget, perRead = 4096, 256, 32
	data := pattern(1024 * bs)
	src := newMemSource(data)
	c := scanCache(t, src, int64(len(data)), bs, budget, Options{})
	var held []func()
	for off := int64(0); off < int64(len(data)); off += perRead * bs {
		slices, release, err := c.ReadSlices(t.Context(), off, make([]byte, perRead*bs))
		if err != nil {
			t.Fatal(err)
		}
		if got := joined(slices); !bytes.Equal(got, data[off:off+perRead*bs]) {
			t.Fatalf("wrong data at %d", off)
		}
		held = append(held, release)
		if len(held) > 2 { // two reads in flight, as the kernel would
			held[0]()
			held = held[1:]
		}
	}
	for _, r := range held {
		r()
	}
	idle(c)
	limit := int64(budget/scanShare + 4*perRead)
	if st := c.Stats(); st.CachedBytes > limit*bs {
		t.Fatalf("a lent scan of 1024 blocks kept %d blocks cached, want at most %d of a %d-block budget", st.CachedBytes/bs, limit, budget)
	}
}
