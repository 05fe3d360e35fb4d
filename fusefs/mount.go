package fusefs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Options describes the file, its windows and the mount.
type Options struct {
	// Name is the file's name in the mount root (the export name, or
	// --name). It must be a single path element: not empty, not "." or
	// "..", no "/" or NUL, at most 255 bytes.
	Name string
	// Size is the file size in bytes.
	Size int64
	// Windows are more files in the mount root, each showing a range of
	// the file (a partition: NAME-p1 ...), read through the same reader.
	// Their names follow the rules of Name and are all different; each
	// range lies inside the file.
	Windows []Window
	// Writer, if set, makes the file and its windows writable (mode 0644,
	// the mount no longer "ro"): a write to any of them goes to Writer at
	// its offset in the file, so each sees the others' writes. Sizes never
	// change: a write past a file's end fails with ENOSPC, a truncate to
	// another size or a chmod with EPERM. Writable files bypass the kernel
	// page cache. Without a Writer every write is refused with EROFS.
	// Writer may implement [ContextWriterAt].
	Writer io.WriterAt
	// Immutable says the view is a frozen snapshot: Open returns
	// FOPEN_KEEP_CACHE, so the kernel page cache survives across opens.
	// Otherwise every open drops the cached pages.
	Immutable bool
	// Mtime is reported as the atime, mtime and ctime of the file and the
	// root. Zero means the time NewRoot is called (mount time).
	Mtime time.Time
	// UID and GID are the owner reported for the file and the root. Zero
	// means the mounting process's real uid or gid (os.Getuid, os.Getgid),
	// the owner a file created by that user would have; so only a mount
	// made by root shows root as the owner.
	UID, GID uint32
	// AllowOther lets other users than the mounting one access the mount
	// (-o allow_other; a non-root user needs user_allow_other in
	// /etc/fuse.conf).
	AllowOther bool
	// FsName is the source shown in /proc/mounts and df, e.g. the NBD URI
	// without secrets. Empty means "snapmount". The type is always
	// fuse.snapmount.
	FsName string
	// Debug turns on go-fuse's opcode tracing, written to Logger.
	Debug bool
	// Logger receives read errors (with offset and length, rate-limited)
	// and go-fuse's diagnostics. Nil means log.Default().
	Logger *log.Logger
	// Stats, if set, returns a JSON document (at most 64 KiB). It is
	// readable as the extended attribute StatsXattr of the file
	// (getfattr -n user.snapmount.stats FILE) and listed by Listxattr. It
	// may be called concurrently.
	Stats func() []byte
	// OnWriteAttempt, if set, is called with the operation ("open-write",
	// "setattr", "write", "unlink", ...) and the caller's pid and uid for
	// every write attempt the file system refuses, so the caller can keep
	// an audit trail. It may be called concurrently. Note that on the "ro"
	// mount Linux refuses write attempts itself, before they reach the
	// file system (on 6.18 none of those in the tests does): the hook is a
	// second line of defence that normally stays silent.
	OnWriteAttempt func(op string, pid, uid uint32)
	// AsyncDirectIO negotiates the kernel's asynchronous direct I/O
	// (FUSE_ASYNC_DIO, on by default in libfuse and hence in nbdfuse):
	// libaio and io_uring then keep many O_DIRECT reads of one file in
	// flight instead of one at a time. The price is that a process
	// waiting for a synchronous O_DIRECT read can no longer interrupt it:
	// only use it when every read is bounded by a timeout below (the NBD
	// client's is).
	AsyncDirectIO bool
	// Reads, if set, is told as each read of the file starts and ends,
	// so that the caller knows how many are in flight (to size the
	// process's scheduler to them, say). Its methods are called
	// concurrently, on the path of every read: they must be cheap and
	// must not block.
	Reads ReadObserver
}

// Seeker, if the reader implements it, answers lseek(2) SEEK_DATA and
// SEEK_HOLE, e.g. from the NBD allocation map (base:allocation). SeekData
// returns the first offset >= off that holds data, SeekHole the first offset
// >= off in a hole (the file size counts as a hole). Errors wrapping
// syscall.ENXIO mean "no data at or after off", as in lseek(2); other errors
// are mapped like read errors. Without a Seeker the whole file is data.
type Seeker interface {
	SeekData(ctx context.Context, off int64) (int64, error)
	SeekHole(ctx context.Context, off int64) (int64, error)
}

// ReadObserver is told as each read starts and ends; see Options.Reads.
type ReadObserver interface {
	ReadStarted()
	ReadEnded()
}

// AllocationReporter, if the reader implements it, gives the file's
// st_blocks (what du and ls -s show, and what cp --sparse=auto takes for a
// sign of holes): AllocatedBytes returns how many of its bytes take
// storage, e.g. from the NBD allocation map. It may wait to learn that,
// until ctx is done; final reports that the count will not change. Until
// it is final, the kernel keeps the file's attributes only briefly, unless
// the view is immutable: there the kernel keeps its page cache across
// opens, and a refresh of the attributes would drop it. Without it the
// whole file counts as allocated.
type AllocationReporter interface {
	AllocatedBytes(ctx context.Context) (n int64, final bool)
}

// Window is a file showing Size bytes of the file from Offset on.
type Window struct {
	Name         string
	Offset, Size int64
}

// ContextWriterAt, if Options.Writer implements it, is used instead of
// WriteAt with the context of the FUSE request.
type ContextWriterAt interface {
	WriteAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// ContextReaderAt, if the reader implements it, is used instead of ReadAt
// with the context of the FUSE request, which go-fuse cancels when the kernel
// interrupts the request (the reading process got a signal). On cancellation
// it should return promptly with an error (ctx.Err() is fine); the read then
// fails with EINTR. Like ReadAt it must not touch p after it returns, even
// when it returns early: p is go-fuse's request buffer and is reused at once.
type ContextReaderAt interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// SliceReader, if the reader implements it, lends the len(buf) bytes at
// off as slices of its own memory (the block cache's blocks), so the reply
// is written from them with one writev and no copy into go-fuse's buffer.
// buf is go-fuse's reply buffer: what the reader does not hold it may read
// into buf and lend from there. release is called once the reply has been
// written; the slices must stay unchanged until then. A reader may decline
// (nil slices, nil error): the read then goes through ReadAt into buf.
// Not copying is worth most to cold sequential reads through the cache.
type SliceReader interface {
	ReadSlices(ctx context.Context, off int64, buf []byte) (slices [][]byte, release func(), err error)
}

// Mount settings.
const (
	// maxRequest is MaxWrite, which go-fuse also passes as max_read: the
	// largest READ the kernel sends. 1 MiB is the kernel's limit with the
	// default fs.fuse.max_pages_limit (256 pages); go-fuse lowers it if the
	// limit is lower: fewer, larger requests cost less per byte. Buffered
	// reads get requests as large as the readahead window (see readAhead).
	maxRequest = 1 << 20
	// maxReadAhead is what INIT asks for. The kernel offers its default
	// readahead window (128 KiB) and go-fuse only ever lowers it, so INIT
	// yields 128 KiB; Mount then raises the window through sysfs when it
	// may (see readAhead).
	maxReadAhead = readAhead
	// maxBackground bounds the kernel's asynchronous requests (readahead)
	// in flight. The kernel's default of 12 measured the same on a
	// CPU-bound machine, but 12 MiB in flight is thin for several streams
	// with 4 MiB readahead over a slow link.
	maxBackground = 64
	// congestionThreshold: past this many background requests the kernel
	// stops issuing the asynchronous part of readahead. 3/4 of
	// maxBackground, the kernel's own convention.
	congestionThreshold = maxBackground * 3 / 4
	// metadataTimeout is how long the kernel may cache entries,
	// attributes and failed lookups. The tree never changes, so any long
	// time will do; it saves a LOOKUP or GETATTR per path walk.
	metadataTimeout = 24 * time.Hour
	// allocWait is how long a stat waits for the allocation count: a
	// server slow to map a large disk must not make ls wait. Until the
	// count is final the attributes are kept for partialAttrTimeout.
	allocWait          = 200 * time.Millisecond
	partialAttrTimeout = time.Second
)

// Mount mounts the tree of [NewRoot](r, opt) at dir, read-only unless
// opt.Writer is set, and returns once the kernel's INIT handshake has
// completed, i.e. once the files are readable. Unmount with
// server.Unmount (or fusermount3 -u dir); server.Wait returns when the
// mount is gone. Root mounts with mount(2) itself, as libfuse does;
// otherwise (or if that fails) mounting goes through the setuid
// fusermount3, which must be installed; /dev/fuse must be accessible.
//
// Mount options: ro (without a Writer), default_permissions (the kernel
// checks modes itself, so no ACCESS round trips), subtype snapmount,
// fsname opt.FsName, max_read=1 MiB, asynchronous reads, up to 64
// background requests; xattrs stay enabled for the stats attribute, but
// security.capability and POSIX ACL lookups are answered by go-fuse
// without reaching the node. When the process may (root), the kernel
// readahead window of the mount is raised from 128 KiB to 4 MiB: cold
// sequential reads then arrive as 1 MiB requests, several in flight (see
// readAhead).
func Mount(dir string, r io.ReaderAt, opt Options) (*fuse.Server, error) {
	if err := opt.check(); err != nil {
		return nil, err
	}
	if r == nil {
		return nil, errors.New("fusefs: nil reader")
	}
	root := NewRoot(r, opt)
	fsOpts := fsOptions(opt)
	// fs.Mount would drop the server if WaitMount failed, leaving the
	// mount behind with nobody to unmount it; do its three steps here.
	server, err := fuse.NewServer(fs.NewNodeFS(root, fsOpts), dir, &fsOpts.MountOptions)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount %s: %w", dir, err)
	}
	go server.Serve()
	if err := server.WaitMount(); err != nil {
		_ = server.Unmount()
		return nil, fmt.Errorf("fusefs: mount %s: %w", dir, err)
	}
	raiseErr := raiseReadAhead(dir)
	if raiseErr != nil && !errors.Is(raiseErr, os.ErrPermission) {
		fsOpts.Logger.Printf("fusefs: cannot raise the readahead window of %s: %v", dir, raiseErr)
	}
	return server, nil
}

// tableDir returns dir as the kernel lists it in mount tables: absolute,
// clean and with symlinks resolved (as fusermount3 mounts it).
func tableDir(dir string) string {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return dir
	}
	if real, err := filepath.EvalSymlinks(abs); err == nil {
		return real
	}
	return abs
}

// fsOptions returns the go-fuse options for opt; see Mount.
func fsOptions(opt Options) *fs.Options {
	timeout := metadataTimeout
	logger := opt.logger()
	fsName := opt.FsName
	if fsName == "" {
		fsName = "snapmount"
	}
	options := []string{"ro", "default_permissions"}
	flags := uintptr(syscall.MS_RDONLY | syscall.MS_NOSUID | syscall.MS_NODEV)
	if opt.Writer != nil {
		options = options[1:]
		flags &^= syscall.MS_RDONLY
	}
	return &fs.Options{
		MountOptions: fuse.MountOptions{
			Options:              options,
			AllowOther:           opt.AllowOther,
			FsName:               fsName,
			Name:                 "snapmount",
			MaxWrite:             maxRequest,
			MaxReadAhead:         maxReadAhead,
			MaxBackground:        maxBackground,
			CongestionThreshold:  congestionThreshold,
			IgnoreSecurityLabels: true,
			Debug:                opt.Debug,
			Logger:               logger,
			// Our replies are memory buffers, which splicing cannot
			// help; go-fuse 2.12 nonetheless sets up a pipe for each,
			// and for 1 MiB replies (more than the default
			// pipe-max-size) fails and logs every time.
			DisableSplice: true,
			// As root, mount(2) directly, as libfuse does, instead of
			// forking fusermount3 (go-fuse falls back to it if the call
			// fails), with the flags fusermount3 uses: the file is
			// readable sooner.
			DirectMount:      os.Geteuid() == 0,
			DirectMountFlags: flags,
			ExtraCapabilities: func() uint64 {
				if opt.AsyncDirectIO {
					return fuse.CAP_ASYNC_DIO
				}
				return 0
			}(),
		},
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		RootStableAttr:  &fs.StableAttr{Ino: rootIno},
		Logger:          logger,
	}
}

func (o *Options) logger() *log.Logger {
	if o.Logger != nil {
		return o.Logger
	}
	return log.Default()
}

// pollHackName is a name go-fuse answers itself in the mount root (see
// fuse/poll.go): a file of that name would be unreachable.
const pollHackName = ".go-fuse-epoll-hack"

// check reports what is wrong with o, if anything.
func (o *Options) check() error {
	if err := checkName(o.Name); err != nil {
		return err
	}
	if o.Size < 0 {
		return fmt.Errorf("fusefs: negative file size %d", o.Size)
	}
	names := map[string]bool{o.Name: true}
	for _, w := range o.Windows {
		if err := checkName(w.Name); err != nil {
			return err
		}
		if names[w.Name] {
			return fmt.Errorf("fusefs: two files named %q", w.Name)
		}
		names[w.Name] = true
		if w.Offset < 0 || w.Size < 0 || w.Offset > o.Size || w.Size > o.Size-w.Offset {
			return fmt.Errorf("fusefs: window %q (%d bytes at offset %d) is not inside the file of %d bytes", w.Name, w.Size, w.Offset, o.Size)
		}
	}
	return nil
}

func checkName(name string) error {
	switch {
	case name == "" || name == "." || name == "..":
		return fmt.Errorf("fusefs: invalid file name %q", name)
	case strings.ContainsAny(name, "/\x00"):
		return fmt.Errorf("fusefs: invalid file name %q: must be a single path element", name)
	case len(name) > 255:
		return fmt.Errorf("fusefs: file name is %d bytes long, at most 255 are allowed", len(name))
	case name == pollHackName:
		return fmt.Errorf("fusefs: file name %q is reserved by go-fuse", name)
	}
	return nil
}

// owner resolves the zero values of UID and GID; see Options.
func (o *Options) owner() (uid, gid uint32) {
	uid, gid = o.UID, o.GID
	if uid == 0 {
		uid = uint32(os.Getuid())
	}
	if gid == 0 {
		gid = uint32(os.Getgid())
	}
	return uid, gid
}
