package fusefs

import (
	"context"
	"io"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Inode numbers: fixed, so st_ino is stable across mounts. Window i
// (Options.Windows) has fileIno+1+i.
const (
	rootIno = 1
	fileIno = 2
)

// view holds the resolved options the root and the files share. It does not
// change after NewRoot, so it needs no lock.
type view struct {
	size      int64 // the whole file's
	immutable bool
	writable  bool // Options.Writer is set
	files     int  // the whole file and its windows
	mtime     time.Time
	uid, gid  uint32

	stats          func() []byte
	onWriteAttempt func(op string, pid, uid uint32)
	errs           *errorLog
	reads          ReadObserver // nil: nobody counts reads

	// The reader and writer every file goes through, with their optional
	// methods.
	r      io.ReaderAt
	ctxr   ContextReaderAt
	sr     SliceReader
	seeker Seeker
	alloc  AllocationReporter
	w      io.WriterAt
	ctxw   ContextWriterAt
}

// rootNode is the mount root: a read-only directory holding the files.
type rootNode struct {
	fs.Inode
	v     *view
	file  *fileNode   // the whole file
	files []*fileNode // the whole file, then the windows
}

// NewRoot returns the root directory node holding the file and its windows,
// which read through r (see [ContextReaderAt] and [Seeker] for the optional
// methods it uses) and write through opt.Writer if set. It panics if r is
// nil or opt is invalid; [Mount] checks them first and returns an error
// instead.
func NewRoot(r io.ReaderAt, opt Options) fs.InodeEmbedder {
	if err := opt.check(); err != nil {
		panic(err)
	}
	if r == nil {
		panic("fusefs: nil reader")
	}
	v := &view{
		size:           opt.Size,
		immutable:      opt.Immutable,
		writable:       opt.Writer != nil,
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
	v.r = r
	v.ctxr, _ = r.(ContextReaderAt)
	v.sr, _ = r.(SliceReader)
	v.seeker, _ = r.(Seeker)
	v.alloc, _ = r.(AllocationReporter)
	if opt.Writer != nil {
		v.w = opt.Writer
		v.ctxw, _ = opt.Writer.(ContextWriterAt)
	}
	root := &rootNode{v: v}
	whole := Window{Name: opt.Name, Offset: 0, Size: opt.Size}
	for i, w := range append([]Window{whole}, opt.Windows...) {
		root.files = append(root.files, &fileNode{v: v, win: w, ino: fileIno + uint64(i)})
	}
	root.file = root.files[0]
	v.files = len(root.files)
	return root
}

// OnAdd builds the whole tree once: the files are persistent inodes, so
// go-fuse keeps them even when the kernel forgets them, and lookups of their
// names are answered from the tree (anything else is ENOENT).
func (n *rootNode) OnAdd(ctx context.Context) {
	for _, f := range n.files {
		child := n.NewPersistentInode(ctx, f, fs.StableAttr{Mode: fuse.S_IFREG, Ino: f.ino})
		n.AddChild(f.win.Name, child, false)
	}
}

// Lookup answers from the tree, as go-fuse would without it, but keeps
// the shorter attribute timeout a file may ask for (see fileNode.attr),
// which go-fuse's own lookup drops.
func (n *rootNode) Lookup(ctx context.Context, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	child := n.GetChild(name)
	if child == nil {
		return nil, syscall.ENOENT
	}
	if f, ok := child.Operations().(*fileNode); ok {
		if valid := f.attr(ctx, &out.Attr); valid != 0 {
			out.SetAttrTimeout(valid)
		}
	}
	return child, 0
}

func (n *rootNode) Getattr(ctx context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	n.v.fillAttr(&out.Attr, fuse.S_IFDIR|0555, 0)
	out.Nlink = 2
	return 0
}

// Readdir lists ".", ".." and the files; go-fuse's default would omit the
// first two, which POSIX readdir callers expect.
func (n *rootNode) Readdir(ctx context.Context) (fs.DirStream, syscall.Errno) {
	entries := []fuse.DirEntry{
		{Name: ".", Mode: fuse.S_IFDIR, Ino: rootIno},
		{Name: "..", Mode: fuse.S_IFDIR, Ino: rootIno},
	}
	for _, f := range n.files {
		entries = append(entries, fuse.DirEntry{Name: f.win.Name, Mode: fuse.S_IFREG, Ino: f.ino})
	}
	return fs.NewListDirStream(entries), 0
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

// statfsBlock is the block size statfs reports; the whole file's bytes
// count as used (the windows show the same bytes), nothing is free.
const statfsBlock = 4096

func (v *view) statfs(out *fuse.StatfsOut) {
	*out = fuse.StatfsOut{
		Bsize:   statfsBlock,
		Frsize:  statfsBlock,
		Blocks:  (uint64(v.size) + statfsBlock - 1) / statfsBlock,
		Files:   uint64(1 + v.files), // the root and the files
		NameLen: 255,
	}
}
