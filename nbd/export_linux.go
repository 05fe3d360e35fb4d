package nbd

// Linux system calls the server's image I/O needs beyond package os. They
// go through package syscall, not golang.org/x/sys/unix: go.mod says
// "go 1.26" while x/sys v0.49.0 requires "go 1.26.0", so importing x/sys
// would need a go.mod change (see the report on issue 3).

import (
	"errors"
	"os"
	"syscall"
)

// Values from <linux/falloc.h>, <linux/fs.h> and <linux/fadvise.h>.
const (
	fallocKeepSize  = 0x01 // FALLOC_FL_KEEP_SIZE
	fallocPunchHole = 0x02 // FALLOC_FL_PUNCH_HOLE
	fallocZeroRange = 0x10 // FALLOC_FL_ZERO_RANGE
	seekData        = 3    // SEEK_DATA
	seekHole        = 4    // SEEK_HOLE
	fadvWillNeed    = 3    // POSIX_FADV_WILLNEED
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
		_, _, e := syscall.Syscall6(syscall.SYS_FADVISE64, uintptr(fd), uintptr(off), uintptr(length), fadvWillNeed, 0, 0)
		if e != 0 {
			return e
		}
		return nil
	})
}
