package fusefs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"snapmount/test/testenv"
)

// These tests mount for real. They read the mount from the test process
// with plain read(2)/pread(2) only (see the package doc on deadlocks), and
// use a helper process where a signal must hit the reader.

// testMount mounts the file of r and opt in a new temporary directory and
// returns the directory; the mount is undone when the test ends, and the
// test fails if that does not work. SNAPMOUNT_FUSE_DEBUG=1 traces opcodes.
func testMount(t *testing.T, r io.ReaderAt, opt Options) string {
	t.Helper()
	testenv.RequireFUSE(t)
	dir := t.TempDir()
	opt.Debug = os.Getenv("SNAPMOUNT_FUSE_DEBUG") == "1"
	server, err := Mount(dir, r, opt)
	if err != nil {
		t.Fatalf("Mount: %v", err)
	}
	t.Cleanup(func() {
		if err := server.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
		}
		if m, ok := findMount(t, dir); ok {
			t.Errorf("still mounted after Unmount: %+v", m)
		}
	})
	return dir
}

func TestMountReadWholeFile(t *testing.T) {
	const size = 3<<20 + 123
	dir := testMount(t, patternReader{}, Options{Name: "disk.img", Size: size})
	got, err := os.ReadFile(filepath.Join(dir, "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, patternBytes(0, size)) {
		t.Fatalf("read %d bytes, want %d of the pattern (or content differs)", len(got), size)
	}
}

// TestMountParallelReadAt reads random ranges from many goroutines at once,
// through one descriptor and several: go-fuse calls Read concurrently.
func TestMountParallelReadAt(t *testing.T) {
	const size = 64 << 20
	dir := testMount(t, patternReader{}, Options{Name: "disk", Size: size})
	path := filepath.Join(dir, "disk")
	shared, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer shared.Close()

	var wg sync.WaitGroup
	for g := range 16 {
		wg.Go(func() {
			f := shared
			if g%2 == 1 {
				own, err := os.Open(path)
				if err != nil {
					t.Error(err)
					return
				}
				defer own.Close()
				f = own
			}
			rnd := rand.New(rand.NewPCG(uint64(g), 1))
			for range 40 {
				n := 1 + rnd.IntN(300<<10)
				off := rnd.Int64N(size)
				buf := make([]byte, n)
				got, err := f.ReadAt(buf, off)
				want := min(n, int(size-off))
				if got != want || (err != nil && !(errors.Is(err, io.EOF) && got < n)) {
					t.Errorf("ReadAt(%d@%d): %d, %v; want %d bytes", n, off, got, err, want)
					return
				}
				if !bytes.Equal(buf[:got], patternBytes(off, got)) {
					t.Errorf("ReadAt(%d@%d): wrong content", n, off)
					return
				}
			}
		})
	}
	testenv.Wait(t, &wg, "the readers to finish")
}

func TestMountAttributes(t *testing.T) {
	const size = 5<<20 + 7
	mtime := time.Date(2023, 1, 2, 3, 4, 5, 0, time.UTC)
	dir := testMount(t, patternReader{}, Options{Name: "vm disk", Size: size, Mtime: mtime, UID: 4321, GID: 8765})

	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join(dir, "vm disk"), &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != syscall.S_IFREG|0444 || st.Size != size || st.Uid != 4321 || st.Gid != 8765 || st.Nlink != 1 {
		t.Errorf("file: mode %o size %d owner %d:%d nlink %d", st.Mode, st.Size, st.Uid, st.Gid, st.Nlink)
	}
	if st.Ino != fileIno || st.Mtim.Sec != mtime.Unix() || st.Blocks != (size+511)/512 || st.Blksize != preferredIOSize {
		t.Errorf("file: ino %d mtime %d blocks %d blksize %d", st.Ino, st.Mtim.Sec, st.Blocks, st.Blksize)
	}

	if err := syscall.Stat(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != syscall.S_IFDIR|0555 || st.Uid != 4321 {
		t.Errorf("root: mode %o owner %d", st.Mode, st.Uid)
	}

	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || entries[0].Name() != "vm disk" || !entries[0].Type().IsRegular() {
		t.Errorf("ReadDir: %v, want just the file", entries)
	}
	for _, name := range []string{"other", "vm", ".go-fuse-epoll-hack/x", "vm disk/x"} {
		if _, err := os.Lstat(filepath.Join(dir, name)); !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ENOTDIR) {
			t.Errorf("Lstat(%q): %v, want ENOENT", name, err)
		}
	}

	var sfs unix.Statfs_t
	if err := unix.Statfs(dir, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Flags&unix.ST_RDONLY == 0 || sfs.Blocks != (size+4095)/4096 || sfs.Bfree != 0 {
		t.Errorf("statfs: flags %#x blocks %d free %d", sfs.Flags, sfs.Blocks, sfs.Bfree)
	}
}

// kernelMaxRead is the largest READ this kernel lets a mount negotiate:
// maxRequest, or less where fs.fuse.max_pages_limit is lower (go-fuse
// lowers max_read to it; kernels without the setting allow 256 pages).
func kernelMaxRead(t *testing.T) int {
	t.Helper()
	pages := 256
	if b, err := os.ReadFile("/proc/sys/fs/fuse/max_pages_limit"); err == nil {
		if pages, err = strconv.Atoi(strings.TrimSpace(string(b))); err != nil {
			t.Fatalf("fs.fuse.max_pages_limit %q: %v", b, err)
		}
	}
	return min(maxRequest, pages*os.Getpagesize())
}

// mountMaxRead returns the max_read the mount at dir negotiated, from
// /proc/self/mounts.
func mountMaxRead(t *testing.T, dir string) int {
	t.Helper()
	m, ok := findMount(t, dir)
	if !ok {
		t.Fatalf("%s not in /proc/self/mounts", dir)
	}
	for _, o := range m.options {
		if v, ok := strings.CutPrefix(o, "max_read="); ok {
			n, err := strconv.Atoi(v)
			if err != nil {
				t.Fatalf("mount option %s: %v", o, err)
			}
			return n
		}
	}
	t.Fatalf("mount options %v have no max_read", m.options)
	return 0
}

// TestMountOptions checks /proc/mounts: read-only, nosuid and nodev (as
// fusermount3 mounts, also when root mounts directly), our type and
// source, and reads as large as the kernel allows up to 1 MiB.
func TestMountOptions(t *testing.T) {
	dir := testMount(t, patternReader{}, Options{Name: "disk", Size: 1, FsName: "nbd+unix:///disk?socket=/run/x.sock"})
	m, ok := findMount(t, dir)
	if !ok {
		t.Fatalf("%s not in /proc/self/mounts", dir)
	}
	if m.fstype != "fuse.snapmount" || m.source != "nbd+unix:///disk?socket=/run/x.sock" {
		t.Errorf("type %q source %q, want fuse.snapmount and the FsName", m.fstype, m.source)
	}
	maxRead := fmt.Sprintf("max_read=%d", kernelMaxRead(t))
	for _, want := range []string{"ro", "nosuid", "nodev", maxRead, "default_permissions"} {
		if !slices.Contains(m.options, want) {
			t.Errorf("mount options %v lack %s", m.options, want)
		}
	}
}

// TestMountRefusesWrites tries every way to change the mount; the kernel or
// the file system must say EROFS.
func TestMountRefusesWrites(t *testing.T) {
	var attempts attemptLog
	dir := testMount(t, patternReader{}, Options{Name: "disk", Size: 4096, OnWriteAttempt: attempts.record})
	file := filepath.Join(dir, "disk")
	for _, c := range []struct {
		name string
		call func() error
	}{
		{"WriteFile", func() error { return os.WriteFile(file, []byte("x"), 0644) }},
		{"open O_RDWR", func() error { f, err := os.OpenFile(file, os.O_RDWR, 0); f.Close(); return err }},
		{"open O_WRONLY", func() error { f, err := os.OpenFile(file, os.O_WRONLY, 0); f.Close(); return err }},
		{"open O_TRUNC", func() error { f, err := os.OpenFile(file, os.O_RDONLY|os.O_TRUNC, 0); f.Close(); return err }},
		{"truncate", func() error { return os.Truncate(file, 0) }},
		{"chmod", func() error { return os.Chmod(file, 0644) }},
		{"chown", func() error { return os.Chown(file, 1, 1) }},
		{"utimes", func() error { return os.Chtimes(file, time.Now(), time.Now()) }},
		{"create", func() error { f, err := os.Create(filepath.Join(dir, "new")); f.Close(); return err }},
		{"mkdir", func() error { return os.Mkdir(filepath.Join(dir, "d"), 0755) }},
		{"remove", func() error { return os.Remove(file) }},
		{"rename", func() error { return os.Rename(file, filepath.Join(dir, "moved")) }},
		{"link", func() error { return os.Link(file, filepath.Join(dir, "l")) }},
		{"symlink", func() error { return os.Symlink("disk", filepath.Join(dir, "s")) }},
		{"mkfifo", func() error { return syscall.Mkfifo(filepath.Join(dir, "p"), 0644) }},
		{"setxattr", func() error { return unix.Setxattr(file, "user.x", []byte("y"), 0) }},
		{"removexattr", func() error { return unix.Removexattr(file, StatsXattr) }},
		{"chmod root", func() error { return os.Chmod(dir, 0777) }},
	} {
		if err := c.call(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: %v, want EROFS", c.name, err)
		}
	}
	// A descriptor opened for reading cannot write either.
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte("x"), 0); !errors.Is(err, syscall.EBADF) {
		t.Errorf("write to O_RDONLY descriptor: %v, want EBADF", err)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, 4096); !errors.Is(err, syscall.EBADF) && !errors.Is(err, syscall.EROFS) {
		t.Errorf("fallocate: %v, want EBADF or EROFS", err)
	}
	if err := f.Sync(); err != nil {
		t.Errorf("fsync of the read-only file: %v", err)
	}
	if got, err := io.ReadAll(f); err != nil || !bytes.Equal(got, patternBytes(0, 4096)) {
		t.Errorf("content after the attempts: %v", err)
	}
	t.Logf("write attempts that reached the file system (the kernel refuses the rest): %v", attempts.list)
}

func TestMountSeek(t *testing.T) {
	const size = 4 << 20
	sparse := &sparseReader{size: size, data: []extent{{0, 64 << 10}, {1 << 20, 64 << 10}}}
	dir := testMount(t, sparse, Options{Name: "sparse", Size: size})
	f, err := os.Open(filepath.Join(dir, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	for _, c := range []struct {
		off    int64
		whence int
		want   int64
		err    error
	}{
		{0, unix.SEEK_HOLE, 64 << 10, nil},
		{64 << 10, unix.SEEK_DATA, 1 << 20, nil},
		{100 << 10, unix.SEEK_DATA, 1 << 20, nil},
		{1<<20 + 1, unix.SEEK_HOLE, 1<<20 + 64<<10, nil},
		{1<<20 + 64<<10, unix.SEEK_DATA, 0, syscall.ENXIO},
		{size, unix.SEEK_HOLE, 0, syscall.ENXIO},
	} {
		got, err := unix.Seek(fd, c.off, c.whence)
		if c.err != nil {
			if !errors.Is(err, c.err) {
				t.Errorf("Seek(%d, %d): %d, %v; want %v", c.off, c.whence, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("Seek(%d, %d): %d, %v; want %d", c.off, c.whence, got, err, c.want)
		}
	}

	// Without a Seeker the whole file is data.
	dir = testMount(t, patternReader{}, Options{Name: "dense", Size: size})
	g, err := os.Open(filepath.Join(dir, "dense"))
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if got, err := unix.Seek(int(g.Fd()), 12345, unix.SEEK_DATA); err != nil || got != 12345 {
		t.Errorf("SEEK_DATA without Seeker: %d, %v", got, err)
	}
	if got, err := unix.Seek(int(g.Fd()), 12345, unix.SEEK_HOLE); err != nil || got != size {
		t.Errorf("SEEK_HOLE without Seeker: %d, %v", got, err)
	}
}

func TestMountStatsXattr(t *testing.T) {
	stats := []byte(`{"hits":10,"misses":3,"snapshot":"disk@s7"}`)
	dir := testMount(t, patternReader{}, Options{Name: "disk", Size: 1, Stats: func() []byte { return stats }})
	file := filepath.Join(dir, "disk")

	n, err := unix.Getxattr(file, StatsXattr, nil)
	if err != nil || n != len(stats) {
		t.Fatalf("size query: %d, %v; want %d", n, err, len(stats))
	}
	buf := make([]byte, n)
	if n, err = unix.Getxattr(file, StatsXattr, buf); err != nil || !bytes.Equal(buf[:n], stats) {
		t.Errorf("Getxattr: %q, %v", buf[:n], err)
	}
	if _, err := unix.Getxattr(file, StatsXattr, make([]byte, 3)); !errors.Is(err, syscall.ERANGE) {
		t.Errorf("small buffer: %v, want ERANGE", err)
	}
	if _, err := unix.Getxattr(file, "user.nothing", make([]byte, 100)); !errors.Is(err, syscall.ENODATA) {
		t.Errorf("other name: %v, want ENODATA", err)
	}
	list := make([]byte, 256)
	if n, err = unix.Listxattr(file, list); err != nil || string(list[:n]) != StatsXattr+"\x00" {
		t.Errorf("Listxattr: %q, %v", list[:n], err)
	}

	dir = testMount(t, patternReader{}, Options{Name: "disk", Size: 1})
	if n, err := unix.Listxattr(filepath.Join(dir, "disk"), list); err != nil || n != 0 {
		t.Errorf("Listxattr without Stats: %q, %v", list[:n], err)
	}
}

// TestMountRequestSize: a 1 MiB O_DIRECT read reaches the reader in
// requests of the negotiated max_read (one of 1 MiB where the kernel
// allows it), not eight of 128 KiB.
func TestMountRequestSize(t *testing.T) {
	counter := &countingReader{r: patternReader{}}
	dir := testMount(t, counter, Options{Name: "disk", Size: 8 << 20})
	maxRead := mountMaxRead(t, dir)
	if want := kernelMaxRead(t); maxRead != want {
		t.Fatalf("the mount negotiated max_read=%d, want %d", maxRead, want)
	}
	fd, err := unix.Open(filepath.Join(dir, "disk"), unix.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	buf := testenv.AlignedBuf(1 << 20)
	for _, off := range []int64{0, 3 << 20} {
		before, _, _ := counter.stats()
		n, err := unix.Pread(fd, buf, off)
		if err != nil || n != len(buf) || !bytes.Equal(buf, patternBytes(off, n)) {
			t.Fatalf("Pread(1 MiB @%d): %d, %v", off, n, err)
		}
		after, _, largest := counter.stats()
		if want := (1<<20 + maxRead - 1) / maxRead; after-before != want || largest != maxRead {
			t.Errorf("1 MiB O_DIRECT read at %d took %d requests, largest %d; want %d of %d", off, after-before, largest, want, maxRead)
		}
	}
}

// TestMountBufferedRequestSizes: buffered sequential reads reach the reader
// as kernel readahead shapes them, in requests as large as the readahead
// window or max_read allow, whichever is smaller. As root, Mount raised
// the window, so requests grow to max_read; otherwise the kernel's window
// (128 KiB by default) caps them.
func TestMountBufferedRequestSizes(t *testing.T) {
	counter := &countingReader{r: patternReader{}}
	const size = 32 << 20
	dir := testMount(t, counter, Options{Name: "disk", Size: size})
	f, err := os.Open(filepath.Join(dir, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := io.ReadFull(f, buf); err != nil || !bytes.Equal(buf, patternBytes(off, len(buf))) {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	requests, bytes, largest := counter.stats()
	t.Logf("buffered 1 MiB reads of %d MiB: %d requests, %d bytes, largest %d", size>>20, requests, bytes, largest)
	ra := readAheadKB(t, dir)
	if os.Geteuid() == 0 && ra != readAhead>>10 {
		t.Errorf("read_ahead_kb of the mount is %d, want %d", ra, readAhead>>10)
	}
	if want := min(mountMaxRead(t, dir), ra<<10); largest != want {
		t.Errorf("largest request %d bytes, want %d (max_read %d, read_ahead_kb %d)", largest, want, mountMaxRead(t, dir), ra)
	}
}

// readAheadKB returns the kernel readahead window of the mount at dir.
func readAheadKB(t *testing.T, dir string) int {
	t.Helper()
	ra, err := KernelReadahead(dir)
	if err != nil {
		t.Fatal(err)
	}
	return int(ra >> 10)
}

// TestMountKeepCache: an immutable view keeps the page cache across opens,
// so a second read does not reach the reader; a live view drops it on open.
func TestMountKeepCache(t *testing.T) {
	const size = 2 << 20
	for _, immutable := range []bool{true, false} {
		counter := &countingReader{r: patternReader{}}
		dir := testMount(t, counter, Options{Name: "disk", Size: size, Immutable: immutable})
		testenv.CheckPageCache(t, filepath.Join(dir, "disk"), patternBytes(0, size), immutable, func() int64 {
			_, n, _ := counter.stats()
			return n
		})
	}
}

// TestMountReadError: a failing range gives the reader's errno to the
// application, and the rest of the file stays readable.
func TestMountReadError(t *testing.T) {
	const bad = 1 << 20 // [1 MiB, 2 MiB) fails
	r := readerFunc(func(p []byte, off int64) (int, error) {
		if off < 2*bad && off+int64(len(p)) > bad {
			return 0, &serverError{syscall.EIO}
		}
		fillPattern(p, off)
		return len(p), nil
	})
	var logged bytes.Buffer
	var mu sync.Mutex
	logger := log.New(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return logged.Write(p)
	}), "", 0)
	dir := testMount(t, r, Options{Name: "disk", Size: 4 << 20, Logger: logger})
	f, err := os.Open(filepath.Join(dir, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	if _, err := f.ReadAt(buf, bad+8192); !errors.Is(err, syscall.EIO) {
		t.Errorf("read in the bad range: %v, want EIO", err)
	}
	if _, err := f.ReadAt(buf, 3<<20); err != nil || !bytes.Equal(buf, patternBytes(3<<20, 4096)) {
		t.Errorf("read after the bad range: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(logged.String(), "EIO") {
		t.Errorf("the failure was not logged: %q", logged.String())
	}
}

type writerFunc func(p []byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// blockingReader blocks every read until its context is cancelled, and says
// when a read has started.
type blockingReader struct {
	started     chan struct{} // closed when the first read starts
	startOnce   sync.Once
	interrupted chan struct{} // closed when a read saw its context end
	intOnce     sync.Once
	release     chan struct{} // closed to end every read with an error
}

func newBlockingReader() *blockingReader {
	return &blockingReader{started: make(chan struct{}), interrupted: make(chan struct{}), release: make(chan struct{})}
}

func (b *blockingReader) ReadAt(p []byte, off int64) (int, error) {
	panic("ReadAt called although ReadAtContext exists")
}

func (b *blockingReader) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	b.startOnce.Do(func() { close(b.started) })
	select {
	case <-ctx.Done():
		b.intOnce.Do(func() { close(b.interrupted) })
		return 0, ctx.Err()
	case <-b.release:
		return 0, errors.New("blockingReader: released")
	}
}

// TestMountInterrupt: a signal to a process blocked in read(2) makes the
// kernel interrupt the FUSE request; the reader's context ends and the
// process's read fails with EINTR. The reader is a helper process (this test
// binary) that reads with O_DIRECT, so the request is synchronous and
// interruptible, and catches SIGUSR1, which is sent to its reading thread.
func TestMountInterrupt(t *testing.T) {
	r := newBlockingReader()
	dir := testMount(t, r, Options{Name: "disk", Size: 1 << 20, Logger: log.New(io.Discard, "", 0)})
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := helperCmd(self, "pread", helperFileEnv+"="+filepath.Join(dir, "disk"))
	lines := newLineWriter()
	cmd.Stdout = lines
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		lines.done()
		close(exited)
	}()
	// Runs before testMount's unmount. A process blocked in a FUSE request
	// cannot die before the request is answered, so answer it first.
	t.Cleanup(func() {
		close(r.release)
		select {
		case <-exited:
		default:
			_ = cmd.Process.Kill()
			testenv.Receive(t, exited, "the helper process to exit")
		}
	})
	line, _ := lines.next(t, 30*time.Second)
	var tid int
	if _, err := fmt.Sscanf(line, "tid %d", &tid); err != nil {
		testenv.Receive(t, exited, "the helper process to exit")
		t.Fatalf("helper said %q (exit: %v)", line, waitErr)
	}
	select {
	case <-r.started:
	case <-time.After(30 * time.Second):
		t.Fatal("the helper's read never reached the reader")
	}
	if err := unix.Tgkill(cmd.Process.Pid, tid, unix.SIGUSR1); err != nil {
		t.Fatal(err)
	}
	if got, ok := lines.next(t, 30*time.Second); !ok {
		testenv.Receive(t, exited, "the helper process to exit")
		t.Fatalf("helper ended without a result: %v", waitErr)
	} else if got != "result EINTR" {
		t.Errorf("helper: %q, want result EINTR", got)
	}
	select {
	case <-r.interrupted:
	default:
		t.Errorf("the reader's context was not cancelled")
	}
	testenv.Receive(t, exited, "the helper process to exit")
	if waitErr != nil {
		t.Errorf("helper: %v", waitErr)
	}
}

// KernelReadahead finds a mount by a path through a symlink, as the mount
// command may be given one: the mount table lists the resolved path.
func TestKernelReadaheadThroughSymlink(t *testing.T) {
	dir := testMount(t, patternReader{}, Options{Name: "disk", Size: 1 << 20})
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	want, err := KernelReadahead(dir)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := KernelReadahead(link); err != nil || got != want {
		t.Fatalf("KernelReadahead through a symlink: %d, %v; want %d as for %s", got, err, want, dir)
	}
}
