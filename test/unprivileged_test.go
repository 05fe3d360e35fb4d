package test

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const testUser = "snapmount-test"

// testUserIDs returns the uid and gid of the system user the
// unprivileged tests run as, creating it if needed (root only).
func testUserIDs(t *testing.T) (uint32, uint32) {
	t.Helper()
	if os.Getuid() != 0 {
		skipOrFail(t, "creating a test user needs root")
	}
	u, err := user.Lookup(testUser)
	if err != nil {
		requireCmd(t, "useradd")
		if out, err := exec.Command("useradd", "-r", "-M", "-s", "/usr/sbin/nologin", testUser).CombinedOutput(); err != nil {
			// Another package's test may have created it meanwhile.
			if u, err = user.Lookup(testUser); err != nil {
				t.Fatalf("useradd %s: %v: %s", testUser, err, out)
			}
		}
		if u == nil {
			if u, err = user.Lookup(testUser); err != nil {
				t.Fatal(err)
			}
		}
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	return uint32(uid), uint32(gid)
}

// openDevFuse makes /dev/fuse usable by every user for the test, as
// desktop distributions ship it (0666; 0600 on these machines), and puts
// the old mode back afterwards.
func openDevFuse(t *testing.T) {
	t.Helper()
	// go test runs packages in parallel and fusefs's tests change the
	// mode too: the same lock file keeps the save and restore pairs from
	// interleaving.
	lock, err := os.OpenFile(filepath.Join(os.TempDir(), "snapmount-dev-fuse.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lock.Close() }) // runs last: after the mode is back
	st, err := os.Stat("/dev/fuse")
	if err != nil {
		skipOrFail(t, "/dev/fuse is missing")
	}
	old := st.Mode().Perm()
	if err := os.Chmod("/dev/fuse", 0o666); err != nil {
		t.Fatalf("chmod /dev/fuse: %v", err)
	}
	t.Cleanup(func() { os.Chmod("/dev/fuse", old) })
}

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
	requireFUSE(t)
	requireCmd(t, "nbdkit")
	uid, gid := testUserIDs(t)
	openDevFuse(t)

	dir := shortTempDir(t)
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
		t.Fatalf("mount as %s: exit %d: %s", testUser, r.code, r.stderr)
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
		t.Fatalf("sha256sum as %s: %q %q", testUser, sum.stdout, sum.stderr)
	}
	st := asUser(t, uid, gid, "/usr/bin/stat", "-c", "%u %a", file)
	if strings.TrimSpace(st.stdout) != fmt.Sprintf("%d 444", uid) {
		t.Errorf("file owner and mode %q, want %d 444", st.stdout, uid)
	}
	if r := asUser(t, uid, gid, bin, "umount", mnt); r.code != 0 {
		t.Fatalf("umount as %s: %d %s", testUser, r.code, r.stderr)
	}
	if isMounted(mnt) {
		t.Fatal("still mounted")
	}
}
