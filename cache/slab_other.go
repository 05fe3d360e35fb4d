//go:build !linux

package cache

// slabs on systems without MADV_HUGEPAGE: buffers come from the Go heap.
type slabs struct{}

func (s *slabs) carve(n int) []byte { return make([]byte, n) }
func (s *slabs) release()           {}
