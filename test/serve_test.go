package test

// End-to-end tests of "snapmount serve" against real NBD clients:
// nbdinfo, nbdcopy, qemu-img, qemu-io and python3-libnbd.

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"snapmount/nbd"
	"snapmount/test/testenv"
)

const serveImageSize = 32 << 20

func TestServeNbdinfo(t *testing.T) {
	testenv.RequireCmd(t, "nbdinfo")
	dir := t.TempDir()
	sparse := filepath.Join(dir, "sparse.img")
	writeSparseImage(t, sparse, serveImageSize, [][2]int64{{4 << 20, 1 << 20}, {20 << 20, 2 << 20}}, 1)
	full := filepath.Join(dir, "full.img")
	writeRandomImage(t, full, 8<<20, 2)
	sock, _ := startServe(t, "--description", "full=the full disk", sparse, "full="+full)

	list := mustRun(t, "nbdinfo", "--list", unixURI("", sock)).stdout
	for _, want := range []string{`export="sparse.img"`, `export="full"`, "description: the full disk", "export-size: 33554432", "base:allocation"} {
		if !strings.Contains(list, want) {
			t.Errorf("nbdinfo --list lacks %q:\n%s", want, list)
		}
	}

	// The map shows the holes and the data extents exactly.
	m := mustRun(t, "nbdinfo", "--map", unixURI("sparse.img", sock)).stdout
	want := []string{
		"0 4194304 3 hole,zero",
		"4194304 1048576 0 data",
		"5242880 15728640 3 hole,zero",
		"20971520 2097152 0 data",
		"23068672 10485760 3 hole,zero",
	}
	if got := strings.Fields(m); strings.Join(got, " ") != strings.Join(strings.Fields(strings.Join(want, " ")), " ") {
		t.Errorf("nbdinfo --map:\n%s\nwant:\n%s", m, strings.Join(want, "\n"))
	}
	// A snapshot's map is its own: the same while nothing was written.
	if m2 := mustRun(t, "nbdinfo", "--map", unixURI("sparse.img@snapshot", sock)).stdout; m2 != m {
		t.Errorf("snapshot map differs from the image's:\n%s", m2)
	}

	for _, tc := range []struct {
		export, flag string
		code         int
	}{
		{"full", "read-only", 2},
		{"full@live", "read-only", 0},
		{"full@snapshot", "read-only", 0},
		{"full", "multi-conn", 0},
		{"full@snapshot", "multi-conn", 0},
		{"full", "trim", 0},
		{"full@live", "trim", 2},
		{"full", "fua", 0},
	} {
		verb := "--can"
		if tc.flag == "read-only" {
			verb = "--is"
		}
		if r := runCmd(t, time.Minute, "nbdinfo", verb, tc.flag, unixURI(tc.export, sock)); r.code != tc.code {
			t.Errorf("nbdinfo %s %s %s: exit %d, want %d (%s)", verb, tc.flag, tc.export, r.code, tc.code, r.stderr)
		}
	}
	info := mustRun(t, "nbdinfo", unixURI("full", sock)).stdout
	if field(info, "block_size_maximum") != "33554432" || field(info, "block_size_preferred") != "4096" {
		t.Errorf("block sizes in nbdinfo:\n%s", info)
	}
	if r := runCmd(t, time.Minute, "nbdinfo", unixURI("nosuch", sock)); r.code == 0 {
		t.Error("nbdinfo of an unknown export succeeded")
	}
}

func TestServeNbdcopyRoundTrip(t *testing.T) {
	testenv.RequireCmd(t, "nbdcopy", "qemu-img")
	dir := t.TempDir()
	src := filepath.Join(dir, "src.img")
	writeRandomImage(t, src, serveImageSize, 3)
	img := filepath.Join(dir, "disk.img")
	writeSparseImage(t, img, serveImageSize, nil, 0)
	sock, _ := startServe(t, "disk="+img)
	uri := unixURI("disk", sock)

	mustRun(t, "nbdcopy", "--connections=4", src, uri)
	out := filepath.Join(dir, "out.img")
	mustRun(t, "nbdcopy", "--connections=4", uri, out)
	if got, want := fileSHA256(t, out), fileSHA256(t, src); got != want {
		t.Errorf("read back %s, wrote %s", got, want)
	}
	if got, want := fileSHA256(t, img), fileSHA256(t, src); got != want {
		t.Errorf("image holds %s, want %s", got, want)
	}
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, uri)
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, unixURI("disk@snapshot", sock))
}

func TestServeQemuIO(t *testing.T) {
	testenv.RequireCmd(t, "qemu-io")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	writeRandomImage(t, img, 8<<20, 4)
	orig, _ := os.ReadFile(img)
	sock, _ := startServe(t, "disk="+img)

	// A snapshot first, held open by a second qemu-io... qemu-io runs its
	// commands and leaves, so the snapshot is joined by name instead.
	name := strings.TrimSpace(pyLibnbd(t, `
import nbd, sys
h = nbd.NBD(); h.set_full_info(True)
h.connect_uri(sys.argv[1])
print(h.get_canonical_export_name())
`, unixURI("disk@snapshot", sock)))
	if name != "disk@s1" {
		t.Fatalf("canonical snapshot name %q, want disk@s1", name)
	}

	mustRun(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0xab 0 64k",
		"-c", "read -P 0xab 0 64k",
		"-c", "write -z 64k 64k",
		"-c", "read -P 0 64k 64k",
		"-c", "discard 128k 64k",
		"-c", "read -P 0 128k 64k",
		"-c", "write -P 0xcd -f 1M 4k", // FUA
		"-c", "flush",
		unixURI("disk", sock))
	got := readFileRange(t, img, 0, 192<<10)
	want := append(bytes.Repeat([]byte{0xab}, 64<<10), make([]byte, 128<<10)...)
	if !bytes.Equal(got, want) {
		t.Error("the image does not hold what qemu-io wrote")
	}
	if !bytes.Equal(readFileRange(t, img, 1<<20, 4096), bytes.Repeat([]byte{0xcd}, 4096)) {
		t.Error("the FUA write is not in the image")
	}
	// The snapshot (it lingers) still has the old data; a pattern check
	// of the first byte value of the original would be random, so compare
	// through qemu-img against a copy of the original.
	origPath := filepath.Join(dir, "orig.img")
	if err := os.WriteFile(origPath, orig, 0o644); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", origPath, unixURI("disk@s1", sock))
	// qemu-io refuses to write to a read-only export (it opens it -r).
	r := runCmd(t, time.Minute, "qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", unixURI("disk@s1", sock))
	if r.code == 0 && !strings.Contains(r.stdout+r.stderr, "ermission") && !strings.Contains(r.stdout+r.stderr, "read-only") {
		t.Errorf("qemu-io write to a snapshot succeeded: %s%s", r.stdout, r.stderr)
	}
	mustRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", origPath, unixURI("disk@s1", sock))
}

const pyChecks = `
import nbd, sys, threading
uri, size = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_structured_replies_negotiated(), "no structured replies"
assert h.can_meta_context("base:allocation"), "no base:allocation"
assert h.get_size() == size
# Out of range: EINVAL, and the connection still works.
try:
    h.pread(4096, size - 100)
    raise SystemExit("read past the end succeeded")
except nbd.Error as e:
    assert e.errno == "EINVAL", e
assert len(h.pread(4096, 0)) == 4096
# FUA and flush.
h.pwrite(b"\x5a" * 65536, 0, flags=nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(65536, 0) == b"\x5a" * 65536
# Block status through structured replies.
seen = []
h.block_status(1 << 20, 0, lambda ctx, off, ents, err: seen.append((ctx, list(ents))))
assert seen and seen[0][0] == "base:allocation", seen
# 8 parallel connections on disjoint ranges.
chunk = size // 8
errs = []
def worker(i):
    try:
        c = nbd.NBD(); c.connect_uri(uri)
        data = bytes([i + 1]) * chunk
        for off in range(0, chunk, 1 << 20):
            c.pwrite(data[off:off + (1 << 20)], i * chunk + off)
        c.flush()
        for off in range(0, chunk, 1 << 20):
            assert c.pread(1 << 20, i * chunk + off) == data[off:off + (1 << 20)], "conn %d read back" % i
        c.shutdown()
    except Exception as e:
        errs.append(e)
ts = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
for t in ts: t.start()
for t in ts: t.join()
assert not errs, errs
for i in range(8):
    assert h.pread(4096, i * chunk) == bytes([i + 1]) * 4096
print("ok")
`

func TestServePythonLibnbd(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	writeRandomImage(t, img, serveImageSize, 5)
	sock, _ := startServe(t, "disk="+img)
	if out := pyLibnbd(t, pyChecks, unixURI("disk", sock), fmt.Sprint(serveImageSize)); strings.TrimSpace(out) != "ok" {
		t.Errorf("python checks printed %q", out)
	}
	for i := 0; i < 8; i++ {
		got := readFileRange(t, img, int64(i)*serveImageSize/8, 4096)
		if !bytes.Equal(got, bytes.Repeat([]byte{byte(i + 1)}, 4096)) {
			t.Errorf("connection %d's data is not in the image", i)
		}
	}
}

// TestServeReadOnlyPromise: a reader that promised to read only connects
// first, then a stock writer (qemu-io) with --max-writers 1 still gets the
// write slot; the reader's writes fail with EPERM.
func TestServeReadOnlyPromise(t *testing.T) {
	testenv.RequireCmd(t, "qemu-io")
	img := filepath.Join(t.TempDir(), "disk.img")
	writeRandomImage(t, img, 8<<20, 6)
	orig := readFileRange(t, img, 0, 4096)
	sock, _ := startServe(t, "--max-writers", "1", "--busy", "refuse", "disk="+img)

	reader := dialRawNBD(t, sock)
	if types, _ := reader.option(nbd.OptXReadOnly, []byte("x")); types[0] != nbd.RepErrInvalid {
		t.Errorf("promise with data: %s, want ERR_INVALID", types[0])
	}
	if types, _ := reader.option(nbd.OptXReadOnly, nil); types[0] != nbd.RepAck {
		t.Fatalf("promise: %s, want ACK", types[0])
	}
	flags, canon := reader.goExport("disk")
	if flags&nbd.FlagReadOnly == 0 || flags&(nbd.FlagSendTrim|nbd.FlagSendWriteZeroes|nbd.FlagSendFUA) != 0 {
		t.Errorf("reader flags %s: want READ_ONLY and no write flags", flags)
	}
	if canon != "disk@s1" {
		t.Errorf("reader's canonical name %q, want disk@s1", canon)
	}

	// The writer connects second and writes.
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k", "-c", "flush", unixURI("disk", sock))
	if !bytes.Equal(readFileRange(t, img, 0, 4096), bytes.Repeat([]byte{0x77}, 4096)) {
		t.Error("the writer's data is not in the image")
	}
	// The reader cannot write, and still sees its instant.
	if errno, _ := reader.request(nbd.CmdWrite, 0, 4096, bytes.Repeat([]byte{1}, 4096)); errno != nbd.EPERM {
		t.Errorf("reader WRITE: errno %d, want EPERM", errno)
	}
	if errno, _ := reader.request(nbd.CmdTrim, 0, 4096, nil); errno != nbd.EPERM {
		t.Errorf("reader TRIM: errno %d, want EPERM", errno)
	}
	if errno, data := reader.request(nbd.CmdRead, 0, 4096, nil); errno != 0 || !bytes.Equal(data, orig) {
		t.Errorf("reader READ: errno %d, data changed %v", errno, !bytes.Equal(data, orig))
	}
	// A second stock writer is refused while qemu-io... has left, so
	// hold the slot with a raw writer and try another.
	holder := dialRawNBD(t, sock)
	if f, _ := holder.goExport("disk"); f&nbd.FlagReadOnly != 0 {
		t.Fatalf("writer slot not free after qemu-io left (flags %s)", f)
	}
	r := runCmd(t, time.Minute, "qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", unixURI("disk", sock))
	if r.code == 0 {
		t.Errorf("a second writer over --max-writers 1 --busy refuse was let in")
	}
}

// TestServeDurability: data acknowledged after FUA or FLUSH is in the image
// file after the server is killed with SIGKILL.
func TestServeDurability(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	writeSparseImage(t, img, 8<<20, nil, 0)
	sock, p := startServe(t, "disk="+img)
	pyLibnbd(t, `
import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
h.pwrite(b"\x11" * 65536, 1 << 20, flags=nbd.CMD_FLAG_FUA)
h.pwrite(b"\x22" * 65536, 2 << 20)
h.flush()
`, unixURI("disk", sock))
	p.kill()
	if !bytes.Equal(readFileRange(t, img, 1<<20, 65536), bytes.Repeat([]byte{0x11}, 65536)) {
		t.Error("FUA write lost after kill -9")
	}
	if !bytes.Equal(readFileRange(t, img, 2<<20, 65536), bytes.Repeat([]byte{0x22}, 65536)) {
		t.Error("flushed write lost after kill -9")
	}
}

// TestServeHostileBytes: garbage and broken handshakes end only their own
// connection; the server, the image and other clients are unharmed.
func TestServeHostileBytes(t *testing.T) {
	testenv.RequireCmd(t, "nbdinfo")
	img := filepath.Join(t.TempDir(), "disk.img")
	writeRandomImage(t, img, 8<<20, 7)
	before := fileSHA256(t, img)
	sock, _ := startServe(t, "--handshake-timeout", "10s", "disk="+img)
	bystander := dialRawNBD(t, sock)
	bystander.goExport("disk@live")

	send := func(b []byte) {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(30 * time.Second))
		c.Write(b)
		// Read until the server hangs up (it must).
		buf := make([]byte, 4096)
		for {
			if _, err := c.Read(buf); err != nil {
				if ne, ok := err.(net.Error); ok && ne.Timeout() {
					t.Errorf("server kept a hostile connection open after % x", b[:min(len(b), 16)])
				}
				return
			}
		}
	}
	hdr := be.AppendUint32(nil, 3)
	opt4G := be.AppendUint64(append([]byte{}, hdr...), nbd.IHaveOpt)
	opt4G = be.AppendUint32(opt4G, uint32(nbd.OptGo))
	opt4G = be.AppendUint32(opt4G, 0xffffffff)
	send(bytes.Repeat([]byte("\xde\xad\xbe\xef"), 4096))
	send(opt4G)
	send([]byte{0, 0, 0, 3, 'I', 'H'})

	w := dialRawNBD(t, sock)
	w.goExport("disk")
	w.write(bytes.Repeat([]byte{0x42}, 28)) // bad request magic
	w.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := w.c.Read(make([]byte, 1)); err == nil {
		t.Error("server answered a request with bad magic")
	}

	if errno, _ := bystander.request(nbd.CmdRead, 0, 65536, nil); errno != 0 {
		t.Errorf("bystander READ: errno %d", errno)
	}
	mustRun(t, "nbdinfo", unixURI("disk", sock))
	if fileSHA256(t, img) != before {
		t.Error("hostile clients changed the image")
	}
}

// TestServeIdleHandshakesLockNobodyOut: 300 connections that never finish
// their handshake (more than --max-conns) do not keep a writer and a
// reader out: each new connection closes the oldest idle one once
// --max-handshakes wait, and the log says so.
func TestServeIdleHandshakesLockNobodyOut(t *testing.T) {
	testenv.RequireCmd(t, "qemu-io")
	img := filepath.Join(t.TempDir(), "disk.img")
	writeRandomImage(t, img, 1<<20, 18)
	sock, p := startServe(t, "--handshake-timeout", "60s", "disk="+img)
	refused := 0
	for range 300 {
		c := testenv.Dial(t, "unix", sock)
		// The greeting says the server took the connection; then idle.
		if _, err := io.ReadFull(c, make([]byte, nbd.GreetingLen)); err != nil {
			refused++
		}
	}
	if refused > 0 {
		t.Errorf("%d of the idle connections were refused at once", refused)
	}
	for _, args := range [][]string{
		{"-f", "raw", "-c", "write -P 0x21 0 64k", unixURI("disk", sock)},
		{"-r", "-f", "raw", "-c", "read -P 0x21 0 64k", unixURI("disk@live", sock)},
	} {
		if r := runCmd(t, time.Minute, "qemu-io", args...); r.code != 0 || strings.Contains(r.stdout, "failed") {
			t.Errorf("qemu-io %v beside 300 idle connections: exit %d: %s%s", args, r.code, r.stdout, r.stderr)
		}
	}
	p.waitOutput("too many connections in their handshake", testenv.WaitLimit)
}
