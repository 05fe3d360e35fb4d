package fusefs

import (
	"context"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Every operation that could change the tree or the file's attributes is
// refused with EROFS here, explicitly: several of go-fuse's defaults are not EROFS
// (Unlink and Rmdir even succeed and drop the child from the tree), and the
// "ro" mount flag should not be the only guard.

// refuse reports a refused write attempt to OnWriteAttempt, with the caller
// go-fuse put in ctx, and returns EROFS.
func (v *view) refuse(ctx context.Context, op string) syscall.Errno {
	if v.onWriteAttempt != nil {
		var pid, uid uint32
		if c, ok := fuse.FromContext(ctx); ok {
			pid, uid = c.Pid, c.Uid
		}
		v.onWriteAttempt(op, pid, uid)
	}
	return syscall.EROFS
}

// The file (Setattr, Write and Allocate, which a Writer allows, are in
// write.go).

func (f *fileNode) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	return f.v.refuse(ctx, "setxattr")
}

func (f *fileNode) Removexattr(ctx context.Context, attr string) syscall.Errno {
	return f.v.refuse(ctx, "removexattr")
}

// The root directory.

func (n *rootNode) Setattr(ctx context.Context, _ fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	return n.v.refuse(ctx, "setattr")
}

func (n *rootNode) Create(ctx context.Context, name string, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, n.v.refuse(ctx, "create")
}

func (n *rootNode) Tmpfile(ctx context.Context, flags, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	return nil, nil, 0, n.v.refuse(ctx, "tmpfile")
}

func (n *rootNode) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, n.v.refuse(ctx, "mkdir")
}

func (n *rootNode) Mknod(ctx context.Context, name string, mode, dev uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, n.v.refuse(ctx, "mknod")
}

func (n *rootNode) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, n.v.refuse(ctx, "link")
}

func (n *rootNode) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	return nil, n.v.refuse(ctx, "symlink")
}

func (n *rootNode) Unlink(ctx context.Context, name string) syscall.Errno {
	return n.v.refuse(ctx, "unlink")
}

func (n *rootNode) Rmdir(ctx context.Context, name string) syscall.Errno {
	return n.v.refuse(ctx, "rmdir")
}

func (n *rootNode) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	return n.v.refuse(ctx, "rename")
}

func (n *rootNode) Setxattr(ctx context.Context, attr string, data []byte, flags uint32) syscall.Errno {
	return n.v.refuse(ctx, "setxattr")
}

func (n *rootNode) Removexattr(ctx context.Context, attr string) syscall.Errno {
	return n.v.refuse(ctx, "removexattr")
}

// Fsync on the directory (fsync(2) of an O_RDONLY directory fd is allowed)
// has nothing to do.
func (n *rootNode) Fsync(ctx context.Context, _ fs.FileHandle, flags uint32) syscall.Errno {
	return 0
}
