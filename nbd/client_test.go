package nbd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// fakeServer is the server end of a test connection, scripted byte by
// byte by the test with the package's codec.
type fakeServer struct {
	t       testing.TB
	c       net.Conn
	br      *bufio.Reader
	stopped atomic.Bool // the test is over: I/O errors are expected
}

func newFakeServer(t testing.TB, c net.Conn) *fakeServer {
	return &fakeServer{t: t, c: c, br: bufio.NewReader(c)}
}

// fatalf fails the test, unless the test already ended and closed the
// connection under the script.
func (s *fakeServer) fatalf(format string, args ...any) {
	s.t.Helper()
	if s.stopped.Load() {
		runtime.Goexit()
	}
	s.t.Fatalf(format, args...)
}

func (s *fakeServer) write(b []byte) {
	s.t.Helper()
	if _, err := s.c.Write(b); err != nil {
		if !s.stopped.Load() {
			s.t.Errorf("fake server write: %v", err)
		}
	}
}

func (s *fakeServer) greet(flags HandshakeFlags) ClientFlags {
	s.t.Helper()
	s.write(AppendGreeting(nil, flags))
	var b [4]byte
	if _, err := io.ReadFull(s.br, b[:]); err != nil {
		s.fatalf("reading client flags: %v", err)
	}
	return ClientFlags(be.Uint32(b[:]))
}

func (s *fakeServer) readOption() (Option, []byte) {
	s.t.Helper()
	var h [OptionHeaderLen]byte
	if _, err := io.ReadFull(s.br, h[:]); err != nil {
		s.fatalf("reading option: %v", err)
	}
	opt, n, err := ParseOptionHeader(h[:])
	if err != nil {
		s.t.Fatal(err)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(s.br, data); err != nil {
		s.fatalf("reading option data: %v", err)
	}
	return opt, data
}

func (s *fakeServer) expectOption(want Option) []byte {
	s.t.Helper()
	opt, data := s.readOption()
	if opt != want {
		s.t.Fatalf("client sent %s, want %s", opt, want)
	}
	return data
}

func (s *fakeServer) reply(opt Option, typ Reply, data []byte) {
	s.write(AppendOptionReply(nil, opt, typ, data))
}

func (s *fakeServer) readRequest() Request {
	s.t.Helper()
	var b [RequestHeaderLen]byte
	if _, err := io.ReadFull(s.br, b[:]); err != nil {
		s.fatalf("reading request: %v", err)
	}
	r, err := ParseRequest(b[:])
	if err != nil {
		s.t.Fatal(err)
	}
	return r
}

func (s *fakeServer) chunk(flags uint16, typ ChunkType, cookie uint64, payload []byte) {
	s.write(append(AppendChunkHeader(nil, flags, typ, cookie, uint32(len(payload))), payload...))
}

func dataChunk(off uint64, data []byte) []byte {
	return append(be.AppendUint64(nil, off), data...)
}

func holeChunk(off uint64, n uint32) []byte {
	return be.AppendUint32(be.AppendUint64(nil, off), n)
}

// testConn is a client Conn in transmission over a socket pair, with the
// fake server on the other end.
func testConn(t testing.TB, structured bool) (*Conn, *fakeServer) {
	t.Helper()
	cc, sc := testenv.SocketPair(t)
	info := &ExportInfo{
		Size: 1 << 20, Flags: FlagHasFlags | FlagReadOnly,
		BlockSize:  BlockSize{Min: 1, Preferred: 4096, Max: 1 << 20},
		Structured: structured,
		Contexts:   map[uint32]string{7: ContextBaseAllocation},
	}
	c := newConn(cc, bufio.NewReader(cc), info, nil)
	t.Cleanup(func() { c.Close() })
	return c, newFakeServer(t, sc)
}

type readResult struct {
	buf []byte
	err error
}

func goRead(ctx context.Context, c *Conn, off int64, bufs ...[]byte) <-chan readResult {
	ch := make(chan readResult, 1)
	go func() {
		err := c.ReadVec(ctx, bufs, off)
		var all []byte
		for _, b := range bufs {
			all = append(all, b...)
		}
		ch <- readResult{all, err}
	}()
	return ch
}

func TestConnStructuredRead(t *testing.T) {
	c, s := testConn(t, true)
	res := goRead(context.Background(), c, 4096, make([]byte, 6), make([]byte, 10))
	r := s.readRequest()
	if r.Type != CmdRead || r.Offset != 4096 || r.Length != 16 || r.Flags != 0 {
		t.Fatalf("request %+v", r)
	}
	// Out of order, with a hole: the client reassembles.
	s.chunk(0, ChunkOffsetData, r.Cookie, dataChunk(4096+8, []byte("BBBBBBBB")))
	s.chunk(0, ChunkOffsetHole, r.Cookie, holeChunk(4096+4, 4))
	s.chunk(ReplyFlagDone, ChunkOffsetData, r.Cookie, dataChunk(4096, []byte("AAAA")))
	got := testenv.Receive(t, res, "the read's result")
	if got.err != nil || string(got.buf) != "AAAA\x00\x00\x00\x00BBBBBBBB" {
		t.Fatalf("got %q, %v", got.buf, got.err)
	}
}

func TestConnPipelinedOutOfOrder(t *testing.T) {
	c, s := testConn(t, false)
	first := goRead(context.Background(), c, 0, make([]byte, 4))
	r1 := s.readRequest()
	second := goRead(context.Background(), c, 100, make([]byte, 4))
	r2 := s.readRequest()
	if r1.Cookie == r2.Cookie {
		t.Fatal("two requests in flight share a cookie")
	}
	s.write(append(AppendSimpleReply(nil, 0, r2.Cookie), "2222"...))
	s.write(append(AppendSimpleReply(nil, 0, r1.Cookie), "1111"...))
	if g := testenv.Receive(t, first, "the first read's result"); g.err != nil || string(g.buf) != "1111" {
		t.Fatalf("first: %q %v", g.buf, g.err)
	}
	if g := testenv.Receive(t, second, "the second read's result"); g.err != nil || string(g.buf) != "2222" {
		t.Fatalf("second: %q %v", g.buf, g.err)
	}
}

func TestConnRequestErrorsKeepConnection(t *testing.T) {
	c, s := testConn(t, true)
	res := goRead(context.Background(), c, 8192, make([]byte, 4096))
	r := s.readRequest()
	s.chunk(0, ChunkOffsetData, r.Cookie, dataChunk(8192, make([]byte, 512)))
	s.chunk(ReplyFlagDone, ChunkErrorOffset, r.Cookie, AppendErrorChunkPayload(nil, EIO, "bad sector", 8192+512))
	g := testenv.Receive(t, res, "the read's result")
	var re *RequestError
	if !errors.As(g.err, &re) || re.Errno != EIO || re.Offset != 8192+512 || re.Msg != "bad sector" {
		t.Fatalf("got %v", g.err)
	}
	if !errors.Is(g.err, syscall.EIO) {
		t.Fatalf("a server EIO must match syscall.EIO: %v", g.err)
	}
	if !strings.Contains(g.err.Error(), "offset 8704") {
		t.Fatalf("error does not name the offset: %v", g.err)
	}
	// The connection lives on.
	res = goRead(context.Background(), c, 0, make([]byte, 3))
	r = s.readRequest()
	s.chunk(ReplyFlagDone, ChunkOffsetData, r.Cookie, dataChunk(0, []byte("ok!")))
	if g := testenv.Receive(t, res, "the read's result"); g.err != nil || string(g.buf) != "ok!" {
		t.Fatalf("after error: %q %v", g.buf, g.err)
	}
}

func TestConnSimpleErrors(t *testing.T) {
	c, s := testConn(t, false)
	res := goRead(context.Background(), c, 0, make([]byte, 4))
	r := s.readRequest()
	s.write(AppendSimpleReply(nil, 1234, r.Cookie)) // unknown errno: EINVAL to the caller
	g := testenv.Receive(t, res, "the read's result")
	if !errors.Is(g.err, syscall.EINVAL) {
		t.Fatalf("got %v", g.err)
	}
	res = goRead(context.Background(), c, 0, make([]byte, 2))
	r = s.readRequest()
	s.write(append(AppendSimpleReply(nil, 0, r.Cookie), "hi"...))
	if g := testenv.Receive(t, res, "the read's result"); g.err != nil || string(g.buf) != "hi" {
		t.Fatalf("%q %v", g.buf, g.err)
	}
}

// Every violation of the protocol kills the connection, and the request
// fails instead of returning wrong data.
func TestConnProtocolViolations(t *testing.T) {
	for _, c := range []struct {
		name       string
		structured bool
		reply      func(s *fakeServer, cookie uint64)
	}{
		{"unknown cookie", true, func(s *fakeServer, k uint64) {
			s.chunk(ReplyFlagDone, ChunkNone, k+1000, nil)
		}},
		{"bad magic", true, func(s *fakeServer, k uint64) { s.write(make([]byte, 20)) }},
		{"overlapping chunks", true, func(s *fakeServer, k uint64) {
			s.chunk(0, ChunkOffsetData, k, dataChunk(0, []byte("abcd")))
			s.chunk(ReplyFlagDone, ChunkOffsetData, k, dataChunk(2, []byte("cdef")))
		}},
		{"chunk past the request", true, func(s *fakeServer, k uint64) {
			s.chunk(ReplyFlagDone, ChunkOffsetData, k, dataChunk(4, []byte("abcdefgh")))
		}},
		{"chunk before the request", true, func(s *fakeServer, k uint64) {
			s.chunk(ReplyFlagDone, ChunkOffsetHole, k, holeChunk(1<<40, 8))
		}},
		{"gap at done", true, func(s *fakeServer, k uint64) {
			s.chunk(ReplyFlagDone, ChunkOffsetData, k, dataChunk(0, []byte("abcd")))
		}},
		{"simple reply to a structured read", true, func(s *fakeServer, k uint64) {
			s.write(append(AppendSimpleReply(nil, 0, k), "12345678"...))
		}},
		{"none without done", true, func(s *fakeServer, k uint64) {
			s.chunk(0, ChunkNone, k, nil)
		}},
		{"unknown non-error chunk", true, func(s *fakeServer, k uint64) {
			s.chunk(ReplyFlagDone, ChunkType(77), k, []byte{1})
		}},
		{"hole of length zero", true, func(s *fakeServer, k uint64) {
			s.chunk(ReplyFlagDone, ChunkOffsetHole, k, holeChunk(0, 0))
		}},
		{"block status to a read", true, func(s *fakeServer, k uint64) {
			s.chunk(ReplyFlagDone, ChunkBlockStatus, k, AppendBlockStatusPayload(nil, 7, []WireExtent{{8, 0}}))
		}},
		{"error with errno 0", true, func(s *fakeServer, k uint64) {
			s.chunk(ReplyFlagDone, ChunkError, k, AppendErrorChunkPayload(nil, 0, "", -1))
		}},
		{"server hangs up", false, func(s *fakeServer, k uint64) { s.c.Close() }},
		{"truncated payload", false, func(s *fakeServer, k uint64) {
			s.write(append(AppendSimpleReply(nil, 0, k), "1234"...))
			s.c.Close()
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			conn, s := testConn(t, c.structured)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			res := goRead(ctx, conn, 0, make([]byte, 8))
			r := s.readRequest()
			c.reply(s, r.Cookie)
			g := testenv.Receive(t, res, "the read's result")
			var ce *ConnError
			if !errors.As(g.err, &ce) {
				t.Fatalf("got %v, want a connection error", g.err)
			}
			select {
			case <-conn.Dead():
			case <-ctx.Done():
				t.Fatal("connection still alive after a protocol violation")
			}
			if err := conn.ReadVec(ctx, [][]byte{make([]byte, 1)}, 0); err == nil {
				t.Fatal("a dead connection accepted a request")
			}
		})
	}
}

// A caller that gives up must never find its buffer written afterwards,
// and the connection must stay usable.
func TestConnAbandonedRead(t *testing.T) {
	c, s := testConn(t, true)
	ctx, cancel := context.WithCancel(context.Background())
	buf := make([]byte, 8)
	res := goRead(ctx, c, 0, buf)
	r := s.readRequest()
	cancel()
	if g := testenv.Receive(t, res, "the read's result"); !errors.Is(g.err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", g.err)
	}
	s.chunk(ReplyFlagDone, ChunkOffsetData, r.Cookie, dataChunk(0, []byte("LATEDATA")))
	// A second read proves the late reply was consumed in step.
	res = goRead(context.Background(), c, 16, make([]byte, 2))
	r2 := s.readRequest()
	s.chunk(ReplyFlagDone, ChunkOffsetData, r2.Cookie, dataChunk(16, []byte("ok")))
	if g := testenv.Receive(t, res, "the read's result"); g.err != nil || string(g.buf) != "ok" {
		t.Fatalf("after an abandoned read: %q %v", g.buf, g.err)
	}
	if !bytes.Equal(buf, make([]byte, 8)) {
		t.Fatalf("abandoned buffer was written: %q", buf)
	}
}

// Replies are read by the callers waiting for them, so a connection
// nobody uses reads only through its watcher: a server that hangs up on
// an idle connection must still make it dead (and the pool reconnect)
// within about idleWatch, without a request.
func TestConnIdleHangUpIsNoticed(t *testing.T) {
	c, s := testConn(t, true)
	s.c.Close()
	select {
	case <-c.Dead():
	case <-time.After(10 * idleWatch):
		t.Fatalf("an idle connection whose server hung up is still alive after %v", 10*idleWatch)
	}
	var ce *ConnError
	if err := c.ReadVec(context.Background(), [][]byte{make([]byte, 8)}, 0); !errors.As(err, &ce) {
		t.Fatalf("a read on it: got %v, want a connection error", err)
	}
}

// A caller that reads replies for others and for itself: three reads in
// flight, replies in reverse order, the first two callers give up before
// theirs come. Whoever reads, each surviving caller gets its own bytes
// and no abandoned buffer is written.
func TestConnLeaderReadsForOthers(t *testing.T) {
	c, s := testConn(t, true)
	ctx0, cancel0 := context.WithCancel(context.Background())
	ctx1, cancel1 := context.WithCancel(context.Background())
	b0, b1 := make([]byte, 4), make([]byte, 4)
	r0 := goRead(ctx0, c, 0, b0)
	q0 := s.readRequest()
	r1 := goRead(ctx1, c, 4, b1)
	q1 := s.readRequest()
	r2 := goRead(context.Background(), c, 8, make([]byte, 4))
	q2 := s.readRequest()
	cancel0()
	cancel1()
	for _, r := range []<-chan readResult{r0, r1} {
		if g := testenv.Receive(t, r, "the read's result"); !errors.Is(g.err, context.Canceled) {
			t.Fatalf("a cancelled read: got %v, want context.Canceled", g.err)
		}
	}
	s.chunk(ReplyFlagDone, ChunkOffsetData, q2.Cookie, dataChunk(8, []byte("CCCC")))
	s.chunk(ReplyFlagDone, ChunkOffsetData, q1.Cookie, dataChunk(4, []byte("BBBB")))
	s.chunk(ReplyFlagDone, ChunkOffsetData, q0.Cookie, dataChunk(0, []byte("AAAA")))
	if g := testenv.Receive(t, r2, "the third read's result"); g.err != nil || string(g.buf) != "CCCC" {
		t.Fatalf("the surviving read: %q %v", g.buf, g.err)
	}
	// A fourth read proves the abandoned replies were consumed in step.
	r3 := goRead(context.Background(), c, 12, make([]byte, 2))
	q3 := s.readRequest()
	s.chunk(ReplyFlagDone, ChunkOffsetData, q3.Cookie, dataChunk(12, []byte("ok")))
	if g := testenv.Receive(t, r3, "the fourth read's result"); g.err != nil || string(g.buf) != "ok" {
		t.Fatalf("after abandoned reads: %q %v", g.buf, g.err)
	}
	if string(b0)+string(b1) != string(make([]byte, 8)) {
		t.Fatalf("abandoned buffers were written: %q %q", b0, b1)
	}
}

// A caller that gives up on a reply the server stalled in the middle of
// must return, and the connection go after stallGrace, whoever reads the
// reply: the caller itself (it was reading when it gave up) or, when it
// gave up before, the watcher, which drops the payload. Otherwise the
// reader waits until the server moves, for ever.
func TestConnGivesUpOnAStalledReply(t *testing.T) {
	stalled := func(s *fakeServer, cookie uint64) {
		payload := dataChunk(0, []byte("abcdefgh"))
		hdr := AppendChunkHeader(nil, ReplyFlagDone, ChunkOffsetData, cookie, uint32(len(payload)))
		s.write(append(hdr, payload[:len(payload)-3]...)) // 3 bytes short
	}
	dead := func(t *testing.T, c *Conn) {
		select {
		case <-c.Dead():
		case <-time.After(10 * stallGrace):
			t.Fatal("the connection with a reply cut in the middle is still alive")
		}
	}
	t.Run("caller reading", func(t *testing.T) {
		started := make(chan struct{}, 1)
		testHookReplyStarts = func() {
			select {
			case started <- struct{}{}:
			default:
			}
		}
		t.Cleanup(func() { testHookReplyStarts = nil })
		c, s := testConn(t, true)
		ctx, cancel := context.WithCancel(context.Background())
		res := goRead(ctx, c, 0, make([]byte, 8))
		stalled(s, s.readRequest().Cookie)
		testenv.Receive(t, started, "the readers to start")
		cancel()
		select {
		case g := <-res:
			if g.err == nil {
				t.Fatal("a read whose reply stalled succeeded")
			}
		case <-time.After(10 * stallGrace):
			t.Fatalf("a caller that gave up still waits on a stalled reply after %v", 10*stallGrace)
		}
		dead(t, c)
	})
	t.Run("caller gone", func(t *testing.T) {
		c, s := testConn(t, true)
		ctx, cancel := context.WithCancel(context.Background())
		res := goRead(ctx, c, 0, make([]byte, 8))
		r := s.readRequest()
		cancel()
		if g := testenv.Receive(t, res, "the read's result"); !errors.Is(g.err, context.Canceled) {
			t.Fatalf("got %v, want context.Canceled", g.err)
		}
		stalled(s, r.Cookie)
		dead(t, c)
	})
}

// No write-type command can leave a client connection.
func TestConnRefusesWrites(t *testing.T) {
	c, s := testConn(t, true)
	for _, cmd := range []Cmd{CmdWrite, CmdTrim, CmdWriteZeroes, CmdResize, CmdFlush, CmdCache, Cmd(99)} {
		if _, err := c.start(context.Background(), time.Time{}, cmd, 0, 0, 512, nil); !errors.Is(err, ErrWriteRefused) {
			t.Errorf("%s: got %v, want ErrWriteRefused", cmd, err)
		}
	}
	// Nothing reached the server: the next bytes it sees are this READ.
	res := goRead(context.Background(), c, 0, make([]byte, 1))
	if r := s.readRequest(); r.Type != CmdRead {
		t.Fatalf("server saw %s first", r.Type)
	} else {
		s.chunk(ReplyFlagDone, ChunkOffsetData, r.Cookie, dataChunk(0, []byte("x")))
	}
	if g := testenv.Receive(t, res, "the read's result"); g.err != nil {
		t.Fatal(g.err)
	}
}

func TestConnBlockStatus(t *testing.T) {
	c, s := testConn(t, true)
	type res struct {
		ext []Extent
		err error
	}
	ch := make(chan res, 1)
	go func() {
		ext, err := c.BlockStatus(context.Background(), 1<<19, 1<<19)
		ch <- res{ext, err}
	}()
	r := s.readRequest()
	if r.Type != CmdBlockStatus || r.Offset != 1<<19 || r.Length != 1<<19 {
		t.Fatalf("request %+v", r)
	}
	// A context the client did not ask for is ignored; the last extent
	// may run past the request and is clipped to the export.
	s.chunk(0, ChunkBlockStatus, r.Cookie, AppendBlockStatusPayload(nil, 99, []WireExtent{{512, 0}}))
	s.chunk(ReplyFlagDone, ChunkBlockStatus, r.Cookie, AppendBlockStatusPayload(nil, 7, []WireExtent{{65536, 0}, {1 << 20, StateHole | StateZero}}))
	g := testenv.Receive(t, ch, "the block status result")
	want := []Extent{{1 << 19, 65536, 0}, {1<<19 + 65536, 1<<19 - 65536, StateHole | StateZero}}
	if g.err != nil || len(g.ext) != 2 || g.ext[0] != want[0] || g.ext[1] != want[1] {
		t.Fatalf("got %v %v, want %v", g.ext, g.err, want)
	}
	if !g.ext[1].Zero() || g.ext[0].Zero() {
		t.Fatal("Zero() wrong")
	}
}

func TestConnCloseFailsPending(t *testing.T) {
	c, s := testConn(t, true)
	res := goRead(context.Background(), c, 0, make([]byte, 8))
	s.readRequest()
	go c.Close()
	if g := testenv.Receive(t, res, "the read's result"); !errors.Is(g.err, ErrClosed) {
		t.Fatalf("got %v, want ErrClosed", g.err)
	}
	// Close sent NBD_CMD_DISC.
	if r := s.readRequest(); r.Type != CmdDisc {
		t.Fatalf("after close the server saw %s, want DISC", r.Type)
	}
}

// listenFake starts a listener whose first connection is scripted by fn
// (later ones are closed at once).
func listenFake(t *testing.T, fn func(s *fakeServer)) *URI {
	return listenPool(t, func(n int, s *fakeServer) {
		if n == 1 {
			fn(s)
		}
	})
}

// listenPool serves every connection to a new Unix socket with fn, each
// in its own goroutine; n counts connections from 1.
func listenPool(t *testing.T, fn func(n int, s *fakeServer)) *URI {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "s")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var (
		wg      sync.WaitGroup
		mu      sync.Mutex
		servers []*fakeServer
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := 1; ; n++ {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s := newFakeServer(t, c)
			mu.Lock()
			servers = append(servers, s)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				fn(n, s)
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, s := range servers {
			s.stopped.Store(true)
			s.c.Close()
		}
		mu.Unlock()
		testenv.Wait(t, &wg, "the fake servers to end")
	})
	u, err := ParseURI("nbd+unix:///disk?socket=" + path)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

func TestDialNegotiatesEverything(t *testing.T) {
	u := listenFake(t, func(s *fakeServer) {
		if cf := s.greet(HandshakeFixedNewstyle | HandshakeNoZeroes); cf != ClientFixedNewstyle|ClientNoZeroes {
			t.Errorf("client flags %#x", cf)
		}
		s.expectOption(OptStructuredReply)
		s.reply(OptStructuredReply, RepAck, nil)
		if d := s.expectOption(OptXReadOnly); len(d) != 0 {
			t.Errorf("promise carries %d bytes", len(d))
		}
		s.reply(OptXReadOnly, RepErrUnsup, []byte("unknown option"))
		req, err := ParseMetaContextRequest(s.expectOption(OptSetMetaContext))
		if err != nil || req.Export != "disk" || len(req.Queries) != 1 || req.Queries[0] != ContextBaseAllocation {
			t.Errorf("meta context request %+v %v", req, err)
		}
		s.reply(OptSetMetaContext, RepMetaContext, AppendMetaContextReply(nil, 5, ContextBaseAllocation))
		s.reply(OptSetMetaContext, RepAck, nil)
		er, err := ParseExportRequest(s.expectOption(OptGo))
		if err != nil || er.Name != "disk" {
			t.Errorf("GO %+v %v", er, err)
		}
		s.reply(OptGo, RepInfo, AppendInfoText(nil, InfoName, "disk@s4"))
		s.reply(OptGo, RepInfo, []byte{0, 42, 1, 2}) // unknown info: ignored
		s.reply(OptGo, RepInfo, AppendInfoBlockSize(nil, BlockSize{512, 4096, 1 << 20}))
		s.reply(OptGo, RepInfo, AppendInfoExport(nil, 1<<20, FlagHasFlags|FlagReadOnly|FlagCanMultiConn))
		s.reply(OptGo, RepAck, nil)
		r := s.readRequest()
		if r.Type != CmdDisc {
			t.Errorf("got %s, want DISC", r.Type)
		}
	})
	c, err := Dial(context.Background(), u, DialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	info := c.Info()
	if info.CanonicalName != "disk@s4" || info.Size != 1<<20 || !info.ReadOnly() || !info.CanMultiConn() ||
		!info.Structured || info.Promise || info.PromiseReply != RepErrUnsup || info.BlockSize.Min != 512 || !info.HasBlockSize {
		t.Fatalf("info %+v", info)
	}
	if id, ok := info.ContextID(ContextBaseAllocation); !ok || id != 5 {
		t.Fatalf("context id %d %v", id, ok)
	}
	c.Close()
}

func TestDialFallsBackToExportName(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		u := listenFake(t, func(s *fakeServer) {
			flags := HandshakeFixedNewstyle
			if noZeroes {
				flags |= HandshakeNoZeroes
			}
			s.greet(flags)
			s.expectOption(OptStructuredReply)
			s.reply(OptStructuredReply, RepErrUnsup, nil)
			s.expectOption(OptXReadOnly)
			s.reply(OptXReadOnly, RepAck, nil)
			s.expectOption(OptGo)
			s.reply(OptGo, RepErrUnsup, nil)
			if name := s.expectOption(OptExportName); string(name) != "disk" {
				t.Errorf("EXPORT_NAME %q", name)
			}
			b := be.AppendUint16(be.AppendUint64(nil, 4096), uint16(FlagHasFlags))
			if !noZeroes {
				b = append(b, make([]byte, 124)...)
			}
			s.write(b)
			r := s.readRequest()
			if r.Length != 512 {
				t.Errorf("read of %d bytes, want 512 (the default minimum block)", r.Length)
			}
			s.write(append(AppendSimpleReply(nil, 0, r.Cookie), make([]byte, 512)...))
			s.readRequest() // DISC
		})
		c, err := Dial(context.Background(), u, DialOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		if info := c.Info(); !info.ExportName || info.Size != 4096 || info.Structured || !info.Promise {
			t.Fatalf("info %+v", info)
		}
		buf := make([]byte, 512)
		if err := c.ReadVec(context.Background(), [][]byte{buf}, 0); err != nil {
			t.Fatalf("read: %v", err)
		}
		c.Close()
	}
}

func TestDialErrors(t *testing.T) {
	for _, c := range []struct {
		name   string
		script func(s *fakeServer)
		want   string
	}{
		{"oldstyle", func(s *fakeServer) {
			s.write(be.AppendUint64(be.AppendUint64(nil, Magic), OldstyleMagic))
			s.write(make([]byte, 136))
		}, "oldstyle"},
		{"not nbd", func(s *fakeServer) { s.write([]byte("SSH-2.0-OpenSSH_9.2\r\n")) }, "does not speak NBD"},
		{"unknown export", func(s *fakeServer) {
			s.greet(HandshakeFixedNewstyle)
			s.expectOption(OptStructuredReply)
			s.reply(OptStructuredReply, RepAck, nil)
			s.expectOption(OptXReadOnly)
			s.reply(OptXReadOnly, RepErrUnsup, nil)
			s.expectOption(OptSetMetaContext)
			s.reply(OptSetMetaContext, RepErrUnknown, nil)
		}, `export "disk" does not exist`},
		{"tls required", func(s *fakeServer) {
			s.greet(HandshakeFixedNewstyle)
			s.expectOption(OptStructuredReply)
			s.reply(OptStructuredReply, RepErrTLSReqd, nil)
		}, "requires TLS"},
		{"wrong option echoed", func(s *fakeServer) {
			s.greet(HandshakeFixedNewstyle)
			s.expectOption(OptStructuredReply)
			s.reply(OptList, RepAck, nil)
		}, "protocol error"},
		{"huge reply", func(s *fakeServer) {
			s.greet(HandshakeFixedNewstyle)
			s.expectOption(OptStructuredReply)
			s.write(be.AppendUint32(be.AppendUint32(be.AppendUint32(be.AppendUint64(nil, OptReplyMagic), uint32(OptStructuredReply)), uint32(RepErrUnsup)), 1<<31))
		}, "protocol error"},
		{"go without export info", func(s *fakeServer) {
			s.greet(HandshakeFixedNewstyle)
			s.expectOption(OptStructuredReply)
			s.reply(OptStructuredReply, RepErrUnsup, nil)
			s.expectOption(OptXReadOnly)
			s.reply(OptXReadOnly, RepErrUnsup, nil)
			s.expectOption(OptGo)
			s.reply(OptGo, RepAck, nil)
		}, "without NBD_INFO_EXPORT"},
		{"hang up", func(s *fakeServer) { s.greet(HandshakeFixedNewstyle) }, "closed the connection"},
	} {
		t.Run(c.name, func(t *testing.T) {
			u := listenFake(t, c.script)
			_, err := Dial(context.Background(), u, DialOptions{HandshakeTimeout: 10 * time.Second})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want an error containing %q", err, c.want)
			}
		})
	}
}

func TestDialHandshakeTimeout(t *testing.T) {
	stall := make(chan struct{})
	u := listenFake(t, func(s *fakeServer) { <-stall })
	defer close(stall)
	start := time.Now()
	_, err := Dial(context.Background(), u, DialOptions{HandshakeTimeout: 200 * time.Millisecond})
	if err == nil || !strings.Contains(err.Error(), "did not complete the handshake") {
		t.Fatalf("got %v", err)
	}
	if time.Since(start) > 10*time.Second {
		t.Fatal("handshake timeout not honoured")
	}
}
