package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
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
	if typ, ok := mountAt(abs); ok && strings.HasPrefix(typ, "fuse") && errors.Is(unix.Statfs(abs, &sfs), syscall.ENOTCONN) {
		if err := fusermount("-u", "-z", abs); err != nil {
			return "", fmt.Errorf("mountpoint %s is a dead FUSE mount and lazy unmounting it failed: %v", abs, err)
		}
	}
	st, err := os.Stat(abs)
	if errors.Is(err, syscall.ENOTCONN) {
		if err := fusermount("-u", "-z", abs); err != nil {
			return "", fmt.Errorf("mountpoint %s is a dead FUSE mount and lazy unmounting it failed: %v", abs, err)
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
	if m, ok := mountAt(abs); ok {
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

// mountAt returns the filesystem type of the mount at dir, if there is one.
func mountAt(dir string) (string, bool) {
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return "", false
	}
	defer f.Close()
	return findMount(f, dir)
}

// findMount reads a mounts table for an entry at dir.
func findMount(r io.Reader, dir string) (string, bool) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 3 && unescapeMount(fields[1]) == dir {
			return fields[2], true
		}
	}
	return "", false
}

// unescapeMount undoes the octal escapes of /proc/mounts (\040 = space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
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
