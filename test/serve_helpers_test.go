package test

import (
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"snapmount/nbd"
)

// startServe runs "snapmount serve" on a Unix socket in a fresh short
// directory, with args before the images, and waits for its ready line.
func startServe(t testing.TB, args ...string) (sock string, p *proc) {
	t.Helper()
	sock = filepath.Join(shortTempDir(t), "s.sock")
	full := append([]string{"serve", "--no-tcp", "--socket", sock}, args...)
	p = startProc(t, snapmountBin, full...)
	p.waitOutput("snapmount serve: listening on", 60*time.Second)
	return sock, p
}

// pyLibnbd runs a Python script with libnbd; argv follows the script.
// It fails the test unless the script exits 0, and returns its stdout.
func pyLibnbd(t testing.TB, script string, args ...string) string {
	t.Helper()
	py := requireLibnbdPython(t)
	return mustRun(t, py, append([]string{"-c", script}, args...)...).stdout
}

// rawNBD is a minimal hand-written NBD client for what no stock client
// does: sending snapmount's read-only promise. It is a test fixture, not a
// client library.
type rawNBD struct {
	t      testing.TB
	c      net.Conn
	cookie uint64
}

var be = binary.BigEndian

func dialRawNBD(t testing.TB, sock string) *rawNBD {
	t.Helper()
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(60 * time.Second))
	r := &rawNBD{t: t, c: c}
	g := r.read(18)
	if be.Uint64(g) != nbd.Magic || be.Uint64(g[8:]) != nbd.IHaveOpt {
		t.Fatalf("greeting % x is not fixed newstyle", g)
	}
	r.write(be.AppendUint32(nil, uint32(nbd.ClientFixedNewstyle|nbd.ClientNoZeroes)))
	return r
}

func (r *rawNBD) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatal(err)
	}
}

func (r *rawNBD) read(n int) []byte {
	r.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(r.c, b); err != nil {
		r.t.Fatal(err)
	}
	return b
}

// option sends an option and returns the replies up to the final one as
// (type, data) pairs.
func (r *rawNBD) option(opt nbd.Option, data []byte) (types []nbd.Reply, datas [][]byte) {
	r.t.Helper()
	b := be.AppendUint64(nil, nbd.IHaveOpt)
	b = be.AppendUint32(b, uint32(opt))
	b = be.AppendUint32(b, uint32(len(data)))
	r.write(append(b, data...))
	for {
		h := r.read(20)
		if be.Uint64(h) != nbd.OptReplyMagic || nbd.Option(be.Uint32(h[8:])) != opt {
			r.t.Fatalf("bad option reply header % x", h)
		}
		typ := nbd.Reply(be.Uint32(h[12:]))
		types = append(types, typ)
		datas = append(datas, r.read(int(be.Uint32(h[16:]))))
		if typ == nbd.RepAck || typ.IsError() {
			return types, datas
		}
	}
}

// goExport sends GO for name and returns the transmission flags and the
// canonical name the server sent.
func (r *rawNBD) goExport(name string) (nbd.TransmissionFlags, string) {
	r.t.Helper()
	d := be.AppendUint32(nil, uint32(len(name)))
	d = append(d, name...)
	d = be.AppendUint16(d, 1)
	d = be.AppendUint16(d, uint16(nbd.InfoName))
	types, datas := r.option(nbd.OptGo, d)
	if types[len(types)-1] != nbd.RepAck {
		r.t.Fatalf("GO %q: %s %q", name, types[len(types)-1], datas[len(datas)-1])
	}
	var flags nbd.TransmissionFlags
	var canon string
	for i, typ := range types {
		if typ != nbd.RepInfo || len(datas[i]) < 2 {
			continue
		}
		switch nbd.InfoType(be.Uint16(datas[i])) {
		case nbd.InfoExport:
			flags = nbd.TransmissionFlags(be.Uint16(datas[i][10:]))
		case nbd.InfoName:
			canon = string(datas[i][2:])
		}
	}
	return flags, canon
}

// request sends a request (simple replies) and returns the reply's errno
// and, for a successful READ, the data.
func (r *rawNBD) request(cmd nbd.Cmd, off uint64, length uint32, payload []byte) (uint32, []byte) {
	r.t.Helper()
	r.cookie++
	b := be.AppendUint32(nil, nbd.RequestMagic)
	b = be.AppendUint16(b, 0)
	b = be.AppendUint16(b, uint16(cmd))
	b = be.AppendUint64(b, r.cookie)
	b = be.AppendUint64(b, off)
	b = be.AppendUint32(b, length)
	r.write(append(b, payload...))
	h := r.read(16)
	if be.Uint32(h) != nbd.SimpleReplyMagic || be.Uint64(h[8:]) != r.cookie {
		r.t.Fatalf("bad simple reply % x", h)
	}
	errno := be.Uint32(h[4:])
	if cmd == nbd.CmdRead && errno == 0 {
		return 0, r.read(int(length))
	}
	return errno, nil
}

// readFileRange returns n bytes of a file at off.
func readFileRange(t testing.TB, path string, off, n int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// copyFile copies src to a new file dst.
func copyFile(t testing.TB, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// field returns the value of "key: value" in a tool's output.
func field(out, key string) string {
	for _, line := range strings.Split(out, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok && k == key {
			return strings.TrimSpace(v)
		}
	}
	return fmt.Sprintf("<no %s in output>", key)
}
