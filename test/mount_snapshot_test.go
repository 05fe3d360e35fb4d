package test

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// statsJSON reads a mount's counters.
func statsJSON(t testing.TB, mnt string) map[string]any {
	t.Helper()
	r := snapmount(t, time.Minute, "stats", "--json", mnt)
	if r.code != 0 {
		t.Fatalf("stats: %d %s", r.code, r.stderr)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &m); err != nil {
		t.Fatalf("stats JSON %q: %v", r.stdout, err)
	}
	return m
}

// The product's main job: a mount of NAME on snapmount serve is a frozen
// snapshot. A writer that connects after it (one writer slot only: the
// mount's four connections took none) rewrites the whole image; reads of
// the mount during and after the writes give the original bytes, as does
// a second mount joining the snapshot's canonical name with no cache,
// while NAME@live shows the new data.
func TestMountSnapshotUnderWriter(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "qemu-io")
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	const size = 32 << 20
	writeRandomImage(t, image, size, 31)
	original := fileSHA256(t, image)
	sock, _ := startServe(t, "--max-writers", "1", "disk="+image)

	mntA := mountDir(t, dir, "a")
	r := snapmount(t, time.Minute, "mount", unixURI("disk", sock), mntA)
	if r.code != 0 {
		t.Fatalf("mount: %d %s", r.code, r.stderr)
	}
	t.Cleanup(func() { unmountSM(t, mntA) })
	if strings.Contains(r.stderr, "warning") {
		t.Errorf("a snapshot mount warned: %q", r.stderr)
	}
	st := statsJSON(t, mntA)
	snap, _ := st["export"].(string)
	if !strings.HasPrefix(snap, "disk@s") || st["frozen_snapshot"] != true {
		t.Fatalf("mount is not a frozen snapshot: %v", st)
	}
	file := filepath.Join(mntA, "disk")

	// The writer rewrites every byte while the mount is read.
	writer := startProc(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 32M", "-c", "flush", unixURI("disk", sock))
	during := fileSHA256(t, file)
	if err := writer.waitExit(2 * time.Minute); err != nil {
		t.Fatalf("the writer could not write (did the mount take the writer slot?): %v\n%s", err, writer.out.String())
	}
	want := bytes.Repeat([]byte{0x5a}, size)
	sum := sha256.Sum256(want)
	if got := fileSHA256(t, image); got != hex.EncodeToString(sum[:]) {
		t.Fatal("the writer's data did not reach the image")
	}
	after := fileSHA256(t, file)
	if during != original || after != original {
		t.Fatalf("snapshot changed: sha during writes %s, after %s, original %s", during, after, original)
	}

	// Another mount joins the same instant by its canonical name and
	// reads through to the server (no cache) to prove the server's view.
	mntB := mountDir(t, dir, "b")
	mountSM(t, unixURI(snap, sock), mntB, "--no-cache")
	if got := fileSHA256(t, filepath.Join(mntB, "disk")); got != original {
		t.Fatalf("%s read through a second mount: %s, want the original %s", snap, got, original)
	}
	// The live view shows the writer's data, and says it is live.
	mntC := mountDir(t, dir, "c")
	r = snapmount(t, time.Minute, "mount", unixURI("disk@live", sock), mntC)
	if r.code != 0 {
		t.Fatalf("mount @live: %d %s", r.code, r.stderr)
	}
	t.Cleanup(func() { unmountSM(t, mntC) })
	if !strings.Contains(r.stderr, "live") {
		t.Errorf("no live-view warning: %q", r.stderr)
	}
	if got := fileSHA256(t, filepath.Join(mntC, "disk")); got != hex.EncodeToString(sum[:]) {
		t.Fatalf("@live shows %s, not the written data", got)
	}
}

// A snapshot that is gone (the server restarted, its stores are dropped)
// gives EIO, never the newer data the image now holds.
func TestMountSnapshotGone(t *testing.T) {
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "qemu-io")
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 4<<20, 5)
	orig, _ := os.ReadFile(image)
	sockDir := testenv.ShortTempDir(t)
	sock := filepath.Join(sockDir, "s.sock")
	serve := func() *proc {
		p := startProc(t, snapmountBin, "serve", "--no-tcp", "--socket", sock, "disk="+image)
		p.waitOutput("listening on", time.Minute)
		return p
	}
	srv := serve()
	mnt := mountDir(t, dir, "mnt")
	mountSM(t, unixURI("disk", sock), mnt, "--readahead", "0", "--timeout", "5s")
	f, err := os.Open(filepath.Join(mnt, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 128<<10)
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, orig[:len(buf)]) {
		t.Fatalf("first read: %v", err)
	}
	srv.kill()
	os.Remove(sock)
	serve()
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4M", unixURI("disk", sock))
	_, err = f.ReadAt(buf, 2<<20)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of a gone snapshot: %v, want EIO (data %x...)", err, buf[:4])
	}
}

// A snapshot smaller than the cache is fetched from the server once, even
// by a reader the kernel's page cache does not serve: of two passes of
// O_DIRECT reads over a mounted snapshot (a sequential scan each), the
// second fetches nothing, and the cache evicts nothing.
func TestMountSmallSnapshotFetchedOnce(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	const size = 8 << 20
	writeRandomImage(t, image, size, 41)
	sock, _ := startServe(t, "disk="+image)
	mnt := mountDir(t, dir, "mnt")
	// A budget twice the export: a scan of it would keep 1/32 (512 KiB)
	// if scans of exports that fit were not kept whole.
	mountSM(t, unixURI("disk", sock), mnt, "--cache-size", "16M")

	buf := testenv.AlignedBuf(1 << 20)
	var fetched, evictions [2]float64
	for pass := range 2 {
		f, err := os.OpenFile(filepath.Join(mnt, "disk"), os.O_RDONLY|syscall.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		for off := int64(0); off < size; off += int64(len(buf)) {
			if _, err := f.ReadAt(buf, off); err != nil {
				f.Close()
				t.Fatalf("pass %d: O_DIRECT read at %d: %v", pass+1, off, err)
			}
		}
		f.Close()
		st := statsJSON(t, mnt)
		c, _ := st["cache"].(map[string]any)
		if st["frozen_snapshot"] != true || c == nil {
			t.Fatalf("not a frozen snapshot with a cache: %v", st)
		}
		fetched[pass], _ = c["bytes_fetched"].(float64)
		evictions[pass], _ = c["evictions"].(float64)
	}
	if fetched[0] < size || fetched[1] != fetched[0] || evictions[1] != 0 {
		t.Fatalf("two O_DIRECT passes over an %d-byte snapshot: %.0f bytes fetched by the first, %.0f more by the second, %.0f evictions; want the second to fetch nothing", size, fetched[0], fetched[1]-fetched[0], evictions[1])
	}
}
