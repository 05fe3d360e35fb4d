package nbd

import (
	"io"
	"sort"
)

// scatter is the destination of one READ: several buffers filled in
// order, so merged cache misses land in their own block buffers.
type scatter [][]byte

// readFrom reads n bytes from r into the buffers, starting rel bytes into
// the destination. place() has checked the range fits.
func (s scatter) readFrom(r io.Reader, rel uint64, n uint32) error {
	for _, b := range s {
		if n == 0 {
			break
		}
		if rel >= uint64(len(b)) {
			rel -= uint64(len(b))
			continue
		}
		take := min(uint64(len(b))-rel, uint64(n))
		if _, err := io.ReadFull(r, b[rel:rel+take]); err != nil {
			return err
		}
		n -= uint32(take)
		rel = 0
	}
	if n != 0 {
		return protoErrorf("%d payload bytes beyond the read buffers", n)
	}
	return nil
}

// zero clears n bytes starting rel bytes into the destination.
func (s scatter) zero(rel uint64, n uint32) {
	for _, b := range s {
		if n == 0 {
			return
		}
		if rel >= uint64(len(b)) {
			rel -= uint64(len(b))
			continue
		}
		take := min(uint64(len(b))-rel, uint64(n))
		clear(b[rel : rel+take])
		n -= uint32(take)
		rel = 0
	}
}

// spans records which bytes of a READ the reply has covered, so a chunk
// that overlaps another, and a reply that leaves a gap, are caught.
// Chunks usually arrive in order, which the append path makes O(1).
type spans struct {
	total uint64
	list  []span // sorted by start, never adjacent or overlapping
}

type span struct{ start, end uint64 }

// add records [start, start+n); false if it overlaps what is recorded.
func (s *spans) add(start, n uint64) bool {
	end := start + n
	i := sort.Search(len(s.list), func(i int) bool { return s.list[i].end > start })
	if i < len(s.list) && s.list[i].start < end {
		return false
	}
	s.total += n
	// Merge with the neighbour before (ending at start) and after
	// (starting at end).
	joinPrev := i > 0 && s.list[i-1].end == start
	joinNext := i < len(s.list) && s.list[i].start == end
	switch {
	case joinPrev && joinNext:
		s.list[i-1].end = s.list[i].end
		s.list = append(s.list[:i], s.list[i+1:]...)
	case joinPrev:
		s.list[i-1].end = end
	case joinNext:
		s.list[i].start = start
	default:
		s.list = append(s.list, span{})
		copy(s.list[i+1:], s.list[i:])
		s.list[i] = span{start, end}
	}
	return true
}

// addAll records a simple reply, which covers the whole request.
func (s *spans) addAll(n uint32) { s.total = uint64(n) }
