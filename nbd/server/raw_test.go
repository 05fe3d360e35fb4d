package server

// A raw NBD client for the server's tests: it speaks through the shared
// codec, one message at a time, and can send what no real client would
// (our private option, hostile bytes). It is no client library: it checks
// what the tests need and fails the test on anything unexpected.

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"math/rand"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"snapmount/nbd"
	"snapmount/test/testenv"
)

// be is the byte order of the numbers the tests put on the wire by hand.
var be = binary.BigEndian

// testImage writes size bytes of seeded random data and returns the path.
func testImage(t testing.TB, size int64, seed int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	b := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(b)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func fileHash(t testing.TB, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// testLogger sends the server's log lines to t.Log, so they show only for
// failing tests or with -v.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testLogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testLogWriter struct{ t testing.TB }

func (w testLogWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// startTestServer serves cfg (with one export "disk" of image if cfg has
// none) on 127.0.0.1 and returns the server and its address.
func startTestServer(t testing.TB, cfg Config, image string) (*Server, string) {
	t.Helper()
	if len(cfg.Exports) == 0 {
		cfg.Exports = []ExportConfig{{Name: "disk", Path: image, Description: "test disk"}}
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	if cfg.SnapshotDir == "" {
		cfg.SnapshotDir = t.TempDir()
	}
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		if err := srv.Close(); err != nil {
			t.Errorf("closing server: %v", err)
		}
		if err := <-done; !errors.Is(err, ErrClosed) {
			t.Errorf("Serve returned %v, want ErrClosed", err)
		}
	})
	return srv, l.Addr().String()
}

type rawClient struct {
	t      testing.TB
	c      net.Conn
	cookie uint64
}

// dialRaw connects and does the greeting with FIXED_NEWSTYLE|NO_ZEROES.
func dialRaw(t testing.TB, addr string) *rawClient {
	t.Helper()
	r := &rawClient{t: t, c: testenv.Dial(t, "tcp", addr)}
	var g [nbd.GreetingLen]byte
	r.readFull(g[:])
	if be.Uint64(g[0:]) != nbd.Magic || be.Uint64(g[8:]) != nbd.IHaveOpt {
		t.Fatalf("greeting % x is not fixed newstyle", g)
	}
	if f := nbd.HandshakeFlags(be.Uint16(g[16:])); f != nbd.HandshakeFixedNewstyle|nbd.HandshakeNoZeroes {
		t.Fatalf("handshake flags %#x, want FIXED_NEWSTYLE|NO_ZEROES", f)
	}
	r.write(be.AppendUint32(nil, uint32(nbd.ClientFixedNewstyle|nbd.ClientNoZeroes)))
	return r
}

func (r *rawClient) write(b []byte) {
	r.t.Helper()
	if _, err := r.c.Write(b); err != nil {
		r.t.Fatalf("raw client write: %v", err)
	}
}

func (r *rawClient) readFull(b []byte) {
	r.t.Helper()
	if _, err := io.ReadFull(r.c, b); err != nil {
		r.t.Fatalf("raw client read: %v", err)
	}
}

type optReply struct {
	typ  nbd.Reply
	data []byte
}

// option sends one option and returns every reply up to the final one
// (ACK or an error).
func (r *rawClient) option(opt nbd.Option, data []byte) []optReply {
	r.t.Helper()
	r.write(nbd.AppendOption(nil, opt, data))
	var out []optReply
	for {
		var h [nbd.OptionReplyLen]byte
		r.readFull(h[:])
		o, typ, n, err := nbd.ParseOptionReplyHeader(h[:])
		if err != nil {
			r.t.Fatal(err)
		}
		if o != opt {
			r.t.Fatalf("reply to %s echoes %s", opt, o)
		}
		d := make([]byte, n)
		r.readFull(d)
		out = append(out, optReply{typ, d})
		if typ == nbd.RepAck || typ.IsError() {
			return out
		}
	}
}

// final returns the type of the last reply.
func final(rs []optReply) nbd.Reply { return rs[len(rs)-1].typ }

// exportInfo is what INFO or GO told about an export.
type exportInfo struct {
	size      uint64
	flags     nbd.TransmissionFlags
	name      string
	hasName   bool
	blockSize nbd.BlockSize
}

// info sends INFO or GO asking for NAME and BLOCK_SIZE; it returns the
// final reply type and what the INFO replies said.
func (r *rawClient) info(opt nbd.Option, name string) (nbd.Reply, exportInfo) {
	r.t.Helper()
	req := nbd.ExportRequest{Name: name, Infos: []nbd.InfoType{nbd.InfoName, nbd.InfoBlockSize}}
	rs := r.option(opt, req.Encode())
	var ei exportInfo
	for _, x := range rs {
		if x.typ != nbd.RepInfo {
			continue
		}
		ir, err := nbd.ParseInfoReply(x.data)
		if err != nil {
			r.t.Fatal(err)
		}
		switch ir.Type {
		case nbd.InfoExport:
			ei.size, ei.flags = ir.Size, ir.Flags
		case nbd.InfoName:
			ei.name, ei.hasName = ir.Text, true
		case nbd.InfoBlockSize:
			ei.blockSize = ir.BlockSize
		}
	}
	return final(rs), ei
}

// mustGo opens an export with GO and fails the test unless it is ACKed.
func (r *rawClient) mustGo(name string) exportInfo {
	r.t.Helper()
	typ, ei := r.info(nbd.OptGo, name)
	if typ != nbd.RepAck {
		r.t.Fatalf("GO %q: %s, want ACK", name, typ)
	}
	return ei
}

// request sends one request header (and payload for WRITE).
func (r *rawClient) request(typ nbd.Cmd, flags nbd.CmdFlags, off uint64, length uint32, payload []byte) uint64 {
	r.t.Helper()
	r.cookie++
	req := nbd.Request{Flags: flags, Type: typ, Cookie: r.cookie, Offset: off, Length: length}
	var b [nbd.RequestHeaderLen]byte
	req.Encode(b[:])
	r.write(append(b[:], payload...))
	return r.cookie
}

// simpleReply reads a simple reply header and returns its errno.
func (r *rawClient) simpleReply(cookie uint64) nbd.Errno {
	r.t.Helper()
	var b [nbd.ChunkHeaderLen]byte
	h, err := nbd.ReadReplyHeader(r.c, &b)
	if err != nil {
		r.t.Fatal(err)
	}
	if h.Structured || h.Cookie != cookie {
		r.t.Fatalf("got reply %+v, want a simple reply to cookie %d", h, cookie)
	}
	return h.Errno
}

// readSimple issues a READ without structured replies and returns the
// data, or the errno.
func (r *rawClient) readSimple(off uint64, length uint32) ([]byte, nbd.Errno) {
	r.t.Helper()
	c := r.request(nbd.CmdRead, 0, off, length, nil)
	if e := r.simpleReply(c); e != 0 {
		return nil, e
	}
	b := make([]byte, length)
	r.readFull(b)
	return b, 0
}

// readStructured issues a READ with structured replies negotiated and
// reassembles the chunks; it returns the data or the errno.
func (r *rawClient) readStructured(off uint64, length uint32, flags nbd.CmdFlags) ([]byte, nbd.Errno, int) {
	r.t.Helper()
	c := r.request(nbd.CmdRead, flags, off, length, nil)
	out := make([]byte, length)
	chunks := 0
	var errno nbd.Errno
	for {
		var b [nbd.ChunkHeaderLen]byte
		h, err := nbd.ReadReplyHeader(r.c, &b)
		if err != nil {
			r.t.Fatal(err)
		}
		if !h.Structured || h.Cookie != c {
			r.t.Fatalf("got reply %+v, want a chunk for cookie %d", h, c)
		}
		p := make([]byte, h.Length)
		r.readFull(p)
		chunks++
		switch h.Type {
		case nbd.ChunkOffsetData:
			o := be.Uint64(p) - off
			copy(out[o:], p[8:])
		case nbd.ChunkOffsetHole:
			o, n := be.Uint64(p)-off, be.Uint32(p[8:])
			clear(out[o : o+uint64(n)])
		case nbd.ChunkNone:
		default:
			if !h.Type.IsError() {
				r.t.Fatalf("unexpected chunk type %s", h.Type)
			}
			ec, err := nbd.ParseErrorChunk(h.Type, p)
			if err != nil {
				r.t.Fatal(err)
			}
			errno = ec.Errno
		}
		if h.Flags&nbd.ReplyFlagDone != 0 {
			if errno != 0 {
				return nil, errno, chunks
			}
			return out, 0, chunks
		}
	}
}

// expectClosed fails unless the server closes the connection (possibly
// after sending some bytes, which are ignored).
func (r *rawClient) expectClosed() {
	r.t.Helper()
	r.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err := io.Copy(io.Discard, r.c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		r.t.Fatal("server kept the connection open")
	}
}

// testLoggerTo sends the server's log lines of level (or above) to w.
func testLoggerTo(w io.Writer, level slog.Level) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}
