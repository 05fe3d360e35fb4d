package main

// Where copy writes: never over data it was not told to replace, and
// never a file that looks complete before it is.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"snapmount/nbd/server"
)

// checkDest refuses a destination copy must not write: an image a local
// snapmount serve is serving (it holds a lock on it), and, unless force,
// one that exists and is not empty. inPlace reports a destination that is
// written where it is, as the data comes (a pipe, a character or block
// device).
func checkDest(name string, force bool) (inPlace bool, err error) {
	st, err := os.Stat(name)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("destination: %w", err)
	}
	switch {
	case st.IsDir():
		return false, fmt.Errorf("destination %s is a directory: name the file to write", name)
	case st.Mode()&os.ModeSocket != 0:
		return false, fmt.Errorf("destination %s is a socket, which cannot be opened to write to: name a file, a pipe or a device", name)
	case st.Mode()&(os.ModeNamedPipe|os.ModeCharDevice) != 0:
		// Not opened to look: a pipe's open for reading waits for a
		// writer (the reader at its other end waits for us), and a
		// character device may act on any open (a tape rewinds).
		return true, nil
	}
	// O_NONBLOCK: should a pipe take name's place meanwhile, open does
	// not wait for its writer.
	f, err := os.OpenFile(name, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return false, fmt.Errorf("destination: %w", err)
	}
	defer f.Close()
	if served, err := server.ImageLocked(f); err == nil && served {
		return false, fmt.Errorf("%s is an image a snapmount serve is serving (it holds its lock): copying onto it would destroy it; choose another DEST", name)
	}
	size := st.Size()
	if !st.Mode().IsRegular() {
		size, _ = f.Seek(0, io.SeekEnd) // a block device's size
	}
	if size > 0 && !force {
		return false, notEmpty(name, size)
	}
	return !st.Mode().IsRegular(), nil
}

func notEmpty(name string, size int64) error {
	return fmt.Errorf("%s exists and is not empty (%s): copy does not overwrite it without --force", name, humanSize(uint64(size)))
}

// openInPlace opens a destination written where it is. A pipe's open
// waits for its reader: a signal (ctx) ends the wait.
func openInPlace(ctx context.Context, name string) (*os.File, error) {
	type opened struct {
		f   *os.File
		err error
	}
	ch := make(chan opened, 1)
	go func() {
		f, err := os.OpenFile(name, os.O_WRONLY, 0)
		ch <- opened{f, err}
	}()
	select {
	case o := <-ch:
		if o.err != nil {
			return nil, fmt.Errorf("opening destination: %w", o.err)
		}
		return o.f, nil
	case <-ctx.Done():
		// The open ends with the process.
		return nil, withCode(exitSignal, fmt.Errorf("interrupted while %s waited for a reader; nothing was written", name))
	}
}

// destFile is a copy's destination while it is written: a file beside
// DEST that becomes DEST only when complete.
type destFile struct {
	*os.File
	dest    string
	partial string // its name, where it has one (no O_TMPFILE)
	existed bool   // DEST existed (and is replaced only by commit)
	force   bool   // DEST may be replaced even if it is not empty by then
	done    bool
}

// createBeside makes the file a copy to dest writes: with no name, in
// dest's directory (O_TMPFILE), or where the file system cannot make one,
// .DEST.partial-N there.
func createBeside(dest string, force bool) (*destFile, error) {
	d := newDestFile(dest, force)
	dir := filepath.Dir(dest)
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
	if err == nil {
		d.File = os.NewFile(uintptr(fd), dest)
		return d, nil
	}
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EINVAL) {
		err = d.createPartial()
	}
	if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.EROFS) {
		return nil, fmt.Errorf("cannot copy to %s: the copy is written beside it and renamed into place once complete, and %s is not writable (%v)", dest, dir, pathErrno(err))
	}
	if err != nil {
		return nil, fmt.Errorf("opening destination: %w", &os.PathError{Op: "open", Path: dir, Err: pathErrno(err)})
	}
	return d, nil
}

// pathErrno is the errno in err, or err.
func pathErrno(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// newDestFile is the destination dest, with no file yet.
func newDestFile(dest string, force bool) *destFile {
	d := &destFile{dest: dest, force: force}
	if _, err := os.Lstat(dest); err == nil {
		d.existed = true
	}
	return d
}

// createPartial makes d's file .DEST.partial-N, for file systems without
// O_TMPFILE.
func (d *destFile) createPartial() error {
	f, err := os.CreateTemp(filepath.Dir(d.dest), "."+filepath.Base(d.dest)+".partial-*")
	if err != nil {
		return err
	}
	d.File, d.partial = f, f.Name()
	return nil
}

// destAppearedError: DEST did not exist when the copy began, and does now.
type destAppearedError struct{ dest string }

func (e *destAppearedError) Error() string {
	return fmt.Sprintf("%s appeared while copying (another program made it): left it as it is and discarded the copy; copy again, with --force to replace it", e.dest)
}

// commit puts the complete file in place as dest; with sync, data and
// name are on disk first. A DEST that did not exist is never replaced:
// if one appeared meanwhile, commit fails. One that did is replaced in
// one rename, by a file with its mode (and its owner, where the user may
// give it), unless it is no longer empty and force is off.
func (d *destFile) commit(sync bool) error {
	if sync {
		if err := d.Sync(); err != nil {
			return fmt.Errorf("fsync %s: %w", d.dest, err)
		}
	}
	var err error
	if d.existed {
		err = d.replace()
	} else {
		err = d.place()
	}
	if err != nil {
		return err
	}
	d.done = true
	if sync {
		if dir, err := os.Open(filepath.Dir(d.dest)); err == nil {
			err = dir.Sync()
			dir.Close()
			if err != nil {
				return fmt.Errorf("fsync the directory of %s: %w", d.dest, err)
			}
		}
	}
	return nil
}

// place gives the file the name dest, which must not exist.
func (d *destFile) place() error {
	var err error
	if d.partial == "" {
		err = unix.Linkat(unix.AT_FDCWD, d.procPath(), unix.AT_FDCWD, d.dest, unix.AT_SYMLINK_FOLLOW)
	} else {
		err = unix.Renameat2(unix.AT_FDCWD, d.partial, unix.AT_FDCWD, d.dest, unix.RENAME_NOREPLACE)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOSYS) {
			// No RENAME_NOREPLACE here: a link does not replace either.
			if err = os.Link(d.partial, d.dest); err == nil {
				os.Remove(d.partial)
			}
		}
	}
	if errors.Is(err, unix.EEXIST) || errors.Is(err, os.ErrExist) {
		return &destAppearedError{d.dest}
	}
	if err != nil {
		return fmt.Errorf("putting %s in place: %w", d.dest, pathErrno(err))
	}
	return nil
}

// replace puts the file in place of dest in one rename, with dest's mode
// and owner.
func (d *destFile) replace() error {
	if st, err := os.Stat(d.dest); err == nil {
		if st.Mode().IsRegular() && st.Size() > 0 && !d.force {
			return notEmpty(d.dest, st.Size())
		}
		if err := d.Chmod(st.Mode().Perm()); err != nil {
			return fmt.Errorf("giving the copy the mode of %s: %w", d.dest, pathErrno(err))
		}
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			_ = d.Chown(int(sys.Uid), int(sys.Gid)) // where the user may
		}
	}
	name := d.partial
	if name == "" {
		// Give the nameless file a name beside dest, then rename it.
		name = filepath.Join(filepath.Dir(d.dest), fmt.Sprintf(".%s.partial-%d-%d", filepath.Base(d.dest), os.Getpid(), time.Now().UnixNano()))
		if err := unix.Linkat(unix.AT_FDCWD, d.procPath(), unix.AT_FDCWD, name, unix.AT_SYMLINK_FOLLOW); err != nil {
			return fmt.Errorf("naming %s: %w", d.dest, err)
		}
	}
	if err := os.Rename(name, d.dest); err != nil {
		os.Remove(name)
		return fmt.Errorf("putting %s in place: %w", d.dest, pathErrno(err))
	}
	return nil
}

// procPath names the open file, to give a nameless one a name.
func (d *destFile) procPath() string { return fmt.Sprintf("/proc/self/fd/%d", d.Fd()) }

// discard closes the file and, unless it was committed, removes what a
// failed copy left of it.
func (d *destFile) discard() {
	d.Close()
	if !d.done && d.partial != "" {
		os.Remove(d.partial)
	}
}

// unwritten says what a failed copy left of dest (nil: written in place).
func unwritten(name string, d *destFile) string {
	switch {
	case d != nil && d.existed:
		return name + " was left as it was"
	case d != nil:
		return name + " was not created"
	case name == "-":
		return "the output is incomplete"
	}
	return name + " is incomplete"
}
