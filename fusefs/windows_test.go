package fusefs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"snapmount/test/testenv"
)

// memDisk is a disk in memory that can be written: the Writer of the
// tests (in snapmount, the overlay), and their reader too.
type memDisk struct {
	mu  sync.RWMutex
	b   []byte
	err error // returned by every write when set
}

func newMemDisk(size int) *memDisk { return &memDisk{b: patternBytes(0, size)} }

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return bytes.NewReader(m.b).ReadAt(p, off)
}

func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return 0, m.err
	}
	return copy(m.b[off:], p), nil
}

func (m *memDisk) bytes(off, n int64) []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return bytes.Clone(m.b[off : off+n])
}

// windowed returns options for a 1 MiB file "disk" with windows disk-p1
// (64 KiB at 4 KiB) and disk-p2 (the last 100,000 bytes).
func windowed(w *memDisk) Options {
	opt := Options{Name: "disk", Size: 1 << 20, Windows: []Window{
		{Name: "disk-p1", Offset: 4096, Size: 64 << 10},
		{Name: "disk-p2", Offset: 1<<20 - 100000, Size: 100000},
	}}
	if w != nil {
		opt.Writer = w
	}
	return opt
}

// sparseDisk reports 4 KiB of the file as allocated.
type sparseDisk struct{ patternReader }

func (sparseDisk) AllocatedBytes(ctx context.Context) (int64, bool) { return 4096, true }

func TestWindowsTree(t *testing.T) {
	root, _ := newTestNodes(t, sparseDisk{}, windowed(nil))
	if got := readdirNames(t, root, true); got != ".:1 ..:1 disk:2 disk-p1:3 disk-p2:4" {
		t.Errorf("Readdir: %s", got)
	}
	for name, size := range map[string]uint64{"disk": 1 << 20, "disk-p1": 64 << 10, "disk-p2": 100000} {
		child := root.GetChild(name)
		if child == nil {
			t.Fatalf("no child %s", name)
		}
		var out fuse.AttrOut
		child.Operations().(*fileNode).Getattr(context.Background(), nil, &out)
		if out.Size != size || out.Mode != syscall.S_IFREG|0444 {
			t.Errorf("%s: size %d mode %o", name, out.Size, out.Mode)
		}
		// The allocation is the whole file's: a window counts as
		// allocated throughout.
		if blocks := map[string]uint64{"disk": 8}[name]; blocks == 0 && out.Blocks != (size+511)/512 || blocks != 0 && out.Blocks != blocks {
			t.Errorf("%s: %d blocks", name, out.Blocks)
		}
	}
	var st fuse.StatfsOut
	root.Statfs(context.Background(), &st)
	if st.Files != 4 {
		t.Errorf("statfs counts %d files, want 4", st.Files)
	}
}

func windowNode(t *testing.T, root *rootNode, name string) *fileNode {
	t.Helper()
	child := root.GetChild(name)
	if child == nil {
		t.Fatalf("no file %s", name)
	}
	return child.Operations().(*fileNode)
}

// TestWindowRead reads and seeks through windows: offsets are the
// window's, data and holes the file's at the window's offset.
func TestWindowRead(t *testing.T) {
	sparse := &sparseReader{size: 1 << 20, data: []extent{{8192, 4096}, {1<<20 - 50000, 10000}}}
	root, _ := newTestNodes(t, sparse, windowed(nil))
	p1, p2 := windowNode(t, root, "disk-p1"), windowNode(t, root, "disk-p2")

	got, errno := readBytes(t, p1, context.Background(), 8192, 2048)
	if errno != 0 || !bytes.Equal(got, mustRead(t, sparse, 4096+2048, 8192)) {
		t.Errorf("p1 read at 2048: %v", errno)
	}
	// A read across the window's end stops there.
	got, errno = readBytes(t, p2, context.Background(), 4096, 100000-1000)
	if errno != 0 || len(got) != 1000 || !bytes.Equal(got, mustRead(t, sparse, 1<<20-1000, 1000)) {
		t.Errorf("p2 read across its end: %d bytes, %v", len(got), errno)
	}
	for _, c := range []struct {
		f      *fileNode
		off    uint64
		whence uint32
		want   uint64
		errno  syscall.Errno
	}{
		{p1, 0, unix.SEEK_DATA, 4096, 0},             // the file's data at 8192
		{p1, 0, unix.SEEK_HOLE, 0, 0},                // the window starts in a hole
		{p1, 4096, unix.SEEK_HOLE, 8192, 0},          // ... and the data ends at 12288
		{p1, 8192, unix.SEEK_DATA, 0, syscall.ENXIO}, // no more data inside p1
		{p2, 0, unix.SEEK_DATA, 50000, 0},
		{p2, 50000, unix.SEEK_HOLE, 60000, 0},
		{p2, 60000, unix.SEEK_HOLE, 60000, 0},
		{p2, 60001, unix.SEEK_DATA, 0, syscall.ENXIO},
	} {
		got, errno := c.f.Lseek(context.Background(), nil, c.off, c.whence)
		if got != c.want || errno != c.errno {
			t.Errorf("%s Lseek(%d, %d): %d, %v; want %d, %v", c.f.win.Name, c.off, c.whence, got, errno, c.want, c.errno)
		}
	}
}

func mustRead(t *testing.T, r interface {
	ReadAt([]byte, int64) (int, error)
}, off int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := r.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestInvalidWindows(t *testing.T) {
	for _, ws := range [][]Window{
		{{Name: "disk", Offset: 0, Size: 1}},
		{{Name: "p", Offset: 0, Size: 1}, {Name: "p", Offset: 1, Size: 1}},
		{{Name: "a/b", Offset: 0, Size: 1}},
		{{Name: "p", Offset: -1, Size: 1}},
		{{Name: "p", Offset: 0, Size: 101}},
		{{Name: "p", Offset: 100, Size: 1}},
		{{Name: "p", Offset: 50, Size: 1<<63 - 1}},
	} {
		if _, err := Mount("/nonexistent", patternReader{}, Options{Name: "disk", Size: 100, Windows: ws}); err == nil {
			t.Errorf("windows %+v accepted", ws)
		}
	}
}

// TestWriterNodes calls the write paths of writable files directly.
func TestWriterNodes(t *testing.T) {
	disk := newMemDisk(1 << 20)
	var log attemptLog
	opt := windowed(disk)
	opt.OnWriteAttempt = log.record
	root, whole := newTestNodes(t, disk, opt)
	p1, p2 := windowNode(t, root, "disk-p1"), windowNode(t, root, "disk-p2")
	ctx := callerCtx(1, 2)

	var out fuse.AttrOut
	p1.Getattr(ctx, nil, &out)
	if out.Mode != syscall.S_IFREG|0644 {
		t.Errorf("writable file mode %o, want 0644", out.Mode)
	}
	for _, flags := range []int{syscall.O_RDWR, syscall.O_WRONLY, syscall.O_RDONLY} {
		_, fl, errno := p1.Open(ctx, uint32(flags))
		if errno != 0 || fl&fuse.FOPEN_DIRECT_IO == 0 || fl&fuse.FOPEN_KEEP_CACHE != 0 {
			t.Errorf("Open(%#o): flags %#x, %v; want direct I/O, no kept cache", flags, fl, errno)
		}
	}
	for _, flags := range []int{syscall.O_RDWR | syscall.O_TRUNC, syscall.O_WRONLY | syscall.O_APPEND} {
		if _, _, errno := p1.Open(ctx, uint32(flags)); errno != syscall.EPERM {
			t.Errorf("Open(%#o): %v, want EPERM", flags, errno)
		}
	}

	// A write through a window lands at the window's offset.
	if n, errno := p1.Write(ctx, nil, []byte("through p1"), 100); n != 10 || errno != 0 {
		t.Fatalf("p1 Write: %d, %v", n, errno)
	}
	if got := disk.bytes(4096+100, 10); string(got) != "through p1" {
		t.Errorf("the disk holds %q at p1's offset 100", got)
	}
	got, _ := readBytes(t, whole, ctx, 10, 4096+100)
	if string(got) != "through p1" {
		t.Errorf("the whole file reads %q", got)
	}
	// Across the end: a short write; at the end: ENOSPC.
	if n, errno := p2.Write(ctx, nil, []byte("0123456789"), 100000-4); n != 4 || errno != 0 {
		t.Errorf("Write across p2's end: %d, %v; want 4, 0", n, errno)
	}
	if n, errno := p2.Write(ctx, nil, []byte("x"), 100000); n != 0 || errno != syscall.ENOSPC {
		t.Errorf("Write at p2's end: %d, %v; want ENOSPC", n, errno)
	}
	if got := disk.bytes(1<<20-4, 4); string(got) != "0123" {
		t.Errorf("the disk's last bytes are %q", got)
	}
	// The writer's errors come back as their errno.
	disk.err = fmt.Errorf("overlay full: %w", syscall.ENOSPC)
	if _, errno := whole.Write(ctx, nil, []byte("x"), 0); errno != syscall.ENOSPC {
		t.Errorf("Write when the writer is full: %v, want ENOSPC", errno)
	}
	disk.err = nil

	// Sizes and modes never change; a truncate to the same size is fine.
	for _, c := range []struct {
		name  string
		in    fuse.SetAttrIn
		errno syscall.Errno
	}{
		{"same size", setattrIn(fuse.FATTR_SIZE, 64<<10, 0), 0},
		{"same size, times", setattrIn(fuse.FATTR_SIZE|fuse.FATTR_MTIME, 64<<10, 0), 0},
		{"shrink", setattrIn(fuse.FATTR_SIZE, 0, 0), syscall.EPERM},
		{"grow", setattrIn(fuse.FATTR_SIZE, 1<<30, 0), syscall.EPERM},
		{"chmod", setattrIn(fuse.FATTR_MODE, 0, 0o600), syscall.EPERM},
		{"utimes", setattrIn(fuse.FATTR_MTIME, 0, 0), syscall.EPERM},
	} {
		if errno := p1.Setattr(ctx, nil, &c.in, &out); errno != c.errno {
			t.Errorf("Setattr %s: %v, want %v", c.name, errno, c.errno)
		}
	}
	if errno := p1.Allocate(ctx, nil, 0, 10, 0); errno != syscall.EOPNOTSUPP {
		t.Errorf("Allocate: %v", errno)
	}
	// The tree still refuses every change.
	if _, errno := root.Mkdir(ctx, "d", 0o755, &fuse.EntryOut{}); errno != syscall.EROFS {
		t.Errorf("Mkdir: %v", errno)
	}
	if errno := root.Unlink(ctx, "disk-p1"); errno != syscall.EROFS {
		t.Errorf("Unlink: %v", errno)
	}
}

func setattrIn(valid uint32, size uint64, mode uint32) fuse.SetAttrIn {
	var in fuse.SetAttrIn
	in.Valid, in.Size, in.Mode = valid, size, mode
	return in
}

// TestMountWindows mounts a file with windows, read-only: they read the
// file's bytes at their offsets and refuse writes with EROFS.
func TestMountWindows(t *testing.T) {
	dir := testMount(t, patternReader{}, windowed(nil))
	got, err := os.ReadFile(filepath.Join(dir, "disk-p2"))
	if err != nil || !bytes.Equal(got, patternBytes(1<<20-100000, 100000)) {
		t.Fatalf("disk-p2: %d bytes, %v", len(got), err)
	}
	if _, err := os.OpenFile(filepath.Join(dir, "disk-p1"), os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("open disk-p1 for writing: %v, want EROFS", err)
	}
	if names := testenv.DirNames(t, dir); !slices.Equal(names, []string{"disk", "disk-p1", "disk-p2"}) {
		t.Errorf("the mount lists %v", names)
	}
}

// TestMountWriter mounts writable files: the mount is not "ro", a write
// through a window shows at once through the whole file, even in a
// descriptor that had read the bytes before, and the other way round.
func TestMountWriter(t *testing.T) {
	disk := newMemDisk(1 << 20)
	dir := testMount(t, disk, windowed(disk))
	m, _ := findMount(t, dir)
	if slices.Contains(m.options, "ro") || !slices.Contains(m.options, "rw") {
		t.Errorf("mount options %v: want rw", m.options)
	}
	whole, err := os.OpenFile(filepath.Join(dir, "disk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer whole.Close()
	p1, err := os.OpenFile(filepath.Join(dir, "disk-p1"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p1.Close()
	before := make([]byte, 8192)
	if _, err := whole.ReadAt(before, 4096); err != nil {
		t.Fatal(err)
	}

	if _, err := p1.WriteAt([]byte("written through p1"), 1000); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 18)
	if _, err := whole.ReadAt(got, 4096+1000); err != nil || string(got) != "written through p1" {
		t.Errorf("the whole file reads %q, %v", got, err)
	}
	if _, err := whole.WriteAt([]byte("and back"), 4096+2000); err != nil {
		t.Fatal(err)
	}
	if _, err := p1.ReadAt(got[:8], 2000); err != nil || string(got[:8]) != "and back" {
		t.Errorf("p1 reads %q, %v", got[:8], err)
	}
	if got := disk.bytes(4096+1000, 18); string(got) != "written through p1" {
		t.Errorf("the writer holds %q", got)
	}

	// Past the end, ENOSPC; the size never changes.
	if _, err := p1.WriteAt([]byte("x"), 64<<10); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write at p1's end: %v, want ENOSPC", err)
	}
	if err := os.Truncate(filepath.Join(dir, "disk-p1"), 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("truncate: %v, want EPERM", err)
	}
	if fi, err := p1.Stat(); err != nil || fi.Size() != 64<<10 || fi.Mode().Perm() != 0o644 {
		t.Errorf("p1 after the attempts: %v, %v", fi, err)
	}
	// The root (mode 0555) refuses, as EACCES from the kernel unless root.
	if err := os.Mkdir(filepath.Join(dir, "d"), 0o755); !errors.Is(err, syscall.EROFS) && !errors.Is(err, syscall.EACCES) {
		t.Errorf("mkdir: %v, want EROFS or EACCES", err)
	}
	if err := p1.Sync(); err != nil {
		t.Errorf("fsync: %v", err)
	}
}
