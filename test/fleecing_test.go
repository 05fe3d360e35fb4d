package test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// qemu's own point-in-time view of a running VM's qcow2 disk ("fleecing",
// what libvirt's pull-mode backup uses): qemu-storage-daemon serves the
// image writable over NBD, and at the snapshot moment a copy-before-write
// filter slips in under the writers, with a snapshot-access node over it
// exported read-only. While qemu-io rewrites the whole disk through the
// writable export, an ordinary user's snapmount mount of the fleecing
// export reads the original bytes, and snapmount copy --sha256 of it gives
// the original digest. Teardown takes the graph apart again with the
// writer still connected, and leaves a consistent image with the new data.
func TestQemuFleecing(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "qemu-storage-daemon", "qemu-img", "qemu-io")
	u := testUser(t)
	dir := u.dir

	const size = 16 << 20
	image := filepath.Join(dir, "vm.qcow2")
	fleece := filepath.Join(dir, "fleece.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", image, "16M")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", fleece, "16M")
	// The original disk: three patterns around a hole (never written).
	original := make([]byte, size)
	for _, p := range []struct {
		pattern  byte
		off, len int
	}{{0x5d, 0, 4 << 20}, {0xd5, 4 << 20, 3 << 20}, {0xdc, 12 << 20, 4 << 20}} {
		mustRun(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%x %d %d", p.pattern, p.off, p.len), image)
		copy(original[p.off:p.off+p.len], bytes.Repeat([]byte{p.pattern}, p.len))
	}
	sum := sha256.Sum256(original)
	originalSum := hex.EncodeToString(sum[:])

	nbdSock := filepath.Join(dir, "nbd.sock")
	qmpSock := filepath.Join(dir, "qmp.sock")
	// The writers' export sits on a no-op throttle filter: its child can
	// be swapped (blockdev-reopen) for the copy-before-write filter later.
	// qemu-storage-daemon sets up in the order of its arguments: the
	// monitor is there once the NBD socket is.
	qsd := startProc(t, "qemu-storage-daemon",
		"--chardev", "socket,id=qmp0,path="+qmpSock+",server=on,wait=off",
		"--monitor", "chardev=qmp0",
		"--blockdev", "driver=file,node-name=proto,filename="+image,
		"--blockdev", "driver=qcow2,node-name=disk,file=proto",
		"--object", "throttle-group,id=tg0",
		"--blockdev", "driver=throttle,node-name=top,file=disk,throttle-group=tg0",
		"--nbd-server", "addr.type=unix,addr.path="+nbdSock,
		"--export", "type=nbd,id=live,node-name=top,name=live,writable=on")
	qsd.waitReady("unix", nbdSock)
	qmp := dialQMP(t, qmpSock)

	// The snapshot moment.
	qmp.do(t, "blockdev-add", map[string]any{"driver": "qcow2", "node-name": "fleece",
		"file": map[string]any{"driver": "file", "filename": fleece}})
	qmp.do(t, "blockdev-add", map[string]any{"driver": "copy-before-write", "node-name": "cbw", "file": "disk", "target": "fleece"})
	qmp.do(t, "blockdev-reopen", map[string]any{"options": []any{
		map[string]any{"driver": "throttle", "node-name": "top", "file": "cbw", "throttle-group": "tg0"}}})
	qmp.do(t, "blockdev-add", map[string]any{"driver": "snapshot-access", "node-name": "snap", "file": "cbw"})
	qmp.do(t, "block-export-add", map[string]any{"type": "nbd", "id": "snap", "node-name": "snap", "name": "snap"})
	// qemu-storage-daemon made its socket as root, 0755: let the user in.
	if err := os.Chmod(nbdSock, 0o666); err != nil {
		t.Fatal(err)
	}

	snapURI, liveURI := unixURI("snap", nbdSock), unixURI("live", nbdSock)
	mnt := u.mkdir(t, "mnt")
	// --no-cache: every read below goes to qemu, none is answered from a
	// copy this process kept from before the rewrite.
	r := u.run(t, "snapmount", "mount", "--no-cache", "--timeout", "10s", snapURI, mnt)
	if r.code != 0 {
		t.Fatalf("mount of the fleecing export as %s: exit %d: %s", testenv.TestUser, r.code, r.stderr)
	}
	t.Cleanup(func() {
		if isMounted(mnt) {
			u.run(t, "snapmount", "umount", mnt)
		}
	})
	file := filepath.Join(mnt, "snap")
	userSHA := func() string {
		t.Helper()
		r := u.run(t, "/usr/bin/sha256sum", file)
		if r.code != 0 {
			t.Fatalf("sha256sum of the mounted fleecing export as %s: %s", testenv.TestUser, r.stderr)
		}
		return strings.Fields(r.stdout)[0]
	}

	// The rewrite runs while the user reads.
	var wg sync.WaitGroup
	var rewrite result
	wg.Add(1)
	go func() {
		defer wg.Done()
		rewrite = runCmd(t, 2*time.Minute, "qemu-io", "-f", "raw",
			"-c", "write -P 0xab 0 8M", "-c", "write -P 0xac 8M 8M", liveURI)
	}()
	during := userSHA()
	testenv.Wait(t, &wg, "the qemu-io rewrite")
	if rewrite.code != 0 {
		t.Fatalf("qemu-io rewrite through the live export: %s%s", rewrite.stdout, rewrite.stderr)
	}
	// The writes reached the disk: the live export shows them.
	mustRun(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0xab 0 8M", "-c", "read -P 0xac 8M 8M", liveURI)
	if during != originalSum {
		t.Errorf("mounted fleecing export read during the rewrite: sha256 %s, want the original %s", during, originalSum)
	}
	// Byte for byte, as the user reads it.
	originalFile := filepath.Join(dir, "original.img")
	if err := os.WriteFile(originalFile, original, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := u.run(t, "/usr/bin/cmp", file, originalFile); r.code != 0 {
		t.Fatalf("mounted fleecing export after the rewrite differs from the original: %s%s", r.stdout, r.stderr)
	}
	if after := userSHA(); after != originalSum {
		t.Errorf("mounted fleecing export after the rewrite: sha256 %s as %s, want %s", after, testenv.TestUser, originalSum)
	}
	cp := u.run(t, "snapmount", "copy", "--sha256", snapURI, "/dev/null")
	if cp.code != 0 || !strings.HasPrefix(cp.stdout, originalSum) {
		t.Errorf("snapmount copy --sha256 of the fleecing export: exit %d, %q %q; want %s", cp.code, cp.stdout, cp.stderr, originalSum)
	}

	// Teardown, with the writer's export still up.
	if r := u.run(t, "snapmount", "umount", mnt); r.code != 0 || isMounted(mnt) {
		t.Fatalf("umount as %s: exit %d: %s", testenv.TestUser, r.code, r.stderr)
	}
	qmp.do(t, "block-export-del", map[string]any{"id": "snap"})
	qmp.waitEvent(t, "BLOCK_EXPORT_DELETED")
	qmp.do(t, "blockdev-del", map[string]any{"node-name": "snap"})
	qmp.do(t, "blockdev-reopen", map[string]any{"options": []any{
		map[string]any{"driver": "throttle", "node-name": "top", "file": "disk", "throttle-group": "tg0"}}})
	qmp.do(t, "blockdev-del", map[string]any{"node-name": "cbw"})
	qmp.do(t, "blockdev-del", map[string]any{"node-name": "fleece"})
	mustRun(t, "qemu-io", "-f", "raw", "-c", "write -P 0xee 0 64k", liveURI)
	qsd.stop()
	if qsd.err != nil {
		t.Fatalf("qemu-storage-daemon did not end cleanly: %v\n%s", qsd.err, qsd.out.String())
	}
	mustRun(t, "qemu-img", "check", "-q", image)
	mustRun(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0xee 0 64k", "-c", "read -P 0xab 64k 8128k", "-c", "read -P 0xac 8M 8M", image)
}

// qmpConn is a QMP monitor connection (qemu's JSON control protocol).
type qmpConn struct {
	c      net.Conn
	r      *bufio.Reader
	events []string // names of the events read while waiting for replies
}

func dialQMP(t *testing.T, sock string) *qmpConn {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("connecting to QMP at %s: %v", sock, err)
	}
	t.Cleanup(func() { c.Close() })
	q := &qmpConn{c: c, r: bufio.NewReader(c)}
	if greeting := q.read(t); greeting["QMP"] == nil {
		t.Fatalf("QMP greeting: %v", greeting)
	}
	q.do(t, "qmp_capabilities", map[string]any{})
	return q
}

// read returns the next message, within 30 s.
func (q *qmpConn) read(t *testing.T) map[string]any {
	t.Helper()
	q.c.SetReadDeadline(time.Now().Add(30 * time.Second))
	line, err := q.r.ReadBytes('\n')
	if err != nil {
		t.Fatalf("reading from QMP: %v", err)
	}
	var m map[string]any
	if err := json.Unmarshal(line, &m); err != nil {
		t.Fatalf("QMP sent %q: %v", line, err)
	}
	return m
}

// do runs a command and fails the test unless it succeeds.
func (q *qmpConn) do(t *testing.T, cmd string, args map[string]any) {
	t.Helper()
	msg, _ := json.Marshal(map[string]any{"execute": cmd, "arguments": args})
	if _, err := q.c.Write(append(msg, '\n')); err != nil {
		t.Fatalf("QMP %s: %v", cmd, err)
	}
	for {
		m := q.read(t)
		if ev, ok := m["event"].(string); ok {
			q.events = append(q.events, ev)
			continue
		}
		if m["error"] != nil {
			t.Fatalf("QMP %s %s: %v", cmd, msg, m["error"])
		}
		return
	}
}

// waitEvent waits for an event (or finds it among those already read).
func (q *qmpConn) waitEvent(t *testing.T, name string) {
	t.Helper()
	for i, ev := range q.events {
		if ev == name {
			q.events = append(q.events[:i], q.events[i+1:]...)
			return
		}
	}
	for {
		if ev, _ := q.read(t)["event"].(string); ev == name {
			return
		}
	}
}
