package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"snapmount/fusefs"
)

// prepareMountpoint checks that dir can take the mount: an existing, empty
// directory. A mountpoint left behind by a crashed run ("transport
// endpoint is not connected") is lazily unmounted first.
func prepareMountpoint(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	// The kernel may answer stat from its attribute cache even for a
	// dead mount; statfs always asks the filesystem, so it tells.
	var sfs unix.Statfs_t
	if typ, ok := fusefs.MountType(abs); ok && strings.HasPrefix(typ, "fuse") && errors.Is(unix.Statfs(abs, &sfs), syscall.ENOTCONN) {
		if err := unmountDead(abs); err != nil {
			return "", err
		}
	}
	st, err := os.Stat(abs)
	if errors.Is(err, syscall.ENOTCONN) {
		if err := unmountDead(abs); err != nil {
			return "", err
		}
		st, err = os.Stat(abs)
	}
	switch {
	case errors.Is(err, os.ErrNotExist):
		return "", fmt.Errorf("mountpoint %s does not exist: create an empty directory there", abs)
	case err != nil:
		return "", fmt.Errorf("mountpoint %s: %v", abs, err)
	case !st.IsDir():
		return "", fmt.Errorf("mountpoint %s is not a directory", abs)
	}
	if m, ok := fusefs.MountType(abs); ok {
		return "", fmt.Errorf("%s is already a mount point (%s); unmount it first: snapmount umount %s", abs, m, abs)
	}
	f, err := os.Open(abs)
	if err != nil {
		return "", fmt.Errorf("mountpoint %s: %v", abs, err)
	}
	defer f.Close()
	if names, _ := f.Readdirnames(1); len(names) > 0 {
		return "", fmt.Errorf("mountpoint %s is not empty: mount on an empty directory", abs)
	}
	return abs, nil
}

// unmountDead lazily unmounts the dead FUSE mount at dir.
func unmountDead(dir string) error {
	if err := fusermount("-u", "-z", dir); err != nil {
		return fmt.Errorf("mountpoint %s is a dead FUSE mount and lazy unmounting it failed: %v; try: fusermount3 -u -z %s", dir, err, dir)
	}
	return nil
}

// fusermount runs fusermount3 (or fusermount) with args.
func fusermount(args ...string) error {
	bin := "fusermount3"
	if _, err := exec.LookPath(bin); err != nil {
		bin = "fusermount"
	}
	out, err := exec.Command(bin, args...).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if msg == "" {
			msg = err.Error()
		}
		return errors.New(msg)
	}
	return nil
}

// captureStderr runs fn with the process's standard error (descriptor 2,
// which go-fuse hands to fusermount3) going to a pipe, and returns what
// was written to it meanwhile.
func captureStderr(fn func() error) (string, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return "", fn()
	}
	defer r.Close()
	saved, err := unix.Dup(2)
	if err != nil {
		w.Close()
		return "", fn()
	}
	err = unix.Dup3(int(w.Fd()), 2, 0)
	w.Close()
	if err != nil {
		unix.Close(saved)
		return "", fn()
	}
	var out strings.Builder
	read := make(chan struct{})
	go func() {
		defer close(read)
		_, _ = io.Copy(&out, io.LimitReader(r, 64<<10))
		_, _ = io.Copy(io.Discard, r)
	}()
	ferr := fn()
	_ = unix.Dup3(saved, 2, 0) // closes the pipe's last write end
	unix.Close(saved)
	<-read
	return out.String(), ferr
}

// mountFailure explains a failed mount: with what fusermount3 said, and
// what to do about it, rather than go-fuse's "fusermount exited with code
// 256".
func mountFailure(dir string, err error, said string) error {
	var reason string
	for line := range strings.Lines(said) {
		// "/usr/bin/fusermount3: user has no write access to ..."
		if i := strings.Index(line, "fusermount"); i >= 0 && strings.Contains(line, ": ") {
			reason = strings.TrimSpace(line[i:])
		}
	}
	if reason == "" {
		return fmt.Errorf("mounting on %s: %w", dir, err)
	}
	var fix string
	switch {
	case strings.Contains(reason, "write access"):
		fix = "mount on a directory you own or may write to"
	case strings.Contains(reason, "user_allow_other"):
		fix = "add the line user_allow_other to /etc/fuse.conf (as root), or mount without --allow-other"
	case strings.Contains(reason, "/dev/fuse"):
		fix = "/dev/fuse must be readable and writable for you, which your distribution's permissions for it decide (often mode 0666, or a fuse group to join)"
	case strings.Contains(reason, "mount count"):
		fix = "unmount some FUSE mounts, or raise mount_max in /etc/fuse.conf"
	}
	if fix == "" {
		return fmt.Errorf("mounting on %s: %s", dir, reason)
	}
	return fmt.Errorf("mounting on %s: %s; %s", dir, reason, fix)
}

// totalMemory is the machine's memory in bytes, or 0 if unknown.
func totalMemory() int64 {
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) != nil {
		return 0
	}
	return int64(si.Totalram) * int64(si.Unit)
}
