package cache

import "sync"

// bufferPool recycles block buffers. Buffers are only taken after memory
// was reserved for them (see reserve), so the number ever allocated never
// exceeds MaxBytes/BlockSize and the free list needs no bound of its own.
// A sync.Pool would let the GC drop buffers, but storing a []byte in one
// allocates on every Put; a plain stack does not.
//
// New buffers are carved from slabs (see slabs); the slabs are released
// once the pool is drained and every buffer has come back.
type bufferPool struct {
	size int // every buffer has exactly this capacity

	// mu guards the fields below.
	mu        sync.Mutex
	free      [][]byte
	allocated int  // buffers made so far (tests check the memory bound with it)
	closed    bool // after Close, returned buffers are dropped
	slabs     slabs
}

// get returns a buffer of length and capacity size. Its contents are
// whatever the last user left; callers overwrite all of it.
func (p *bufferPool) get() []byte {
	p.mu.Lock()
	if n := len(p.free); n > 0 {
		b := p.free[n-1]
		p.free[n-1] = nil
		p.free = p.free[:n-1]
		p.mu.Unlock()
		return b
	}
	p.allocated++
	b := p.slabs.carve(p.size)
	p.mu.Unlock()
	return b
}

// put returns a buffer from get. Anything else is a bug that would break
// the memory bound, so it panics.
func (p *bufferPool) put(b []byte) {
	if b == nil {
		return
	}
	if cap(b) != p.size {
		panic("cache: foreign buffer returned to the block pool")
	}
	p.mu.Lock()
	if p.closed {
		p.allocated--
		p.releaseIfUnusedLocked()
	} else {
		p.free = append(p.free, b[:p.size])
	}
	p.mu.Unlock()
}

// releaseIfUnusedLocked gives the slabs back once the pool is closed and
// no buffer carved from them is in use any more.
func (p *bufferPool) releaseIfUnusedLocked() {
	if p.closed && p.allocated == 0 {
		p.slabs.release()
	}
}

// drain drops every free buffer and makes later puts drop theirs.
func (p *bufferPool) drain() {
	p.mu.Lock()
	p.allocated -= len(p.free)
	p.free = nil
	p.closed = true
	p.releaseIfUnusedLocked()
	p.mu.Unlock()
}

// live returns how many buffers exist: in blocks, in flight or free.
func (p *bufferPool) live() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.allocated
}

// scratchSlots bounds the contiguous buffers used to merge misses from a
// source without VectorReader: at most this many merged requests at once
// carry a MaxRequest-sized scratch buffer beyond the block budget; others
// fall back to one request per block.
const scratchSlots = 4

// scratchPool hands out up to scratchSlots buffers of one size, made on
// first use.
type scratchPool struct {
	size  int
	slots chan []byte
}

func newScratchPool(size int) *scratchPool {
	s := &scratchPool{size: size, slots: make(chan []byte, scratchSlots)}
	for range scratchSlots {
		s.slots <- nil
	}
	return s
}

// get returns a buffer of s.size bytes, or nil when all are in use.
func (s *scratchPool) get() []byte {
	select {
	case b := <-s.slots:
		if b == nil {
			b = make([]byte, s.size)
		}
		return b
	default:
		return nil
	}
}

func (s *scratchPool) put(b []byte) { s.slots <- b }
