package cache

import (
	"syscall"
	"unsafe"
)

// slabs hands out block buffers carved from large anonymous mappings
// marked MADV_HUGEPAGE. A cache fills its whole budget with fresh memory
// on a first pass, and touching fresh memory in 4 KiB pages is what that
// costs most; transparent huge pages take a fraction of the faults (on VMs
// that back guest memory lazily every fault is dearer still). Buffers live
// outside the Go heap, so the slabs are unmapped explicitly, once no
// buffer is in use (bufferPool).
type slabs struct {
	maps [][]byte // whole mappings, for munmap
	cur  []byte   // what is left of the newest slab
}

const (
	slabSize = 32 << 20
	hugePage = 2 << 20
)

// carve returns a buffer of n bytes; capacity n, so appends cannot run
// into the next buffer.
func (s *slabs) carve(n int) []byte {
	if len(s.cur) < n {
		s.cur = s.newSlab(max(slabSize, n))
	}
	b := s.cur[:n:n]
	s.cur = s.cur[n:]
	return b
}

func (s *slabs) newSlab(n int) []byte {
	// Over-allocate so the slab can start on a huge-page boundary: the
	// kernel only backs aligned 2 MiB ranges with a huge page. The unused
	// head and tail are never touched, so they cost address space only.
	m, err := syscall.Mmap(-1, 0, n+hugePage, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return make([]byte, n) // a plain heap slab still works
	}
	s.maps = append(s.maps, m)
	pad := (hugePage - int(uintptr(unsafe.Pointer(&m[0]))%hugePage)) % hugePage
	slab := m[pad : pad+n]
	_ = syscall.Madvise(slab, syscall.MADV_HUGEPAGE) // a hint: fine if refused
	return slab
}

// release unmaps every slab. No buffer carved from them may be in use.
func (s *slabs) release() {
	for _, m := range s.maps {
		_ = syscall.Munmap(m)
	}
	s.maps, s.cur = nil, nil
}
