package fusefs

import (
	"context"
	"errors"
	"io"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// preferredIOSize is st_blksize, the I/O size stat(2) recommends: one
// maximal FUSE request. Tools that size their buffers from it (cp, cat)
// then read in requests of 1 MiB.
const preferredIOSize = maxRequest

// fileNode is a regular file: the whole file or one of its windows, Size
// bytes of the reader from Offset on. It needs no file handle: all state is
// in the node and the view and never changes, so concurrent calls need no
// lock.
type fileNode struct {
	fs.Inode
	v   *view
	win Window
	ino uint64
}

func (f *fileNode) Getattr(ctx context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	if valid := f.attr(ctx, &out.Attr); valid != 0 {
		out.SetTimeout(valid)
	}
	return 0
}

// attr fills out with f's attributes. It returns how long the kernel may
// keep them, where that is shorter than usual (0 otherwise): while the
// allocation count is not final, a later stat of a view that is not
// immutable is to ask again.
func (f *fileNode) attr(ctx context.Context, out *fuse.Attr) (valid time.Duration) {
	mode := uint32(0444)
	if f.v.writable {
		mode = 0644
	}
	f.v.fillAttr(out, fuse.S_IFREG|mode, f.win.Size)
	out.Nlink = 1
	// The allocation is known for the whole file only: a window counts as
	// allocated throughout.
	if f.v.alloc != nil && f.ino == fileIno {
		actx, cancel := context.WithTimeout(ctx, allocWait)
		used, final := f.v.alloc.AllocatedBytes(actx)
		cancel()
		used = min(max(used, 0), f.v.size)
		out.Blocks = (uint64(used) + 511) / 512
		// Not where the page cache is kept across opens (immutable):
		// refreshing the attributes drops it.
		if !final && !f.v.immutable {
			valid = partialAttrTimeout
		}
	}
	return valid
}

// writeOpenFlags are the open flags that ask for a change to the file's
// size or existence, refused even where writes are allowed.
const writeOpenFlags = syscall.O_TRUNC | syscall.O_APPEND | syscall.O_CREAT

// Open refuses every open that could write unless the files are writable,
// and O_TRUNC, O_APPEND and O_CREAT always; it returns no handle.
// FOPEN_KEEP_CACHE (immutable, read-only views only) keeps the page cache
// across opens; FOPEN_NOFLUSH spares close(2) a FLUSH round trip, as there
// is nothing to flush. Writable files bypass the page cache
// (FOPEN_DIRECT_IO): the whole file and its windows are different inodes,
// each with pages of its own, and a write through one must show at once
// through the others.
func (f *fileNode) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if f.v.writable {
		if flags&writeOpenFlags != 0 {
			return nil, 0, syscall.EPERM
		}
		return nil, fuse.FOPEN_NOFLUSH | fuse.FOPEN_DIRECT_IO, 0
	}
	if flags&syscall.O_ACCMODE != syscall.O_RDONLY || flags&writeOpenFlags != 0 {
		return nil, 0, f.v.refuse(ctx, "open-write")
	}
	fuseFlags := uint32(fuse.FOPEN_NOFLUSH)
	if f.v.immutable {
		fuseFlags |= fuse.FOPEN_KEEP_CACHE
	}
	return nil, fuseFlags, 0
}

// Read fills dest from the reader, clamped to the file size.
//
// It never returns a short read before the end of the file: the kernel takes
// a short READ as end of file and shrinks the file it shows. So a reader that
// fails part way fails the whole request; only io.EOF (the reader's data
// ends) gives a short read.
func (f *fileNode) Read(ctx context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	if off < 0 {
		return nil, syscall.EINVAL
	}
	if off >= f.win.Size {
		return fuse.ReadResultData(nil), 0
	}
	if r := f.v.reads; r != nil {
		r.ReadStarted()
		defer r.ReadEnded()
	}
	if rest := f.win.Size - off; int64(len(dest)) > rest {
		dest = dest[:rest]
	}
	if f.v.sr != nil {
		slices, release, err := f.v.sr.ReadSlices(ctx, f.win.Offset+off, dest)
		if err != nil {
			return nil, f.v.fail(ctx, err, "read of %d bytes at offset %d", len(dest), off)
		}
		if slices != nil {
			return &lentResult{slices: slices, release: release}, 0
		}
		// The reader declined to lend: read into dest below.
	}
	n, err := f.readAt(ctx, dest, off)
	switch {
	case n < 0 || n > len(dest):
		f.v.errs.printf("fusefs: read of %d bytes at offset %d: reader returned %d bytes (returning EIO)", len(dest), off, n)
		return nil, syscall.EIO
	case err == nil && n == len(dest):
		return fuse.ReadResultData(dest), 0
	case err == nil:
		f.v.errs.printf("fusefs: read of %d bytes at offset %d: reader returned %d bytes and no error (returning EIO)", len(dest), off, n)
		return nil, syscall.EIO
	case errors.Is(err, io.EOF):
		return fuse.ReadResultData(dest[:n]), 0
	}
	return nil, f.v.fail(ctx, err, "read of %d bytes at offset %d", len(dest), off)
}

// lentResult is a reply written straight from memory the reader lent
// (go-fuse writes a result with Slices by one writev), given back in Done,
// which go-fuse calls once the reply was written or dropped.
type lentResult struct {
	slices  [][]byte
	release func()
}

func (r *lentResult) Size() int {
	n := 0
	for _, s := range r.slices {
		n += len(s)
	}
	return n
}

// Bytes copies the slices into buf, for writers that need one buffer.
func (r *lentResult) Bytes(buf []byte) ([]byte, fuse.Status) {
	buf = buf[:0]
	for _, s := range r.slices {
		buf = append(buf, s...)
	}
	return buf, fuse.OK
}

func (r *lentResult) Slices() ([][]byte, fuse.Status) { return r.slices, fuse.OK }

func (r *lentResult) Done() {
	if r.release != nil {
		r.release()
		r.release = nil
	}
}

// readAt reads at offset off of the file, which is f.win.Offset+off of the
// reader.
func (f *fileNode) readAt(ctx context.Context, p []byte, off int64) (int, error) {
	off += f.win.Offset
	if f.v.ctxr != nil {
		return f.v.ctxr.ReadAtContext(ctx, p, off)
	}
	return f.v.r.ReadAt(p, off)
}

// fail maps err to an errno and logs it with what failed, unless it is an
// interrupt (EINTR is what a signalled reader expects, not news).
func (v *view) fail(ctx context.Context, err error, format string, args ...any) syscall.Errno {
	errno := toErrno(ctx, err)
	if errno != syscall.EINTR {
		name := unix.ErrnoName(errno)
		if name == "" {
			name = errno.Error()
		}
		v.errs.printf("fusefs: "+format+": %v (returning %s)", append(args, err, name)...)
	}
	return errno
}

// Lseek answers SEEK_DATA and SEEK_HOLE, from the reader's Seeker if it has
// one; otherwise the whole file is data. As in lseek(2), an offset at or past
// the end gives ENXIO. Answers from the Seeker are kept in range, erring
// towards "data": a hole reported where there is data would make sparse-aware
// copies skip it.
func (f *fileNode) Lseek(ctx context.Context, _ fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	size := uint64(f.win.Size)
	if whence != unix.SEEK_DATA && whence != unix.SEEK_HOLE {
		return 0, syscall.EINVAL
	}
	if off >= size {
		return 0, syscall.ENXIO
	}
	if f.v.seeker == nil {
		if whence == unix.SEEK_DATA {
			return off, 0
		}
		return size, 0
	}

	if whence == unix.SEEK_DATA {
		res, err := f.v.seeker.SeekData(ctx, f.win.Offset+int64(off))
		res -= f.win.Offset
		switch {
		case errors.Is(err, syscall.ENXIO):
			return 0, syscall.ENXIO
		case err != nil:
			return 0, f.v.fail(ctx, err, "SEEK_DATA from offset %d", off)
		case res < 0 || uint64(res) < off:
			return off, 0
		case uint64(res) >= size:
			return 0, syscall.ENXIO
		}
		return uint64(res), 0
	}

	res, err := f.v.seeker.SeekHole(ctx, f.win.Offset+int64(off))
	res -= f.win.Offset
	switch {
	case errors.Is(err, syscall.ENXIO):
		return 0, syscall.ENXIO
	case err != nil:
		return 0, f.v.fail(ctx, err, "SEEK_HOLE from offset %d", off)
	case res < 0 || uint64(res) < off || uint64(res) > size:
		return size, 0
	}
	return uint64(res), 0
}

// StatsXattr is the extended attribute of the file that holds
// Options.Stats().
const StatsXattr = "user.snapmount.stats"

// xattrSizeMax is the kernel's limit on an extended attribute value
// (XATTR_SIZE_MAX).
const xattrSizeMax = 64 << 10

// Getxattr serves StatsXattr. As getxattr(2) asks, a dest too small for the
// value gets ERANGE and the size needed (a zero-length dest is a size query).
func (f *fileNode) Getxattr(ctx context.Context, attr string, dest []byte) (uint32, syscall.Errno) {
	if attr != StatsXattr || f.v.stats == nil {
		return 0, syscall.ENODATA
	}
	data := f.v.stats()
	if len(data) > xattrSizeMax {
		return 0, syscall.E2BIG
	}
	if len(dest) < len(data) {
		return uint32(len(data)), syscall.ERANGE
	}
	return uint32(copy(dest, data)), 0
}

// Listxattr lists StatsXattr when there are stats.
func (f *fileNode) Listxattr(ctx context.Context, dest []byte) (uint32, syscall.Errno) {
	if f.v.stats == nil {
		return 0, 0
	}
	const list = StatsXattr + "\x00"
	if len(dest) < len(list) {
		return uint32(len(list)), syscall.ERANGE
	}
	return uint32(copy(dest, list)), 0
}

func (f *fileNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	f.v.statfs(out)
	return 0
}

// Fsync and Flush succeed: a read-only file has nothing to write back, and
// a writable one's writes reached the Writer before they were answered.
func (f *fileNode) Fsync(ctx context.Context, _ fs.FileHandle, flags uint32) syscall.Errno {
	return 0
}

func (f *fileNode) Flush(ctx context.Context, _ fs.FileHandle) syscall.Errno {
	return 0
}
