package test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// account is who runs a command: nil is the test's own user (root);
// otherwise testenv.TestUser, with a copy of the binary under test it may
// run (bin) in a directory it may enter (dir: 0755, root's; the user's own
// directories go below, see mkdir).
type account struct {
	uid, gid uint32
	bin, dir string
}

// testUser prepares a test to run commands as testenv.TestUser: FUSE
// required, /dev/fuse open to all, and a copy of the binary under test,
// since the user cannot enter the suite's private build directory.
func testUser(t *testing.T) *account {
	t.Helper()
	testenv.RequireFUSE(t)
	uid, gid := testenv.UnprivilegedUser(t)
	testenv.OpenDevFuse(t)
	dir := testenv.ShortTempDir(t)
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "snapmount")
	copyFile(t, snapmountBin, bin)
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	return &account{uid: uid, gid: gid, bin: bin, dir: dir}
}

// snapmount is the binary under test as a may run it.
func (a *account) snapmount() string {
	if a == nil {
		return snapmountBin
	}
	return a.bin
}

// name is how the tests' messages call a.
func (a *account) name() string {
	if a == nil {
		return "root"
	}
	return testenv.TestUser
}

// command is exec.Command run as a; the name "snapmount" is the binary
// under test. The user's commands run in / with an environment of their
// own that keeps the suite's GORACE: without its atexit_sleep_ms=0 (see
// TestMain) a race-built snapmount sleeps a second at every exit.
func (a *account) command(name string, args ...string) *exec.Cmd {
	if name == "snapmount" {
		name = a.snapmount()
	}
	cmd := exec.Command(name, args...)
	if a != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: a.uid, Gid: a.gid}}
		cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/", "GORACE=" + os.Getenv("GORACE")}
		cmd.Dir = "/"
	}
	return cmd
}

// accountCmdLimit bounds each command an account runs.
const accountCmdLimit = 2 * time.Minute

// run runs a command as a to completion (accountCmdLimit at most) and
// returns its output and exit code.
func (a *account) run(t testing.TB, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), accountCmdLimit)
	defer cancel()
	cmd := a.command(name, args...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s as %s: %v", name, a.name(), err)
	}
	stop := context.AfterFunc(ctx, func() { cmd.Process.Kill() })
	err := cmd.Wait()
	stop()
	r := result{stdout: so.String(), stderr: se.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("%s as %s: %v", name, a.name(), err)
	}
	if ctx.Err() != nil {
		t.Fatalf("%s %s as %s did not finish within %v", name, strings.Join(args, " "), a.name(), accountCmdLimit)
	}
	return r
}

// must runs a command as a and fails the test unless it exits 0; it
// returns the command's stdout.
func (a *account) must(t testing.TB, name string, args ...string) string {
	t.Helper()
	r := a.run(t, name, args...)
	if r.code != 0 {
		t.Fatalf("%s %s as %s: exit %d\n%s%s", name, strings.Join(args, " "), a.name(), r.code, r.stdout, r.stderr)
	}
	return r.stdout
}

// mkdir makes a directory in a.dir that a owns.
func (a *account) mkdir(t testing.TB, name string) string {
	t.Helper()
	d := filepath.Join(a.dir, name)
	if err := os.Mkdir(d, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(d, int(a.uid), int(a.gid)); err != nil {
		t.Fatal(err)
	}
	return d
}

// mount runs snapmount mount as a and unmounts (as a) when the test ends;
// it returns mount's stderr.
func (a *account) mount(t testing.TB, uri, mnt string, flags ...string) string {
	t.Helper()
	args := append(append([]string{"mount"}, flags...), uri, mnt)
	r := a.run(t, "snapmount", args...)
	if r.code != 0 {
		t.Fatalf("snapmount %s as %s: exit %d: %s", strings.Join(args, " "), a.name(), r.code, r.stderr)
	}
	t.Cleanup(func() {
		if isMounted(mnt) {
			a.run(t, "snapmount", "umount", mnt)
		}
		if isMounted(mnt) {
			exec.Command("fusermount3", "-u", "-z", mnt).Run()
			t.Errorf("the umount as %s left %s mounted", a.name(), mnt)
		}
	})
	return r.stderr
}

// fuse2fs mounts the ext4 in image read-only with fuse2fs as a, reads
// path in it and unmounts. fuse2fs replays no journal: a file system that
// needs recovery fails with fuse2fs's message (ok false).
func (a *account) fuse2fs(t testing.TB, image, path string) (content string, ok bool, msg string) {
	t.Helper()
	mnt := a.mkdir(t, fmt.Sprintf("fuse2fs-%d", time.Now().UnixNano()))
	r := a.run(t, "/usr/bin/fuse2fs", "-o", "ro,fakeroot", image, mnt)
	if r.code != 0 {
		return "", false, r.stdout + r.stderr
	}
	defer func() {
		if r := a.run(t, "/usr/bin/fusermount3", "-u", mnt); r.code != 0 {
			exec.Command("fusermount3", "-u", "-z", mnt).Run()
			t.Errorf("fusermount3 -u %s: %s", mnt, r.stderr)
		}
	}()
	return a.must(t, "/usr/bin/cat", filepath.Join(mnt, path)), true, ""
}

// listing returns the names in dir, read as a.
func (a *account) listing(t testing.TB, dir string) []string {
	t.Helper()
	return strings.Fields(a.must(t, "/usr/bin/ls", "-1", dir))
}
