package main

import (
	"errors"
	"fmt"
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
