package fusefs

import (
	"context"
	"io"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Inode numbers: fixed, so st_ino is stable across mounts.
const (
	rootIno = 1
	fileIno = 2
)

// view holds the resolved options the root and the file share. It does not
// change after NewRoot, so it needs no lock.
type view struct {
	name      string
	size      int64
	immutable bool
	mtime     time.Time
	uid, gid  uint32

	stats          func() []byte
	onWriteAttempt func(op string, pid, uid uint32)
	errs           *errorLog
	reads          ReadObserver // nil: nobody counts reads
}

// rootNode is the mount root: a read-only directory holding the file.
type rootNode struct {
	fs.Inode
	v    *view
	file *fileNode
}

// NewRoot returns the root directory node holding the single read-only file,
// which reads through r (see [ContextReaderAt] and [Seeker] for the optional
// methods it uses). It panics if r is nil or opt.Name or opt.Size is
// invalid; [Mount] checks them first and returns an error instead.
func NewRoot(r io.ReaderAt, opt Options) fs.InodeEmbedder {
	if err := opt.check(); err != nil {
		panic(err)
	}
	if r == nil {
		panic("fusefs: nil reader")
	}
	v := &view{
		name:           opt.Name,
		size:           opt.Size,
		immutable:      opt.Immutable,
		mtime:          opt.Mtime,
		stats:          opt.Stats,
		onWriteAttempt: opt.OnWriteAttempt,
		reads:          opt.Reads,
		errs:           newErrorLog(opt.logger()),
	}
	if v.mtime.IsZero() {
		v.mtime = time.Now()
	}
	v.uid, v.gid = opt.owner()
	return &rootNode{v: v, file: newFileNode(v, r)}
}

// OnAdd builds the whole tree once: the file is a persistent inode, so
// go-fuse keeps it even when the kernel forgets it, and lookups of its name
// are answered from the tree (anything else is ENOENT).
func (n *rootNode) OnAdd(ctx context.Context) {
	child := n.NewPersistentInode(ctx, n.file, fs.StableAttr{Mode: fuse.S_IFREG, Ino: fileIno})
	n.AddChild(n.v.name, child, false)
}

func (n *rootNode) Getattr(ctx context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.v.fillAttr(&out.Attr, fuse.S_IFDIR|0555, 0)
	out.Nlink = 2
	return 0
}

// Readdir lists ".", ".." and the file; go-fuse's default would omit the
// first two, which POSIX readdir callers expect.
func (n *rootNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	return fs.NewListDirStream([]fuse.DirEntry{
		{Name: ".", Mode: fuse.S_IFDIR, Ino: rootIno},
		{Name: "..", Mode: fuse.S_IFDIR, Ino: rootIno},
		{Name: n.v.name, Mode: fuse.S_IFREG, Ino: fileIno},
	}), 0
}

func (n *rootNode) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	n.v.statfs(out)
	return 0
}

// fillAttr sets the attributes every node shares: owner, constant times,
// and the size with st_blocks derived from it.
func (v *view) fillAttr(out *fuse.Attr, mode uint32, size int64) {
	out.Mode = mode
	out.Size = uint64(size)
	out.Blocks = (uint64(size) + 511) / 512 // st_blocks counts 512-byte units
	out.Blksize = preferredIOSize
	out.Owner = fuse.Owner{Uid: v.uid, Gid: v.gid}
	t := v.mtime
	out.SetTimes(&t, &t, &t)
}

// statfsBlock is the block size statfs reports; the file's bytes count as
// used, nothing is free.
const statfsBlock = 4096

func (v *view) statfs(out *fuse.StatfsOut) {
	*out = fuse.StatfsOut{
		Bsize:   statfsBlock,
		Frsize:  statfsBlock,
		Blocks:  (uint64(v.size) + statfsBlock - 1) / statfsBlock,
		Files:   2, // the root and the file
		NameLen: 255,
	}
}
