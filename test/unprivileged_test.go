package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// asUser runs the binary under test as the unprivileged user.
func asUser(t *testing.T, uid, gid uint32, bin string, args ...string) result {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid}}
	cmd.Env = []string{"PATH=/usr/bin:/bin", "HOME=/"}
	cmd.Dir = "/"
	var so, se strings.Builder
	cmd.Stdout, cmd.Stderr = &so, &se
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return result{so.String(), se.String(), code}
	case <-time.After(2 * time.Minute):
		cmd.Process.Kill()
		t.Fatalf("%s %v as uid %d did not finish", bin, args, uid)
	}
	return result{}
}

// An ordinary user mounts through fusermount3 in a directory it owns,
// reads the export, and unmounts; the file belongs to that user.
func TestMountUnprivileged(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "nbdkit")
	uid, gid := testenv.UnprivilegedUser(t)
	testenv.OpenDevFuse(t)

	dir := testenv.ShortTempDir(t)
	os.Chmod(dir, 0o755)
	// The user cannot enter the suite's private build directory.
	bin := filepath.Join(dir, "snapmount")
	copyFile(t, snapmountBin, bin)
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 4<<20, 17)
	port := freePort(t)
	srv := startProc(t, "nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", strconv.Itoa(port), "file", image)
	srv.waitReady("tcp", fmt.Sprintf("127.0.0.1:%d", port))

	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chown(mnt, int(uid), int(gid))
	uri := fmt.Sprintf("nbd://127.0.0.1:%d/", port)
	r := asUser(t, uid, gid, bin, "mount", uri, mnt)
	if r.code != 0 {
		t.Fatalf("mount as %s: exit %d: %s", testenv.TestUser, r.code, r.stderr)
	}
	t.Cleanup(func() {
		if isMounted(mnt) {
			asUser(t, uid, gid, bin, "umount", mnt)
		}
		if isMounted(mnt) {
			exec.Command("fusermount3", "-u", "-z", mnt).Run()
			t.Error("the user's umount left the mount behind")
		}
	})
	file := filepath.Join(mnt, "nbd")
	// Without allow_other only the user may look: read it as the user.
	sum := asUser(t, uid, gid, "/usr/bin/sha256sum", file)
	if sum.code != 0 || !strings.HasPrefix(sum.stdout, fileSHA256(t, image)) {
		t.Fatalf("sha256sum as %s: %q %q", testenv.TestUser, sum.stdout, sum.stderr)
	}
	st := asUser(t, uid, gid, "/usr/bin/stat", "-c", "%u %a", file)
	if strings.TrimSpace(st.stdout) != fmt.Sprintf("%d 444", uid) {
		t.Errorf("file owner and mode %q, want %d 444", st.stdout, uid)
	}
	if r := asUser(t, uid, gid, bin, "umount", mnt); r.code != 0 {
		t.Fatalf("umount as %s: %d %s", testenv.TestUser, r.code, r.stderr)
	}
	if isMounted(mnt) {
		t.Fatal("still mounted")
	}
}

// A mount fusermount3 refuses says why in one line, with what to do, in
// the background (where fusermount3's own output went nowhere) as in the
// foreground: a mountpoint the user may not write, and --allow-other
// without user_allow_other in /etc/fuse.conf.
func TestMountUnprivilegedRefusalSaysWhy(t *testing.T) {
	testenv.RequireFUSE(t)
	uid, gid := testenv.UnprivilegedUser(t)
	testenv.OpenDevFuse(t)
	dir, _, sock := nbdkitImage(t, 1<<20, 4)
	os.Chmod(dir, 0o755)
	os.Chmod(sock, 0o666)
	bin := filepath.Join(dir, "snapmount")
	copyFile(t, snapmountBin, bin)
	os.Chmod(bin, 0o755)
	rootOwned := mountDir(t, dir, "root-owned") // 0755 root: not the user's
	own := mountDir(t, dir, "own")
	os.Chown(own, int(uid), int(gid))
	conf, _ := os.ReadFile("/etc/fuse.conf")
	allowed := regexp.MustCompile(`(?m)^\s*user_allow_other`).Match(conf)
	for _, c := range []struct {
		flag, dir string
		want      []string
	}{
		{"", rootOwned, []string{"fusermount3: user has no write access to mountpoint " + rootOwned, "mount on a directory you own"}},
		{"-f", rootOwned, []string{"fusermount3: user has no write access", "mount on a directory you own"}},
		{"--allow-other", own, []string{"user_allow_other", "add the line user_allow_other to /etc/fuse.conf"}},
	} {
		if allowed && c.flag == "--allow-other" {
			continue // this machine allows it
		}
		args := []string{"mount", unixURI("", sock), c.dir}
		if c.flag != "" {
			args = slices.Insert(args, 1, c.flag)
		}
		r := asUser(t, uid, gid, bin, args...)
		msg := strings.TrimSpace(r.stderr)
		msg = msg[strings.LastIndex(msg, "\n")+1:] // after the live-view warning
		ok := r.code == 4
		for _, w := range c.want {
			ok = ok && strings.Contains(msg, w)
		}
		if !ok {
			t.Errorf("%v as %s: exit %d, %q; want exit 4 and one line with %q", args, testenv.TestUser, r.code, r.stderr, c.want)
		}
		if isMounted(c.dir) {
			t.Errorf("%v left a mount", args)
		}
	}
}
