package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Conn is one client connection in the transmission phase. Requests are
// pipelined: any number may be in flight, written under one mutex, and
// replies are matched to requests by cookie (the shape of net/rpc's
// client). READ payloads are read from the socket straight into the
// caller's buffers.
//
// Replies are read leader/follower: a caller waiting for its reply takes
// the right to read (readTok) if nobody has it and reads replies, its own
// and others', until its own has come; the others wait for their reply or
// for the right. So a lone request's caller reads its own reply from the
// socket, and no other goroutine has to wake to hand it over, which is
// what a lone reader (a file system walk, a forensic tool) pays most for.
// While nobody waits, a watcher reads once a second (idleWatch), so a
// server that hangs up is noticed, and the pool reconnects, without a
// request.
//
// No timer, context or goroutine is made per request: the Go runtime
// wakes a thread for many of them (a timer earlier than the network
// poller's sleep, a goroutine watching a context that is not the
// standard library's, as go-fuse's is), a cost every random read would
// pay. Instead a guard looks at the calls in flight every guardInterval
// while there are any: it kicks a reading caller whose context has ended,
// and fails the connection once a call is past its deadline (checkCalls).
//
// Conn has no method that changes data: it can send READ, BLOCK_STATUS and
// DISC and nothing else, whatever the server advertises.
type Conn struct {
	nc       net.Conn
	br       *bufio.Reader
	info     *ExportInfo
	allocID  uint32 // id of base:allocation, valid if hasAlloc
	hasAlloc bool

	wmu  sync.Mutex // serializes request writes; protects wbuf
	wbuf [RequestHeaderLen]byte

	mu      sync.Mutex // protects following
	pending map[uint64]*call
	cookie  uint64
	err     error // why the connection is unusable; nil while it works

	// readTok holds the one right to read replies while nobody uses it.
	readTok chan struct{}
	// kickMu guards kickFor and the read deadline that kicks a reading
	// caller whose context ended out of its wait for the next reply.
	kickMu  sync.Mutex
	kickFor *call
	between bool // lead waits for a reply to start
	kicked  bool // the kick set the read deadline

	// guard runs checkCalls every guardInterval while calls are in
	// flight; guarding says it is armed.
	guard    *time.Timer
	guarding atomic.Bool
	writeDL  time.Time // the socket's write deadline; guarded by wmu

	dead     chan struct{} // closed when the connection has failed or closed
	inflight atomic.Int64  // bytes requested and not yet answered
	answered *answerClock  // the pool's time of the latest reply; nil outside a pool
}

// oldestDeadline returns the earliest deadline of the calls in flight.
func (c *Conn) oldestDeadline() (time.Time, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var first time.Time
	for _, cl := range c.pending {
		if !cl.deadline.IsZero() && (first.IsZero() || cl.deadline.Before(first)) {
			first = cl.deadline
		}
	}
	return first, !first.IsZero()
}

// idleWatch is how often the watcher reads when no caller does.
const idleWatch = time.Second

// callState tells whoever reads replies whether it may write into a
// call's buffers. Guarded by Conn.mu.
type callState uint8

const (
	callWaiting   callState = iota // caller waits; payload goes to its buffers
	callReceiving                  // the reader is copying into the buffers now
	callAbandoned                  // caller gave up; payload is discarded
)

type call struct {
	ctx      context.Context // the caller's: once it ends, the caller leaves
	deadline time.Time       // zero, or when the connection counts as stuck
	req      Request
	dst      scatter   // READ destination
	covered  spans     // READ: byte ranges received so far
	extents  []Extent  // BLOCK_STATUS result
	err      error     // the first error the reply reported
	state    callState // guarded by Conn.mu
	done     chan struct{}
}

// newConn starts the transmission phase on a negotiated connection.
func newConn(nc net.Conn, br *bufio.Reader, info *ExportInfo, answered *answerClock) *Conn {
	c := &Conn{
		answered: answered,
		nc:       nc,
		br:       br,
		info:     info,
		pending:  make(map[uint64]*call),
		dead:     make(chan struct{}),
		readTok:  make(chan struct{}, 1),
	}
	c.readTok <- struct{}{}
	c.allocID, c.hasAlloc = info.ContextID(ContextBaseAllocation)
	c.guard = time.AfterFunc(time.Hour, c.checkCalls)
	c.guard.Stop()
	go c.watchIdle()
	return c
}

// Info describes the export this connection serves.
func (c *Conn) Info() *ExportInfo { return c.info }

// Inflight is the number of bytes requested and not yet answered; the
// pool sends new work to the least loaded connection.
func (c *Conn) Inflight() int64 { return c.inflight.Load() }

// Dead is closed once the connection can no longer be used.
func (c *Conn) Dead() <-chan struct{} { return c.dead }

// Err returns why the connection died, or nil while it works.
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// ConnError is the error of a request whose connection failed. Requests
// failing with it may be retried on another connection.
type ConnError struct{ Err error }

func (e *ConnError) Error() string { return "nbd: connection lost: " + e.Err.Error() }
func (e *ConnError) Unwrap() error { return e.Err }

// start registers a request and writes it to the server. A zero deadline
// means none.
func (c *Conn) start(ctx context.Context, deadline time.Time, typ Cmd, flags CmdFlags, off uint64, length uint32, dst scatter) (*call, error) {
	// The one gate every request passes: a read-only client must not be
	// able to send anything that changes data.
	switch typ {
	case CmdRead, CmdBlockStatus:
	default:
		return nil, fmt.Errorf("%w (refused %s)", ErrWriteRefused, typ)
	}
	// dst is set before the request is visible to whoever reads replies:
	// the reply can arrive as soon as the header is written.
	cl := &call{ctx: ctx, deadline: deadline, req: Request{Flags: flags, Type: typ, Offset: off, Length: length}, dst: dst, done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, &ConnError{err}
	}
	c.cookie++
	cl.req.Cookie = c.cookie
	c.pending[cl.req.Cookie] = cl
	c.mu.Unlock()
	c.inflight.Add(int64(length))
	if !c.guarding.Load() && c.guarding.CompareAndSwap(false, true) {
		c.guard.Reset(guardInterval)
	}

	c.wmu.Lock()
	// A write blocked past the call's deadline ends when the guard kills
	// the connection; only a caller's own deadline needs the socket's.
	// Setting it only when it changes keeps timers out of the common case.
	if dl, _ := ctx.Deadline(); !dl.Equal(c.writeDL) {
		_ = c.nc.SetWriteDeadline(dl)
		c.writeDL = dl
	}
	cl.req.Encode(c.wbuf[:])
	_, err := c.nc.Write(c.wbuf[:])
	c.wmu.Unlock()
	if err != nil {
		// A partial header leaves the stream unusable: kill the
		// connection; whoever reads replies then fails this call too.
		c.fail(fmt.Errorf("sending %s: %w", typ, err))
	}
	return cl, nil
}

// wait waits for a call's reply or for ctx. A caller that gives up while
// the reader is copying into its buffers waits for the copy to stop, so
// its buffers are never written after it returns.
func (c *Conn) wait(ctx context.Context, cl *call) error {
	for ctx.Err() == nil {
		select {
		case <-cl.done:
			return cl.err
		case <-c.readTok:
			c.lead(ctx, cl)
			c.readTok <- struct{}{}
		case <-ctx.Done():
		}
	}
	c.mu.Lock()
	select {
	case <-cl.done:
		c.mu.Unlock()
		return cl.err
	default:
	}
	if cl.state != callReceiving {
		cl.state = callAbandoned
		c.mu.Unlock()
		return ctx.Err()
	}
	c.mu.Unlock()
	// The payload is arriving right now; from a live server that takes
	// microseconds. A server stalled mid-payload leaves the stream
	// useless anyway, so after a grace period the connection goes.
	t := time.NewTimer(stallGrace)
	defer t.Stop()
	select {
	case <-cl.done:
	case <-t.C:
		c.fail(errStalled)
		<-cl.done
	}
	return ctx.Err()
}

// fail marks the connection dead and unblocks its reader and writers.
func (c *Conn) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.kill()
}

// kill makes every read and write of the socket fail at once, after c.err
// is set; kickMu orders it after any deadline a reading caller clears.
// Whoever reads replies then shuts the connection down, and if nobody
// does, kill does.
func (c *Conn) kill() {
	c.kickMu.Lock()
	_ = c.nc.SetDeadline(time.Unix(1, 0))
	c.kickMu.Unlock()
	select {
	case <-c.readTok:
		c.shutdown(nil)
		c.readTok <- struct{}{}
	default:
	}
}

// Close ends the connection: NBD_CMD_DISC if it is healthy, then the
// socket. Requests still in flight fail with ErrClosed.
func (c *Conn) Close() error {
	c.mu.Lock()
	alive := c.err == nil
	if alive {
		c.err = ErrClosed
	}
	c.mu.Unlock()
	if alive {
		var b [RequestHeaderLen]byte
		c.wmu.Lock()
		_ = c.nc.SetWriteDeadline(time.Now().Add(time.Second))
		(&Request{Type: CmdDisc}).Encode(b[:])
		_, _ = c.nc.Write(b[:])
		c.wmu.Unlock()
	}
	c.kill()
	<-c.dead
	return nil
}

// lead reads replies, holding readTok, until cl's has come or the
// connection fails, or cl's ctx ends. When ctx ends while lead waits for
// a reply to start, the guard's kick (a read deadline in the past) stops
// the wait within guardInterval; in the middle of a reply the kick gives
// the reply stallGrace to end, as a caller waiting for another reader
// does, and then the connection goes: a reply cut in the middle leaves
// the stream unusable.
func (c *Conn) lead(ctx context.Context, cl *call) {
	defer c.setKick(nil, false)
	for ctx.Err() == nil {
		select {
		case <-cl.done:
			return
		default:
		}
		c.setKick(cl, true)
		if _, err := c.br.Peek(1); err != nil {
			if c.ownDeadline(err) {
				return // the kick: the caller abandons cl
			}
			c.shutdown(err)
			return
		}
		c.setKick(cl, false)
		if testHookReplyStarts != nil {
			testHookReplyStarts()
		}
		if err := c.readOne(); err != nil {
			if c.ownDeadline(err) {
				err = errStalled
			}
			c.shutdown(err)
			return
		}
	}
}

// errStalled ends a connection whose server stopped in the middle of a
// reply that nobody is waiting for any more (see stallGrace).
var errStalled = errors.New("server stalled in the middle of a reply")

// ownDeadline reports whether err is a read deadline this connection set
// for its own reasons (a kick or a stall grace), not kill's.
func (c *Conn) ownDeadline(err error) bool {
	return errors.Is(err, os.ErrDeadlineExceeded) && c.Err() == nil
}

// testHookReplyStarts, if set, runs when a reading caller has seen a
// reply start, before reading it.
var testHookReplyStarts func()

// stallGrace is how long a reply already arriving may take once the
// caller it belongs to has given up.
const stallGrace = time.Second

// kick ends lead's wait for cl after cl's ctx ended (see lead; the guard
// calls it).
func (c *Conn) kick(cl *call) {
	c.kickMu.Lock()
	defer c.kickMu.Unlock()
	if c.kickFor != cl || c.kicked || c.Err() != nil {
		return // not cl's read, or kicked already: its grace must not grow
	}
	if c.between {
		_ = c.nc.SetReadDeadline(time.Unix(1, 0))
	} else {
		_ = c.nc.SetReadDeadline(time.Now().Add(stallGrace))
	}
	c.kicked = true
}

// setKick says what lead is doing for cl: waiting for a reply to start
// (between) or reading one; cl nil when lead ends. A kick that came stays
// in force as a grace deadline if a reply starts after it, and is
// cleared otherwise, unless the connection is being killed (kill's
// deadline must stand).
func (c *Conn) setKick(cl *call, between bool) {
	c.kickMu.Lock()
	defer c.kickMu.Unlock()
	c.kickFor, c.between = cl, between
	if !c.kicked || c.Err() != nil {
		return
	}
	if cl != nil && !between {
		_ = c.nc.SetReadDeadline(time.Now().Add(stallGrace))
		return
	}
	_ = c.nc.SetReadDeadline(time.Time{})
	c.kicked = false
}

// guardInterval is how often the guard looks at the calls in flight: at
// most how late a reading caller whose context ended is kicked, and a
// connection whose server missed a call's deadline fails.
const guardInterval = 50 * time.Millisecond

// errNoReply is why a connection failed on which a call passed its
// deadline: a server that does not answer in time counts as stuck, and
// the pool replaces the connection. Client.do turns it into EIO for the
// call whose deadline passed; it never reaches a caller itself.
var errNoReply = errors.New("nbd: the server did not answer in time")

// checkCalls is the guard. It fails the connection once a call is past
// its deadline, kicks a reading caller whose context ended, and runs
// again while calls are in flight.
func (c *Conn) checkCalls() {
	now := time.Now()
	c.mu.Lock()
	late, busy := false, len(c.pending) > 0
	for _, cl := range c.pending {
		if !cl.deadline.IsZero() && now.After(cl.deadline) {
			late = true
			break
		}
	}
	c.mu.Unlock()
	if late {
		c.fail(errNoReply)
		return
	}
	c.kickMu.Lock()
	cl := c.kickFor
	c.kickMu.Unlock()
	if cl != nil && cl.ctx.Err() != nil {
		c.kick(cl)
	}
	if !busy {
		c.guarding.Store(false)
		// A call that started since the count saw the guard armed.
		c.mu.Lock()
		busy = len(c.pending) > 0
		c.mu.Unlock()
		if !busy || !c.guarding.CompareAndSwap(false, true) {
			return
		}
	}
	c.guard.Reset(guardInterval)
}

// watchIdle reads replies while no caller does, once every idleWatch: a
// server that hangs up on an idle connection is then noticed. A reply
// that arrives meanwhile is read here and handed to its caller as before
// leader/follower reading, at most once a watch.
func (c *Conn) watchIdle() {
	t := time.NewTicker(idleWatch)
	defer t.Stop()
	for {
		select {
		case <-c.dead:
			return
		case <-t.C:
		}
		select {
		case <-c.readTok:
		default:
			continue // a caller reads
		}
		if err := c.readOne(); err != nil {
			c.shutdown(err)
		}
		c.readTok <- struct{}{}
	}
}

// readOne reads one reply chunk and hands it to its call.
func (c *Conn) readOne() error {
	var hbuf [ChunkHeaderLen]byte
	h, err := ReadReplyHeader(c.br, &hbuf)
	if err != nil {
		return err
	}
	return c.handleReply(h)
}

// shutdown ends the connection after a read failed (err) or it was killed
// (err nil: c.err says why): it fails every call in flight and closes
// dead. Only the holder of readTok calls it; the first call does the work.
func (c *Conn) shutdown(err error) {
	c.mu.Lock()
	if c.pending == nil {
		c.mu.Unlock()
		return
	}
	if c.err == nil {
		if err == nil || errors.Is(err, io.EOF) {
			err = errors.New("server closed the connection")
		}
		c.err = err
	}
	final := c.err
	pending := c.pending
	c.pending = nil
	c.mu.Unlock()
	c.guard.Stop()
	_ = c.nc.Close()
	for _, cl := range pending {
		if errors.Is(final, ErrClosed) {
			cl.err = ErrClosed
		} else {
			cl.err = &ConnError{final}
		}
		close(cl.done)
	}
	close(c.dead)
}

// maxStatusPayload bounds a BLOCK_STATUS chunk: the spec's 2^20 extents.
const maxStatusPayload = 4 + 8<<20

// maxErrorPayload bounds an error chunk: errno, a 4096-byte message and
// an offset, with room for error types this code does not know.
const maxErrorPayload = 64 << 10

func (c *Conn) handleReply(h ReplyHeader) error {
	c.mu.Lock()
	cl := c.pending[h.Cookie]
	c.mu.Unlock()
	if cl == nil {
		return protoErrorf("reply for cookie %d, which is not in flight", h.Cookie)
	}
	isRead := cl.req.Type == CmdRead
	if !h.Structured {
		if isRead && c.info.Structured {
			return protoErrorf("simple reply to READ after structured replies were negotiated")
		}
		if h.Errno != 0 {
			cl.err = c.requestError(cl, h.Errno, "", cl.req.Offset)
		} else if isRead {
			if err := c.receive(cl, 0, cl.req.Length); err != nil {
				return err
			}
			cl.covered.addAll(cl.req.Length)
		} else if cl.req.Type == CmdBlockStatus {
			return protoErrorf("simple success reply to BLOCK_STATUS")
		}
		c.finish(cl)
		return nil
	}
	done := h.Flags&ReplyFlagDone != 0
	switch h.Type {
	case ChunkNone:
		if h.Length != 0 || !done {
			return protoErrorf("NONE chunk with length %d and flags %#x", h.Length, h.Flags)
		}
	case ChunkOffsetData:
		if !isRead || h.Length < 9 {
			return protoErrorf("OFFSET_DATA chunk of %d bytes for %s", h.Length, cl.req.Type)
		}
		var ob [8]byte
		if _, err := io.ReadFull(c.br, ob[:]); err != nil {
			return err
		}
		rel, n, err := cl.place(be.Uint64(ob[:]), uint64(h.Length-8))
		if err != nil {
			return err
		}
		if err := c.receive(cl, rel, n); err != nil {
			return err
		}
	case ChunkOffsetHole:
		if !isRead || h.Length != 12 {
			return protoErrorf("OFFSET_HOLE chunk of %d bytes for %s", h.Length, cl.req.Type)
		}
		var hb [12]byte
		if _, err := io.ReadFull(c.br, hb[:]); err != nil {
			return err
		}
		size := be.Uint32(hb[8:])
		if size == 0 {
			return protoErrorf("OFFSET_HOLE of length 0")
		}
		rel, n, err := cl.place(be.Uint64(hb[:]), uint64(size))
		if err != nil {
			return err
		}
		c.zero(cl, rel, n)
	case ChunkBlockStatus:
		if cl.req.Type != CmdBlockStatus || h.Length > maxStatusPayload {
			return protoErrorf("BLOCK_STATUS chunk of %d bytes for %s", h.Length, cl.req.Type)
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(c.br, p); err != nil {
			return err
		}
		id, ext, err := ParseBlockStatusPayload(p)
		if err != nil {
			return err
		}
		if c.hasAlloc && id == c.allocID {
			if cl.extents != nil {
				return protoErrorf("two BLOCK_STATUS chunks for one context")
			}
			cl.extents = c.extents(cl.req.Offset, ext)
		}
	default:
		if !h.Type.IsError() {
			return protoErrorf("unknown chunk type %s", h.Type)
		}
		if h.Length > maxErrorPayload {
			return protoErrorf("error chunk of %d bytes", h.Length)
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(c.br, p); err != nil {
			return err
		}
		ec, err := ParseErrorChunk(h.Type, p)
		if err != nil {
			return err
		}
		off := cl.req.Offset
		if ec.HasOffset {
			if ec.Offset < cl.req.Offset || ec.Offset-cl.req.Offset >= uint64(cl.req.Length) {
				return protoErrorf("ERROR_OFFSET %d outside the request [%d, +%d)", ec.Offset, cl.req.Offset, cl.req.Length)
			}
			off = ec.Offset
		}
		if cl.err == nil {
			cl.err = c.requestError(cl, ec.Errno, ec.Msg, off)
		}
	}
	if done {
		if cl.err == nil {
			if isRead && cl.covered.total != uint64(cl.req.Length) {
				return protoErrorf("READ reply covered %d of %d bytes", cl.covered.total, cl.req.Length)
			}
			if cl.req.Type == CmdBlockStatus && c.hasAlloc && cl.extents == nil {
				return protoErrorf("BLOCK_STATUS reply without base:allocation extents")
			}
		}
		c.finish(cl)
	}
	return nil
}

func (c *Conn) requestError(cl *call, errno Errno, msg string, off uint64) error {
	return &RequestError{Cmd: cl.req.Type, Offset: off, Length: cl.req.Length, Errno: errno, Msg: msg}
}

// place checks that a content chunk lies inside the request and overlaps
// no earlier chunk, and returns its position relative to the request.
func (cl *call) place(off, n uint64) (uint64, uint32, error) {
	start := cl.req.Offset
	if off < start || off-start > uint64(cl.req.Length) || n > uint64(cl.req.Length)-(off-start) {
		return 0, 0, protoErrorf("chunk [%d, +%d) outside the READ [%d, +%d)", off, n, start, cl.req.Length)
	}
	rel := off - start
	if !cl.covered.add(rel, n) {
		return 0, 0, protoErrorf("chunk [%d, +%d) overlaps an earlier chunk", off, n)
	}
	return rel, uint32(n), nil
}

// receive reads n payload bytes into the call's buffers at rel, or drops
// them if the caller has gone.
func (c *Conn) receive(cl *call, rel uint64, n uint32) error {
	c.mu.Lock()
	if cl.state == callAbandoned {
		c.mu.Unlock()
		return c.discardAbandoned(n)
	}
	cl.state = callReceiving
	c.mu.Unlock()
	err := cl.dst.readFrom(c.br, rel, n)
	c.mu.Lock()
	if cl.state == callReceiving {
		cl.state = callWaiting
	}
	c.mu.Unlock()
	return err
}

// discardAbandoned drops n payload bytes of a call whose caller has gone.
// Nobody waits for them, so a server that stalls in the middle gets
// stallGrace, as it does while their caller waits to leave, and then the
// connection goes (whoever reads here, a caller or the watcher, would
// otherwise wait for ever).
func (c *Conn) discardAbandoned(n uint32) error {
	c.kickMu.Lock()
	if c.Err() == nil {
		_ = c.nc.SetReadDeadline(time.Now().Add(stallGrace))
	}
	c.kickMu.Unlock()
	err := discard(c.br, int64(n))
	c.kickMu.Lock()
	if c.Err() == nil {
		_ = c.nc.SetReadDeadline(time.Time{})
	}
	c.kickMu.Unlock()
	if c.ownDeadline(err) {
		err = errStalled
	}
	return err
}

// zero fills a hole the server reported, unless the caller has gone.
func (c *Conn) zero(cl *call, rel uint64, n uint32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cl.state != callAbandoned {
		cl.dst.zero(rel, n)
	}
}

// finish completes a call and wakes its caller.
func (c *Conn) finish(cl *call) {
	c.mu.Lock()
	delete(c.pending, cl.req.Cookie)
	c.mu.Unlock()
	c.inflight.Add(-int64(cl.req.Length))
	if c.answered != nil {
		c.answered.mark()
	}
	close(cl.done)
}

// Extent is a range of the export with its base:allocation status.
type Extent struct {
	Offset, Length int64
	Flags          uint32 // StateHole, StateZero
}

// Zero reports whether the extent reads as zeros.
func (e Extent) Zero() bool { return e.Flags&StateZero != 0 }

// Hole reports whether the extent is unallocated.
func (e Extent) Hole() bool { return e.Flags&StateHole != 0 }

// extents turns wire extents into absolute ones clipped to the export.
func (c *Conn) extents(off uint64, ext []WireExtent) []Extent {
	out := make([]Extent, 0, len(ext))
	pos := off
	for _, e := range ext {
		if pos >= c.info.Size {
			break
		}
		n := uint64(e.Length)
		if n > c.info.Size-pos {
			n = c.info.Size - pos
		}
		out = append(out, Extent{Offset: int64(pos), Length: int64(n), Flags: e.Flags})
		pos += n
	}
	return out
}

// checkRange validates a request against the export's size and the
// server's block-size limits: the callers (the pool) split and align, so
// a failure here is a bug, not a server problem.
func (c *Conn) checkRange(off int64, n int64, maxLen int64) error {
	min := int64(c.info.BlockSize.Min)
	size := int64(c.info.Size)
	switch {
	case off < 0 || n <= 0 || off > size || n > size-off:
		return fmt.Errorf("nbd: request [%d, +%d) outside the export of %d bytes", off, n, size)
	case n > maxLen:
		return fmt.Errorf("nbd: request of %d bytes exceeds the maximum of %d", n, maxLen)
	case off%min != 0 || (n%min != 0 && off+n != size):
		return fmt.Errorf("nbd: request [%d, +%d) not aligned to the minimum block size %d", off, n, min)
	}
	return nil
}

// ReadVec reads len(bufs[0])+...+len(bufs[k]) bytes at off into bufs in
// order, with one READ. The range must respect the server's limits.
func (c *Conn) ReadVec(ctx context.Context, bufs [][]byte, off int64) error {
	return c.readVec(ctx, time.Time{}, bufs, off)
}

// readVec is ReadVec with a deadline past which the connection counts as
// stuck and fails (zero: none).
func (c *Conn) readVec(ctx context.Context, deadline time.Time, bufs [][]byte, off int64) error {
	var n int64
	for _, b := range bufs {
		n += int64(len(b))
	}
	if err := c.checkRange(off, n, int64(c.info.BlockSize.Max)); err != nil {
		return err
	}
	cl, err := c.start(ctx, deadline, CmdRead, 0, uint64(off), uint32(n), bufs)
	if err != nil {
		return err
	}
	return c.wait(ctx, cl)
}

// BlockStatus asks for the base:allocation extents from off, covering at
// most length bytes (the server may answer with less).
func (c *Conn) BlockStatus(ctx context.Context, off, length int64) ([]Extent, error) {
	return c.blockStatus(ctx, time.Time{}, off, length)
}

// blockStatus is BlockStatus with a deadline, as readVec.
func (c *Conn) blockStatus(ctx context.Context, deadline time.Time, off, length int64) ([]Extent, error) {
	if !c.hasAlloc {
		return nil, ErrNoAllocation
	}
	if length > 1<<31 {
		length = 1 << 31 // u32 on the wire; keep it aligned
	}
	if err := c.checkRange(off, length, 1<<32-1); err != nil {
		return nil, err
	}
	cl, err := c.start(ctx, deadline, CmdBlockStatus, 0, uint64(off), uint32(length), nil)
	if err != nil {
		return nil, err
	}
	if err := c.wait(ctx, cl); err != nil {
		return nil, err
	}
	return cl.extents, nil
}

// ErrNoAllocation means the server offers no base:allocation context. It
// wraps errors.ErrUnsupported, so callers can stop asking.
var ErrNoAllocation = fmt.Errorf("nbd: server does not report allocation (no base:allocation context): %w", errors.ErrUnsupported)
