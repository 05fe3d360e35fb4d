package cache

import "sync"

// Readahead recognises sequential streams by where reads start: a small
// table remembers where each recent stream's last read ended, and a read
// that starts there (give or take reordering) continues it. A stream's
// second read confirms it and opens a window of initialWindowBlocks; each
// time the reader has consumed half the prefetched data the window
// doubles, up to the maximum, and is topped up. A read matching no stream
// starts a new one in the least recently used slot, so random reads never
// trigger readahead and several interleaved streams each keep their own
// window (like nbdkit's readahead filter and Linux's, but per stream).
//
// Prefetches run in the background with bounded concurrency: at most
// readaheadPerStream requests per stream and readaheadWorkers in all, each
// at most MaxRequest. During the warm-up (Options.MaxMissRequest) requests
// are smaller, and the bounds grow by as much, so that as many bytes are in
// flight. When either bound is reached the readahead is skipped, not
// queued, so it can never delay or flood demand reads; the next read of
// the stream tops it up.
const (
	numStreams          = 8
	initialWindowBlocks = 2
	readaheadPerStream  = 2
	readaheadWorkers    = 4
	// reorderReads: FUSE hands a stream's reads to several goroutines, so
	// they can arrive slightly out of order. A read that starts within
	// this many read lengths of a stream's end still continues it.
	reorderReads = 2
)

type stream struct {
	next     int64  // where the stream's furthest read ended
	raEnd    int64  // readahead was issued up to here
	window   int64  // bytes to keep prefetched ahead of next; 0 until confirmed
	inflight int    // readahead requests running for this stream
	gen      uint64 // 0: free slot; changes whenever the slot is reused
	lastUse  uint64
}

type readahead struct {
	c             *Cache
	maxWindow     int64
	initialWindow int64

	// mu guards the fields below.
	mu       sync.Mutex
	streams  [numStreams]stream
	tick     uint64
	gens     uint64
	inflight int // readahead requests running, all streams
}

// setMaxWindow changes the largest window; 0 stops prefetching but keeps
// recognising streams.
func (r *readahead) setMaxWindow(n int64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.maxWindow = max(0, min(n, r.c.maxBytes/4)&^(r.c.geo.blockSize-1))
	r.initialWindow = min(r.initialWindow, r.maxWindow)
	for i := range r.streams {
		r.streams[i].window = min(r.streams[i].window, r.maxWindow)
	}
}

func newReadahead(c *Cache, maxReadahead int64) *readahead {
	bs := c.geo.blockSize
	maxWindow := min(maxReadahead, c.maxBytes/4) &^ (bs - 1)
	if maxWindow < bs {
		return nil
	}
	return &readahead{
		c:             c,
		maxWindow:     maxWindow,
		initialWindow: min(initialWindowBlocks*bs, maxWindow),
	}
}

// observe feeds a caller's read of n bytes at off to the stream table and
// starts readahead when a stream asks for it. A nil readahead does
// nothing.
//
// It reports whether it started prefetches, and whether the read
// continues a sequential stream.
func (r *readahead) observe(off int64, n int) (started, streaming bool) {
	if r == nil {
		return false, false
	}
	end := off + int64(n)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.tick++
	best := r.nearestLocked(off, n)
	if best < 0 {
		r.startStreamLocked(end)
		return false, false
	}
	s := &r.streams[best]
	s.lastUse = r.tick
	s.next = max(s.next, end)
	if r.maxWindow == 0 {
		return false, true // prefetching is off; streams still count as scans
	}
	if s.window == 0 {
		s.window = r.initialWindow
	} else if s.raEnd-s.next > s.window/2 {
		return false, true // enough is prefetched
	} else {
		s.window = min(2*s.window, r.maxWindow)
	}
	return r.issueLocked(best), true
}

// continues reports whether a read of n bytes at off would continue a
// stream (as observe would find it), without recording anything. A nil
// readahead knows no streams.
func (r *readahead) continues(off int64, n int) bool {
	if r == nil {
		return false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.nearestLocked(off, n) >= 0
}

// nearestLocked returns the slot of the stream a read of n bytes at off
// continues (the one whose end is nearest, within the slack), or -1.
func (r *readahead) nearestLocked(off int64, n int) int {
	ahead, behind := r.slack(n)
	best := -1
	var bestDist int64
	for i := range r.streams {
		s := &r.streams[i]
		if s.gen == 0 {
			continue
		}
		d, limit := off-s.next, ahead
		if d < 0 {
			d, limit = -d, behind
		}
		if d <= limit && (best < 0 || d < bestDist) {
			best, bestDist = i, d
		}
	}
	return best
}

// lateReads is how many reads behind its stream's end a large read may
// start and still continue it (see slack).
const lateReads = 16

// slack is how far a read of n bytes may start ahead of a stream's end
// (it overtook reads of the stream) or behind it (it was overtaken) and
// still continue it.
func (r *readahead) slack(n int) (ahead, behind int64) {
	ahead = reorderReads * max(int64(n), r.c.geo.blockSize)
	behind = ahead
	if int64(n) >= 4*r.c.geo.blockSize {
		// Reads this large are the kernel's readahead, with several in
		// flight (a 4 MiB window in 1 MiB reads): more reordering. With
		// 2 reads of slack, parts of a cold 1 GiB read through the mount
		// were not seen as the stream (79-81 MiB stayed cached of the
		// then 32 MiB scan share; with 4 reads, 55-58 MiB). Reads also
		// come late by as much as the kernel keeps in flight, two
		// windows: with 4 reads either way, 9 reads of a cold 1 GiB read
		// started 6-7 MiB behind the stream's end, and their 10 MiB were
		// cached as random reads, more than the whole scan share.
		ahead *= 2
		behind = lateReads * int64(n)
	}
	return ahead, behind
}

// startStreamLocked records a read that continues no stream, in a free
// slot or in the least recently used one.
func (r *readahead) startStreamLocked(end int64) {
	slot := 0
	for i := range r.streams {
		if r.streams[i].gen == 0 {
			slot = i
			break
		}
		if r.streams[i].lastUse < r.streams[slot].lastUse {
			slot = i
		}
	}
	r.gens++
	r.streams[slot] = stream{next: end, raEnd: end, gen: r.gens, lastUse: r.tick}
}

// issueLocked starts prefetches that fill stream i's window, in requests
// of at most MaxRequest (MaxMissRequest during the warm-up), as far as the
// concurrency bounds allow. It reports whether it started any.
func (r *readahead) issueLocked(i int) (started bool) {
	c := r.c
	s := &r.streams[i]
	start := max(s.raEnd, c.geo.alignUp(s.next))
	target := c.geo.alignUp(min(s.next+s.window, c.geo.size))
	runBlocks := c.runBlocks()
	scale := max(1, c.maxRunBlocks/runBlocks) // more, smaller requests during the warm-up
	for start < target && s.inflight < readaheadPerStream*scale && r.inflight < readaheadWorkers*scale {
		stop := min(start+int64(runBlocks)*c.geo.blockSize, target)
		gen := s.gen
		from, to := start, stop
		if !c.goTracked(func() {
			c.prefetch(from, to)
			r.finished(i, gen)
		}) {
			return started
		}
		started = true
		s.inflight++
		r.inflight++
		s.raEnd = stop
		start = stop
	}
	return started
}

// finished accounts for the end of a readahead request of stream slot i
// as it was in generation gen.
func (r *readahead) finished(i int, gen uint64) {
	r.mu.Lock()
	if s := &r.streams[i]; s.gen == gen {
		s.inflight--
	}
	r.inflight--
	r.mu.Unlock()
}

// prefetch fetches the blocks of the block-aligned range [from, to) that
// are neither cached, in flight, nor known holes, as far as the
// readahead memory rules allow.
func (c *Cache) prefetch(from, to int64) {
	if c.alloc != nil {
		c.alloc.ensure(c.ctx, from, to, allocWindow) // on failure, fetch the data
	}
	first, last := c.geo.blockOf(from), c.geo.blockOf(to-1)
	var want []int64
	for idx := first; idx <= last; idx++ {
		start := c.geo.blockStart(idx)
		if c.alloc != nil && c.alloc.isZero(start, start+int64(c.geo.blockLen(idx))) {
			continue
		}
		sh := c.shardOf(idx)
		sh.mu.Lock()
		_, present := sh.blocks[idx]
		sh.mu.Unlock()
		if !present {
			want = append(want, idx)
		}
	}
	if len(want) == 0 {
		return
	}
	reserved := c.reserve(len(want), true)
	var runs []*fetch
	var cur *fetch
	for _, idx := range want {
		if reserved == 0 {
			break
		}
		buf := c.bufs.get()
		sh := c.shardOf(idx)
		sh.mu.Lock()
		if _, present := sh.blocks[idx]; present {
			sh.mu.Unlock()
			c.bufs.put(buf)
			continue
		}
		reserved--
		if cur == nil || cur.blocks[len(cur.blocks)-1].idx != idx-1 {
			cur = &fetch{off: c.geo.blockStart(idx), readahead: true, done: make(chan struct{})}
			runs = append(runs, cur)
		}
		b := c.addToFetch(cur, idx, buf)
		b.refs.Store(1) // the index only
		b.readahead.Store(true)
		b.scan.Store(true)
		c.readaheadBytes.Add(b.cost())
		sh.blocks[idx] = b
		sh.mu.Unlock()
	}
	c.unreserve(reserved)
	for _, f := range runs {
		c.runFetch(f)
	}
}
