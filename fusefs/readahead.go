package fusefs

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// readAhead is the kernel readahead window Mount asks for. The FUSE INIT
// handshake cannot give it: the kernel offers its default of 128 KiB and
// only accepts a smaller answer. The window of a mount's backing device can
// be raised through sysfs, but only by root.
//
// A larger window keeps more of a sequential reader's requests in flight,
// which matters most when every read waits for a network round trip.
// Kernel readahead only grows for sequential streams, so the larger window
// costs random readers nothing.
const readAhead = 4 << 20

// raiseReadAhead sets the readahead window of the FUSE mount at dir to
// readAhead, through /sys/class/bdi/MAJ:MIN/read_ahead_kb. The backing device
// belongs to this mount alone and goes away with it. Writing there needs
// root: for other users it fails with a permission error and the window
// stays at 128 KiB.
func raiseReadAhead(dir string) error {
	path, err := readAheadFile(dir)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(strconv.Itoa(readAhead >> 10))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// KernelReadahead returns the kernel's readahead window, in bytes, for
// the snapmount mount at dir (its backing device's read_ahead_kb).
func KernelReadahead(dir string) (int64, error) {
	path, err := readAheadFile(dir)
	if err != nil {
		return 0, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	kb, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return kb << 10, err
}

// readAheadFile returns the sysfs file holding the readahead window of
// the snapmount mount at dir, found in the mount table under tableDir(dir):
// /sys/class/bdi/MAJ:MIN/read_ahead_kb of its backing device.
func readAheadFile(dir string) (string, error) {
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", err
	}
	dev, ok := mountDevice(mountinfo, tableDir(dir))
	if !ok {
		return "", fmt.Errorf("%s is not a snapmount mount in /proc/self/mountinfo", dir)
	}
	return filepath.Join("/sys/class/bdi", dev, "read_ahead_kb"), nil
}

// mountDevice returns the device ("major:minor") of the last fuse.snapmount
// mount at dir listed in mountinfo (proc(5)); the last one is the one on top.
func mountDevice(mountinfo []byte, dir string) (dev string, ok bool) {
	dev, typ, ok := topMount(mountinfo, dir)
	if !ok || typ != "fuse.snapmount" {
		return "", false
	}
	return dev, true
}

// topMount returns the device and file system type of the last mount at
// dir listed in mountinfo: the one on top.
func topMount(mountinfo []byte, dir string) (dev, typ string, ok bool) {
	for line := range strings.Lines(string(mountinfo)) {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
		before, after, found := strings.Cut(line, " - ")
		f, g := strings.Fields(before), strings.Fields(after)
		if !found || len(f) < 5 || len(g) < 1 {
			continue
		}
		if unescapeOctal(f[4]) == dir {
			dev, typ, ok = f[2], g[0], true
		}
	}
	return dev, typ, ok
}

// MountType returns the file system type ("fuse.snapmount", "ext4", ...)
// of what is mounted at dir, if anything is. dir must be absolute and
// clean, as mount tables list it.
func MountType(dir string) (string, bool) {
	mountinfo, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	_, typ, ok := topMount(mountinfo, dir)
	return typ, ok
}

// unescapeOctal undoes the \NNN escapes the kernel writes in mount tables for
// space, tab, newline and backslash.
func unescapeOctal(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
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
