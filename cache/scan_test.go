package cache

import "testing"

// scanCache is a cache that recognises streams but does not prefetch,
// as the mount runs it when the kernel reads ahead: evictions then follow
// the reads exactly, so the tests are deterministic.
func scanCache(t *testing.T, src *memSource, size, bs int64) *Cache {
	c := newTestCache(t, asVec(src), size, Options{BlockSize: int(bs), MaxBytes: 16 * bs, MaxReadahead: 4 * bs})
	c.SetMaxReadahead(0)
	return c
}

// scanThrough reads 128 blocks sequentially in 2-block reads: a stream
// from its second read on.
func scanThrough(t *testing.T, c *Cache, data []byte, bs int64) {
	t.Helper()
	for off := int64(0); off < 128*bs; off += 2 * bs {
		readOK(t, c, data, off, int(2*bs))
	}
	idle(c)
}

// A long sequential read must not flush what other reads use: blocks read
// twice (a working set) survive a scan of many times the budget.
func TestScanKeepsWorkingSet(t *testing.T) {
	const bs = 4096
	data := pattern(256 * bs)
	src := newMemSource(data)
	c := scanCache(t, src, int64(len(data)), bs)
	hot := []int64{200, 210, 220, 230}
	for range 2 {
		for _, b := range hot {
			readOK(t, c, data, b*bs, bs)
		}
	}
	scanThrough(t, c, data, bs)
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

// A scan larger than the cache recycles its own most recent blocks, so
// its start stays cached for a second pass (plain CLOCK, like LRU, keeps
// its end, and a second pass then misses everywhere). The first read is
// not yet known to be a stream, so the kept part starts at its second.
func TestScanKeepsItsStart(t *testing.T) {
	const bs = 4096
	data := pattern(256 * bs)
	src := newMemSource(data)
	c := scanCache(t, src, int64(len(data)), bs)
	scanThrough(t, c, data, bs)
	before := len(src.Calls())
	readOK(t, c, data, 2*bs, 10*bs)
	if n := len(src.Calls()) - before; n != 0 {
		t.Fatalf("the start of the scan was evicted: %d source reads to read blocks 2-11 again", n)
	}
}
