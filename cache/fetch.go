package cache

import (
	"bytes"
	"context"
	"fmt"
	"runtime"
	"sync/atomic"
)

// block is one cached block, resident or in flight. It sits in its
// shard's map from the moment a reader claims it until it is evicted or
// its fetch fails.
type block struct {
	idx int64

	// Written by the fetch before the block is published (fetch.done
	// closed, fetch field cleared under the shard lock); read-only after.
	data []byte // nil for a zero block; len is the block's length, cap BlockSize
	zero bool   // the block reads as zeros and holds no data

	// fetch is non-nil while the block is in flight. Guarded by the
	// shard's mu.
	fetch *fetch

	// refs is one for the index while the block is in it, plus one per
	// reader about to copy out of it. Readers pin (add one) under the
	// shard lock, so an evictor holding that lock and seeing 1 knows
	// nobody reads the block. Whoever drops the last reference returns
	// the buffer.
	refs atomic.Int32

	referenced atomic.Bool // CLOCK bit: read since the hand last passed
	readahead  atomic.Bool // fetched by readahead, not yet read by a caller
	scan       atomic.Bool // fetched for a sequential stream (see clock.go)

	// inScanList says the block is on Cache.scanList; guarded by evictMu.
	inScanList bool

	// prev and next link the CLOCK ring; guarded by Cache.evictMu.
	prev, next *block
}

// cost is what the block charges against MaxBytes.
func (b *block) cost() int64 { return int64(cap(b.data)) }

// fetch is one source request for a run of adjacent blocks, shared by
// every reader waiting for any of them.
type fetch struct {
	off       int64 // offset of blocks[0]
	length    int64 // bytes of all blocks
	blocks    []*block
	readahead bool

	done chan struct{} // closed when err and the blocks are final
	err  error
}

// slotKind says how a read gets one block.
type slotKind uint8

const (
	slotMissing slotKind = iota // not resident: to classify and claim
	slotHit                     // resident, pinned
	slotWait                    // in flight, pinned: wait for f
	slotZero                    // inside a known hole: zeros
	slotDirect                  // no memory to keep it: read straight into p
)

type slot struct {
	kind slotKind
	b    *block
	f    *fetch
}

// readSlow serves [pos, off+len(p)) of p, which holds [off, off+len(p)),
// when some block is not resident:
//
//  1. look every block up: pin resident ones, join fetches in flight;
//  2. for the rest, consult the allocation map: holes need no fetch;
//  3. reserve memory and claim the still-missing blocks, grouping
//     adjacent ones into fetches of at most MaxRequest (MaxMissRequest
//     during the warm-up);
//  4. start the fetches, let readahead look at the read, read blocks
//     there was no memory for straight into p;
//  5. copy everything out in order, waiting where needed.
func (c *Cache) readSlow(ctx context.Context, o *readOut, off, end, pos int64) (int, error) {
	first := c.geo.blockOf(pos)
	slots := make([]slot, c.geo.blockOf(end-1)-first+1)

	missing := 0
	for i := range slots {
		if !c.lookup(first+int64(i), &slots[i]) {
			missing++
		}
	}
	// A small random miss reads its own bytes around the cache; it does
	// not wait for the allocation map either (one more round trip): the
	// map is asked in the background, for later reads, unless it already
	// knows the block is a hole.
	around := missing == 1 && len(slots) == 1 && c.aroundTheCache(first, off, end)
	if around && c.alloc != nil {
		start := c.geo.blockStart(first)
		end := start + int64(c.geo.blockLen(first))
		if around = !c.alloc.isZero(start, end); around {
			c.allocLater(start, end)
		}
	}
	if missing > 0 && c.alloc != nil && !around {
		var lo, hi int64 = -1, 0
		for i := range slots {
			if slots[i].kind == slotMissing {
				idx := first + int64(i)
				if lo < 0 {
					lo = c.geo.blockStart(idx)
				}
				hi = c.geo.blockStart(idx) + int64(c.geo.blockLen(idx))
			}
		}
		if err := c.alloc.ensure(ctx, lo, hi, allocWindow); err != nil && ctx.Err() != nil {
			c.unpinSlots(slots)
			return int(pos - off), fmt.Errorf("cache: read at offset %d: %w", pos, ctx.Err())
		}
		for i := range slots {
			idx := first + int64(i)
			start := c.geo.blockStart(idx)
			if slots[i].kind == slotMissing && c.alloc.isZero(start, start+int64(c.geo.blockLen(idx))) {
				slots[i].kind = slotZero
				c.stats.zeroHits.Add(1)
				missing--
			}
		}
	}
	if around {
		slots[0].kind = slotDirect
		missing = 0
		c.stats.misses.Add(1)
		c.stats.uncached.Add(1)
	}
	var runs []*fetch
	if missing > 0 {
		runs = c.claim(first, slots, missing)
	}
	// All runs but the last go to goroutines, to be read in parallel;
	// the reader reads the last itself, after starting readahead: on few
	// CPUs a hand-off to a fetch goroutine and back costs cold sequential
	// reads much of their throughput. The cost: a reader cancelled while it
	// fetches returns when the fetch ends (the source bounds it), not at
	// once; readers that joined still leave at once.
	var inline *fetch
	if len(runs) > 0 {
		inline = runs[len(runs)-1]
		runs = runs[:len(runs)-1]
	}
	for _, f := range runs {
		if !c.goTracked(func() { c.runFetch(f) }) {
			c.failFetch(f, ErrClosed)
		}
	}
	started, streaming := c.ra.observe(off, int(end-off))
	if streaming {
		for _, f := range append(runs, inline) {
			if f != nil {
				for _, b := range f.blocks {
					b.scan.Store(true)
				}
			}
		}
	}
	if started && inline != nil {
		// Let the prefetches just started put their requests on the
		// wire before this reader is busy with its own fetch (with one
		// CPU they would otherwise wait until it blocks).
		runtime.Gosched()
	}
	if inline != nil && !c.runTracked(func() { c.runFetch(inline) }) {
		c.failFetch(inline, ErrClosed)
	}
	c.readDirect(ctx, o, off, end, first, slots)

	for i := range slots {
		s := &slots[i]
		idx := first + int64(i)
		switch s.kind {
		case slotWait:
			if !isDone(s.f.done) { // a finished fetch wins over a cancelled ctx
				select {
				case <-s.f.done:
				case <-ctx.Done():
					c.unpinSlots(slots[i:])
					return c.doneUpTo(off, idx), fmt.Errorf("cache: read at offset %d: %w", max(off, c.geo.blockStart(idx)), ctx.Err())
				}
			}
			if s.f.err != nil {
				c.unpinSlots(slots[i:])
				return c.doneUpTo(off, idx), s.f.err
			}
			c.deliver(o, s.b, off, end, false)
			s.b = nil
		case slotHit:
			c.deliver(o, s.b, off, end, true)
			s.b = nil
		case slotZero:
			c.deliverZero(o, idx, off, end)
		case slotDirect:
			if s.f != nil && s.f.err != nil {
				c.unpinSlots(slots[i:])
				return c.doneUpTo(off, idx), s.f.err
			}
			if o.lend {
				pOff, _, n := c.geo.part(idx, off, end)
				o.slices = append(o.slices, o.p[pOff:pOff+n])
			}
		}
	}
	return int(end - off), nil
}

// aroundTheCache decides whether a read of [off, end), all in the missing
// block idx, is read around the cache (Options.AdmitOnSecondMiss): when
// it is smaller than the block, continues no stream, and misses the block
// for the first time while remembered.
func (c *Cache) aroundTheCache(idx, off, end int64) bool {
	if c.ghosts == nil || end-off >= int64(c.geo.blockLen(idx)) || c.ra.continues(off, int(end-off)) {
		return false
	}
	return !c.ghosts.admit(idx)
}

func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// doneUpTo returns how many bytes of a read at off precede block idx.
func (c *Cache) doneUpTo(off, idx int64) int {
	return int(max(0, c.geo.blockStart(idx)-off))
}

// lookup finds block idx and fills s: pinned and ready (slotHit), pinned
// and in flight (slotWait), or absent (false).
func (c *Cache) lookup(idx int64, s *slot) bool {
	sh := c.shardOf(idx)
	sh.mu.Lock()
	b := sh.blocks[idx]
	if b == nil {
		sh.mu.Unlock()
		return false
	}
	joined := c.pinLocked(sh, b, s)
	sh.mu.Unlock()
	if joined && c.hookJoined != nil {
		c.hookJoined(idx)
	}
	return true
}

// pinLocked pins b, present in sh, for a reader and counts the lookup. It
// reports whether the reader joins a fetch in flight.
func (c *Cache) pinLocked(sh *shard, b *block, s *slot) bool {
	b.refs.Add(1)
	s.b = b
	if b.fetch != nil {
		sh.joins++
		s.kind, s.f = slotWait, b.fetch
		return true
	}
	if b.zero {
		sh.zeroHits++
	} else {
		sh.hits++
	}
	s.kind = slotHit
	return false
}

// unpinSlots releases the blocks of slots a read gives up on.
func (c *Cache) unpinSlots(slots []slot) {
	for i := range slots {
		if slots[i].b != nil {
			c.unpin(slots[i].b)
			slots[i].b = nil
		}
	}
}

// claim reserves memory for the missing slots and registers them as in
// flight, merging adjacent ones into fetches of at most maxRunBlocks
// (maxMissBlocks until missWarmup bytes were fetched). A
// block someone else claimed meanwhile is pinned or joined instead; blocks
// there is no memory for become slotDirect. The fetches are returned
// unstarted.
func (c *Cache) claim(first int64, slots []slot, missing int) []*fetch {
	reserved := c.reserve(missing, false)
	runBlocks := c.runBlocks()
	var runs []*fetch
	var cur *fetch
	for i := range slots {
		s := &slots[i]
		if s.kind != slotMissing {
			continue
		}
		idx := first + int64(i)
		var buf []byte
		if reserved > 0 {
			buf = c.bufs.get()
		}
		sh := c.shardOf(idx)
		sh.mu.Lock()
		if b := sh.blocks[idx]; b != nil {
			joined := c.pinLocked(sh, b, s)
			sh.mu.Unlock()
			c.bufs.put(buf)
			if joined && c.hookJoined != nil {
				c.hookJoined(idx)
			}
			continue
		}
		sh.misses++
		if buf == nil {
			sh.mu.Unlock()
			s.kind = slotDirect
			continue
		}
		reserved--
		if cur == nil || cur.blocks[len(cur.blocks)-1].idx != idx-1 || len(cur.blocks) == runBlocks {
			cur = &fetch{off: c.geo.blockStart(idx), done: make(chan struct{})}
			runs = append(runs, cur)
		}
		b := c.addToFetch(cur, idx, buf)
		b.refs.Store(2) // the index and this reader
		sh.blocks[idx] = b
		sh.mu.Unlock()
		s.kind, s.b, s.f = slotWait, b, cur
	}
	c.unreserve(reserved)
	return runs
}

// runBlocks is how many blocks one fetch merges: maxMissBlocks until
// missWarmup bytes were fetched, then maxRunBlocks.
func (c *Cache) runBlocks() int {
	if c.stats.bytesFetched.Load() < c.missWarmup {
		return c.maxMissBlocks
	}
	return c.maxRunBlocks
}

// addToFetch makes the in-flight block idx, with buffer buf, part of f.
func (c *Cache) addToFetch(f *fetch, idx int64, buf []byte) *block {
	n := c.geo.blockLen(idx)
	b := &block{idx: idx, data: buf[:n], fetch: f}
	f.blocks = append(f.blocks, b)
	f.length += int64(n)
	return b
}

// readDirect reads the slotDirect blocks, those there was no memory to
// cache, straight into o.p: adjacent ones in one request. The outcome is
// kept in each slot's f (done already closed). A lending read has no
// buffer of its own; one is made for the read's range if needed.
func (c *Cache) readDirect(ctx context.Context, o *readOut, off, end int64, first int64, slots []slot) {
	for i := range slots {
		if slots[i].kind == slotDirect && o.p == nil {
			o.p = make([]byte, end-off)
			break
		}
	}
	p := o.p
	for i := 0; i < len(slots); {
		if slots[i].kind != slotDirect {
			i++
			continue
		}
		j := i
		for j < len(slots) && slots[j].kind == slotDirect {
			j++
		}
		lo, _, _ := c.geo.part(first+int64(i), off, end)
		hiOff, _, n := c.geo.part(first+int64(j-1), off, end)
		r := &fetch{done: make(chan struct{})}
		r.err = c.readSource(ctx, p[lo:hiOff+n], off+int64(lo))
		close(r.done)
		for k := i; k < j; k++ {
			slots[k].f = r
		}
		i = j
	}
}

// runFetch reads f's blocks from the source and publishes them. It runs
// under the cache's context, not a reader's: see the package
// documentation.
func (c *Cache) runFetch(f *fetch) {
	if err := c.fill(c.ctx, f); err != nil {
		c.failFetch(f, err)
		return
	}
	c.completeFetch(f)
}

// fill reads the source into f's block buffers: through VectorReader
// straight into them, else into one scratch buffer that is then split, or,
// when no scratch buffer is free, block by block.
func (c *Cache) fill(ctx context.Context, f *fetch) error {
	if c.vecSrc != nil {
		bufs := make([][]byte, len(f.blocks))
		for i, b := range f.blocks {
			bufs[i] = b.data
		}
		return c.readSourceVec(ctx, bufs, f.off, f.length)
	}
	if len(f.blocks) > 1 {
		if scratch := c.scratch.get(); scratch != nil {
			defer c.scratch.put(scratch)
			if err := c.readSource(ctx, scratch[:f.length], f.off); err != nil {
				return err
			}
			rest := scratch[:f.length]
			for _, b := range f.blocks {
				rest = rest[copy(b.data, rest):]
			}
			return nil
		}
	}
	for _, b := range f.blocks {
		if err := c.readSource(ctx, b.data, c.geo.blockStart(b.idx)); err != nil {
			return err
		}
	}
	return nil
}

// completeFetch publishes f's blocks: all-zero ones give their buffer
// back and become zero blocks, all enter the CLOCK ring, then waiters are
// released.
func (c *Cache) completeFetch(f *fetch) {
	var freed int64
	for _, b := range f.blocks {
		if isZero(b.data) {
			freed += b.cost()
			if b.readahead.Load() {
				c.readaheadBytes.Add(-b.cost())
			}
			c.bufs.put(b.data)
			b.data, b.zero = nil, true
		}
	}
	if f.readahead {
		c.stats.readaheadBlocks.Add(int64(len(f.blocks)))
	}
	c.evictMu.Lock()
	c.used -= freed
	for _, b := range f.blocks {
		sh := c.shardOf(b.idx)
		sh.mu.Lock()
		b.fetch = nil
		sh.mu.Unlock()
		c.ringInsertLocked(b)
	}
	c.evictMu.Unlock()
	close(f.done)
}

// failFetch drops f's blocks from the index, so a later read tries again,
// and releases f's waiters with err. Errors are never cached.
func (c *Cache) failFetch(f *fetch, err error) {
	var cost int64
	for _, b := range f.blocks {
		sh := c.shardOf(b.idx)
		sh.mu.Lock()
		if sh.blocks[b.idx] == b {
			delete(sh.blocks, b.idx)
		}
		sh.mu.Unlock()
		cost += b.cost()
		if b.readahead.CompareAndSwap(true, false) {
			c.readaheadBytes.Add(-b.cost())
		}
	}
	c.evictMu.Lock()
	c.used -= cost
	c.entries -= int64(len(f.blocks))
	c.evictMu.Unlock()
	for _, b := range f.blocks {
		c.unpin(b) // the index's reference
	}
	f.err = err
	close(f.done)
}

// isZero reports whether b holds only zero bytes: its first byte is zero
// and every byte equals the one before it. Real data almost always has a
// non-zero first or last byte, so the full comparison is rare. (nbd.AllZero
// is the same test; the cache does not import nbd.)
func isZero(b []byte) bool {
	return len(b) == 0 || b[0] == 0 && b[len(b)-1] == 0 && bytes.Equal(b[1:], b[:len(b)-1])
}
