package server

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"snapmount/nbd"
	"snapmount/test/testenv"
)

const testSize = 4 << 20

// writeFlags are the flags that advertise a way to change data; a
// read-only view never carries them.
const writeFlags = nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero | nbd.FlagSendResize | nbd.FlagSendFUA

func TestServerReadOnlyOptionBeforeWriter(t *testing.T) {
	img := testImage(t, testSize, 1)
	_, addr := startTestServer(t, Config{MaxWriters: 1, Busy: BusyRefuse}, img)

	// The reader connects first and promises to read only.
	reader := dialRaw(t, addr)
	if got := final(reader.option(nbd.OptXReadOnly, []byte{1})); got != nbd.RepErrInvalid {
		t.Errorf("X_READ_ONLY with data: %s, want ERR_INVALID", got)
	}
	for i := 0; i < 2; i++ { // a repeat is ACKed too
		if got := final(reader.option(nbd.OptXReadOnly, nil)); got != nbd.RepAck {
			t.Fatalf("X_READ_ONLY (try %d): %s, want ACK", i+1, got)
		}
	}
	typ, info := reader.info(nbd.OptInfo, "disk")
	if typ != nbd.RepAck || info.flags&nbd.FlagReadOnly == 0 || info.flags&writeFlags != 0 {
		t.Errorf("INFO after the promise: %s, flags %s; want ACK, READ_ONLY and no write flags", typ, info.flags)
	}
	ri := reader.mustGo("disk")
	if ri.flags&nbd.FlagReadOnly == 0 || ri.flags&writeFlags != 0 || ri.flags&nbd.FlagCanMultiConn == 0 {
		t.Errorf("reader flags %s: want READ_ONLY|CAN_MULTI_CONN and no write flags", ri.flags)
	}
	if ri.name != "disk@s1" {
		t.Errorf("reader's canonical name %q, want disk@s1 (a new snapshot)", ri.name)
	}

	// The writer, second, still gets the only writer slot.
	writer := dialRaw(t, addr)
	wi := writer.mustGo("disk")
	want := nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendFUA | nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero | nbd.FlagSendCache | nbd.FlagCanMultiConn
	if wi.flags != want {
		t.Errorf("writer flags %s, want %s", wi.flags, want)
	}
	// A third writer is refused by policy.
	third := dialRaw(t, addr)
	if typ, _ := third.info(nbd.OptGo, "disk"); typ != nbd.RepErrPolicy {
		t.Errorf("third writer: %s, want ERR_POLICY (--busy=refuse)", typ)
	}

	// The reader's WRITE gets EPERM, its payload is drained: the next
	// request on the connection still works.
	payload := bytes.Repeat([]byte{0xee}, 8192)
	if e := reader.simpleReply(reader.request(nbd.CmdWrite, 0, 0, uint32(len(payload)), payload)); e != nbd.EPERM {
		t.Errorf("reader WRITE: %s, want EPERM", e)
	}
	for _, cmd := range []nbd.Cmd{nbd.CmdTrim, nbd.CmdWriteZeroes, nbd.CmdResize} {
		if e := reader.simpleReply(reader.request(cmd, 0, 0, 4096, nil)); e != nbd.EPERM {
			t.Errorf("reader %s: %s, want EPERM", cmd, e)
		}
	}
	if e := reader.simpleReply(reader.request(nbd.CmdFlush, 0, 0, 0, nil)); e != 0 {
		t.Errorf("reader FLUSH: %s, want success (a no-op)", e)
	}
	before, e := reader.readSimple(0, 8192)
	if e != 0 {
		t.Fatalf("reader READ after refused WRITE: %s", e)
	}

	// The writer writes; the reader's snapshot keeps the old data.
	if e := writer.simpleReply(writer.request(nbd.CmdWrite, nbd.CmdFlagFUA, 0, uint32(len(payload)), payload)); e != 0 {
		t.Fatalf("writer WRITE: %s", e)
	}
	got, _ := writer.readSimple(0, 8192)
	if !bytes.Equal(got, payload) {
		t.Error("writer does not read back what it wrote")
	}
	after, _ := reader.readSimple(0, 8192)
	if !bytes.Equal(after, before) {
		t.Error("the reader's snapshot changed after the writer's write")
	}
}

func TestServerReaderViewLive(t *testing.T) {
	img := testImage(t, testSize, 2)
	_, addr := startTestServer(t, Config{ReaderView: ReaderViewLive}, img)
	reader := dialRaw(t, addr)
	if got := final(reader.option(nbd.OptXReadOnly, nil)); got != nbd.RepAck {
		t.Fatalf("X_READ_ONLY: %s", got)
	}
	ri := reader.mustGo("disk")
	if ri.flags&nbd.FlagReadOnly == 0 || ri.name != "disk@live" {
		t.Errorf("live reader: flags %s, name %q; want READ_ONLY and disk@live", ri.flags, ri.name)
	}
	writer := dialRaw(t, addr)
	writer.mustGo("disk")
	data := bytes.Repeat([]byte{7}, 4096)
	if e := writer.simpleReply(writer.request(nbd.CmdWrite, 0, 4096, 4096, data)); e != 0 {
		t.Fatal(e)
	}
	if got, _ := reader.readSimple(4096, 4096); !bytes.Equal(got, data) {
		t.Error("a live reader does not see the writer's write")
	}
}

func TestServerBusyReadOnly(t *testing.T) {
	img := testImage(t, testSize, 3)
	_, addr := startTestServer(t, Config{MaxWriters: 1}, img)
	w1 := dialRaw(t, addr)
	if w1.mustGo("disk").flags&nbd.FlagReadOnly != 0 {
		t.Fatal("first writer got a read-only view")
	}
	w2 := dialRaw(t, addr)
	if f := w2.mustGo("disk").flags; f&nbd.FlagReadOnly == 0 {
		t.Errorf("second writer over --max-writers 1: flags %s, want READ_ONLY (--busy=readonly)", f)
	}
	w1.write(nbd.AppendOption(nil, nbd.OptAbort, nil)) // not in transmission: close is enough
	w1.c.Close()
	w2.c.Close()
	// The slot comes back when the writer leaves; the server notices
	// asynchronously, so poll with fresh connections.
	deadline := time.Now().Add(10 * time.Second)
	for {
		w3 := dialRaw(t, addr)
		f := w3.mustGo("disk").flags
		w3.c.Close()
		if f&nbd.FlagReadOnly == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("writer slot never came back after the writer left")
		}
	}
}

func TestServerExportNames(t *testing.T) {
	img := testImage(t, testSize, 4)
	_, addr := startTestServer(t, Config{SnapshotLinger: time.Hour}, img)
	c := dialRaw(t, addr)
	for _, tc := range []struct {
		name     string
		want     nbd.Reply
		readOnly bool
		canon    string
	}{
		{"disk", nbd.RepAck, false, "disk"},
		{"", nbd.RepAck, false, "disk"},
		{"disk@live", nbd.RepAck, true, "disk@live"},
		{"disk@snapshot", nbd.RepAck, true, ""}, // INFO creates nothing
		{"disk@s1", nbd.RepErrUnknown, false, ""},
		{"disk@s0", nbd.RepErrUnknown, false, ""},
		{"disk@bogus", nbd.RepErrUnknown, false, ""},
		{"other", nbd.RepErrUnknown, false, ""},
	} {
		typ, info := c.info(nbd.OptInfo, tc.name)
		if typ != tc.want {
			t.Errorf("INFO %q: %s, want %s", tc.name, typ, tc.want)
			continue
		}
		if typ != nbd.RepAck {
			continue
		}
		if ro := info.flags&nbd.FlagReadOnly != 0; ro != tc.readOnly {
			t.Errorf("INFO %q: flags %s, read-only %v want %v", tc.name, info.flags, ro, tc.readOnly)
		}
		if tc.canon != "" && info.name != tc.canon {
			t.Errorf("INFO %q: name %q, want %q", tc.name, info.name, tc.canon)
		}
		if info.blockSize != advertisedBlockSize {
			t.Errorf("INFO %q: block size %+v, want %+v", tc.name, info.blockSize, advertisedBlockSize)
		}
	}
	// GO on @snapshot creates s1; a second connection joins it by name.
	s := dialRaw(t, addr)
	if got := s.mustGo("disk@snapshot").name; got != "disk@s1" {
		t.Fatalf("GO disk@snapshot named %q, want disk@s1", got)
	}
	j := dialRaw(t, addr)
	if got := j.mustGo("disk@s1"); got.name != "disk@s1" || got.flags&nbd.FlagReadOnly == 0 {
		t.Errorf("GO disk@s1: %+v", got)
	}

	// LIST shows the export with its description.
	rs := c.option(nbd.OptList, nil)
	if final(rs) != nbd.RepAck || len(rs) != 2 {
		t.Fatalf("LIST: %+v", rs)
	}
	e, err := nbd.ParseServerReply(rs[0].data)
	if err != nil || e.Name != "disk" || e.Description != "test disk" {
		t.Errorf("LIST entry %+v, %v", e, err)
	}
	if got := final(c.option(nbd.OptList, []byte{0})); got != nbd.RepErrInvalid {
		t.Errorf("LIST with data: %s, want ERR_INVALID", got)
	}
}

func TestServerMetaContextAndBlockStatus(t *testing.T) {
	path := testImage(t, testSize, 5)
	// Punch a hole in the middle: [1 MiB, 3 MiB).
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := exportFallocate(f, fallocPunchHole|fallocKeepSize, 1<<20, 2<<20); err != nil {
		t.Skipf("file system cannot punch holes: %v", err)
	}
	f.Close()
	_, addr := startTestServer(t, Config{}, path)
	c := dialRaw(t, addr)
	mc := nbd.MetaContextRequest{Export: "disk", Queries: []string{"base:allocation"}}
	if got := final(c.option(nbd.OptSetMetaContext, mc.Encode())); got != nbd.RepErrInvalid {
		t.Errorf("SET_META_CONTEXT before STRUCTURED_REPLY: %s, want ERR_INVALID", got)
	}
	if got := final(c.option(nbd.OptStructuredReply, nil)); got != nbd.RepAck {
		t.Fatalf("STRUCTURED_REPLY: %s", got)
	}
	list := nbd.MetaContextRequest{Export: "disk", Queries: []string{"base:"}}
	rs := c.option(nbd.OptListMetaContext, list.Encode())
	if len(rs) != 2 || rs[0].typ != nbd.RepMetaContext || string(rs[0].data[4:]) != nbd.ContextBaseAllocation {
		t.Errorf("LIST_META_CONTEXT base: → %+v, want base:allocation", rs)
	}
	odd := nbd.MetaContextRequest{Export: "disk", Queries: []string{"base:nonsense", "qemu:dirty-bitmap:x"}}
	if rs := c.option(nbd.OptSetMetaContext, odd.Encode()); len(rs) != 1 || rs[0].typ != nbd.RepAck {
		t.Errorf("SET_META_CONTEXT of unknown contexts: %+v, want a bare ACK", rs)
	}
	rs = c.option(nbd.OptSetMetaContext, mc.Encode())
	if len(rs) != 2 || rs[0].typ != nbd.RepMetaContext {
		t.Fatalf("SET_META_CONTEXT: %+v", rs)
	}
	id := be.Uint32(rs[0].data)
	info := c.mustGo("disk")
	if info.flags&nbd.FlagSendDF == 0 {
		t.Errorf("flags %s lack SEND_DF with structured replies", info.flags)
	}

	cookie := c.request(nbd.CmdBlockStatus, 0, 0, testSize, nil)
	var b [nbd.ChunkHeaderLen]byte
	h, err := nbd.ReadReplyHeader(c.c, &b)
	if err != nil || h.Type != nbd.ChunkBlockStatus || h.Cookie != cookie || h.Flags&nbd.ReplyFlagDone == 0 {
		t.Fatalf("BLOCK_STATUS reply %+v, %v", h, err)
	}
	p := make([]byte, h.Length)
	c.readFull(p)
	gotID, ext, err := nbd.ParseBlockStatusPayload(p)
	if err != nil || gotID != id {
		t.Fatalf("BLOCK_STATUS payload: id %d (want %d), %v", gotID, id, err)
	}
	want := []nbd.WireExtent{{Length: 1 << 20}, {Length: 2 << 20, Flags: nbd.StateHole | nbd.StateZero}, {Length: 1 << 20}}
	if len(ext) != len(want) {
		t.Fatalf("extents %v, want %v", ext, want)
	}
	for i := range want {
		if ext[i] != want[i] {
			t.Errorf("extent %d: %v, want %v", i, ext[i], want[i])
		}
	}

	// A structured READ over the hole sends it as OFFSET_HOLE.
	data, e, chunks := c.readStructured(512<<10, 1<<20, 0)
	if e != 0 || chunks != 2 || !bytes.Equal(data[512<<10:], make([]byte, 512<<10)) {
		t.Errorf("READ across a hole: errno %s, %d chunks (want 2)", e, chunks)
	}
	// With DF it is one data chunk.
	if _, e, chunks := c.readStructured(512<<10, 1<<20, nbd.CmdFlagDF); e != 0 || chunks != 1 {
		t.Errorf("READ with DF: errno %s, %d chunks (want 1)", e, chunks)
	}
	// Out of range: EINVAL in an error chunk, and the connection lives on.
	if _, e, _ := c.readStructured(testSize-10, 20, 0); e != nbd.EINVAL {
		t.Errorf("READ past the end: %s, want EINVAL", e)
	}
	if _, e, _ := c.readStructured(0, nbd.MaxPayload+1, 0); e != nbd.EINVAL {
		t.Errorf("READ above 32 MiB: %s, want EINVAL", e)
	}
	if _, e, _ := c.readStructured(0, 4096, nbd.CmdFlagNoHole); e != nbd.EINVAL {
		t.Errorf("READ with NO_HOLE: %s, want EINVAL", e)
	}
	if _, e, _ := c.readStructured(0, 4096, 0); e != 0 {
		t.Errorf("READ after errors: %s", e)
	}
}

func TestServerUnknownOptionAndCommand(t *testing.T) {
	img := testImage(t, testSize, 6)
	_, addr := startTestServer(t, Config{}, img)
	c := dialRaw(t, addr)
	if got := final(c.option(nbd.Option(0x40000001), bytes.Repeat([]byte{1}, 1000))); got != nbd.RepErrUnsup {
		t.Errorf("unknown option: %s, want ERR_UNSUP", got)
	}
	if got := final(c.option(nbd.OptExtendedHeaders, nil)); got != nbd.RepErrUnsup {
		t.Errorf("EXTENDED_HEADERS: %s, want ERR_UNSUP", got)
	}
	if got := final(c.option(nbd.OptStartTLS, nil)); got != nbd.RepErrPolicy {
		t.Errorf("STARTTLS without TLS: %s, want ERR_POLICY", got)
	}
	// Option data above the limit is drained and refused.
	if got := final(c.option(nbd.OptList, make([]byte, maxOptionData+1))); got != nbd.RepErrTooBig {
		t.Errorf("oversize option: %s, want ERR_TOO_BIG", got)
	}
	c.mustGo("disk")
	for _, tc := range []struct {
		typ    nbd.Cmd
		flags  nbd.CmdFlags
		off    uint64
		length uint32
		want   nbd.Errno
	}{
		{nbd.Cmd(42), 0, 0, 0, nbd.EINVAL},
		{nbd.CmdFlush, 0, 1, 0, nbd.EINVAL},
		{nbd.CmdTrim, 0, testSize, 1, nbd.EINVAL},
		{nbd.CmdWriteZeroes, 0, testSize - 1, 2, nbd.ENOSPC},
		{nbd.CmdBlockStatus, 0, 0, 4096, nbd.EINVAL}, // no meta context
		{nbd.CmdCache, 0, 0, 1 << 20, 0},
		{nbd.CmdRead, nbd.CmdFlagDF, 0, 4096, nbd.EINVAL}, // DF needs structured replies
		{nbd.CmdWriteZeroes, nbd.CmdFlagNoHole | nbd.CmdFlagFastZero, 0, 1 << 20, 0},
		{nbd.CmdTrim, nbd.CmdFlagFUA, 1 << 20, 1 << 20, 0},
		{nbd.CmdFlush, 0, 0, 0, 0},
		{nbd.CmdResize, 0, 0, 0, nbd.EINVAL},
		{nbd.CmdRead, 0, 1 << 62, 1, nbd.EINVAL},
	} {
		if got := c.simpleReply(c.request(tc.typ, tc.flags, tc.off, tc.length, nil)); got != tc.want {
			t.Errorf("%s flags %#x %d@%d: %s, want %s", tc.typ, tc.flags, tc.length, tc.off, got, tc.want)
		}
		if tc.typ == nbd.CmdRead && tc.want == 0 {
			c.readFull(make([]byte, tc.length))
		}
	}
	if e := c.simpleReply(c.request(nbd.CmdWrite, 0, testSize-1, 2, []byte{1, 2})); e != nbd.ENOSPC {
		t.Errorf("WRITE past the end: %s, want ENOSPC", e)
	}
	got, e := c.readSimple(1<<20, 4096)
	if e != 0 || !bytes.Equal(got, make([]byte, 4096)) {
		t.Errorf("after WRITE_ZEROES and TRIM the range does not read as zeros (%s)", e)
	}
	c.request(nbd.CmdDisc, 0, 0, 0, nil)
	c.expectClosed()
}

// TestServerHostileBytes sends what no client should; each connection
// ends without harming the server, the image or other clients.
func TestServerHostileBytes(t *testing.T) {
	img := testImage(t, testSize, 7)
	before := fileHash(t, img)
	_, addr := startTestServer(t, Config{HandshakeTimeout: 5 * time.Second}, img)

	bystander := dialRaw(t, addr)
	bystander.mustGo("disk@live")

	raw := func(t *testing.T) net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	t.Run("garbage", func(t *testing.T) {
		c := raw(t)
		c.Write(bytes.Repeat([]byte("GARBAGE!"), 1000))
		(&rawClient{t: t, c: c}).expectClosed()
	})
	t.Run("unknown client flags", func(t *testing.T) {
		c := raw(t)
		c.Write([]byte{0xff, 0xff, 0xff, 0xff})
		(&rawClient{t: t, c: c}).expectClosed()
	})
	t.Run("truncated handshake", func(t *testing.T) {
		c := raw(t)
		c.Write([]byte{0, 0, 0, 1, 'I', 'H', 'A'})
		c.(*net.TCPConn).CloseWrite()
		(&rawClient{t: t, c: c}).expectClosed()
	})
	t.Run("4 GiB option", func(t *testing.T) {
		c := dialRaw(t, addr)
		var b []byte
		b = be.AppendUint64(b, nbd.IHaveOpt)
		b = be.AppendUint32(b, uint32(nbd.OptGo))
		b = be.AppendUint32(b, 0xffffffff)
		c.write(b)
		c.expectClosed()
	})
	t.Run("option name length lies", func(t *testing.T) {
		c := dialRaw(t, addr)
		data := be.AppendUint32(nil, 0xfffffff0) // name length far beyond the data
		data = append(data, "disk"...)
		data = be.AppendUint16(data, 0)
		if got := final(c.option(nbd.OptGo, data)); got != nbd.RepErrInvalid {
			t.Errorf("GO with a lying length: %s, want ERR_INVALID", got)
		}
		mc := be.AppendUint32(nil, 4)
		mc = append(mc, "disk"...)
		mc = be.AppendUint32(mc, 1<<30) // a billion queries in no bytes
		if got := final(c.option(nbd.OptListMetaContext, mc)); got != nbd.RepErrInvalid {
			t.Errorf("LIST_META_CONTEXT with a lying count: %s, want ERR_INVALID", got)
		}
	})
	t.Run("too many options", func(t *testing.T) {
		c := dialRaw(t, addr)
		var b []byte
		for i := 0; i <= maxOptions; i++ {
			b = nbd.AppendOption(b, nbd.OptStructuredReply, nil)
		}
		go c.c.Write(b)
		c.expectClosed()
	})
	t.Run("bad request magic", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.mustGo("disk")
		c.write(bytes.Repeat([]byte{0x55}, nbd.RequestHeaderLen))
		c.expectClosed()
	})
	t.Run("oversize write", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.mustGo("disk")
		c.request(nbd.CmdWrite, 0, 0, nbd.MaxPayload+1, nil)
		c.expectClosed()
	})
	t.Run("write to a snapshot", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.mustGo("disk@snapshot")
		p := bytes.Repeat([]byte{0xaa}, 4096)
		if e := c.simpleReply(c.request(nbd.CmdWrite, 0, 0, 4096, p)); e != nbd.EPERM {
			t.Errorf("WRITE to a snapshot: %s, want EPERM", e)
		}
	})
	t.Run("vanish mid-request", func(t *testing.T) {
		c := dialRaw(t, addr)
		c.mustGo("disk@live")
		hdr := make([]byte, nbd.RequestHeaderLen)
		(&nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Length: 1 << 20}).Encode(hdr)
		c.write(append(hdr, make([]byte, 1000)...))
		for i := 0; i < 8; i++ {
			c.request(nbd.CmdRead, 0, 0, 1<<20, nil)
		}
		c.c.Close()
	})
	t.Run("handshake timeout", func(t *testing.T) {
		c := dialRaw(t, addr) // then silence
		c.expectClosed()
	})

	// The bystander never noticed, a fresh client works, the image is
	// as it was.
	if _, e := bystander.readSimple(0, 65536); e != 0 {
		t.Errorf("bystander's READ: %s", e)
	}
	fresh := dialRaw(t, addr)
	fresh.mustGo("disk@live")
	if _, e := fresh.readSimple(testSize-4096, 4096); e != 0 {
		t.Errorf("fresh client's READ: %s", e)
	}
	if fileHash(t, img) != before {
		t.Error("hostile clients changed the image")
	}
}

func TestServerTLS(t *testing.T) {
	cert := selfSignedCert(t)
	for _, mode := range []TLSMode{TLSOn, TLSRequire} {
		img := testImage(t, testSize, 8) // one server at a time may write an image
		cfg := Config{TLSMode: mode, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}}
		_, addr := startTestServer(t, cfg, img)
		c := dialRaw(t, addr)
		if mode == TLSRequire {
			if typ, _ := c.info(nbd.OptInfo, "disk"); typ != nbd.RepErrTLSReqd {
				t.Errorf("INFO before STARTTLS with --tls=require: %s, want ERR_TLS_REQD", typ)
			}
		}
		wantPromise := nbd.RepAck
		if mode == TLSRequire {
			wantPromise = nbd.RepErrTLSReqd
		}
		if got := final(c.option(nbd.OptXReadOnly, nil)); got != wantPromise {
			t.Fatalf("X_READ_ONLY before TLS: %s, want %s", got, wantPromise)
		}
		if got := final(c.option(nbd.OptStartTLS, []byte{1})); got != nbd.RepErrInvalid {
			t.Errorf("STARTTLS with data: %s, want ERR_INVALID", got)
		}
		if got := final(c.option(nbd.OptStartTLS, nil)); got != nbd.RepAck {
			t.Fatalf("STARTTLS: %s", got)
		}
		tc := tls.Client(c.c, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12})
		if err := tc.Handshake(); err != nil {
			t.Fatal(err)
		}
		c.c = tc
		if got := final(c.option(nbd.OptStartTLS, nil)); got != nbd.RepErrInvalid {
			t.Errorf("second STARTTLS: %s, want ERR_INVALID", got)
		}
		// STARTTLS forgot the promise: plain "disk" is a writer again.
		if typ, info := c.info(nbd.OptInfo, "disk"); typ != nbd.RepAck || info.flags&nbd.FlagReadOnly != 0 {
			t.Errorf("mode %d: INFO after STARTTLS: %s, flags %s; want a writer", mode, typ, info.flags)
		}
		// Made after TLS, the promise holds.
		if got := final(c.option(nbd.OptXReadOnly, nil)); got != nbd.RepAck {
			t.Fatalf("X_READ_ONLY after TLS: %s", got)
		}
		if typ, info := c.info(nbd.OptInfo, "disk"); typ != nbd.RepAck || info.flags&nbd.FlagReadOnly == 0 {
			t.Errorf("mode %d: INFO after a promise over TLS: %s, flags %s; want READ_ONLY", mode, typ, info.flags)
		}
		c.option(nbd.OptStartTLS, nil) // refused (TLS is on), and must not reset the state
		info := c.mustGo("disk@live")
		if info.flags&nbd.FlagReadOnly == 0 {
			t.Errorf("mode %d: disk@live is not read-only (flags %s)", mode, info.flags)
		}
		want, _ := os.ReadFile(img)
		if got, e := c.readSimple(4096, 4096); e != 0 || !bytes.Equal(got, want[4096:8192]) {
			t.Errorf("READ over TLS: %s", e)
		}
	}
}

func selfSignedCert(t testing.TB) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

func TestServerExportNameOption(t *testing.T) {
	img := testImage(t, testSize, 9)
	_, addr := startTestServer(t, Config{}, img)
	c := dialRaw(t, addr)
	c.write(nbd.AppendOption(nil, nbd.OptXReadOnly, nil))
	var h [nbd.OptionReplyLen]byte
	c.readFull(h[:])
	c.write(nbd.AppendOption(nil, nbd.OptExportName, []byte("disk")))
	var r [nbd.ExportNameReplyLen]byte // NO_ZEROES: no padding
	c.readFull(r[:])
	size, flags := nbd.ParseExportNameReply(r[:])
	if size != testSize || flags&nbd.FlagReadOnly == 0 {
		t.Errorf("EXPORT_NAME after the promise: size %d flags %s", size, flags)
	}
	if _, e := c.readSimple(0, 4096); e != 0 {
		t.Error(e)
	}
	// An unknown export: the server can only hang up.
	u := dialRaw(t, addr)
	u.write(nbd.AppendOption(nil, nbd.OptExportName, []byte("nope")))
	u.expectClosed()
}

// TestServerShutdownFinishesRequests: requests in flight when Shutdown
// starts get their replies; the connection then closes.
func TestServerShutdown(t *testing.T) {
	img := testImage(t, testSize, 10)
	srv, addr := startTestServer(t, Config{}, img)
	c := dialRaw(t, addr)
	c.mustGo("disk")
	p := bytes.Repeat([]byte{9}, 1<<20)
	cookies := []uint64{}
	for i := 0; i < 4; i++ {
		cookies = append(cookies, c.request(nbd.CmdWrite, 0, uint64(i)<<20, 1<<20, p))
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Shutdown(t.Context()); err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	}()
	// Requests that arrived before the shutdown are answered; later ones
	// may be dropped, but the connection ends with EOF, never a reset
	// that would destroy replies not yet read.
	var acked []uint64
	for range cookies {
		var b [nbd.ChunkHeaderLen]byte
		h, err := nbd.ReadReplyHeader(c.c, &b)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("after %d replies: %v (want replies, then EOF)", len(acked), err)
		}
		if h.Errno != 0 {
			t.Errorf("write failed in shutdown: %s", h.Errno)
		}
		acked = append(acked, h.Cookie)
	}
	c.c.Close()
	testenv.Wait(t, &wg, "Shutdown to return")
	data, _ := os.ReadFile(img)
	for _, ck := range acked {
		i := ck - 1
		if !bytes.Equal(data[i<<20:(i+1)<<20], p) {
			t.Errorf("acknowledged write %d is not in the image after shutdown", ck)
		}
	}
	t.Logf("%d of %d writes acknowledged before shutdown", len(acked), len(cookies))
}

// TestServerPipelined sends many requests without waiting, structured
// READs over holes (several chunks each) mixed with WRITEs, and checks
// every chunk arrives whole and every reply once, with the right data.
func TestServerPipelined(t *testing.T) {
	path := testImage(t, testSize, 11)
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	// Holes every other 64 KiB in the first MiB: reads there have many chunks.
	for off := int64(0); off < 1<<20; off += 128 << 10 {
		if err := exportFallocate(f, fallocPunchHole|fallocKeepSize, off, 64<<10); err != nil {
			t.Skipf("cannot punch holes: %v", err)
		}
	}
	f.Close()
	want, _ := os.ReadFile(path)
	_, addr := startTestServer(t, Config{Workers: 4}, path)
	c := dialRaw(t, addr)
	if got := final(c.option(nbd.OptStructuredReply, nil)); got != nbd.RepAck {
		t.Fatal(got)
	}
	c.mustGo("disk")

	type pending struct {
		read   bool
		off    uint64
		length uint32
		data   []byte
		done   bool
	}
	reqs := map[uint64]*pending{}
	var out []byte
	for i := 0; i < 96; i++ {
		c.cookie++
		var r nbd.Request
		p := &pending{}
		switch i % 3 {
		case 0, 1: // reads: half over the holes, half anywhere
			p.read = true
			p.off = uint64(i%8) * (96 << 10)
			if i%3 == 1 {
				p.off = uint64(1<<20) + uint64(i)*4096
			}
			p.length = 256 << 10
			p.data = make([]byte, p.length)
			r = nbd.Request{Type: nbd.CmdRead, Cookie: c.cookie, Offset: p.off, Length: p.length}
		case 2: // writes to the last MiB, disjoint
			p.off = uint64(testSize-(1<<20)) + uint64(i/3)*4096
			p.length = 4096
			r = nbd.Request{Type: nbd.CmdWrite, Cookie: c.cookie, Offset: p.off, Length: p.length}
		}
		reqs[c.cookie] = p
		hdr := make([]byte, nbd.RequestHeaderLen)
		r.Encode(hdr)
		out = append(out, hdr...)
		if !p.read {
			out = append(out, bytes.Repeat([]byte{byte(i)}, int(p.length))...)
			copy(want[p.off:], bytes.Repeat([]byte{byte(i)}, int(p.length)))
		}
	}
	go c.c.Write(out) // the server replies while we still send
	for left := len(reqs); left > 0; {
		var b [nbd.ChunkHeaderLen]byte
		h, err := nbd.ReadReplyHeader(c.c, &b)
		if err != nil {
			t.Fatalf("with %d replies outstanding: %v", left, err)
		}
		p := reqs[h.Cookie]
		if p == nil || p.done {
			t.Fatalf("reply for unknown or finished cookie %d", h.Cookie)
		}
		if !h.Structured {
			if h.Errno != 0 || p.read {
				t.Fatalf("cookie %d: simple reply errno %s (read %v)", h.Cookie, h.Errno, p.read)
			}
			p.done = true
			left--
			continue
		}
		payload := make([]byte, h.Length)
		c.readFull(payload)
		switch h.Type {
		case nbd.ChunkOffsetData:
			o := be.Uint64(payload) - p.off
			copy(p.data[o:], payload[8:])
		case nbd.ChunkOffsetHole:
			o, n := be.Uint64(payload)-p.off, be.Uint32(payload[8:])
			clear(p.data[o : o+uint64(n)])
		default:
			t.Fatalf("cookie %d: chunk %s", h.Cookie, h.Type)
		}
		if h.Flags&nbd.ReplyFlagDone != 0 {
			p.done = true
			left--
		}
	}
	for ck, p := range reqs {
		if p.read && !bytes.Equal(p.data, want[p.off:p.off+uint64(p.length)]) {
			// Reads of the written area race with the writes; none go there.
			t.Errorf("cookie %d: read %d@%d returned wrong data", ck, p.length, p.off)
		}
	}
	got, _ := os.ReadFile(path)
	if !bytes.Equal(got[testSize-(1<<20):], want[testSize-(1<<20):]) {
		t.Error("pipelined writes did not all land")
	}
}

// TestServerCanonicalNameUnasked: GO on a snapshot sends NBD_INFO_NAME
// even to a client that did not ask, so every client learns the name to
// rejoin; a writer's GO without the request carries no name.
func TestServerCanonicalNameUnasked(t *testing.T) {
	img := testImage(t, testSize, 12)
	_, addr := startTestServer(t, Config{}, img)
	names := func(name string, promise bool) []string {
		c := dialRaw(t, addr)
		if promise {
			c.option(nbd.OptXReadOnly, nil)
		}
		req := nbd.ExportRequest{Name: name}
		var got []string
		for _, r := range c.option(nbd.OptGo, req.Encode()) {
			if r.typ == nbd.RepInfo {
				if ir, err := nbd.ParseInfoReply(r.data); err == nil && ir.Type == nbd.InfoName {
					got = append(got, ir.Text)
				}
			}
		}
		return got
	}
	if got := names("disk@snapshot", false); len(got) != 1 || got[0] != "disk@s1" {
		t.Errorf("GO disk@snapshot without asking: names %q, want [disk@s1]", got)
	}
	if got := names("disk", true); len(got) != 1 || got[0] != "disk@s2" {
		t.Errorf("GO disk after the promise: names %q, want [disk@s2]", got)
	}
	if got := names("disk", false); len(got) != 0 {
		t.Errorf("writer GO without asking: names %q, want none", got)
	}
}

// MaxConns is a hard limit on connections past their handshake, however
// many negotiate at once: a GO past it is refused with ERR_POLICY, saying
// why, and the connection may still ask (INFO) and try again; once a
// connection ends, its slot is free. The refusals are logged, counted.
func TestServerMaxConns(t *testing.T) {
	img := testImage(t, testSize, 13)
	var logged testenv.Buffer
	_, addr := startTestServer(t, Config{MaxConns: 2, Logger: testLoggerTo(&logged, slog.LevelWarn)}, img)
	// All three negotiate at once: each was admitted with no connection
	// past its handshake.
	clients := []*rawClient{dialRaw(t, addr), dialRaw(t, addr), dialRaw(t, addr)}
	clients[0].mustGo("disk@live")
	clients[1].mustGo("disk@live")
	last := clients[2]
	rs := last.option(nbd.OptGo, (&nbd.ExportRequest{Name: "disk@live"}).Encode())
	if r := rs[len(rs)-1]; r.typ != nbd.RepErrPolicy || !strings.Contains(string(r.data), "--max-conns") {
		t.Fatalf("GO past MaxConns: %s %q, want ERR_POLICY saying --max-conns", r.typ, r.data)
	}
	if typ, _ := last.info(nbd.OptInfo, "disk@live"); typ != nbd.RepAck {
		t.Errorf("INFO past MaxConns: %s, want ACK", typ)
	}
	if _, e := clients[0].readSimple(0, 4096); e != 0 {
		t.Errorf("a connection within the limit suffered from the refused one: %s", e)
	}
	if !strings.Contains(logged.String(), "too many connections") {
		t.Errorf("the refusal was not logged: %q", logged.String())
	}
	clients[0].request(nbd.CmdDisc, 0, 0, 0, nil)
	clients[0].expectClosed()
	// The slot comes back once the server has seen the first one go.
	for deadline := time.Now().Add(testenv.WaitLimit); ; {
		typ, _ := last.info(nbd.OptGo, "disk@live")
		if typ == nbd.RepAck {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("GO still refused (%s) %v after a connection ended", typ, testenv.WaitLimit)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if _, e := last.readSimple(0, 4096); e != 0 {
		t.Errorf("read on the connection that got the freed slot: %s", e)
	}
}

// Handshakes closed for newer ones are logged at most once a second, but
// every one is counted: those of a burst after a line come in the next.
func TestServerEvictionsCounted(t *testing.T) {
	img := testImage(t, testSize, 13)
	var logged testenv.Buffer
	_, addr := startTestServer(t, Config{MaxHandshakes: 1, Logger: testLoggerTo(&logged, slog.LevelWarn)}, img)
	const conns = 5 // each closes the one before it
	for range conns {
		dialRaw(t, addr)
	}
	count := regexp.MustCompile(`closed the oldest.* count=(\d+)`)
	for deadline := time.Now().Add(testenv.WaitLimit); ; {
		changed := logged.Changed()
		sum := 0
		for _, m := range count.FindAllStringSubmatch(logged.String(), -1) {
			n, _ := strconv.Atoi(m[1])
			sum += n
		}
		if sum == conns-1 {
			break
		}
		if sum > conns-1 || time.Now().After(deadline) {
			t.Fatalf("the log counts %d closed handshakes, want %d:\n%s", sum, conns-1, logged.String())
		}
		select {
		case <-changed:
		case <-time.After(time.Until(deadline)):
		}
	}
}

// A served image is locked: a second server cannot write it, read-only
// servers share it, ImageLocked tells, and the lock goes with the server.
func TestServedImageIsLocked(t *testing.T) {
	img := testImage(t, testSize, 9)
	cfg := func(readOnly bool) Config {
		return Config{ReadOnly: readOnly, SnapshotDir: t.TempDir(), Logger: testLogger(t),
			Exports: []ExportConfig{{Name: "disk", Path: img}}}
	}
	locked := func() bool {
		f, err := os.Open(img)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		l, err := ImageLocked(f)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	if locked() {
		t.Fatal("an image nobody serves counts as locked")
	}
	srv, err := New(cfg(false))
	if err != nil {
		t.Fatal(err)
	}
	if !locked() {
		t.Error("a served image does not count as locked")
	}
	if _, err := New(cfg(false)); err == nil || !strings.Contains(err.Error(), "another snapmount serve") {
		t.Errorf("a second server of the image: %v, want it refused", err)
	}
	srv.Close()
	if locked() {
		t.Error("the image stays locked after the server closed")
	}
	a, err := New(cfg(true))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	b, err := New(cfg(true))
	if err != nil {
		t.Fatalf("a second read-only server of the image: %v", err)
	}
	defer b.Close()
	if !locked() {
		t.Error("an image served read-only does not count as locked")
	}
}
