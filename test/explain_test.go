package test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// oneLine fails the test unless out is one line holding every want.
func oneLine(t *testing.T, what, out string, want ...string) {
	t.Helper()
	out = strings.TrimSpace(out)
	if strings.Contains(out, "\n") {
		t.Errorf("%s: more than one line: %q", what, out)
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("%s: %q does not say %q", what, out, w)
		}
	}
}

// A mount told not to send the read-only promise, of an export it could
// then write, says that the promise was not sent, not that the server
// does not know it.
func TestMountNoPromiseSaysSo(t *testing.T) {
	testenv.RequireFUSE(t)
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 1<<20, 9)
	sock, _ := startServe(t, "disk="+image)
	mnt := mountDir(t, dir, "mnt")
	r := snapmount(t, time.Minute, "mount", "--no-promise", unixURI("disk", sock), mnt)
	if r.code != 3 {
		t.Errorf("mount --no-promise of a writable export: exit %d, want 3", r.code)
	}
	oneLine(t, "mount --no-promise", r.stderr, "was not sent the read-only promise", "--allow-writable")
	if isMounted(mnt) {
		unmountSM(t, mnt)
		t.Error("mount --no-promise of a writable export mounted it")
	}
}

// A cache larger than the machine's memory is warned about, once.
func TestMountCacheAboveMemoryWarned(t *testing.T) {
	testenv.RequireFUSE(t)
	dir, _, sock := nbdkitImage(t, 1<<20, 10)
	mnt := mountDir(t, dir, "mnt")
	r := snapmount(t, time.Minute, "mount", "--cache-size", "1024T", unixURI("", sock), mnt)
	if r.code != 0 {
		t.Fatalf("mount --cache-size 1024T: exit %d: %s", r.code, r.stderr)
	}
	t.Cleanup(func() { unmountSM(t, mnt) })
	if n := strings.Count(r.stderr, "is more than this machine's memory"); n != 1 {
		t.Errorf("--cache-size 1024T warned %d times, want once: %q", n, r.stderr)
	}
}

// On a mount whose process is gone, stats say so and what cleans up, and
// umount cleans up.
func TestDeadMountExplained(t *testing.T) {
	_, _, mnt := crashedMount(t, 11)
	r := snapmount(t, time.Minute, "stats", mnt)
	if r.code == 0 {
		t.Errorf("stats of a dead mount succeeded: %s", r.stdout)
	}
	oneLine(t, "stats of a dead mount", r.stderr, "mount process", "is gone", "snapmount umount "+mnt)
	if r := snapmount(t, time.Minute, "umount", mnt); r.code != 0 || isMounted(mnt) {
		t.Errorf("umount of a dead mount: exit %d %s; still mounted: %v", r.code, r.stderr, isMounted(mnt))
	}
}

// A snapshot the server broke (its store is full) gives EIO, and stats
// say that the snapshot is broken and why, in text and JSON.
func TestMountSnapshotBrokenStats(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "qemu-io")
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 4<<20, 14)
	sock, _ := startServe(t, "--snapshot-max", "1M", "disk="+image)
	mnt := mountDir(t, dir, "mnt")
	mountSM(t, unixURI("disk", sock), mnt, "--readahead", "0")
	if st := statsJSON(t, mnt); st["state"] != "connected" {
		t.Fatalf("state of a fresh snapshot mount: %v", st["state"])
	}
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 0 4M", unixURI("disk", sock))
	f, err := os.Open(filepath.Join(mnt, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(make([]byte, 4096), 3<<20); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of a broken snapshot: %v, want EIO", err)
	}
	if st := statsJSON(t, mnt); st["state"] != "snapshot broken" || !strings.Contains(fmt.Sprint(st["state_detail"]), "is broken") {
		t.Errorf("stats of a broken snapshot: state %v: %v", st["state"], st["state_detail"])
	}
	r := snapmount(t, time.Minute, "stats", mnt)
	if !strings.Contains(r.stdout, "state:          snapshot broken since ") {
		t.Errorf("stats text of a broken snapshot:\n%s", r.stdout)
	}
}

// info --map against a server that stops answering BLOCK_STATUS (nbdkit's
// delay filter, 30 s) fails within its --timeout, with one line and exit
// code 1: it connected; only the map failed.
func TestInfoMapBounded(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 1<<20, 15)
	sock, _ := startNbdkit(t, dir, "-r", "--filter=delay", "file", image, "delay-extents=30")
	began := time.Now()
	r := snapmount(t, time.Minute, "info", "--map", "--timeout", "2s", unixURI("", sock))
	took := time.Since(began)
	if r.code != 1 || took > 2*time.Second+boundSlack {
		t.Errorf("info --map with a server that does not answer: exit %d after %v, want 1 within 2s + %v", r.code, took, boundSlack)
	}
	oneLine(t, "info --map", r.stderr, "block status at offset 0", "no reply")
}
