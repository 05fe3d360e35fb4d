package cache

import "sync/atomic"

// ghosts remembers blocks that a small random read missed and read around
// the cache (Options.AdmitOnSecondMiss): a second such miss on a
// remembered block admits it. It is a direct-mapped table of block
// numbers, so a block is forgotten when another one maps to its slot;
// without locks, as losing an entry to a race only costs one more read
// around the cache. (Admission on a second touch is 2Q's ghost list and
// TinyLFU's doorkeeper.)
type ghosts struct {
	slots []atomic.Int64 // block index + 1; 0 for an empty slot
	shift uint
}

// newGhosts makes a table of at least n slots (a power of two).
func newGhosts(n int64) *ghosts {
	bits := uint(10)
	for int64(1)<<bits < n && bits < 24 {
		bits++
	}
	return &ghosts{slots: make([]atomic.Int64, 1<<bits), shift: 64 - bits}
}

// admit reports whether idx was remembered, forgetting it; otherwise it
// remembers idx and reports false.
func (g *ghosts) admit(idx int64) bool {
	// Fibonacci hashing: neighbouring blocks land far apart.
	s := &g.slots[(uint64(idx)*0x9E3779B97F4A7C15)>>g.shift]
	if s.Load() == idx+1 {
		return s.CompareAndSwap(idx+1, 0)
	}
	s.Store(idx + 1)
	return false
}
