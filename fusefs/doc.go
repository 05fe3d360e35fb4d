// Package fusefs shows a file, read through an io.ReaderAt, in a FUSE
// mount, with windows of it as more files (a disk and its partitions). It
// is the top layer of "snapmount mount": FUSE read -> file node -> (write
// overlay ->) block cache -> NBD client.
//
// # Structure
//
// The mount root is a directory (mode 0555) holding a regular file (mode
// 0444) named [Options.Name], of size [Options.Size], and one more for each
// of [Options.Windows], showing a range of it through the same reader (so one
// fetch serves both views). All are persistent inodes built once by
// [NewRoot]; the tree never changes, so entries, attributes and failed
// lookups are cached by the kernel for a day and the steady state costs no
// metadata round trips. [Mount] mounts the tree read-only unless there is a
// Writer ("ro" in /proc/mounts, type fuse.snapmount, fsname [Options.FsName])
// and returns once the kernel's INIT handshake has completed, i.e. once the
// files are readable.
//
// # Read-only, unless there is a Writer
//
// Without [Options.Writer], every path that could change anything answers
// EROFS: opening for writing (O_WRONLY, O_RDWR, O_TRUNC, O_APPEND, O_CREAT),
// Setattr (truncate, chmod, chown, utimes), Write, Allocate, Create, Mkdir,
// Mknod, Link, Symlink, Unlink, Rmdir, Rename, Setxattr and Removexattr. On
// the mount the kernel usually answers EROFS itself because of the "ro" flag,
// before asking us; the node methods refuse anyway so the guarantee does not
// rest on a mount flag alone. [Options.OnWriteAttempt] hears about every
// refusal that does reach us. Fsync and Flush succeed: there is nothing to
// flush.
//
// With a Writer (snapmount's private overlay) the files are writable (mode
// 0644, the mount not "ro"): Write passes data to the Writer at the file's
// offset plus its window's, so a write through a window shows through the
// whole file and the other way round. Sizes never change (past the end is
// ENOSPC, truncating to another size EPERM), and the tree still refuses
// every change with EROFS. Writable files are opened with FOPEN_DIRECT_IO:
// the whole file and a window are different inodes with page caches of
// their own, which a write through one would leave stale in the other.
//
// # Kernel caching
//
// File data of read-only files goes through the kernel page cache (writable
// ones bypass it, see above). When [Options.Immutable] is set (the view is a
// frozen snapshot) Open returns FOPEN_KEEP_CACHE, so pages survive across
// opens and a second pass is served by the kernel at memory speed. Otherwise
// every open drops the file's cached pages, as nbdfuse does, so a new open
// sees what the server serves now; pages cached under an already open
// descriptor stay. Open also returns FOPEN_NOFLUSH: close(2) has nothing to
// flush, so it costs no round trip.
//
// Requests are up to 1 MiB (MaxWrite, hence max_read): an O_DIRECT read
// arrives as one request per MiB rather than eight of 128 KiB. Buffered
// reads arrive as kernel readahead shapes them, which the FUSE handshake
// caps at 128 KiB; when it runs as root, [Mount] raises the mount's window
// to 4 MiB through sysfs, so sequential reads arrive as 1 MiB requests with
// several in flight. Non-root mounts keep 128 KiB. See mount.go and
// readahead.go for the options chosen and why.
//
// # Errors and interrupts
//
// Read errors are turned into errnos in one place (errno.go): a cancelled
// request gives EINTR, an error wrapping a syscall.Errno gives that errno
// (the NBD client's errors unwrap to the server's errno), anything else
// gives EIO and is logged, with offset and length, at a bounded rate.
//
// When the process reading the file gets a signal, the kernel sends an
// INTERRUPT and go-fuse cancels the context passed to Read. If the reader
// implements [ContextReaderAt] the context reaches it and the read returns
// EINTR. The kernel only interrupts requests a process is waiting for
// synchronously (O_DIRECT reads, the odd single-page read); readahead
// requests are background requests and are never interrupted: a killed
// reader leaves them to finish or fail on their own, which is why the
// layers below must bound every request with a timeout. (For the same
// reason asynchronous direct I/O is an option, Options.AsyncDirectIO: it
// lets io_uring and libaio keep many O_DIRECT reads in flight, but makes
// even a synchronous O_DIRECT read wait uninterruptibly, which is only
// acceptable when the reader bounds every read with a timeout.)
//
// # Deadlocks
//
// Reading the mount from the process that serves it can deadlock (see the
// "Deadlocks" section of go-fuse's fs package): do not do it with
// GOMAXPROCS=1, never memory-map the file in the serving process, and do not
// start subprocesses with a working directory inside the mount. The tests
// read from the same process only with plain read(2)/pread(2), and use
// subprocesses where a signal or another user is needed.
package fusefs
