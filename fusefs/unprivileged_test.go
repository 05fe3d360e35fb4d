package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// TestMountUnprivileged mounts as an ordinary user through the setuid
// fusermount3, as a desktop user without root would: a helper process (a
// copy of this test binary) runs as testenv.TestUser, mounts a pattern file in a
// directory that user owns and serves it; the user reads it back and
// unmounts it with fusermount3 -u.
func TestMountUnprivileged(t *testing.T) {
	testenv.RequireFUSE(t)
	uid, gid := testenv.UnprivilegedUser(t)
	testenv.OpenDevFuse(t)

	base, err := os.MkdirTemp("", "snapmount-fusefs-unpriv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) }) // runs last, after the unmount
	if err := os.Chmod(base, 0755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(base, "fusefs.test")
	copyExecutable(t, bin)
	mnt := filepath.Join(base, "mnt")
	if err := os.Mkdir(mnt, 0755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(mnt, int(uid), int(gid)); err != nil {
		t.Fatal(err)
	}

	const size = 3<<20 + 77
	helper := helperCmd(bin, "mount", helperDirEnv+"="+mnt, helperSizeEnv+"="+strconv.Itoa(size))
	asUser(helper, uid, gid, base)
	var stderr testenv.Buffer
	helper.Stderr = &stderr
	lines := newLineWriter()
	helper.Stdout = lines
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = helper.Wait()
		lines.done()
		close(exited)
	}()
	t.Cleanup(func() {
		// If the test failed half way, undo the mount as root, then end
		// the helper by its PID.
		if _, mounted := findMount(t, mnt); mounted {
			if out, err := exec.Command("fusermount3", "-u", "-z", mnt).CombinedOutput(); err != nil {
				t.Errorf("fusermount3 -u -z %s: %v: %s", mnt, err, out)
			}
		}
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = helper.Process.Kill()
			testenv.Receive(t, exited, "the helper process to exit")
		}
		if t.Failed() {
			t.Logf("helper stderr:\n%s", stderr.String())
		}
	})
	if line, _ := lines.next(t, 30*time.Second); line != "ready" {
		testenv.Receive(t, exited, "the helper process to exit")
		t.Fatalf("helper said %q, want ready (exit: %v); stderr: %s", line, waitErr, stderr.String())
	}

	m, ok := findMount(t, mnt)
	if !ok {
		t.Fatalf("%s not in /proc/self/mounts", mnt)
	}
	if !slices.Contains(m.options, "ro") || !slices.Contains(m.options, fmt.Sprintf("user_id=%d", uid)) {
		t.Errorf("mount options %v, want ro and user_id=%d", m.options, uid)
	}

	// The user sees its own file, with the right content and owner.
	file := filepath.Join(mnt, "file")
	got := runAsUser(t, uid, gid, base, "cat", file)
	if !bytes.Equal(got, patternBytes(0, size)) {
		t.Errorf("cat as %s: %d bytes, want %d of the pattern (or content differs)", testenv.TestUser, len(got), size)
	}
	want := fmt.Sprintf("%d:%d:444:%d", uid, gid, size)
	if st := strings.TrimSpace(string(runAsUser(t, uid, gid, base, "stat", "-c", "%u:%g:%a:%s", file))); st != want {
		t.Errorf("stat as %s: %s, want %s (uid:gid:mode:size)", testenv.TestUser, st, want)
	}
	// Without allow_other nobody else may look, root included: proof that
	// the mount belongs to the user.
	if _, err := os.Stat(file); !errors.Is(err, fs.ErrPermission) {
		t.Errorf("stat as root: %v, want permission denied (no allow_other)", err)
	}
	// Only root may raise the readahead window; the user's mount keeps the
	// kernel's, and Mount does not complain about it.
	if ra := readAheadKB(t, mnt); ra == readAhead>>10 {
		t.Errorf("read_ahead_kb of the user's mount is %d: who raised it?", ra)
	}

	runAsUser(t, uid, gid, base, "fusermount3", "-u", mnt)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		t.Fatal("the helper still serves 30 s after fusermount3 -u")
	}
	if waitErr != nil {
		t.Errorf("helper: %v; stderr: %s", waitErr, stderr.String())
	}
	if _, mounted := findMount(t, mnt); mounted {
		t.Errorf("%s still mounted", mnt)
	}
	if s := stderr.String(); s != "" {
		t.Errorf("helper wrote to stderr: %s", s)
	}
}

// copyExecutable copies the running test binary to dst, where another user
// may run it (go test keeps its binary in a directory only we can enter).
func copyExecutable(t *testing.T, dst string) {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	in, err := os.Open(self)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// asUser makes cmd run as uid:gid, with no supplementary groups, in dir.
func asUser(cmd *exec.Cmd, uid, gid uint32, dir string) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uid, Gid: gid}
	cmd.Dir = dir
}

// runAsUser runs a command as uid:gid and returns its stdout; it fails the
// test if the command fails.
func runAsUser(t *testing.T, uid, gid uint32, dir string, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	asUser(cmd, uid, gid, dir)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s as %s: %v: %s", name, strings.Join(args, " "), testenv.TestUser, err, stderr.String())
	}
	return out
}

// TestMountAllowOther: with AllowOther another user may read the file (the
// modes, 0555 and 0444, are checked by the kernel: default_permissions);
// without it the mount is the mounting user's alone.
func TestMountAllowOther(t *testing.T) {
	testenv.RequireFUSE(t)
	uid, gid := testenv.UnprivilegedUser(t)
	const size = 1<<20 + 3
	for _, allow := range []bool{true, false} {
		// t.TempDir's parent is 0700; the other user must reach the mount.
		base, err := os.MkdirTemp("", "snapmount-fusefs-other-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(base) })
		if err := os.Chmod(base, 0755); err != nil {
			t.Fatal(err)
		}
		server, err := Mount(base, patternReader{}, Options{Name: "disk", Size: size, AllowOther: allow})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := server.Unmount(); err != nil {
				t.Errorf("Unmount: %v", err)
			}
		})
		cmd := exec.Command("cat", filepath.Join(base, "disk"))
		asUser(cmd, uid, gid, "/")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		switch {
		case allow && (err != nil || !bytes.Equal(out, patternBytes(0, size))):
			t.Errorf("AllowOther: cat as %s: %d bytes, %v: %s", testenv.TestUser, len(out), err, stderr.String())
		case !allow && (err == nil || !strings.Contains(stderr.String(), "Permission denied")):
			t.Errorf("without AllowOther: cat as %s: %v: %s, want permission denied", testenv.TestUser, err, stderr.String())
		}
	}
}
