package test

// Snapshots of "snapmount serve" under a concurrent writer, compared with
// qemu-storage-daemon's copy-before-write + snapshot-access exports (the
// reference peer for point-in-time NBD views).

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/nbd"
	"snapmount/test/testenv"
)

// pySnapshotReader opens the reader URI (argv 1), then a second
// connection to argv 2 with "{name}" replaced by the canonical name the
// server sent, starts the writer command (argv 4, JSON) and reads the
// whole export (argv 3 bytes) alternately through both connections while
// the writer runs; then reads it again once the writer is done.
const pySnapshotReader = `
import hashlib, json, nbd, subprocess, sys
reader_uri, second_tpl, size, writer = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
h = nbd.NBD(); h.set_full_info(True); h.connect_uri(reader_uri)
canon = h.get_canonical_export_name()
h2 = nbd.NBD(); h2.connect_uri(second_tpl.replace("{name}", canon))
out = {"canonical": canon, "read_only": h.is_read_only() and h2.is_read_only(), "multi_conn": h.can_multi_conn()}
w = subprocess.Popen(writer, stdout=subprocess.DEVNULL)
step, hs = 256 << 10, hashlib.sha256()
for i, off in enumerate(range(0, size, step)):
    hs.update((h, h2)[i % 2].pread(min(step, size - off), off))
out["writer_rc"] = w.wait()
out["sha_during"] = hs.hexdigest()
hs = hashlib.sha256()
for off in range(0, size, step):
    hs.update(h2.pread(min(step, size - off), off))
out["sha_after"] = hs.hexdigest()
print(json.dumps(out))
`

type snapshotRun struct {
	Canonical  string `json:"canonical"`
	ReadOnly   bool   `json:"read_only"`
	MultiConn  bool   `json:"multi_conn"`
	WriterRC   int    `json:"writer_rc"`
	ShaDuring  string `json:"sha_during"`
	ShaAfter   string `json:"sha_after"`
	imageAfter string
}

func runSnapshotScenario(t *testing.T, readerURI, secondTpl string, size int64, writer ...string) snapshotRun {
	t.Helper()
	w, _ := json.Marshal(writer)
	out := pyLibnbd(t, pySnapshotReader, readerURI, secondTpl, fmt.Sprint(size), string(w))
	var r snapshotRun
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("reader printed %q: %v", out, err)
	}
	return r
}

func TestServeSnapshotConsistency(t *testing.T) {
	testenv.RequireCmd(t, "nbdcopy", "qemu-storage-daemon", "qemu-img")
	const size = serveImageSize
	dir := t.TempDir()
	before := filepath.Join(dir, "before.img")
	writeRandomImage(t, before, size, 10)
	next := filepath.Join(dir, "next.img")
	writeRandomImage(t, next, size, 11)
	wantBefore, wantNext := fileSHA256(t, before), fileSHA256(t, next)

	check := func(t *testing.T, who string, r snapshotRun, image string) {
		t.Helper()
		if r.WriterRC != 0 {
			t.Errorf("%s: the writer failed (exit %d)", who, r.WriterRC)
		}
		if r.ShaDuring != wantBefore {
			t.Errorf("%s: snapshot read during the writes is not the image before them", who)
		}
		if r.ShaAfter != wantBefore {
			t.Errorf("%s: snapshot read after the writes is not the image before them", who)
		}
		if !r.ReadOnly || !r.MultiConn {
			t.Errorf("%s: snapshot read-only %v, multi-conn %v; want both", who, r.ReadOnly, r.MultiConn)
		}
		if got := fileSHA256(t, image); got != wantNext {
			t.Errorf("%s: the image after the writes is not the writer's data", who)
		}
	}

	var ours, theirs snapshotRun
	t.Run("snapmount", func(t *testing.T) {
		img := filepath.Join(dir, "disk.img")
		copyFile(t, before, img)
		sock, p := startServe(t, "--snapshot-block", "64K", "disk="+img)
		ours = runSnapshotScenario(t, unixURI("disk@snapshot", sock), unixURI("{name}", sock), size,
			"nbdcopy", "--connections=4", next, unixURI("disk", sock))
		if ours.Canonical != "disk@s1" {
			t.Errorf("canonical name %q, want disk@s1", ours.Canonical)
		}
		check(t, "snapmount", ours, img)
		if !strings.Contains(p.out.String(), "snapshot created") {
			t.Error("no log line for the snapshot")
		}
	})
	t.Run("qemu-storage-daemon", func(t *testing.T) {
		src := filepath.Join(dir, "qsd-src.img")
		copyFile(t, before, src)
		tmp := filepath.Join(dir, "qsd-tmp.img")
		mustRun(t, "qemu-img", "create", "-f", "raw", tmp, fmt.Sprint(size))
		sock := filepath.Join(testenv.ShortTempDir(t), "qsd.sock")
		p := startProc(t, "qemu-storage-daemon",
			"--blockdev", "driver=file,node-name=src-file,filename="+src,
			"--blockdev", "driver=raw,node-name=src,file=src-file",
			"--blockdev", "driver=file,node-name=tmp,filename="+tmp,
			"--blockdev", "driver=copy-before-write,node-name=cbw,file=src,target=tmp",
			"--blockdev", "driver=snapshot-access,node-name=snap,file=cbw",
			"--nbd-server", "addr.type=unix,addr.path="+sock,
			"--export", "type=nbd,id=e1,node-name=cbw,name=live,writable=on",
			"--export", "type=nbd,id=e2,node-name=snap,name=snap")
		p.waitReady("unix", sock)
		theirs = runSnapshotScenario(t, unixURI("snap", sock), unixURI("snap", sock), size,
			"nbdcopy", "--connections=4", next, unixURI("live", sock))
		p.stop() // flushes the source image
		check(t, "qemu-storage-daemon", theirs, src)
	})
	if ours.ReadOnly != theirs.ReadOnly || ours.MultiConn != theirs.MultiConn || ours.ShaDuring != theirs.ShaDuring {
		t.Errorf("snapmount and qemu-storage-daemon differ: %+v vs %+v", ours, theirs)
	}
}

const pyStoreFull = `
import json, nbd, subprocess, sys
uri, size, writer = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
h = nbd.NBD(); h.connect_uri(uri)
first = h.pread(65536, 0)
w = subprocess.run(writer, capture_output=True, text=True)
out = {"writer_rc": w.returncode, "writer_out": w.stdout + w.stderr}
try:
    data = b"".join(h.pread(min(1 << 20, size - off), off) for off in range(0, size, 1 << 20))
    out["read"] = "ok"
    out["unchanged_prefix"] = data[:65536] == first
    import hashlib
    out["sha"] = hashlib.sha256(data).hexdigest()
except nbd.Error as e:
    out["read"] = e.errno
print(json.dumps(out))
`

func TestServeSnapshotStoreFull(t *testing.T) {
	testenv.RequireCmd(t, "qemu-io")
	const size = 8 << 20
	for _, policy := range []string{"break-snapshot", "fail-writer"} {
		t.Run(policy, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "disk.img")
			writeRandomImage(t, img, size, 12)
			orig := fileSHA256(t, img)
			sock, p := startServe(t, "--snapshot-max", "1M", "--on-snapshot-full", policy, "disk="+img)
			writer, _ := json.Marshal([]string{"qemu-io", "-f", "raw", "-c", "write -P 0x33 0 8M", unixURI("disk", sock)})
			out := pyLibnbd(t, pyStoreFull, unixURI("disk@snapshot", sock), fmt.Sprint(size), string(writer))
			var r struct {
				WriterRC  int    `json:"writer_rc"`
				WriterOut string `json:"writer_out"`
				Read      string `json:"read"`
				Sha       string `json:"sha"`
			}
			if err := json.Unmarshal([]byte(out), &r); err != nil {
				t.Fatalf("script printed %q: %v", out, err)
			}
			switch policy {
			case "break-snapshot":
				if r.WriterRC != 0 || strings.Contains(r.WriterOut, "failed") {
					t.Errorf("the writer failed although the policy is break-snapshot: %s", r.WriterOut)
				}
				if r.Read != "EIO" {
					t.Errorf("reading a broken snapshot: %q, want EIO", r.Read)
				}
				p.waitOutput("snapshot broken", 30*time.Second)
			case "fail-writer":
				if !strings.Contains(r.WriterOut, "No space left") {
					t.Errorf("the writer was not refused with ENOSPC: exit %d, %s", r.WriterRC, r.WriterOut)
				}
				if r.Read != "ok" || r.Sha != orig {
					t.Errorf("the snapshot did not stay whole under fail-writer: read %q", r.Read)
				}
			}
		})
	}
}

func TestServeSnapshotLingerThenGone(t *testing.T) {
	testenv.RequireCmd(t, "nbdinfo")
	img := filepath.Join(t.TempDir(), "disk.img")
	writeRandomImage(t, img, 4<<20, 13)
	snapDir := t.TempDir()
	sock, p := startServe(t, "--snapshot-linger", "100ms", "--snapshot-dir", snapDir, "disk="+img)
	name := strings.TrimSpace(pyLibnbd(t, `
import nbd, sys
h = nbd.NBD(); h.set_full_info(True); h.connect_uri(sys.argv[1])
print(h.get_canonical_export_name())
h.shutdown()
`, unixURI("disk@snapshot", sock)))
	if name != "disk@s1" {
		t.Fatalf("canonical name %q", name)
	}
	p.waitOutput("snapshot dropped", 30*time.Second)
	r := runCmd(t, time.Minute, "nbdinfo", unixURI(name, sock))
	if r.code == 0 {
		t.Fatalf("nbdinfo %s succeeded after the snapshot was dropped", name)
	}
	// libnbd reports NBD_REP_ERR_UNKNOWN as ENOENT.
	if !strings.Contains(r.stderr, "No such file") {
		t.Errorf("error for a gone snapshot is not ERR_UNKNOWN: %s", r.stderr)
	}
	if entries, _ := os.ReadDir(snapDir); len(entries) != 0 {
		t.Errorf("store files left in --snapshot-dir: %v", entries)
	}
}

// TestServeSigtermCleansUp: SIGTERM with a lingering snapshot and a
// connected writer ends the server with exit 0, the writer's acknowledged
// data in the image and no store left behind (its store never had a
// name: it is only among the server's open files).
func TestServeSigtermCleansUp(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	writeRandomImage(t, img, 4<<20, 14)
	snapDir := t.TempDir()
	sock, p := startServe(t, "--snapshot-dir", snapDir, "--snapshot-linger", "1h", "disk="+img)
	pyLibnbd(t, `
import nbd, sys
s = nbd.NBD(); s.connect_uri(sys.argv[1] % "disk@snapshot")
w = nbd.NBD(); w.connect_uri(sys.argv[1] % "disk")
w.pwrite(b"\x44" * 65536, 0)
`, strings.Replace(unixURI("disk", sock), "disk", "%s", 1))
	if entries, _ := os.ReadDir(snapDir); len(entries) != 0 {
		t.Errorf("a store has a name in --snapshot-dir: %v", entries)
	}
	if n := storesOpen(t, p, snapDir); n != 1 {
		t.Fatalf("%d stores open in --snapshot-dir while the snapshot lingers, want 1", n)
	}
	w := dialRawNBD(t, sock) // a client still connected at SIGTERM
	w.goExport("disk")
	p.stop()
	if p.err != nil {
		t.Errorf("serve after SIGTERM: %v, want exit 0\n%s", p.err, p.out.String())
	}
	if entries, _ := os.ReadDir(snapDir); len(entries) != 0 {
		t.Errorf("store files left after SIGTERM: %v", entries)
	}
	if !bytes.Equal(readFileRange(t, img, 0, 65536), bytes.Repeat([]byte{0x44}, 65536)) {
		t.Error("the acknowledged write is not in the image")
	}
	if _, err := os.Stat(sock); err == nil {
		t.Error("the socket was left behind")
	}
}

// TestServeReadOnlyFlag: with --readonly nobody is a writer.
func TestServeReadOnlyFlag(t *testing.T) {
	testenv.RequireCmd(t, "nbdinfo", "qemu-io")
	img := filepath.Join(t.TempDir(), "disk.img")
	writeRandomImage(t, img, 4<<20, 15)
	before := fileSHA256(t, img)
	if err := os.Chmod(img, 0o444); err != nil {
		t.Fatal(err)
	}
	sock, _ := startServe(t, "--readonly", "disk="+img)
	if r := runCmd(t, time.Minute, "nbdinfo", "--is", "read-only", unixURI("disk", sock)); r.code != 0 {
		t.Errorf("nbdinfo --is read-only with --readonly: exit %d", r.code)
	}
	w := dialRawNBD(t, sock)
	w.goExport("disk")
	if errno, _ := w.request(nbd.CmdWrite, 0, 4, []byte{1, 2, 3, 4}); errno != 1 {
		t.Errorf("WRITE with --readonly: errno %d, want EPERM", errno)
	}
	mustRun(t, "qemu-io", "-r", "-f", "raw", "-c", "read 0 64k", unixURI("disk@snapshot", sock))
	if fileSHA256(t, img) != before {
		t.Error("the image changed under --readonly")
	}
}

// storesOpen counts the server's open files in dir: its snapshot stores,
// which have no name there.
func storesOpen(t testing.TB, p *proc, dir string) int {
	t.Helper()
	fds := fmt.Sprintf("/proc/%d/fd", p.cmd.Process.Pid)
	entries, err := os.ReadDir(fds)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if target, err := os.Readlink(filepath.Join(fds, e.Name())); err == nil && strings.HasPrefix(target, dir+"/") {
			n++
		}
	}
	return n
}

// usedBytes is what df says a file system uses.
func usedBytes(t testing.TB, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// A server killed with SIGKILL while two snapshots hold blocks leaves
// nothing in --snapshot-dir, a file system of its own (tmpfs), and df
// shows the space back: the stores had no name, so the kernel freed them
// with the process.
func TestServeKilledLeavesNoStore(t *testing.T) {
	if os.Geteuid() != 0 {
		testenv.SkipOrFail(t, "mounting a tmpfs for --snapshot-dir needs root")
	}
	dir := testenv.ShortTempDir(t)
	snapDir := filepath.Join(dir, "stores")
	os.Mkdir(snapDir, 0o700)
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", snapDir).CombinedOutput(); err != nil {
		t.Fatalf("mounting a tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", "-l", snapDir).Run() })
	img := filepath.Join(dir, "disk.img")
	const size = 8 << 20
	writeRandomImage(t, img, size, 16)
	sock, p := startServe(t, "--snapshot-dir", snapDir, "--snapshot-linger", "1h", "disk="+img)
	before := usedBytes(t, snapDir)
	// Two snapshots, then a writer that rewrites the image: each store
	// keeps the whole old image.
	pyLibnbd(t, `
import nbd, sys
snaps = [nbd.NBD() for _ in range(2)]
for s in snaps:
    s.connect_uri(sys.argv[1] % "disk@snapshot")
w = nbd.NBD(); w.connect_uri(sys.argv[1] % "disk")
for off in range(0, int(sys.argv[2]), 1 << 20):
    w.pwrite(b"\x55" * (1 << 20), off)
w.flush()
`, strings.Replace(unixURI("disk", sock), "disk", "%s", 1), fmt.Sprint(size))
	if n := storesOpen(t, p, snapDir); n != 2 {
		t.Errorf("%d stores open, want 2", n)
	}
	if held := usedBytes(t, snapDir) - before; held < 2*size {
		t.Errorf("the stores hold %d bytes, want at least %d", held, 2*size)
	}
	p.kill()
	if entries, _ := os.ReadDir(snapDir); len(entries) != 0 {
		t.Errorf("left in --snapshot-dir by the killed server: %v", entries)
	}
	if left := usedBytes(t, snapDir) - before; left > 0 {
		t.Errorf("df shows %d bytes still used in --snapshot-dir after the server died", left)
	}
}

// Without --snapshot-dir the stores go to $TMPDIR, which holds nothing of
// the server's while it runs or after a clean stop: no private directory.
func TestServeCleanStopLeavesNoDirectory(t *testing.T) {
	tmp := testenv.ShortTempDir(t)
	img := filepath.Join(t.TempDir(), "disk.img")
	writeRandomImage(t, img, 1<<20, 17)
	sock := filepath.Join(testenv.ShortTempDir(t), "s.sock")
	p := startProcEnv(t, append(os.Environ(), "TMPDIR="+tmp), snapmountBin, "serve", "--no-tcp", "--socket", sock, "--snapshot-linger", "1h", "disk="+img)
	p.waitOutput("listening on", time.Minute)
	pyLibnbd(t, `
import nbd, sys
s = nbd.NBD(); s.connect_uri(sys.argv[1] % "disk@snapshot")
w = nbd.NBD(); w.connect_uri(sys.argv[1] % "disk")
w.pwrite(b"\x66" * 65536, 0)
`, strings.Replace(unixURI("disk", sock), "disk", "%s", 1))
	if n := storesOpen(t, p, tmp); n != 1 {
		t.Errorf("%d stores open in $TMPDIR, want 1", n)
	}
	if entries, _ := os.ReadDir(tmp); len(entries) != 0 {
		t.Errorf("$TMPDIR holds %v while the server runs", entries)
	}
	p.stop()
	if entries, _ := os.ReadDir(tmp); len(entries) != 0 {
		t.Errorf("$TMPDIR holds %v after a clean stop", entries)
	}
}
