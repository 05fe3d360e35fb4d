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
	done    bool
}

// createBeside makes the file a copy to dest writes: with no name, in
// dest's directory (O_TMPFILE), or where the file system cannot make one,
// .DEST.partial-N there.
func createBeside(dest string) (*destFile, error) {
	d := &destFile{dest: dest}
	if _, err := os.Lstat(dest); err == nil {
		d.existed = true
	}
	dir := filepath.Dir(dest)
	fd, err := unix.Open(dir, unix.O_TMPFILE|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
	if err == nil {
		d.File = os.NewFile(uintptr(fd), dest)
		return d, nil
	}
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EINVAL) {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return d, d.createPartial()
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

// commit puts the complete file in place as dest, replacing what was
// there in one rename; with sync, data and name are on disk first.
func (d *destFile) commit(sync bool) error {
	if sync {
		if err := d.Sync(); err != nil {
			return fmt.Errorf("fsync %s: %w", d.dest, err)
		}
	}
	name := d.partial
	if name == "" {
		// Give the nameless file a name beside dest, then rename it.
		name = filepath.Join(filepath.Dir(d.dest), fmt.Sprintf(".%s.partial-%d-%d", filepath.Base(d.dest), os.Getpid(), time.Now().UnixNano()))
		proc := fmt.Sprintf("/proc/self/fd/%d", d.Fd())
		if err := unix.Linkat(unix.AT_FDCWD, proc, unix.AT_FDCWD, name, unix.AT_SYMLINK_FOLLOW); err != nil {
			return fmt.Errorf("naming %s: %w", d.dest, err)
		}
	}
	if err := os.Rename(name, d.dest); err != nil {
		os.Remove(name)
		return fmt.Errorf("putting %s in place: %w", d.dest, err)
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
