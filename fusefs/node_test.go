package fusefs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// These tests call the node methods directly, without a mount, the way
// go-fuse would: they need neither /dev/fuse nor root.

// newTestNodes returns the root and file nodes for r and opt, with the tree
// built (OnAdd) as a mount would.
func newTestNodes(t *testing.T, r io.ReaderAt, opt Options) (*rootNode, *fileNode) {
	t.Helper()
	root := NewRoot(r, opt).(*rootNode)
	fs.NewNodeFS(root, nil) // runs OnAdd
	return root, root.file
}

// callerCtx is the context go-fuse passes: it carries the caller and is
// cancelled by an interrupt.
func callerCtx(pid, uid uint32) *fuse.Context {
	return &fuse.Context{Caller: fuse.Caller{Owner: fuse.Owner{Uid: uid}, Pid: pid}, Cancel: make(chan struct{})}
}

func TestGetattr(t *testing.T) {
	mtime := time.Date(2024, 5, 6, 7, 8, 9, 0, time.UTC)
	root, file := newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 10<<20 + 1, Mtime: mtime, UID: 1234, GID: 5678})

	var out fuse.AttrOut
	if errno := file.Getattr(context.Background(), nil, &out); errno != 0 {
		t.Fatalf("file Getattr: %v", errno)
	}
	a := out.Attr
	if a.Mode != syscall.S_IFREG|0444 || a.Size != 10<<20+1 || a.Nlink != 1 || a.Uid != 1234 || a.Gid != 5678 {
		t.Errorf("file attr: mode %o size %d nlink %d owner %d:%d, want %o %d 1 1234:5678",
			a.Mode, a.Size, a.Nlink, a.Uid, a.Gid, syscall.S_IFREG|0444, 10<<20+1)
	}
	if want := uint64(10<<20/512 + 1); a.Blocks != want {
		t.Errorf("file blocks %d, want %d", a.Blocks, want)
	}
	for name, got := range map[string]time.Time{"atime": a.AccessTime(), "mtime": a.ModTime(), "ctime": a.ChangeTime()} {
		if !got.Equal(mtime) {
			t.Errorf("file %s %v, want %v", name, got, mtime)
		}
	}

	out = fuse.AttrOut{}
	if errno := root.Getattr(context.Background(), nil, &out); errno != 0 {
		t.Fatalf("root Getattr: %v", errno)
	}
	if a := out.Attr; a.Mode != syscall.S_IFDIR|0555 || a.Uid != 1234 || a.Gid != 5678 || !a.ModTime().Equal(mtime) {
		t.Errorf("root attr: mode %o owner %d:%d mtime %v", a.Mode, a.Uid, a.Gid, a.ModTime())
	}
}

func TestGetattrDefaults(t *testing.T) {
	before := time.Now().Add(-time.Second)
	_, file := newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 1})
	var out fuse.AttrOut
	file.Getattr(context.Background(), nil, &out)
	if out.Uid != uint32(os.Getuid()) || out.Gid != uint32(os.Getgid()) {
		t.Errorf("owner %d:%d, want the process's %d:%d", out.Uid, out.Gid, os.Getuid(), os.Getgid())
	}
	if mt := out.ModTime(); mt.Before(before) || mt.After(time.Now().Add(time.Second)) {
		t.Errorf("mtime %v, want about now", mt)
	}
}

// allocReader reports a fixed allocation, however wrong, as final, and
// the context it was asked with.
type allocReader struct {
	patternReader
	used int64
	ctxs chan context.Context
}

func (a allocReader) AllocatedBytes(ctx context.Context) (int64, bool) {
	if a.ctxs != nil {
		a.ctxs <- ctx
	}
	return a.used, true
}

// st_blocks comes from the reader's AllocationReporter, in 512-byte units
// rounded up, kept between 0 and the size; a final count keeps the usual
// attribute timeout.
func TestGetattrBlocksFromAllocation(t *testing.T) {
	const size = 10 << 20
	for _, c := range []struct {
		used int64
		want uint64
	}{{0, 0}, {4096, 8}, {4097, 9}, {size, size / 512}, {-1, 0}, {size + 4096, size / 512}} {
		ctxs := make(chan context.Context, 1)
		_, file := newTestNodes(t, allocReader{used: c.used, ctxs: ctxs}, Options{Name: "disk", Size: size})
		ctx := callerCtx(1, 2)
		var out fuse.AttrOut
		if errno := file.Getattr(ctx, nil, &out); errno != 0 {
			t.Fatalf("Getattr: %v", errno)
		}
		if out.Blocks != c.want || out.Size != size || out.Timeout() != 0 {
			t.Errorf("AllocatedBytes %d: blocks %d size %d timeout %v, want %d, %d and the default", c.used, out.Blocks, out.Size, out.Timeout(), c.want, size)
		}
		if caller, ok := fuse.FromContext(<-ctxs); !ok || caller.Pid != 1 {
			t.Errorf("AllocatedBytes was not asked with a context of the request's")
		}
	}
}

// slowAlloc is a reporter still learning: it waits for its context and
// answers with what it knows so far, not final.
type slowAlloc struct {
	patternReader
	known     int64
	deadlines chan time.Duration
}

func (a slowAlloc) AllocatedBytes(ctx context.Context) (int64, bool) {
	dl, ok := ctx.Deadline()
	if !ok {
		dl = time.Now().Add(time.Hour)
	}
	a.deadlines <- time.Until(dl)
	select {
	case <-ctx.Done():
	case <-time.After(time.Minute): // a deadline far away fails the test
	}
	return a.known, false
}

// A stat (GETATTR, or the LOOKUP that precedes the first) waits for an
// allocation count still being learned for allocWait at most, not for as
// long as the server takes, reports what is known, and lets the kernel
// keep that only for partialAttrTimeout.
func TestGetattrDoesNotWaitForAllocation(t *testing.T) {
	const size = 10 << 20
	r := slowAlloc{known: 1 << 20, deadlines: make(chan time.Duration, 2)}
	root, file := newTestNodes(t, r, Options{Name: "disk", Size: size})
	var out fuse.AttrOut
	if errno := file.Getattr(callerCtx(1, 2), nil, &out); errno != 0 {
		t.Fatalf("Getattr: %v", errno)
	}
	if out.Blocks != (1<<20)/512 || out.Timeout() != partialAttrTimeout {
		t.Errorf("Getattr with the count still learned: blocks %d, timeout %v; want %d, %v", out.Blocks, out.Timeout(), (1<<20)/512, partialAttrTimeout)
	}
	var entry fuse.EntryOut
	if _, errno := root.Lookup(callerCtx(1, 2), "disk", &entry); errno != 0 {
		t.Fatalf("Lookup: %v", errno)
	}
	if entry.Blocks != (1<<20)/512 || entry.AttrTimeout() != partialAttrTimeout {
		t.Errorf("Lookup with the count still learned: blocks %d, attribute timeout %v; want %d, %v", entry.Blocks, entry.AttrTimeout(), (1<<20)/512, partialAttrTimeout)
	}
	for range 2 {
		if d := <-r.deadlines; d > allocWait {
			t.Errorf("AllocatedBytes was given %v to answer, want %v at most", d, allocWait)
		}
	}
	// An immutable view keeps the usual timeout: a refresh of the
	// attributes would drop the page cache it keeps across opens.
	_, file = newTestNodes(t, r, Options{Name: "disk", Size: size, Immutable: true})
	out = fuse.AttrOut{}
	file.Getattr(callerCtx(1, 2), nil, &out)
	<-r.deadlines
	if out.Blocks != (1<<20)/512 || out.Timeout() != 0 {
		t.Errorf("Getattr of an immutable view with the count still learned: blocks %d, timeout %v; want %d, the default", out.Blocks, out.Timeout(), (1<<20)/512)
	}
}

func TestTree(t *testing.T) {
	root, file := newTestNodes(t, patternReader{}, Options{Name: "disk.img", Size: 1})
	children := root.Children()
	if len(children) != 1 || children["disk.img"] == nil || children["disk.img"].Operations() != file {
		t.Fatalf("root children %v, want just disk.img", children)
	}
	if ino := children["disk.img"].StableAttr().Ino; ino != fileIno {
		t.Errorf("file ino %d, want %d", ino, fileIno)
	}

	if got := readdirNames(t, root, false); got != ". .. disk.img" {
		t.Errorf("Readdir: %s, want . .. disk.img", got)
	}
}

// readdirNames lists the root with Readdir: the names, and with inos the
// inode numbers too ("name:ino"), separated by spaces.
func readdirNames(t *testing.T, root *rootNode, inos bool) string {
	t.Helper()
	ds, errno := root.Readdir(context.Background())
	if errno != 0 {
		t.Fatal(errno)
	}
	var names []string
	for ds.HasNext() {
		e, errno := ds.Next()
		if errno != 0 {
			t.Fatal(errno)
		}
		if inos {
			names = append(names, fmt.Sprintf("%s:%d", e.Name, e.Ino))
		} else {
			names = append(names, e.Name)
		}
	}
	return strings.Join(names, " ")
}

func TestInvalidOptions(t *testing.T) {
	for _, opt := range []Options{
		{Name: "", Size: 1},
		{Name: ".", Size: 1},
		{Name: "..", Size: 1},
		{Name: "a/b", Size: 1},
		{Name: "a\x00b", Size: 1},
		{Name: strings.Repeat("x", 256), Size: 1},
		{Name: pollHackName, Size: 1},
		{Name: "disk", Size: -1},
	} {
		// Mount checks before touching the mountpoint, so no FUSE needed.
		if _, err := Mount("/nonexistent", patternReader{}, opt); err == nil || !strings.HasPrefix(err.Error(), "fusefs: ") {
			t.Errorf("Mount with name %q size %d: error %v, want an option error", opt.Name, opt.Size, err)
		}
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewRoot with name %q size %d did not panic", opt.Name, opt.Size)
				}
			}()
			NewRoot(patternReader{}, opt)
		}()
	}
	if err := (&Options{Name: strings.Repeat("x", 255), Size: 0}).check(); err != nil {
		t.Errorf("255-byte name refused: %v", err)
	}
}

func TestOpen(t *testing.T) {
	for _, immutable := range []bool{false, true} {
		_, file := newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 1, Immutable: immutable})
		fh, flags, errno := file.Open(callerCtx(1, 2), syscall.O_RDONLY|syscall.O_LARGEFILE)
		if errno != 0 || fh != nil {
			t.Fatalf("Open O_RDONLY: handle %v errno %v", fh, errno)
		}
		if got := flags&fuse.FOPEN_KEEP_CACHE != 0; got != immutable {
			t.Errorf("Immutable=%v: FOPEN_KEEP_CACHE set=%v", immutable, got)
		}
		if flags&fuse.FOPEN_NOFLUSH == 0 {
			t.Errorf("FOPEN_NOFLUSH not set")
		}
		if flags&fuse.FOPEN_DIRECT_IO != 0 {
			t.Errorf("FOPEN_DIRECT_IO set: it would bypass the page cache")
		}
	}
}

// attempt is one call to OnWriteAttempt.
type attempt struct {
	op       string
	pid, uid uint32
}

type attemptLog struct {
	mu   sync.Mutex
	list []attempt
}

func (l *attemptLog) record(op string, pid, uid uint32) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.list = append(l.list, attempt{op, pid, uid})
}

func (l *attemptLog) last() attempt {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.list) == 0 {
		return attempt{}
	}
	return l.list[len(l.list)-1]
}

func TestOpenForWritingRefused(t *testing.T) {
	var log attemptLog
	_, file := newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 1, OnWriteAttempt: log.record})
	for _, flags := range []int{
		syscall.O_WRONLY,
		syscall.O_RDWR,
		syscall.O_RDWR | syscall.O_CREAT,
		syscall.O_RDONLY | syscall.O_TRUNC,
		syscall.O_RDONLY | syscall.O_APPEND,
		syscall.O_WRONLY | syscall.O_APPEND,
		syscall.O_ACCMODE,
	} {
		if _, _, errno := file.Open(callerCtx(77, 1000), uint32(flags)); errno != syscall.EROFS {
			t.Errorf("Open(%#o): %v, want EROFS", flags, errno)
		}
		if got := log.last(); got != (attempt{"open-write", 77, 1000}) {
			t.Errorf("Open(%#o): OnWriteAttempt got %+v", flags, got)
		}
	}
}

// TestWritesRefused calls every method that could change something: each
// must answer EROFS (not go-fuse's default, which for Unlink and Rmdir is
// success) and report the attempt.
func TestWritesRefused(t *testing.T) {
	var log attemptLog
	root, file := newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 100, OnWriteAttempt: log.record})
	ctx := callerCtx(4242, 1001)
	var attr fuse.AttrOut
	var entry fuse.EntryOut
	for _, c := range []struct {
		op   string
		call func() syscall.Errno
	}{
		{"setattr", func() syscall.Errno { return file.Setattr(ctx, nil, &fuse.SetAttrIn{}, &attr) }},
		{"write", func() syscall.Errno { _, e := file.Write(ctx, nil, []byte("x"), 0); return e }},
		{"fallocate", func() syscall.Errno { return file.Allocate(ctx, nil, 0, 10, 0) }},
		{"setxattr", func() syscall.Errno { return file.Setxattr(ctx, "user.x", []byte("y"), 0) }},
		{"removexattr", func() syscall.Errno { return file.Removexattr(ctx, StatsXattr) }},
		{"setattr", func() syscall.Errno { return root.Setattr(ctx, nil, &fuse.SetAttrIn{}, &attr) }},
		{"create", func() syscall.Errno { _, _, _, e := root.Create(ctx, "new", 0, 0644, &entry); return e }},
		{"tmpfile", func() syscall.Errno { _, _, _, e := root.Tmpfile(ctx, 0, 0644, &entry); return e }},
		{"mkdir", func() syscall.Errno { _, e := root.Mkdir(ctx, "d", 0755, &entry); return e }},
		{"mknod", func() syscall.Errno { _, e := root.Mknod(ctx, "n", syscall.S_IFIFO|0644, 0, &entry); return e }},
		{"link", func() syscall.Errno { _, e := root.Link(ctx, file, "l", &entry); return e }},
		{"symlink", func() syscall.Errno { _, e := root.Symlink(ctx, "disk", "s", &entry); return e }},
		{"unlink", func() syscall.Errno { return root.Unlink(ctx, "disk") }},
		{"rmdir", func() syscall.Errno { return root.Rmdir(ctx, "disk") }},
		{"rename", func() syscall.Errno { return root.Rename(ctx, "disk", root, "other", 0) }},
		{"setxattr", func() syscall.Errno { return root.Setxattr(ctx, "user.x", nil, 0) }},
		{"removexattr", func() syscall.Errno { return root.Removexattr(ctx, "user.x") }},
	} {
		if errno := c.call(); errno != syscall.EROFS {
			t.Errorf("%s: %v, want EROFS", c.op, errno)
		}
		if got := log.last(); got != (attempt{c.op, 4242, 1001}) {
			t.Errorf("%s: OnWriteAttempt got %+v", c.op, got)
		}
	}
	if root.GetChild("disk") == nil {
		t.Errorf("the file left the tree")
	}

	// Without a hook, and with a plain context (no caller), still EROFS.
	_, file = newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 1})
	if errno := file.Setattr(context.Background(), nil, &fuse.SetAttrIn{}, &attr); errno != syscall.EROFS {
		t.Errorf("Setattr without hook: %v", errno)
	}

	// Flushing a read-only file succeeds.
	if errno := file.Fsync(ctx, nil, 0); errno != 0 {
		t.Errorf("Fsync: %v", errno)
	}
	if errno := file.Flush(ctx, nil); errno != 0 {
		t.Errorf("Flush: %v", errno)
	}
	if errno := root.Fsync(ctx, nil, 0); errno != 0 {
		t.Errorf("root Fsync: %v", errno)
	}
}

// readBytes calls Read and returns the bytes of the result.
func readBytes(t *testing.T, f *fileNode, ctx context.Context, n int, off int64) ([]byte, syscall.Errno) {
	t.Helper()
	res, errno := f.Read(ctx, nil, make([]byte, n), off)
	if errno != 0 {
		if res != nil {
			t.Errorf("Read returned a result with errno %v", errno)
		}
		return nil, errno
	}
	b, st := res.Bytes(make([]byte, n))
	if !st.Ok() {
		t.Fatalf("ReadResult.Bytes: %v", st)
	}
	return b, 0
}

func TestRead(t *testing.T) {
	const size = 1<<20 + 5000
	_, file := newTestNodes(t, patternReader{}, Options{Name: "disk", Size: size})
	for _, c := range []struct {
		n    int
		off  int64
		want int // bytes expected
	}{
		{4096, 0, 4096},
		{1 << 20, 0, 1 << 20},
		{1000, 4097, 1000},                     // unaligned
		{131072, size - 10, 10},                // tail: clamped to the size
		{4096, size - 4096, 4096},              // exactly the last bytes
		{4096, size, 0},                        // at EOF
		{4096, size + 12345, 0},                // past EOF
		{0, 100, 0},                            // empty request
		{1 << 20, size - 1<<20 + 1, 1<<20 - 1}, // large, unaligned tail
	} {
		got, errno := readBytes(t, file, context.Background(), c.n, c.off)
		if errno != 0 {
			t.Errorf("Read(%d@%d): %v", c.n, c.off, errno)
			continue
		}
		if want := patternBytes(c.off, c.want); !bytes.Equal(got, want) {
			t.Errorf("Read(%d@%d): got %d bytes, want %d (or content differs)", c.n, c.off, len(got), len(want))
		}
	}
	if _, errno := readBytes(t, file, context.Background(), 10, -1); errno != syscall.EINVAL {
		t.Errorf("Read at -1: %v, want EINVAL", errno)
	}
}

// readerFunc adapts a function to io.ReaderAt.
type readerFunc func(p []byte, off int64) (int, error)

func (f readerFunc) ReadAt(p []byte, off int64) (int, error) { return f(p, off) }

// ctxReaderFunc adapts a function to io.ReaderAt and ContextReaderAt.
type ctxReaderFunc func(ctx context.Context, p []byte, off int64) (int, error)

func (f ctxReaderFunc) ReadAt(p []byte, off int64) (int, error) {
	panic("ReadAt called although ReadAtContext exists")
}

func (f ctxReaderFunc) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	return f(ctx, p, off)
}

// serverError is an error type like the NBD client's: it wraps the errno
// the server sent.
type serverError struct{ errno syscall.Errno }

func (e *serverError) Error() string { return "nbd: server replied " + e.errno.Error() }
func (e *serverError) Unwrap() error { return e.errno }

// wireErrno is like nbd.Errno: it knows its errno without wrapping one.
type wireErrno uint32

func (e wireErrno) Error() string          { return fmt.Sprintf("wire errno %d", uint32(e)) }
func (e wireErrno) Syscall() syscall.Errno { return syscall.Errno(e) }

func TestReadErrors(t *testing.T) {
	done := make(chan struct{})
	close(done)
	cancelled := &fuse.Context{Cancel: done}

	for _, c := range []struct {
		name   string
		r      io.ReaderAt
		ctx    context.Context
		want   syscall.Errno
		logged bool
	}{
		{"wrapped EIO", readerFunc(func(p []byte, off int64) (int, error) {
			return 0, fmt.Errorf("cache: block 3: %w", &serverError{syscall.EIO})
		}), context.Background(), syscall.EIO, true},
		{"wrapped EINVAL", readerFunc(func(p []byte, off int64) (int, error) {
			return 0, &serverError{syscall.EINVAL}
		}), context.Background(), syscall.EINVAL, true},
		{"Syscall method", readerFunc(func(p []byte, off int64) (int, error) {
			return 0, fmt.Errorf("x: %w", wireErrno(syscall.ENOSPC))
		}), context.Background(), syscall.ENOSPC, true},
		{"plain error", readerFunc(func(p []byte, off int64) (int, error) {
			return 0, errors.New("connection reset")
		}), context.Background(), syscall.EIO, true},
		{"timeout below", readerFunc(func(p []byte, off int64) (int, error) {
			return 0, fmt.Errorf("nbd: read: %w", context.DeadlineExceeded)
		}), context.Background(), syscall.EIO, true},
		{"partial data then error", readerFunc(func(p []byte, off int64) (int, error) {
			return len(p) / 2, syscall.EIO
		}), context.Background(), syscall.EIO, true},
		{"short read without error", readerFunc(func(p []byte, off int64) (int, error) {
			return len(p) - 1, nil
		}), context.Background(), syscall.EIO, true},
		{"interrupted", ctxReaderFunc(func(ctx context.Context, p []byte, off int64) (int, error) {
			<-ctx.Done()
			return 0, ctx.Err()
		}), cancelled, syscall.EINTR, false},
		{"interrupted, reader wraps the error", ctxReaderFunc(func(ctx context.Context, p []byte, off int64) (int, error) {
			return 0, fmt.Errorf("nbd: %w", context.Canceled)
		}), context.Background(), syscall.EINTR, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			var buf bytes.Buffer
			_, file := newTestNodes(t, c.r, Options{Name: "disk", Size: 1 << 20, Logger: log.New(&buf, "", 0)})
			_, errno := readBytes(t, file, c.ctx, 4096, 8192)
			if errno != c.want {
				t.Errorf("errno %v, want %v", errno, c.want)
			}
			logged := buf.String()
			if c.logged && !strings.Contains(logged, "4096 bytes at offset 8192") {
				t.Errorf("log %q does not name length and offset", logged)
			}
			if !c.logged && logged != "" {
				t.Errorf("logged %q for an interrupt", logged)
			}
		})
	}
}

// TestReadEOF: a reader whose data ends early gives a short read, not an
// error; a full read that also says io.EOF is a full read.
func TestReadEOF(t *testing.T) {
	data := patternBytes(0, 10000)
	_, file := newTestNodes(t, bytes.NewReader(data), Options{Name: "disk", Size: 20000})
	got, errno := readBytes(t, file, context.Background(), 4096, 8192)
	if errno != 0 || !bytes.Equal(got, data[8192:]) {
		t.Errorf("read across the reader's end: %d bytes, errno %v; want %d bytes", len(got), errno, 10000-8192)
	}
	_, file = newTestNodes(t, bytes.NewReader(data), Options{Name: "disk", Size: 10000})
	got, errno = readBytes(t, file, context.Background(), 4096, 10000-4096)
	if errno != 0 || !bytes.Equal(got, data[10000-4096:]) {
		t.Errorf("full read ending with io.EOF: %d bytes, errno %v", len(got), errno)
	}
}

func TestReadUsesContext(t *testing.T) {
	ctx := callerCtx(9, 9)
	var seen context.Context
	r := ctxReaderFunc(func(c context.Context, p []byte, off int64) (int, error) {
		seen = c
		fillPattern(p, off)
		return len(p), nil
	})
	_, file := newTestNodes(t, r, Options{Name: "disk", Size: 1 << 20})
	if got, errno := readBytes(t, file, ctx, 100, 7); errno != 0 || !bytes.Equal(got, patternBytes(7, 100)) {
		t.Fatalf("Read: %v", errno)
	}
	if seen != ctx {
		t.Errorf("ReadAtContext got %v, want the request's context", seen)
	}
}

func TestToErrno(t *testing.T) {
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, c := range []struct {
		ctx  context.Context
		err  error
		want syscall.Errno
	}{
		{context.Background(), nil, 0},
		{context.Background(), syscall.EIO, syscall.EIO},
		{context.Background(), &os.PathError{Op: "read", Path: "x", Err: syscall.ESHUTDOWN}, syscall.ESHUTDOWN},
		{context.Background(), context.Canceled, syscall.EINTR},
		{context.Background(), context.DeadlineExceeded, syscall.EIO},
		{context.Background(), io.ErrUnexpectedEOF, syscall.EIO},
		{context.Background(), wireErrno(0), syscall.EIO},
		{cancelled, errors.New("whatever the reader says"), syscall.EINTR},
		{cancelled, nil, 0},
	} {
		if got := toErrno(c.ctx, c.err); got != c.want {
			t.Errorf("toErrno(%v): %v, want %v", c.err, got, c.want)
		}
	}
}

func TestErrorLogRateLimit(t *testing.T) {
	var buf bytes.Buffer
	l := newErrorLog(log.New(&buf, "", 0))
	now := time.Unix(1000, 0)
	l.now = func() time.Time { return now }

	for i := range 25 {
		l.printf("error %d", i)
	}
	if lines := strings.Count(buf.String(), "\n"); lines != logBurst {
		t.Fatalf("%d lines logged in one window, want %d:\n%s", lines, logBurst, buf.String())
	}
	buf.Reset()
	now = now.Add(logWindow)
	l.printf("later")
	if got, want := buf.String(), "later (15 similar errors not logged)\n"; got != want {
		t.Errorf("next window: %q, want %q", got, want)
	}
}

func TestLseek(t *testing.T) {
	const size = 4 << 20
	sparse := &sparseReader{size: size, data: []extent{{0, 64 << 10}, {1 << 20, 64 << 10}, {3 << 20, 1 << 20}}}
	type seek struct {
		off    uint64
		whence uint32
		want   uint64
		errno  syscall.Errno
	}
	for _, c := range []struct {
		name  string
		r     io.ReaderAt
		seeks []seek
	}{
		{"no Seeker: all data", patternReader{}, []seek{
			{0, unix.SEEK_DATA, 0, 0},
			{12345, unix.SEEK_DATA, 12345, 0},
			{0, unix.SEEK_HOLE, size, 0},
			{size - 1, unix.SEEK_HOLE, size, 0},
			{size, unix.SEEK_DATA, 0, syscall.ENXIO},
			{size, unix.SEEK_HOLE, 0, syscall.ENXIO},
			{size + 1, unix.SEEK_HOLE, 0, syscall.ENXIO},
			{0, unix.SEEK_SET, 0, syscall.EINVAL},
		}},
		{"Seeker", sparse, []seek{
			{0, unix.SEEK_DATA, 0, 0},
			{0, unix.SEEK_HOLE, 64 << 10, 0},
			{64 << 10, unix.SEEK_DATA, 1 << 20, 0},
			{100, unix.SEEK_DATA, 100, 0},
			{1<<20 + 5, unix.SEEK_HOLE, 1<<20 + 64<<10, 0},
			{2 << 20, unix.SEEK_HOLE, 2 << 20, 0},
			{2 << 20, unix.SEEK_DATA, 3 << 20, 0},
			{3 << 20, unix.SEEK_HOLE, size, 0},
			{size - 1, unix.SEEK_DATA, size - 1, 0},
			{size, unix.SEEK_DATA, 0, syscall.ENXIO},
		}},
		{"Seeker, no data after the first extent", &sparseReader{size: size, data: []extent{{0, 4096}}}, []seek{
			{4096, unix.SEEK_DATA, 0, syscall.ENXIO},
			{4096, unix.SEEK_HOLE, 4096, 0},
		}},
		{"Seeker out of range is kept in range", badSeeker{data: -5, hole: size + 100}, []seek{
			{10, unix.SEEK_DATA, 10, 0},
			{10, unix.SEEK_HOLE, size, 0},
		}},
		{"Seeker answers past the end", badSeeker{data: size, hole: 3}, []seek{
			{10, unix.SEEK_DATA, 0, syscall.ENXIO},
			{10, unix.SEEK_HOLE, size, 0},
		}},
		{"Seeker fails", badSeeker{err: &serverError{syscall.EIO}}, []seek{
			{10, unix.SEEK_DATA, 0, syscall.EIO},
			{10, unix.SEEK_HOLE, 0, syscall.EIO},
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, file := newTestNodes(t, c.r, Options{Name: "disk", Size: size, Logger: log.New(io.Discard, "", 0)})
			for _, s := range c.seeks {
				got, errno := file.Lseek(context.Background(), nil, s.off, s.whence)
				if errno != s.errno || (errno == 0 && got != s.want) {
					t.Errorf("Lseek(%d, %d): %d, %v; want %d, %v", s.off, s.whence, got, errno, s.want, s.errno)
				}
			}
		})
	}
}

// badSeeker returns fixed answers, however wrong.
type badSeeker struct {
	data, hole int64
	err        error
}

func (b badSeeker) ReadAt(p []byte, off int64) (int, error) { return len(p), nil }
func (b badSeeker) SeekData(ctx context.Context, off int64) (int64, error) {
	return b.data, b.err
}
func (b badSeeker) SeekHole(ctx context.Context, off int64) (int64, error) {
	return b.hole, b.err
}

func TestXattr(t *testing.T) {
	ctx := context.Background()
	_, file := newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 1})
	if _, errno := file.Getxattr(ctx, StatsXattr, make([]byte, 100)); errno != syscall.ENODATA {
		t.Errorf("Getxattr without Stats: %v, want ENODATA", errno)
	}
	if n, errno := file.Listxattr(ctx, make([]byte, 100)); n != 0 || errno != 0 {
		t.Errorf("Listxattr without Stats: %d, %v; want 0, OK", n, errno)
	}

	stats := []byte(`{"hits":1,"misses":2}`)
	_, file = newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 1, Stats: func() []byte { return stats }})
	if n, errno := file.Getxattr(ctx, StatsXattr, nil); n != uint32(len(stats)) || errno != syscall.ERANGE {
		t.Errorf("size query: %d, %v; want %d, ERANGE (go-fuse turns it into the size)", n, errno, len(stats))
	}
	if n, errno := file.Getxattr(ctx, StatsXattr, make([]byte, 5)); n != uint32(len(stats)) || errno != syscall.ERANGE {
		t.Errorf("small buffer: %d, %v; want %d, ERANGE", n, errno, len(stats))
	}
	buf := make([]byte, len(stats))
	if n, errno := file.Getxattr(ctx, StatsXattr, buf); errno != 0 || string(buf[:n]) != string(stats) {
		t.Errorf("exact buffer: %q, %v", buf[:n], errno)
	}
	if _, errno := file.Getxattr(ctx, "user.other", make([]byte, 100)); errno != syscall.ENODATA {
		t.Errorf("other name: %v, want ENODATA", errno)
	}

	want := StatsXattr + "\x00"
	if n, errno := file.Listxattr(ctx, nil); n != uint32(len(want)) || errno != syscall.ERANGE {
		t.Errorf("Listxattr size query: %d, %v", n, errno)
	}
	buf = make([]byte, 100)
	if n, errno := file.Listxattr(ctx, buf); errno != 0 || string(buf[:n]) != want {
		t.Errorf("Listxattr: %q, %v; want %q", buf[:n], errno, want)
	}

	big := make([]byte, xattrSizeMax+1)
	_, file = newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 1, Stats: func() []byte { return big }})
	if _, errno := file.Getxattr(ctx, StatsXattr, nil); errno != syscall.E2BIG {
		t.Errorf("oversized stats: %v, want E2BIG", errno)
	}
}

func TestStatfs(t *testing.T) {
	root, file := newTestNodes(t, patternReader{}, Options{Name: "disk", Size: 10*4096 + 1})
	for _, n := range []fs.NodeStatfser{root, file} {
		var out fuse.StatfsOut
		if errno := n.Statfs(context.Background(), &out); errno != 0 {
			t.Fatal(errno)
		}
		if out.Blocks != 11 || out.Bfree != 0 || out.Bavail != 0 || out.Bsize != 4096 || out.NameLen != 255 {
			t.Errorf("statfs %+v", out)
		}
	}
}

func TestMountDevice(t *testing.T) {
	const mountinfo = `22 1 0:21 / /proc rw,nosuid shared:12 - proc proc rw
97 29 0:52 / /tmp/a\040b rw,nosuid,nodev,relatime shared:50 - fuse.snapmount nbd://x ro,user_id=0
98 29 0:53 / /tmp/other rw - fuse.sshfs host: rw
99 97 0:54 / /tmp/a\040b ro,nosuid,nodev,relatime - fuse.snapmount nbd://y ro,user_id=0
100 29 0:55 / /tmp/c - fuse.snapmount c ro
`
	for _, c := range []struct {
		dir, dev string
		ok       bool
	}{
		{"/tmp/a b", "0:54", true}, // the mount on top
		{"/tmp/other", "", false},  // not ours
		{"/tmp/c", "0:55", true},   // no optional fields
		{"/proc", "", false},
		{"/tmp/none", "", false},
	} {
		if dev, ok := mountDevice([]byte(mountinfo), c.dir); dev != c.dev || ok != c.ok {
			t.Errorf("mountDevice(%q) = %q, %v; want %q, %v", c.dir, dev, ok, c.dev, c.ok)
		}
	}
}
