package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"sync"
	"syscall"
	"testing"
)

// call is one request a fake source received.
type call struct {
	off, n int64
	bufs   int // buffers in a vector read; 0 for ReadAt
}

// memSource is an in-memory source that records every request. Tests
// make in-flight states deterministic with entered (a request announces
// itself) and gate (a request waits for a token or for gate's close).
type memSource struct {
	data []byte
	size int64 // if data is nil: the size of a source that only has an allocation map

	entered chan call            // if set, each held request sends itself here first
	gate    chan struct{}        // if set, each held request then waits on it
	hold    func(off int64) bool // which requests are held; nil: all
	fail    func(off, n int64) error

	// zeros lists the ranges Allocation reports as reading as zeros.
	zeros      []Extent
	allocErr   error
	maxExt     int           // if > 0, Allocation returns at most this many extents
	allocEnter chan struct{} // if set, each Allocation call signals here first
	allocGate  chan struct{} // if set, each Allocation call then waits on it

	mu         sync.Mutex
	calls      []call
	allocCalls int
}

func newMemSource(data []byte) *memSource { return &memSource{data: data} }

func (m *memSource) read(ctx context.Context, bufs [][]byte, off int64) error {
	var n int64
	for _, b := range bufs {
		n += int64(len(b))
	}
	c := call{off: off, n: n, bufs: len(bufs)}
	m.mu.Lock()
	m.calls = append(m.calls, c)
	m.mu.Unlock()
	if m.hold == nil || m.hold(off) {
		if m.entered != nil {
			m.entered <- c
		}
		if m.gate != nil {
			select {
			case <-m.gate:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
	}
	if m.fail != nil {
		if err := m.fail(off, n); err != nil {
			return err
		}
	}
	if off < 0 || off+n > int64(len(m.data)) {
		return fmt.Errorf("fake: read [%d, +%d) outside %d bytes", off, n, len(m.data))
	}
	src := m.data[off:]
	for _, b := range bufs {
		src = src[copy(b, src):]
	}
	return nil
}

func (m *memSource) readAt(ctx context.Context, p []byte, off int64) (int, error) {
	if off >= int64(len(m.data)) {
		return 0, io.EOF
	}
	n := min(int64(len(p)), int64(len(m.data))-off)
	if err := m.read(ctx, [][]byte{p[:n]}, off); err != nil {
		return 0, err
	}
	if int(n) < len(p) {
		return int(n), io.EOF
	}
	return int(n), nil
}

func (m *memSource) allocation(ctx context.Context, off, length int64) ([]Extent, error) {
	m.mu.Lock()
	m.allocCalls++
	m.mu.Unlock()
	if m.allocEnter != nil {
		m.allocEnter <- struct{}{}
	}
	if m.allocGate != nil {
		select {
		case <-m.allocGate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if m.allocErr != nil {
		return nil, m.allocErr
	}
	size := m.size
	if m.data != nil {
		size = int64(len(m.data))
	}
	var out []Extent
	pos, end := off, min(off+length, size)
	for _, z := range m.zeros {
		if z.End() <= pos {
			continue
		}
		if z.Offset >= end {
			break
		}
		if z.Offset > pos {
			out = append(out, Extent{Offset: pos, Length: z.Offset - pos})
			pos = z.Offset
		}
		e := Extent{Offset: pos, Length: min(z.End(), end) - pos, Zero: true, Hole: z.Hole}
		out = append(out, e)
		pos = e.End()
	}
	if pos < end {
		out = append(out, Extent{Offset: pos, Length: end - pos})
	}
	if m.maxExt > 0 && len(out) > m.maxExt {
		out = out[:m.maxExt]
	}
	return out, nil
}

func (m *memSource) Calls() []call {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]call(nil), m.calls...)
}

func (m *memSource) AllocCalls() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.allocCalls
}

// The fake's faces: which optional interfaces the cache sees.

// plainSource has ReadAt only: no cancellation, no vectors.
type plainSource struct{ *memSource }

func (s plainSource) ReadAt(p []byte, off int64) (int, error) {
	return s.readAt(context.Background(), p, off)
}

// ctxSource adds ReadAtContext.
type ctxSource struct{ plainSource }

func (s ctxSource) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	return s.readAt(ctx, p, off)
}

// vecSource adds ReadVecContext, like the NBD client.
type vecSource struct{ ctxSource }

func (s vecSource) ReadVecContext(ctx context.Context, bufs [][]byte, off int64) error {
	return s.read(ctx, bufs, off)
}

// allocSource is vecSource with an allocation map, like the NBD client
// with base:allocation.
type allocSource struct{ vecSource }

func (s allocSource) Allocation(ctx context.Context, off, length int64) ([]Extent, error) {
	return s.allocation(ctx, off, length)
}

// allocPlainSource is ReadAt plus an allocation map.
type allocPlainSource struct{ plainSource }

func (s allocPlainSource) Allocation(ctx context.Context, off, length int64) ([]Extent, error) {
	return s.allocation(ctx, off, length)
}

func asPlain(m *memSource) io.ReaderAt { return plainSource{m} }
func asCtx(m *memSource) io.ReaderAt   { return ctxSource{plainSource{m}} }
func asVec(m *memSource) io.ReaderAt   { return vecSource{ctxSource{plainSource{m}}} }
func asAlloc(m *memSource) io.ReaderAt { return allocSource{vecSource{ctxSource{plainSource{m}}}} }

// sourceKinds are the faces most tests run against.
var sourceKinds = []struct {
	name string
	wrap func(*memSource) io.ReaderAt
}{
	{"plain", asPlain},
	{"ctx", asCtx},
	{"vec", asVec},
}

// requestError mimics nbd.RequestError: a server's errno for one request.
type requestError struct{ errno syscall.Errno }

func (e *requestError) Error() string { return "fake server replied " + e.errno.Error() }
func (e *requestError) Unwrap() error { return e.errno }

// pattern returns n bytes in which every 8-byte word differs, so any
// misplaced copy shows.
func pattern(n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(uint64(n), 42))
	for i := range b {
		b[i] = byte(r.Uint32() | 1) // never zero: no accidental zero blocks
	}
	return b
}

const kib = 1 << 10

// newTestCache returns a cache over src that is closed when the test
// ends.
func newTestCache(t testing.TB, src io.ReaderAt, size int64, opt Options) *Cache {
	t.Helper()
	c := New(src, size, opt)
	t.Cleanup(func() { c.Close() })
	return c
}

// readOK reads [off, off+n) and checks it against want.
func readOK(t testing.TB, c *Cache, want []byte, off int64, n int) {
	t.Helper()
	p := make([]byte, n)
	got, err := c.ReadAt(p, off)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("ReadAt(%d bytes at %d): %v", n, off, err)
	}
	end := min(off+int64(n), int64(len(want)))
	if got != int(end-off) || string(p[:got]) != string(want[off:end]) {
		t.Fatalf("ReadAt(%d bytes at %d): got %d bytes, wrong or short data (want %d)", n, off, got, end-off)
	}
}

// idle waits until every fetch and readahead the cache started is done.
// Tests call it only when no read is running, so no new work can start.
func idle(c *Cache) { c.wg.Wait() }

// checkStats compares the counters named in want, and only those.
func checkStats(t testing.TB, got Stats, want map[string]int64) {
	t.Helper()
	fields := map[string]int64{
		"Hits": got.Hits, "Misses": got.Misses, "ZeroHits": got.ZeroHits,
		"InflightJoins": got.InflightJoins, "SourceReads": got.SourceReads,
		"BytesFetched": got.BytesFetched, "ReadaheadBlocks": got.ReadaheadBlocks,
		"ReadaheadUsed": got.ReadaheadUsed, "ReadaheadWasted": got.ReadaheadWasted,
		"Evictions": got.Evictions, "CachedBytes": got.CachedBytes,
		"Errors": got.Errors, "AllocQueries": got.AllocQueries, "Uncached": got.Uncached,
	}
	for k, w := range want {
		g, ok := fields[k]
		if !ok {
			t.Fatalf("checkStats: no counter %q", k)
		}
		if g != w {
			t.Errorf("%s = %d, want %d (all: %+v)", k, g, w, got)
		}
	}
}
