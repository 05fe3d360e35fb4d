package fusefs

import (
	"context"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// The file's data changes only through Options.Writer; without one, every
// write is refused with EROFS (see readonly.go). The size never changes.

// Write writes data at off of the file, which is f.win.Offset+off of the
// Writer. A write reaching past the end of the file writes what lies before
// it (a short write, after which the writer's next try gets ENOSPC), as on
// a block device.
func (f *fileNode) Write(ctx context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if !f.v.writable {
		return 0, f.v.refuse(ctx, "write")
	}
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= f.win.Size {
		return 0, syscall.ENOSPC
	}
	if rest := f.win.Size - off; int64(len(data)) > rest {
		data = data[:rest]
	}
	var n int
	var err error
	if f.v.ctxw != nil {
		n, err = f.v.ctxw.WriteAtContext(ctx, data, f.win.Offset+off)
	} else {
		n, err = f.v.w.WriteAt(data, f.win.Offset+off)
	}
	if n > 0 && n <= len(data) {
		return uint32(n), 0 // the kernel reports the short count; a retry gets the error
	}
	if err == nil {
		f.v.errs.printf("fusefs: write of %d bytes at offset %d: writer wrote %d bytes and returned no error (returning EIO)", len(data), off, n)
		return 0, syscall.EIO
	}
	return 0, f.v.fail(ctx, err, "write of %d bytes at offset %d of %s", len(data), off, f.win.Name)
}

// Setattr allows what leaves the file as it is: a truncate to its own size
// (with the time stamps it carries, which are not kept). Any other change
// is EPERM on a writable file, EROFS on a read-only one.
func (f *fileNode) Setattr(ctx context.Context, _ fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if !f.v.writable {
		return f.v.refuse(ctx, "setattr")
	}
	size, hasSize := in.GetSize()
	if _, ok := in.GetMode(); ok || !hasSize || size != uint64(f.win.Size) {
		return syscall.EPERM
	}
	if _, ok := in.GetUID(); ok {
		return syscall.EPERM
	}
	if _, ok := in.GetGID(); ok {
		return syscall.EPERM
	}
	return f.Getattr(ctx, nil, out)
}

// Allocate (fallocate(2)) is not offered on a writable file: its blocks
// exist already, and punching or zeroing ranges is not supported.
func (f *fileNode) Allocate(ctx context.Context, _ fs.FileHandle, off, size uint64, mode uint32) syscall.Errno {
	if !f.v.writable {
		return f.v.refuse(ctx, "fallocate")
	}
	return syscall.EOPNOTSUPP
}
