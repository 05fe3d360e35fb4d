package cache

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
)

const (
	// allocWindow is how much of the allocation map one query asks for
	// at least: one BLOCK_STATUS round trip per 64 MiB read is noise, and
	// a whole sparse region is known after the first miss in it.
	allocWindow = 64 << 20
	// seekWindow is the least a seek asks for: SEEK_DATA over a large
	// sparse image walks the map, and 1 GiB per round trip keeps a
	// terabyte to a thousand of them.
	seekWindow = 1 << 30
	// learnWindow is what each query of LearnAllocation's walk asks for;
	// a source answers for as much of it as it can (NBD: 2 GiB at most).
	learnWindow = 4 << 30
	// maxExtents bounds the extent map (about 1.5 MiB). A fragmented
	// image that exceeds it starts over with the latest answer: the map
	// is a cache of what the source says, re-asked lazily.
	maxExtents = 1 << 16
	// allocMaxFailures consecutive failed queries make the cache stop
	// asking, so that a source whose allocation queries always fail does
	// not add a round trip to every miss.
	allocMaxFailures = 3
)

// allocMap caches a source's allocation map: the extents it reported, in
// order, merged where adjacent and alike. Gaps between them are unknown.
type allocMap struct {
	src       Allocator
	size      int64
	queries   atomic.Int64
	holeBytes atomic.Int64 // bytes in known holes

	// learn walks the whole map once (LearnAllocation); learned is
	// closed when it is done.
	learn   sync.Once
	learned chan struct{}

	// mu guards the fields below.
	mu       sync.Mutex
	ext      []Extent
	inflight map[int64]chan struct{} // queries running, by window start
	failures int                     // consecutive failed queries
	off      bool                    // stopped asking (unsupported, or failing)

	// hookWait, if set (by tests only, before any read), is called when
	// a lookup starts waiting on another's query.
	hookWait func()
}

func newAllocMap(src Allocator, size int64) *allocMap {
	return &allocMap{src: src, size: size, inflight: make(map[int64]chan struct{}), learned: make(chan struct{})}
}

// errAllocUnknown means the source could not say what is at an offset.
var errAllocUnknown = errors.New("cache: allocation unknown")

// ensure makes the map cover [start, end), asking the source as needed,
// one query per window at a time, each for at least minQuery bytes (to
// the end of end's window, anyway). It returns nil when the range is
// known, ctx's error when ctx is done, or another error when the source
// cannot say (then the range should be treated as data).
func (m *allocMap) ensure(ctx context.Context, start, end, minQuery int64) error {
	end = min(end, m.size)
	for {
		m.mu.Lock()
		if m.off {
			m.mu.Unlock()
			return errAllocUnknown
		}
		q := firstUnknown(m.ext, start, end)
		if q >= end {
			m.mu.Unlock()
			return nil
		}
		key := alignDown(q, allocWindow)
		if ch, busy := m.inflight[key]; busy {
			m.mu.Unlock()
			if m.hookWait != nil {
				m.hookWait()
			}
			select {
			case <-ch:
				continue // look again: the answer may cover q
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		ch := make(chan struct{})
		m.inflight[key] = ch
		m.mu.Unlock()

		err := m.query(ctx, q, min(max(alignUp(end, allocWindow), q+minQuery), m.size))

		m.mu.Lock()
		delete(m.inflight, key)
		close(ch)
		if err == nil && firstUnknown(m.ext, q, q+1) == q {
			err = fmt.Errorf("%w: allocation query at %d answered nothing usable", errAllocUnknown, q)
		}
		if err != nil && ctx.Err() == nil {
			m.failures++
			if m.failures >= allocMaxFailures || errors.Is(err, errors.ErrUnsupported) ||
				errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EOPNOTSUPP) {
				m.off = true
			}
		} else if err == nil {
			m.failures = 0
		}
		m.mu.Unlock()
		if err != nil {
			return err
		}
	}
}

// wants reports whether a query would be needed for [start, end): the
// map does not cover it, no query for its window runs, and the map has
// not stopped asking.
func (m *allocMap) wants(start, end int64) bool {
	end = min(end, m.size)
	m.mu.Lock()
	defer m.mu.Unlock()
	q := firstUnknown(m.ext, start, end)
	_, busy := m.inflight[alignDown(q, allocWindow)]
	return !m.off && q < end && !busy
}

// allocLater asks the source, in the background, for the allocation map
// of [start, end)'s window unless wants says there is no need.
func (c *Cache) allocLater(start, end int64) {
	if c.alloc.wants(start, end) {
		c.goTracked(func() { c.alloc.ensure(c.ctx, start, end, allocWindow) })
	}
}

// query asks the source about [q, end) and merges the answer.
func (m *allocMap) query(ctx context.Context, q, end int64) error {
	m.queries.Add(1)
	ext, err := m.src.Allocation(ctx, q, end-q)
	if err != nil {
		return err
	}
	ext = usableExtents(ext, q, m.size)
	if len(ext) == 0 {
		return nil
	}
	m.mu.Lock()
	m.ext = mergeExtents(m.ext, ext)
	if len(m.ext) > maxExtents {
		m.ext = append([]Extent(nil), ext...)
	}
	var holes int64
	for _, e := range m.ext {
		if e.Hole {
			holes += e.Length
		}
	}
	m.holeBytes.Store(holes)
	m.mu.Unlock()
	return nil
}

// walk learns the map from start to end, a learnWindow per query, until
// the source cannot say or ctx is done.
func (m *allocMap) walk(ctx context.Context) {
	defer close(m.learned)
	for pos := int64(0); pos < m.size; {
		if err := m.ensure(ctx, pos, pos+1, learnWindow); err != nil {
			return
		}
		m.mu.Lock()
		from := pos
		for i := extentIndex(m.ext, pos); i < len(m.ext) && m.ext[i].Offset <= pos; i++ {
			pos = m.ext[i].End()
		}
		m.mu.Unlock()
		if pos == from {
			return // the bounded map dropped it meanwhile: too fragmented to learn whole
		}
	}
}

// isZero reports whether the map knows all of [start, end) reads as
// zeros.
func (m *allocMap) isZero(start, end int64) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	i := extentIndex(m.ext, start)
	for ; i < len(m.ext) && start < end; i++ {
		e := m.ext[i]
		if e.Offset > start || !e.Zero {
			return false
		}
		start = e.End()
	}
	return start >= end
}

// extentAt returns the known extent holding off, asking the source if
// needed (for a seek: a large window).
func (m *allocMap) extentAt(ctx context.Context, off int64) (Extent, error) {
	if err := m.ensure(ctx, off, off+1, seekWindow); err != nil {
		return Extent{}, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if i := extentIndex(m.ext, off); i < len(m.ext) && m.ext[i].Offset <= off {
		return m.ext[i], nil
	}
	// Known a moment ago, dropped since by the bound on the map.
	return Extent{}, errAllocUnknown
}

// extentIndex returns the index of the first extent ending after off.
func extentIndex(ext []Extent, off int64) int {
	return sort.Search(len(ext), func(i int) bool { return ext[i].End() > off })
}

// firstUnknown returns the first offset in [start, end) no extent covers,
// or end.
func firstUnknown(ext []Extent, start, end int64) int64 {
	for i := extentIndex(ext, start); i < len(ext) && start < end; i++ {
		if ext[i].Offset > start {
			return start
		}
		start = ext[i].End()
	}
	return min(start, end)
}

// usableExtents trims a source's answer for a query at q to what can be
// trusted: extents in order, without gaps or overlaps, from q, inside the
// source, non-empty. It stops at the first extent that breaks the rules.
func usableExtents(ext []Extent, q, size int64) []Extent {
	out := make([]Extent, 0, len(ext))
	pos := q
	for _, e := range ext {
		if e.Length <= 0 {
			continue
		}
		if e.Offset > pos || e.End() <= pos || (pos != q && e.Offset != pos) {
			break // a gap, going backwards, or an overlap: only the first may start before q
		}
		e.Length = min(e.End(), size) - pos
		e.Offset = pos
		if e.Length <= 0 {
			break
		}
		if n := len(out); n > 0 && out[n-1].Zero == e.Zero && out[n-1].Hole == e.Hole {
			out[n-1].Length += e.Length
		} else {
			out = append(out, e)
		}
		pos = e.End()
		if pos >= size {
			break
		}
	}
	return out
}

// mergeExtents returns old with the contiguous run ext laid over it (ext
// wins where they overlap), adjacent alike extents merged.
func mergeExtents(old, ext []Extent) []Extent {
	lo, hi := ext[0].Offset, ext[len(ext)-1].End()
	out := make([]Extent, 0, len(old)+len(ext)+2)
	add := func(e Extent) {
		if e.Length <= 0 {
			return
		}
		if n := len(out); n > 0 && out[n-1].End() == e.Offset && out[n-1].Zero == e.Zero && out[n-1].Hole == e.Hole {
			out[n-1].Length += e.Length
			return
		}
		out = append(out, e)
	}
	i := 0
	for ; i < len(old) && old[i].Offset < lo; i++ {
		e := old[i]
		e.Length = min(e.End(), lo) - e.Offset
		add(e)
	}
	for _, e := range ext {
		add(e)
	}
	for i = extentIndex(old, hi); i < len(old); i++ {
		e := old[i]
		if e.Offset < hi {
			e.Length = e.End() - hi
			e.Offset = hi
		}
		add(e)
	}
	return out
}

// SeekData returns the first offset at or after off that holds data, as
// lseek(2) SEEK_DATA does, from the source's allocation map. When there is
// no data at or after off (or off is at or past the end) the error wraps
// syscall.ENXIO. Without allocation information every offset before the
// end is data.
func (c *Cache) SeekData(ctx context.Context, off int64) (int64, error) {
	if err := c.seekCheck(off); err != nil {
		return 0, err
	}
	if c.alloc == nil {
		return off, nil
	}
	for pos := off; pos < c.geo.size; {
		e, err := c.alloc.extentAt(ctx, pos)
		if err != nil {
			if ctx.Err() != nil {
				return 0, fmt.Errorf("cache: seek data at offset %d: %w", off, ctx.Err())
			}
			return pos, nil // unknown: data, the safe answer
		}
		if !e.Zero {
			return pos, nil
		}
		pos = e.End()
	}
	return 0, fmt.Errorf("cache: no data at or after offset %d: %w", off, syscall.ENXIO)
}

// SeekHole returns the first offset at or after off in a hole (a range
// that reads as zeros), as lseek(2) SEEK_HOLE does; the end of the source
// counts as a hole. An offset at or past the end gives an error wrapping
// syscall.ENXIO.
func (c *Cache) SeekHole(ctx context.Context, off int64) (int64, error) {
	if err := c.seekCheck(off); err != nil {
		return 0, err
	}
	if c.alloc == nil {
		return c.geo.size, nil
	}
	for pos := off; pos < c.geo.size; {
		e, err := c.alloc.extentAt(ctx, pos)
		if err != nil {
			if ctx.Err() != nil {
				return 0, fmt.Errorf("cache: seek hole at offset %d: %w", off, ctx.Err())
			}
			return c.geo.size, nil // unknown: data up to the end, the safe answer
		}
		if e.Zero {
			return pos, nil
		}
		pos = e.End()
	}
	return c.geo.size, nil
}

// LearnAllocation starts learning the source's whole allocation map in
// the background (a query per few GiB), for AllocatedBytes. It returns at
// once; calling it again does nothing.
func (c *Cache) LearnAllocation() {
	if c.alloc == nil {
		return
	}
	c.alloc.learn.Do(func() {
		c.lifeMu.Lock()
		defer c.lifeMu.Unlock()
		if c.closing {
			close(c.alloc.learned)
			return
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.alloc.walk(c.ctx)
		}()
	})
}

// AllocatedBytes returns how many bytes of the source take storage on it
// (a file's st_blocks): its size less the holes the source reported.
// Ranges the source did not report on count as allocated. It waits for
// LearnAllocation's walk (starting it if needed) until ctx is done, then
// answers with what is known; final reports that the walk has ended, so
// that the answer will not change.
func (c *Cache) AllocatedBytes(ctx context.Context) (n int64, final bool) {
	if c.alloc == nil {
		return c.geo.size, true
	}
	c.LearnAllocation()
	select {
	case <-c.alloc.learned:
		final = true
	case <-ctx.Done():
	}
	return c.geo.size - c.alloc.holeBytes.Load(), final
}

func (c *Cache) seekCheck(off int64) error {
	switch {
	case c.closed.Load():
		return ErrClosed
	case off < 0:
		return fmt.Errorf("cache: seek to negative offset %d: %w", off, syscall.EINVAL)
	case off >= c.geo.size:
		return fmt.Errorf("cache: seek at offset %d, at or past the end (%d): %w", off, c.geo.size, syscall.ENXIO)
	}
	return nil
}
