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
	"snapmount/test/testenv"
)

// startServe runs "snapmount serve" on a Unix socket in a fresh short
// directory, with args before the images, and waits for its ready line.
func startServe(t testing.TB, args ...string) (sock string, p *proc) {
	t.Helper()
	sock = filepath.Join(testenv.ShortTempDir(t), "s.sock")
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

// rawNBD is a minimal NBD client, one message at a time through nbd's
// codec, for what no stock client does: sending snapmount's read-only
// promise. It is a test fixture, not a client library.
type rawNBD struct {
	t      testing.TB
	c      net.Conn
	cookie uint64
}

// be is the byte order of what tests put on the wire by hand.
var be = binary.BigEndian

// dialRawNBD connects to sock and answers the greeting (fixed newstyle,
// no zeroes).
func dialRawNBD(t testing.TB, sock string) *rawNBD {
	t.Helper()
	r := &rawNBD{t: t, c: testenv.Dial(t, "unix", sock)}
	g := r.read(nbd.GreetingLen)
	if be.Uint64(g) != nbd.Magic || be.Uint64(g[8:]) != nbd.IHaveOpt {
		t.Fatalf("greeting % x is not fixed newstyle", g)
	}
	r.write(nbd.AppendClientFlags(nil, nbd.ClientFixedNewstyle|nbd.ClientNoZeroes))
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
	r.write(nbd.AppendOption(nil, opt, data))
	for {
		o, typ, n, err := nbd.ParseOptionReplyHeader(r.read(nbd.OptionReplyLen))
		if err != nil || o != opt {
			r.t.Fatalf("bad reply to %s: %s, %v", opt, o, err)
		}
		types = append(types, typ)
		datas = append(datas, r.read(int(n)))
		if typ == nbd.RepAck || typ.IsError() {
			return types, datas
		}
	}
}

// goExport sends GO for name and returns the transmission flags and the
// canonical name the server sent.
func (r *rawNBD) goExport(name string) (nbd.TransmissionFlags, string) {
	r.t.Helper()
	req := nbd.ExportRequest{Name: name, Infos: []nbd.InfoType{nbd.InfoName}}
	types, datas := r.option(nbd.OptGo, req.Encode())
	if types[len(types)-1] != nbd.RepAck {
		r.t.Fatalf("GO %q: %s %q", name, types[len(types)-1], datas[len(datas)-1])
	}
	var flags nbd.TransmissionFlags
	var canon string
	for i, typ := range types {
		if typ != nbd.RepInfo {
			continue
		}
		info, err := nbd.ParseInfoReply(datas[i])
		if err != nil {
			r.t.Fatalf("GO %q: %v", name, err)
		}
		switch info.Type {
		case nbd.InfoExport:
			flags = info.Flags
		case nbd.InfoName:
			canon = info.Text
		}
	}
	return flags, canon
}

// request sends a request (simple replies) and returns the reply's errno
// and, for a successful READ, the data.
func (r *rawNBD) request(cmd nbd.Cmd, off uint64, length uint32, payload []byte) (nbd.Errno, []byte) {
	r.t.Helper()
	r.cookie++
	req := nbd.Request{Type: cmd, Cookie: r.cookie, Offset: off, Length: length}
	b := make([]byte, nbd.RequestHeaderLen)
	req.Encode(b)
	r.write(append(b, payload...))
	var buf [nbd.ChunkHeaderLen]byte
	h, err := nbd.ReadReplyHeader(r.c, &buf)
	if err != nil || h.Structured || h.Cookie != r.cookie {
		r.t.Fatalf("bad reply to %s: %+v, %v", cmd, h, err)
	}
	if cmd == nbd.CmdRead && h.Errno == 0 {
		return 0, r.read(int(length))
	}
	return h.Errno, nil
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
