package overlay

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// randomDisk returns size random bytes, as the read-only disk below.
func randomDisk(size int, seed uint64) []byte {
	b := make([]byte, size)
	r := rand.NewChaCha8([32]byte{byte(seed)})
	r.Read(b)
	return b
}

// newOverlay makes an overlay over disk in a fresh directory, closed at
// the end of the test.
func newOverlay(t *testing.T, disk []byte, opt Options) (*Overlay, string) {
	t.Helper()
	if opt.Dir == "" {
		opt.Dir = t.TempDir()
	}
	o, err := New(bytes.NewReader(disk), int64(len(disk)), opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	return o, opt.Dir
}

// checkRead fails unless reading n bytes at off gives what model holds,
// with io.EOF exactly when the read reaches the end.
func checkRead(t *testing.T, o *Overlay, model []byte, off int64, n int) {
	t.Helper()
	buf := make([]byte, n)
	got, err := o.ReadAt(buf, off)
	want := 0
	if off < int64(len(model)) {
		want = copy(make([]byte, n), model[off:])
	}
	if got != want || (want < n) != errors.Is(err, io.EOF) || (err != nil && !errors.Is(err, io.EOF)) {
		t.Fatalf("read of %d at %d: %d bytes, %v; want %d bytes", n, off, got, err, want)
	}
	if !bytes.Equal(buf[:got], model[off:off+int64(got)]) {
		i := 0
		for buf[i] == model[off+int64(i)] {
			i++
		}
		t.Fatalf("read of %d at %d differs from what was written at byte %d", n, off, off+int64(i))
	}
}

// TestReadsAndWrites writes at random places and lengths (partial blocks,
// several blocks, the short last block) and checks every read against a
// model, and that the disk below is never written.
func TestReadsAndWrites(t *testing.T) {
	t.Parallel()
	const size = 1<<20 + 1000 // the last block is short
	disk := randomDisk(size, 1)
	orig := bytes.Clone(disk)
	model := bytes.Clone(disk)
	o, _ := newOverlay(t, disk, Options{BlockSize: 4096})
	rng := rand.New(rand.NewPCG(1, 2))

	checkRead(t, o, model, 0, size)
	for i := range 400 {
		off := rng.Int64N(size)
		n := 1 + rng.IntN(3*4096)
		switch i % 4 {
		case 1:
			off &^= 4095 // aligned start
		case 2:
			off = size - int64(n) // up to the end
			if off < 0 {
				off = 0
				n = size
			}
		}
		data := randomDisk(n, uint64(i+2))
		got, err := o.WriteAt(data, off)
		want := min(n, int(size-off))
		if got != want || (want < n) != errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("write of %d at %d: %d, %v", n, off, got, err)
		}
		copy(model[off:], data)
		checkRead(t, o, model, rng.Int64N(size), rng.IntN(5*4096))
		checkRead(t, o, model, off&^4095, n+8192)
	}
	checkRead(t, o, model, 0, size)
	checkRead(t, o, model, size-10, 100)
	checkRead(t, o, model, size, 1)
	if !bytes.Equal(disk, orig) {
		t.Fatal("the disk below was written")
	}
	st := o.Stats()
	if st.Blocks == 0 || st.Bytes != st.Blocks*4096 || st.Writes != 400 || st.Refused != 0 {
		t.Errorf("stats %+v", st)
	}
}

// TestNoName checks that the private file has no name, with O_TMPFILE and
// without: the directory stays empty, and the descriptor's path says
// "(deleted)".
func TestNoName(t *testing.T) {
	t.Parallel()
	for _, tmpfile := range []bool{true, false} {
		t.Run(fmt.Sprintf("O_TMPFILE=%v", tmpfile), func(t *testing.T) {
			dir := t.TempDir()
			f, err := openUnnamed(dir, tmpfile)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt([]byte("private"), 1<<20); err != nil {
				t.Fatal(err)
			}
			checkEmpty(t, dir)
			link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasSuffix(link, " (deleted)") {
				t.Errorf("the overlay file is %q, not a deleted file", link)
			}
		})
	}
	if _, err := New(bytes.NewReader(nil), 0, Options{Dir: filepath.Join(t.TempDir(), "missing")}); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("New in a missing directory: %v", err)
	}
}

func checkEmpty(t *testing.T, dir string) {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 0 {
		t.Fatalf("%s holds %v", dir, ents)
	}
}

// TestKilledLeavesNothing kills a process holding an overlay with written
// blocks, with SIGKILL: its directory is empty afterwards. The process is
// this test binary, run as helperProcess.
func TestKilledLeavesNothing(t *testing.T) {
	t.Parallel()
	for _, tmpfile := range []string{"1", "0"} {
		dir := t.TempDir()
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperProcess$")
		cmd.Env = append(os.Environ(), "OVERLAY_HELPER_DIR="+dir, "OVERLAY_HELPER_TMPFILE="+tmpfile)
		out, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// The helper prints one line once its overlay holds data.
		line := make([]byte, 6)
		if _, err := io.ReadFull(out, line); err != nil || string(line) != "ready\n" {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("helper: %q, %v", line, err)
		}
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		checkEmpty(t, dir)
	}
}

// TestHelperProcess is the process TestKilledLeavesNothing kills.
func TestHelperProcess(t *testing.T) {
	dir := os.Getenv("OVERLAY_HELPER_DIR")
	if dir == "" {
		t.Skip("run by TestKilledLeavesNothing")
	}
	o, err := New(bytes.NewReader(make([]byte, 1<<20)), 1<<20, Options{Dir: dir})
	if err != nil {
		t.Fatal(err)
	}
	if os.Getenv("OVERLAY_HELPER_TMPFILE") == "0" {
		o.f.Close()
		if o.f, err = openUnnamed(dir, false); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := o.WriteAt(bytes.Repeat([]byte{1}, 1<<19), 1000); err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("ready\n")
	select {} // until killed
}

// TestBound fills the overlay to MaxBytes: a write needing one block more
// fails with ENOSPC and changes nothing; rewriting blocks already held
// still works; a write past the end of the disk writes what fits and
// fails with ENOSPC.
func TestBound(t *testing.T) {
	t.Parallel()
	disk := randomDisk(64<<10, 3)
	model := bytes.Clone(disk)
	o, _ := newOverlay(t, disk, Options{BlockSize: 4096, MaxBytes: 4*4096 + 100})
	write := func(off int64, n int, fill byte) (int, error) {
		return o.WriteAt(bytes.Repeat([]byte{fill}, n), off)
	}
	// Blocks 1-3 and 5: four blocks, the bound.
	if _, err := write(4096+10, 3*4096-20, 1); err != nil {
		t.Fatal(err)
	}
	if _, err := write(5*4096, 1, 2); err != nil {
		t.Fatal(err)
	}
	copy(model[4096+10:], bytes.Repeat([]byte{1}, 3*4096-20))
	model[5*4096] = 2

	// Blocks 3-4: block 4 is one too many.
	n, err := write(3*4096, 2*4096, 3)
	if n != 0 || !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write beyond the bound: %d, %v; want 0, ENOSPC", n, err)
	}
	checkRead(t, o, model, 0, len(model))

	// Blocks already held can be rewritten.
	if n, err := write(2*4096+7, 4096, 4); err != nil || n != 4096 {
		t.Fatalf("rewrite within the bound: %d, %v", n, err)
	}
	copy(model[2*4096+7:], bytes.Repeat([]byte{4}, 4096))
	checkRead(t, o, model, 0, len(model))

	st := o.Stats()
	if st.Blocks != 4 || st.Bytes != 4*4096 || st.MaxBytes != 4*4096 || st.Refused != 1 {
		t.Errorf("stats %+v", st)
	}

	// Past the end of the disk: at it, nothing; across it, the part before.
	o2, _ := newOverlay(t, disk, Options{})
	if n, err := o2.WriteAt([]byte{1}, int64(len(disk))); n != 0 || !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write at the end: %d, %v", n, err)
	}
	if n, err := o2.WriteAt([]byte{9, 9, 9}, int64(len(disk))-1); n != 1 || !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write across the end: %d, %v", n, err)
	}
	model2 := bytes.Clone(disk)
	model2[len(disk)-1] = 9
	checkRead(t, o2, model2, int64(len(disk))-4096, 4096)
}

// TestConcurrent runs writers and readers at once (run with -race).
// Writers own regions whose edges share blocks with their neighbours', so
// read-modify-writes of one block race: a lost update would lose another
// writer's bytes. Readers check every byte is either the disk's (zero) or
// its region's writer's, and the end result is checked against each
// writer's own record.
func TestConcurrent(t *testing.T) {
	t.Parallel()
	const (
		writers = 4
		region  = 3*4096 + 1234 // not a multiple of the block size
		size    = writers * region
	)
	disk := make([]byte, size)
	o, _ := newOverlay(t, disk, Options{BlockSize: 4096})
	final := make([]byte, size)
	var wg sync.WaitGroup
	var stop sync.WaitGroup
	done := make(chan struct{})
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 7))
			base := int64(w * region)
			for range 300 {
				off := rng.Int64N(region)
				n := 1 + rng.IntN(int(region-off))
				n = min(n, 6000)
				data := bytes.Repeat([]byte{byte(w + 1)}, n)
				if _, err := o.WriteAt(data, base+off); err != nil {
					t.Error(err)
					return
				}
				copy(final[base+off:], data) // each writer its own region
			}
		}()
	}
	for r := range 3 {
		stop.Add(1)
		go func() {
			defer stop.Done()
			rng := rand.New(rand.NewPCG(uint64(r), 9))
			buf := make([]byte, 3*4096)
			for {
				select {
				case <-done:
					return
				default:
				}
				off := rng.Int64N(size)
				n, err := o.ReadAt(buf, off)
				if err != nil && !errors.Is(err, io.EOF) {
					t.Error(err)
					return
				}
				for i, c := range buf[:n] {
					owner := byte((off+int64(i))/region + 1)
					if c != 0 && c != owner {
						t.Errorf("byte %d reads %d, neither the disk's 0 nor writer %d's", off+int64(i), c, owner)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(done)
	stop.Wait()
	checkRead(t, o, final, 0, size)
}

// ctxDisk is a disk below that records the context reads reach it with,
// fails reads at failAt, and lends slices.
type ctxDisk struct {
	data   []byte
	failAt int64

	mu   sync.Mutex
	ctxs []context.Context
	lent int
}

func (d *ctxDisk) ReadAt(p []byte, off int64) (int, error) {
	return d.ReadAtContext(context.Background(), p, off)
}

func (d *ctxDisk) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	d.mu.Lock()
	d.ctxs = append(d.ctxs, ctx)
	d.mu.Unlock()
	if off <= d.failAt && d.failAt < off+int64(len(p)) {
		return 0, syscall.EIO
	}
	return bytes.NewReader(d.data).ReadAt(p, off)
}

func (d *ctxDisk) ReadSlices(ctx context.Context, off int64, buf []byte) ([][]byte, func(), error) {
	d.mu.Lock()
	d.lent++
	d.mu.Unlock()
	return [][]byte{d.data[off : off+int64(len(buf))]}, func() {}, nil
}

type ctxKey struct{}

func TestLowerPassThrough(t *testing.T) {
	t.Parallel()
	d := &ctxDisk{data: randomDisk(64<<10, 4), failAt: 40 << 10}
	o, err := New(d, int64(len(d.data)), Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	ctx := context.WithValue(context.Background(), ctxKey{}, "request")

	// Reads reach the disk below with the request's context; its errors
	// come back.
	if _, err := o.ReadAtContext(ctx, make([]byte, 100), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := o.ReadAtContext(ctx, make([]byte, 100), 40<<10); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of a failing block: %v", err)
	}
	// A partial write of a block reads the rest from below, with the
	// context; a failing read fails the write, which writes nothing.
	if _, err := o.WriteAtContext(ctx, []byte{1}, 100); err != nil {
		t.Fatal(err)
	}
	if n, err := o.WriteAtContext(ctx, []byte{1}, 40<<10+1); n != 0 || !errors.Is(err, syscall.EIO) {
		t.Fatalf("partial write of a failing block: %d, %v", n, err)
	}
	d.mu.Lock()
	for i, c := range d.ctxs {
		if c.Value(ctxKey{}) != "request" {
			t.Errorf("read %d below had another context", i)
		}
	}
	d.mu.Unlock()
	if st := o.Stats(); st.Blocks != 1 {
		t.Errorf("%d blocks held, want 1", st.Blocks)
	}

	// Slices are lent from below where no block was written, and declined
	// (nil) where one was.
	slices, _, err := o.ReadSlices(ctx, 8192, make([]byte, 8192))
	if err != nil || len(slices) != 1 || d.lent != 1 {
		t.Fatalf("ReadSlices of unwritten blocks: %v, %v (lent %d)", slices, err, d.lent)
	}
	for _, off := range []int64{0, 4000} {
		if slices, _, err := o.ReadSlices(ctx, off, make([]byte, 8192)); slices != nil || err != nil {
			t.Errorf("ReadSlices at %d over a written block lent %d slices, %v", off, len(slices), err)
		}
	}
}

func TestOptions(t *testing.T) {
	t.Parallel()
	for _, bs := range []int{100, 1000, 256, 2 << 20} {
		if _, err := New(bytes.NewReader(nil), 0, Options{Dir: t.TempDir(), BlockSize: bs}); err == nil {
			t.Errorf("block size %d accepted", bs)
		}
	}
	o, _ := newOverlay(t, make([]byte, 10000), Options{BlockSize: 512, MaxBytes: 1000})
	if st := o.Stats(); st.BlockSize != 512 || st.MaxBytes != 512 {
		t.Errorf("stats %+v: the bound should round down to whole blocks", st)
	}
}

// TestConcurrentOneBlock has writers write single bytes, interleaved, into
// the same two blocks: each write is a read-modify-write of a whole block,
// so without serialised writes bytes would be lost.
func TestConcurrentOneBlock(t *testing.T) {
	t.Parallel()
	const writers, size = 8, 2 * 4096
	o, _ := newOverlay(t, make([]byte, size), Options{BlockSize: 4096})
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := int64(w); off < size; off += writers {
				if _, err := o.WriteAt([]byte{byte(w + 1)}, off); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	want := make([]byte, size)
	for i := range want {
		want[i] = byte(i%writers + 1)
	}
	checkRead(t, o, want, 0, size)
}
