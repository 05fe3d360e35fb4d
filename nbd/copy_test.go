package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"
)

// copyChunk is the request size of the copier tests: small, so that an
// export of a few hundred KiB is many chunks.
const copyChunk = 64 << 10

// fakeSource is an export in memory for the copier, with an allocation
// map, reads that can fail, block or finish out of order, and a record of
// every read.
type fakeSource struct {
	data []byte
	ext  []Extent // the allocation map; nil: the server has none

	failAt    int64 // a read covering this offset fails with EIO; -1: none
	blockFrom int64 // reads at or past this offset wait for their context; -1: none
	blocked   chan struct{}
	// group > 1: the first read of every group of that many chunks
	// returns only after the others have, so reads finish out of order.
	group    int
	returned []chan struct{} // per chunk, closed when its read returned

	mu          sync.Mutex // protects following
	reads       []int64    // offsets read, in order of arrival
	inflight    int
	blockedOnce bool
}

func newFakeSource(t *testing.T, size int64, seed int64) *fakeSource {
	t.Helper()
	data := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(data)
	return &fakeSource{data: data, failAt: -1, blockFrom: -1, blocked: make(chan struct{})}
}

func (s *fakeSource) Size() int64 { return int64(len(s.data)) }

func (s *fakeSource) BlockStatus(ctx context.Context, off, length int64) ([]Extent, error) {
	if s.ext == nil {
		return nil, ErrNoAllocation
	}
	end := off + length
	var out []Extent
	for _, e := range s.ext {
		from, to := max(e.Offset, off), min(e.Offset+e.Length, end)
		if from < to {
			out = append(out, Extent{Offset: from, Length: to - from, Flags: e.Flags})
		}
	}
	return out, nil
}

func (s *fakeSource) ReadVecContext(ctx context.Context, bufs [][]byte, off int64) error {
	if len(bufs) != 1 {
		return fmt.Errorf("fake: %d buffers, want 1", len(bufs))
	}
	p := bufs[0]
	s.mu.Lock()
	s.reads = append(s.reads, off)
	s.inflight++
	first := s.blockFrom >= 0 && off >= s.blockFrom && !s.blockedOnce
	if first {
		s.blockedOnce = true
	}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.inflight--
		s.mu.Unlock()
	}()

	if off < 0 || off+int64(len(p)) > s.Size() {
		return fmt.Errorf("fake: read of %d bytes at %d outside the export of %d", len(p), off, s.Size())
	}
	if s.failAt >= 0 && off <= s.failAt && s.failAt < off+int64(len(p)) {
		return syscall.EIO
	}
	if s.blockFrom >= 0 && off >= s.blockFrom {
		if first {
			close(s.blocked)
		}
		<-ctx.Done()
		return ctx.Err()
	}
	copy(p, s.data[off:])
	if s.group > 1 {
		i := int(off / copyChunk)
		if i%s.group == 0 {
			// Finish after the rest of the group, or fail if it never
			// comes (the copier would then have stopped reading ahead).
			for j := i + 1; j < i+s.group && j < len(s.returned); j++ {
				select {
				case <-s.returned[j]:
				case <-time.After(10 * time.Second):
					return fmt.Errorf("fake: the read of chunk %d waited 10 s for chunk %d's", i, j)
				}
			}
		}
		defer close(s.returned[i])
	}
	return nil
}

// readsOutOfOrder makes the first read of every group of n chunks finish
// after the others.
func (s *fakeSource) readsOutOfOrder(n int) {
	s.group = n
	s.returned = make([]chan struct{}, (s.Size()+copyChunk-1)/copyChunk)
	for i := range s.returned {
		s.returned[i] = make(chan struct{})
	}
}

func (s *fakeSource) readsInFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inflight
}

// sparseFile records what the copier writes at which offset into a
// buffer of the export's size.
type sparseFile struct {
	mu     sync.Mutex
	data   []byte
	writes [][2]int64 // offset, length
}

func (f *sparseFile) WriteAt(p []byte, off int64) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	copy(f.data[off:], p)
	f.writes = append(f.writes, [2]int64{off, int64(len(p))})
	return len(p), nil
}

// written reports whether any write touched [off, off+n).
func (f *sparseFile) written(off, n int64) bool {
	for _, w := range f.writes {
		if w[0] < off+n && off < w[0]+w[1] {
			return true
		}
	}
	return false
}

// runCopy copies src with 4 reads in flight and fails the test if the
// copy does not end within a minute or leaves a read running.
func runCopy(t *testing.T, ctx context.Context, src *fakeSource, opt CopyOptions) error {
	t.Helper()
	opt.RequestSize = copyChunk
	opt.Requests = 4
	done := make(chan error, 1)
	go func() { done <- copyExport(ctx, src, opt) }()
	select {
	case err := <-done:
		if n := src.readsInFlight(); n != 0 {
			t.Errorf("%d reads still running after the copy returned", n)
		}
		return err
	case <-time.After(time.Minute):
		t.Fatal("the copy did not end within a minute")
	}
	return nil
}

// Reads finish out of order; the stream still gets every byte in order,
// through a pipe (not seekable, like stdout), and progress adds up.
func TestCopyStreamsInOrder(t *testing.T) {
	src := newFakeSource(t, 16*copyChunk, 1)
	src.ext = []Extent{{Offset: 0, Length: src.Size()}}
	src.readsOutOfOrder(4)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(r)
		got <- b
	}()
	var progress []int64
	err = runCopy(t, context.Background(), src, CopyOptions{Stream: w, Progress: func(n int64) { progress = append(progress, n) }})
	w.Close()
	if err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, src.data) {
			t.Errorf("the pipe got %d bytes that differ from the export's %d", len(b), len(src.data))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the pipe's reader did not see the end within 10 s")
	}
	var total int64
	for _, n := range progress {
		total += n
	}
	if total != src.Size() || len(progress) != 16 {
		t.Errorf("progress reported %d bytes in %d calls, want %d in 16", total, len(progress), src.Size())
	}
}

// Holes and zero ranges of the allocation map are neither read nor
// written, and nor are all-zero blocks inside data; the stream (a hash,
// say) still sees every byte, zeros included.
func TestCopyLeavesHolesAndZerosSparse(t *testing.T) {
	const c = copyChunk
	src := newFakeSource(t, 8*c+c/2, 2)
	src.ext = []Extent{
		{Offset: 0, Length: c},
		{Offset: c, Length: 2 * c, Flags: StateHole | StateZero},
		{Offset: 3 * c, Length: c, Flags: StateZero}, // allocated, reads as zeros
		{Offset: 4 * c, Length: 4*c + c/2},
	}
	clear(src.data[c : 4*c])
	zeroBlock := int64(5*c + sparseBlock) // a block of zeros the map calls data
	clear(src.data[zeroBlock : zeroBlock+sparseBlock])

	dst := &sparseFile{data: make([]byte, src.Size())}
	var stream bytes.Buffer
	if err := runCopy(t, context.Background(), src, CopyOptions{Sparse: dst, Stream: &stream}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst.data, src.data) {
		t.Error("the sparse destination differs from the export")
	}
	if !bytes.Equal(stream.Bytes(), src.data) {
		t.Errorf("the stream got %d bytes that differ from the export's %d", stream.Len(), src.Size())
	}
	if dst.written(c, 3*c) {
		t.Errorf("a hole or zero range was written: %v", dst.writes)
	}
	if dst.written(zeroBlock, sparseBlock) {
		t.Errorf("the all-zero block at %d was written: %v", zeroBlock, dst.writes)
	}
	if !dst.written(0, c) || !dst.written(4*c, 1) || !dst.written(8*c, c/2) {
		t.Errorf("data was not written: %v", dst.writes)
	}
	for _, off := range src.reads {
		if off >= c && off < 4*c {
			t.Errorf("read at %d, inside a hole or zero range", off)
		}
	}

	// A real file truncated to size keeps what was skipped as a hole.
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(src.Size()); err != nil {
		t.Fatal(err)
	}
	if err := runCopy(t, context.Background(), src, CopyOptions{Sparse: f}); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(f.Name())
	if err != nil || !bytes.Equal(b, src.data) {
		t.Fatalf("the file differs from the export (%v)", err)
	}
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	// The file system may add a block of its own (an ext4 extent index);
	// a hole written as data would add at least one sparse block.
	const slack = 16 << 10
	if used, data := st.Blocks*512, src.Size()-3*c-sparseBlock; used > data+slack {
		t.Errorf("the file occupies %d bytes, more than its %d bytes of data and %d of the file system's", used, data, slack)
	}
}

// A read that fails half way fails the copy with the offset and the
// server's error; the stream holds exactly the chunks before it, and no
// read is left running.
func TestCopyFailsOnASourceError(t *testing.T) {
	src := newFakeSource(t, 12*copyChunk, 3)
	src.ext = []Extent{{Offset: 0, Length: src.Size()}}
	src.failAt = 6*copyChunk + 100
	var stream bytes.Buffer
	err := runCopy(t, context.Background(), src, CopyOptions{Stream: &stream})
	if !errors.Is(err, syscall.EIO) || !bytes.Contains([]byte(err.Error()), []byte(fmt.Sprintf("offset %d", 6*copyChunk))) {
		t.Fatalf("copy error %v, want EIO at offset %d", err, 6*copyChunk)
	}
	if !bytes.Equal(stream.Bytes(), src.data[:6*copyChunk]) {
		t.Errorf("the stream got %d bytes, want the %d before the failed read", stream.Len(), 6*copyChunk)
	}
}

// Cancelling the context stops the copy: it returns context.Canceled,
// with no read left running, and what it streamed is a prefix of the
// export.
func TestCopyCancel(t *testing.T) {
	src := newFakeSource(t, 32*copyChunk, 4)
	src.ext = []Extent{{Offset: 0, Length: src.Size()}}
	src.blockFrom = 8 * copyChunk
	ctx, cancel := context.WithCancel(context.Background())
	var stream bytes.Buffer
	done := make(chan error, 1)
	go func() {
		done <- copyExport(ctx, src, CopyOptions{Stream: &stream, RequestSize: copyChunk, Requests: 4})
	}()
	select {
	case <-src.blocked:
	case err := <-done:
		t.Fatalf("the copy ended (%v) before reading at offset %d", err, src.blockFrom)
	case <-time.After(10 * time.Second):
		t.Fatalf("no read at offset %d within 10 s", src.blockFrom)
	}
	cancel()
	var err error
	select {
	case err = <-done:
	case <-time.After(time.Minute):
		t.Fatal("the copy did not end within a minute of the cancel")
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("copy error %v, want context.Canceled", err)
	}
	if n := src.readsInFlight(); n != 0 {
		t.Errorf("%d reads still running after the copy returned", n)
	}
	if n := stream.Len(); n > 8*copyChunk || !bytes.Equal(stream.Bytes(), src.data[:n]) {
		t.Errorf("the stream got %d bytes, want a prefix of at most %d", n, 8*copyChunk)
	}
}

// An export whose size is no multiple of the request size, or smaller
// than one request, is copied whole without reading past its end; so is
// one from a server without an allocation map.
func TestCopyShortExport(t *testing.T) {
	for _, size := range []int64{3*copyChunk + 1234, 1000, 1} {
		for _, withMap := range []bool{true, false} {
			src := newFakeSource(t, size, size)
			if withMap {
				src.ext = []Extent{{Offset: 0, Length: size}}
			}
			dst := &sparseFile{data: make([]byte, size)}
			var stream bytes.Buffer
			if err := runCopy(t, context.Background(), src, CopyOptions{Sparse: dst, Stream: &stream}); err != nil {
				t.Fatalf("size %d (map %v): %v", size, withMap, err)
			}
			if !bytes.Equal(dst.data, src.data) || !bytes.Equal(stream.Bytes(), src.data) {
				t.Errorf("size %d (map %v): the copy differs from the export", size, withMap)
			}
			reads := slices.Sorted(slices.Values(src.reads))
			if want := int((size + copyChunk - 1) / copyChunk); len(reads) != want {
				t.Errorf("size %d (map %v): %d reads %v, want %d", size, withMap, len(reads), reads, want)
			}
		}
	}
}

func TestAllZero(t *testing.T) {
	for _, n := range []int{0, 1, 2, 4095, 4096, 4097, 128 << 10} {
		b := make([]byte, n)
		if !AllZero(b) {
			t.Errorf("AllZero(%d zeros) = false", n)
		}
		for _, i := range []int{0, n / 2, n - 1} {
			if n == 0 {
				break
			}
			b[i] = 1
			if AllZero(b) {
				t.Errorf("AllZero(%d bytes, byte %d set) = true", n, i)
			}
			b[i] = 0
		}
	}
}
