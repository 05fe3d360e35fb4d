package server

// Linux system calls the server's image I/O needs beyond package os.

import (
	"errors"
	"os"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	fallocKeepSize  = unix.FALLOC_FL_KEEP_SIZE
	fallocPunchHole = unix.FALLOC_FL_PUNCH_HOLE
	fallocZeroRange = unix.FALLOC_FL_ZERO_RANGE
	seekData        = unix.SEEK_DATA
	seekHole        = unix.SEEK_HOLE
)

// storeRawConn runs fn with the file's descriptor, keeping the descriptor
// alive (and un-reusable) for the duration even if the file is closed
// concurrently.
func storeRawConn(f *os.File, fn func(fd int) error) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var opErr error
	if err := rc.Control(func(fd uintptr) { opErr = fn(int(fd)) }); err != nil {
		return err
	}
	return opErr
}

// exportSeek is lseek(2) with SEEK_DATA or SEEK_HOLE. ENXIO (no more data
// after off) is returned as is for the caller to interpret.
func exportSeek(f *os.File, off int64, whence int) (int64, error) {
	var pos int64
	err := storeRawConn(f, func(fd int) error {
		var err error
		for {
			pos, err = syscall.Seek(fd, off, whence)
			if !errors.Is(err, syscall.EINTR) {
				return err
			}
		}
	})
	return pos, err
}

// exportFallocate is fallocate(2), retried on EINTR.
func exportFallocate(f *os.File, mode uint32, off, length int64) error {
	return storeRawConn(f, func(fd int) error {
		for {
			err := syscall.Fallocate(fd, mode, off, length)
			if !errors.Is(err, syscall.EINTR) {
				return err
			}
		}
	})
}

// exportFdatasync is fdatasync(2): data (and the metadata needed to read
// it back) durable before it returns.
func exportFdatasync(f *os.File) error {
	return storeRawConn(f, func(fd int) error {
		for {
			err := syscall.Fdatasync(fd)
			if !errors.Is(err, syscall.EINTR) {
				return err
			}
		}
	})
}

// exportFadviseWillNeed asks the kernel to start reading a range into the
// page cache (NBD_CMD_CACHE). It is a hint: errors are ignored by callers.
func exportFadviseWillNeed(f *os.File, off, length int64) error {
	return storeRawConn(f, func(fd int) error {
		return unix.Fadvise(fd, off, length, unix.FADV_WILLNEED)
	})
}

// exportMap maps the image read-only so that exportResident can ask the
// kernel which pages are cached. The mapping is never read through (a
// file shortened by another process would fault); it only feeds mincore.
func exportMap(f *os.File, size int64) []byte {
	if size <= 0 || int64(int(size)) != size {
		return nil
	}
	var m []byte
	storeRawConn(f, func(fd int) error {
		var err error
		m, err = syscall.Mmap(fd, 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
		return err
	})
	return m
}

// exportResident reports whether every page of [off, off+n) of the
// mapping is in the page cache, so that sending it costs no disk I/O.
func exportResident(m []byte, off, n int64) bool {
	if m == nil || n <= 0 || off < 0 || off+n > int64(len(m)) {
		return false
	}
	const page = 4096
	start := off &^ (page - 1)
	pages := (off + n - start + page - 1) / page
	var small [256]byte
	vec := small[:]
	if pages > int64(len(small)) {
		vec = make([]byte, pages)
	}
	vec = vec[:pages]
	// x/sys has no mincore wrapper; its per-arch syscall number is enough.
	_, _, e := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&m[start])), uintptr(min(pages*page, int64(len(m))-start)), uintptr(unsafe.Pointer(&vec[0])))
	if e != 0 {
		return false
	}
	for _, v := range vec {
		if v&1 == 0 {
			return false
		}
	}
	return true
}

// sendfile sends n bytes of f from off on conn with sendfile(2): the
// data goes from the page cache to the socket without a copy through the
// process. It returns how many bytes it sent; fewer than n without an
// error means the file ended early.
func sendfile(conn syscall.RawConn, f *os.File, off, n int64) (int64, error) {
	var sent int64
	err := storeRawConn(f, func(in int) error {
		var opErr error
		err := conn.Write(func(out uintptr) bool {
			for sent < n {
				o := off + sent
				m, err := syscall.Sendfile(int(out), in, &o, int(min(n-sent, 1<<30)))
				if m > 0 {
					sent += int64(m)
				}
				switch {
				case errors.Is(err, syscall.EAGAIN):
					return false // wait until the socket is writable
				case errors.Is(err, syscall.EINTR):
					continue
				case err != nil:
					opErr = err
					return true
				case m == 0:
					return true // end of file
				}
			}
			return true
		})
		if err != nil {
			return err
		}
		return opErr
	})
	return sent, err
}

// errNoCopyRange says copy_file_range cannot copy between these files
// (other file systems, an old kernel): copy through memory instead.
var errNoCopyRange = errors.New("copy_file_range unsupported")

// exportCopyRange copies n bytes at off from src to the same offset of
// dst inside the kernel (one page-cache copy, or shared extents where the
// file system can). It returns how many bytes it copied; fewer than n
// without an error means src ended early.
func exportCopyRange(src, dst *os.File, off, n int64) (int64, error) {
	var done int64
	err := storeRawConn(src, func(in int) error {
		return storeRawConn(dst, func(out int) error {
			for done < n {
				roff, woff := off+done, off+done
				m, e := unix.CopyFileRange(in, &roff, out, &woff, int(n-done), 0)
				switch {
				case errors.Is(e, syscall.EINTR):
					continue
				case errors.Is(e, syscall.EXDEV) || errors.Is(e, syscall.EOPNOTSUPP) || errors.Is(e, syscall.ENOSYS) || errors.Is(e, syscall.EINVAL):
					if done == 0 {
						return errNoCopyRange
					}
					return e
				case e != nil:
					return e
				case m == 0:
					return nil // end of src
				}
				done += int64(m)
			}
			return nil
		})
	})
	return done, err
}

// createStore makes a snapshot store with no name on disk in dir: a file
// of O_TMPFILE, or, where the file system cannot make one, a file
// unlinked as soon as it is made. Either way nothing is left in dir once
// the store is closed, however the process ends: the kernel frees the
// space with the last descriptor. how says which way it was made.
func createStore(dir string) (f *os.File, how string, err error) {
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err == nil {
		return os.NewFile(uintptr(fd), dir+"/(O_TMPFILE)"), "O_TMPFILE", nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EINVAL) {
		return nil, "", &os.PathError{Op: "open O_TMPFILE", Path: dir, Err: err}
	}
	return createUnlinkedStore(dir)
}

// createUnlinkedStore is createStore for file systems without O_TMPFILE.
func createUnlinkedStore(dir string) (*os.File, string, error) {
	f, err := os.CreateTemp(dir, "snapmount-store-*")
	if err != nil {
		return nil, "", err
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, "", err
	}
	return f, "unlinked", nil
}

// lockImage takes a lock on a served image for as long as it is open: a
// shared one when served read-only, else an exclusive one. It keeps a
// second server from writing the same image, and tells snapmount copy
// (see ImageLocked) that a destination is an image being served.
func lockImage(f *os.File, readOnly bool) error {
	how := unix.LOCK_EX
	if readOnly {
		how = unix.LOCK_SH
	}
	err := unix.Flock(int(f.Fd()), how|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return errors.New("another process holds a lock on it: is another snapmount serve serving it?")
	}
	return err
}

// ImageLocked reports whether a process holds the lock a server takes on
// the images it serves on the file f: whether f is an image served now.
func ImageLocked(f *os.File) (bool, error) {
	err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if errors.Is(err, unix.EWOULDBLOCK) {
		return true, nil
	}
	if err != nil {
		return false, err
	}
	return false, unix.Flock(int(f.Fd()), unix.LOCK_UN)
}
