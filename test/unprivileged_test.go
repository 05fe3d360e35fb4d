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
	"testing"

	"snapmount/test/testenv"
)

// An ordinary user mounts through fusermount3 in a directory it owns,
// reads the export, and unmounts; the file belongs to that user.
func TestMountUnprivileged(t *testing.T) {
	testenv.RequireCmd(t, "nbdkit")
	u := testUser(t)
	image := filepath.Join(u.dir, "disk.img")
	writeRandomImage(t, image, 4<<20, 17)
	port := freePort(t)
	srv := startProc(t, "nbdkit", "-f", "-r", "-i", "127.0.0.1", "-p", strconv.Itoa(port), "file", image)
	srv.waitReady("tcp", fmt.Sprintf("127.0.0.1:%d", port))

	mnt := u.mkdir(t, "mnt")
	uri := fmt.Sprintf("nbd://127.0.0.1:%d/", port)
	r := u.run(t, "snapmount", "mount", uri, mnt)
	if r.code != 0 {
		t.Fatalf("mount as %s: exit %d: %s", testenv.TestUser, r.code, r.stderr)
	}
	t.Cleanup(func() {
		if isMounted(mnt) {
			u.run(t, "snapmount", "umount", mnt)
		}
		if isMounted(mnt) {
			exec.Command("fusermount3", "-u", "-z", mnt).Run()
			t.Error("the user's umount left the mount behind")
		}
	})
	file := filepath.Join(mnt, "nbd")
	// Without allow_other only the user may look: read it as the user.
	sum := u.run(t, "/usr/bin/sha256sum", file)
	if sum.code != 0 || !strings.HasPrefix(sum.stdout, fileSHA256(t, image)) {
		t.Fatalf("sha256sum as %s: %q %q", testenv.TestUser, sum.stdout, sum.stderr)
	}
	st := u.run(t, "/usr/bin/stat", "-c", "%u %a", file)
	if strings.TrimSpace(st.stdout) != fmt.Sprintf("%d 444", u.uid) {
		t.Errorf("file owner and mode %q, want %d 444", st.stdout, u.uid)
	}
	if r := u.run(t, "snapmount", "umount", mnt); r.code != 0 {
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
	u := testUser(t)
	dir, _, sock := nbdkitImage(t, 1<<20, 4)
	os.Chmod(dir, 0o755)
	os.Chmod(sock, 0o666)
	rootOwned := mountDir(t, dir, "root-owned") // 0755 root: not the user's
	own := u.mkdir(t, "own")
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
		r := u.run(t, "snapmount", args...)
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
