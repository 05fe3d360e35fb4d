package server

// The transmission phase of one connection: one reader (this goroutine)
// parses request headers and WRITE payloads, up to Workers handlers run at
// once, and one writer at a time sends replies, several per writev when
// they queue up. A reply is queued only when it is complete, so no success header
// ever goes out before its data exists, and the chunks of one structured
// reply are never interleaved with another's.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"snapmount/nbd"
)

// reply is one complete reply, ready for the writer.
type reply struct {
	bufs net.Buffers // header(s) and payload, in wire order
	buf  []byte      // pooled payload buffer to give back once written
	cost int64       // in-flight budget to give back once written

	// A READ of cached live data is sent from the image with sendfile:
	// then pieces replace bufs.
	file   *os.File
	pieces []piece
}

// piece is part of a reply: bytes, or (b == nil) n bytes of the
// reply's file at off.
type piece struct {
	b      []byte
	off, n int64
}

// byteBudget is a counting semaphore of payload bytes.
type byteBudget struct {
	mu    sync.Mutex
	cond  sync.Cond
	avail int64
}

func newByteBudget(n int64) *byteBudget {
	b := &byteBudget{avail: n}
	b.cond.L = &b.mu
	return b
}

func (b *byteBudget) acquire(n int64) {
	b.mu.Lock()
	for b.avail < n {
		b.cond.Wait()
	}
	b.avail -= n
	b.mu.Unlock()
}

func (b *byteBudget) release(n int64) {
	b.mu.Lock()
	b.avail += n
	b.cond.Broadcast()
	b.mu.Unlock()
}

// transmit serves requests until DISC, EOF, a protocol violation or
// shutdown, then waits for the handlers and the writer. It returns the
// number of requests and why the connection ended (nil for DISC).
func (c *conn) transmit() (int, error) {
	workers := c.server.cfg.Workers
	slots := make(chan struct{}, workers) // a slot is held from request header to written reply
	budget := newByteBudget(maxInFlightBytes)
	w := &replyWriter{c: c, slots: slots, budget: budget}

	// Small: it batches request headers; WRITE payloads mostly bypass it
	// (a bigger buffer only copies more of each payload twice).
	br := bufio.NewReaderSize(c.conn, 8<<10)
	var handlers sync.WaitGroup
	var hdr [nbd.RequestHeaderLen]byte
	var reason error
	n := 0
	for ; ; n++ {
		if err := c.readRequestBytes(br, hdr[:]); err != nil {
			reason = c.readEnded(err)
			break
		}
		req, err := nbd.ParseRequest(hdr[:])
		if err != nil {
			reason = err
			break
		}
		if req.Type == nbd.CmdDisc {
			break
		}
		if req.Type == nbd.CmdWrite && req.Length > nbd.MaxPayload {
			reason = protoErrorf("WRITE of %d bytes exceeds the %d-byte maximum payload", req.Length, nbd.MaxPayload)
			break
		}
		slots <- struct{}{}
		var cost int64
		var payload []byte
		if req.Type == nbd.CmdWrite || req.Type == nbd.CmdRead && req.Length <= nbd.MaxPayload {
			cost = int64(req.Length)
			budget.acquire(cost)
		}
		if req.Type == nbd.CmdWrite && req.Length > 0 {
			payload = getBuf(int(req.Length))
			if err := c.readRequestBytes(br, payload); err != nil {
				putBuf(payload)
				budget.release(cost)
				<-slots
				reason = c.readEnded(err)
				break
			}
		}
		if r := c.handleInline(req, payload); r != nil {
			r.cost = cost
			w.send(r)
			continue
		}
		handlers.Add(1)
		go func() {
			defer handlers.Done()
			r := c.handle(req, payload)
			r.cost = cost
			w.send(r)
		}()
	}
	handlers.Wait() // every reply is written once its handler is done
	// After DISC every request was read, so closing at once resets
	// nothing; a shutdown may leave requests unread.
	if c.server.inShut.Load() {
		c.closeGracefully()
	}
	return n, reason
}

// shutdownGrace bounds how long shutdown waits for a request already
// begun to arrive whole, and for the client to read its last replies.
const shutdownGrace = 5 * time.Second

// drainGrace bounds how long a closing connection waits for the client
// to hang up after the server's FIN.
const drainGrace = 2 * time.Second

// readRequestBytes reads a request header or payload. A shutdown stops
// the reader with an expired read deadline; a request of which some bytes
// already arrived still gets shutdownGrace to arrive whole.
func (c *conn) readRequestBytes(br *bufio.Reader, p []byte) error {
	n, err := io.ReadFull(br, p)
	var ne net.Error
	if err != nil && n > 0 && errors.As(err, &ne) && ne.Timeout() && c.server.inShut.Load() {
		c.raw.SetReadDeadline(time.Now().Add(shutdownGrace))
		_, err = io.ReadFull(br, p[n:])
		c.raw.SetReadDeadline(time.Now())
	}
	return err
}

// closeGracefully sends FIN after the last reply and swallows what the
// client still sends until it hangs up, so that closing with unread bytes
// (requests that came too late) does not reset the connection and
// destroy replies the client has not read yet.
func (c *conn) closeGracefully() {
	cw, ok := c.conn.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	// Clients that read replies all the time (libnbd, qemu, snapmount
	// mount) see the FIN and hang up at once; a silent one is cut off.
	c.raw.SetReadDeadline(time.Now().Add(drainGrace))
	io.Copy(io.Discard, io.LimitReader(c.conn, 2*nbd.MaxPayload))
}

// readEnded explains why reading a request failed.
func (c *conn) readEnded(err error) error {
	switch {
	case c.server.inShut.Load():
		return errors.New("server shutting down")
	case errors.Is(err, io.EOF):
		return errors.New("client hung up without NBD_CMD_DISC")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errors.New("client hung up in the middle of a request")
	}
	return err
}

// replyWriter serialises replies onto the connection. A handler with a
// finished reply queues it and, if no other handler is writing, becomes
// the writer: it sends everything queued (one writev) until the queue is
// empty. So a reply goes out without a hop to another goroutine, replies
// that pile up while one writev runs leave together, and only one
// goroutine writes at a time. After a write error it closes the
// connection (which stops the reader) and only gives back resources.
type replyWriter struct {
	c      *conn
	slots  <-chan struct{}
	budget *byteBudget

	writing sync.Mutex // held by the goroutine that writes

	mu     sync.Mutex // protects following
	queue  []*reply
	failed bool
}

// send queues r and writes the queue unless another goroutine is writing.
//
// No reply may be left in the queue with nobody to write it: a sender
// that finds the writer's lock taken leaves its reply to the holder, so
// the holder, after giving the lock back, looks at the queue once more
// and takes over again if anything arrived meanwhile. (Looking only
// before unlocking lost replies queued in between, and a client waiting
// for one hung: found with nbdfuse and fio, 4 jobs of O_DIRECT reads.)
func (w *replyWriter) send(r *reply) {
	w.mu.Lock()
	w.queue = append(w.queue, r)
	w.mu.Unlock()
	for w.writing.TryLock() {
		w.mu.Lock()
		batch := w.queue
		w.queue = nil
		failed := w.failed
		w.mu.Unlock()
		if len(batch) > 0 {
			if !failed {
				if err := w.write(batch); err != nil {
					w.mu.Lock()
					w.failed = true
					w.mu.Unlock()
					w.c.log.Debug("writing replies failed", "err", err)
					w.c.raw.Close()
				}
			}
			for _, r := range batch {
				if r.buf != nil {
					putBuf(r.buf)
				}
				w.budget.release(r.cost)
				<-w.slots
			}
		}
		testHookWriterUnlocking()
		w.writing.Unlock()
		w.mu.Lock()
		idle := len(w.queue) == 0
		w.mu.Unlock()
		if idle {
			return
		}
	}
}

// testHookWriterUnlocking runs as the writer is about to give its lock
// back, so a test can queue a reply in exactly that window.
var testHookWriterUnlocking = func() {}

// write sends a batch of replies: bytes with writev, file data with
// sendfile in between.
func (w *replyWriter) write(batch []*reply) error {
	var bufs net.Buffers
	flush := func() error {
		_, err := bufs.WriteTo(w.c.conn)
		bufs = bufs[:0]
		return err
	}
	for _, r := range batch {
		if r.file == nil {
			bufs = append(bufs, r.bufs...)
			continue
		}
		for _, p := range r.pieces {
			if p.b != nil {
				bufs = append(bufs, p.b)
				continue
			}
			if err := flush(); err != nil {
				return err
			}
			sent, err := sendfile(w.c.sendfile, r.file, p.off, p.n)
			if err != nil {
				// The header has gone out; the data cannot follow.
				return fmt.Errorf("sendfile of %d bytes at %d: %w", p.n, p.off, err)
			}
			if sent < p.n {
				// Another process shortened the image: past its end it
				// reads as zeros.
				bufs = append(bufs, make([]byte, p.n-sent))
			}
		}
	}
	return flush()
}

// ---- request handling ----

// flags each command accepts (more are refused with EINVAL).
func (c *conn) allowedFlags(t nbd.Cmd) nbd.CmdFlags {
	var f nbd.CmdFlags = nbd.CmdFlagFUA // proto.md: FUA is valid on any command
	switch t {
	case nbd.CmdRead:
		if c.structured {
			f |= nbd.CmdFlagDF
		}
	case nbd.CmdWriteZeroes:
		f |= nbd.CmdFlagNoHole | nbd.CmdFlagFastZero
	case nbd.CmdBlockStatus:
		f |= nbd.CmdFlagReqOne
	}
	return f
}

// handle runs one request and returns its reply. It never fails: errors
// become error replies.
func (c *conn) handle(req nbd.Request, payload []byte) *reply {
	v := c.view
	size := v.exp.size
	off, length := int64(req.Offset), int64(req.Length)
	inRange := req.Offset <= uint64(size) && length <= size-off
	fua := req.Flags&nbd.CmdFlagFUA != 0 && v.writable

	if bad := req.Flags &^ c.allowedFlags(req.Type); bad != 0 {
		if payload != nil {
			putBuf(payload)
		}
		return c.errorReply(req, fmt.Errorf("flags %#x are not valid for %s: %w", uint16(bad), req.Type, nbd.EINVAL))
	}
	switch req.Type {
	case nbd.CmdRead:
		return c.handleRead(req, inRange)
	case nbd.CmdWrite:
		defer func() {
			if payload != nil {
				putBuf(payload)
			}
		}()
		switch {
		case !v.writable:
			return c.errorReply(req, errReadOnlyView)
		case !inRange:
			return c.errorReply(req, fmt.Errorf("write of %d bytes at offset %d goes past the end of the export (%d bytes): %w", length, off, size, nbd.ENOSPC))
		}
		return c.result(req, v.write(payload, off, fua))
	case nbd.CmdFlush:
		if req.Offset != 0 || req.Length != 0 {
			return c.errorReply(req, fmt.Errorf("FLUSH with offset or length set: %w", nbd.EINVAL))
		}
		return c.result(req, v.flush())
	case nbd.CmdTrim:
		switch {
		case !v.writable:
			return c.errorReply(req, errReadOnlyView)
		case !inRange:
			return c.errorReply(req, fmt.Errorf("trim of %d bytes at offset %d goes past the end of the export: %w", length, off, nbd.EINVAL))
		}
		return c.result(req, v.trim(off, length, fua))
	case nbd.CmdWriteZeroes:
		switch {
		case !v.writable:
			return c.errorReply(req, errReadOnlyView)
		case !inRange:
			return c.errorReply(req, fmt.Errorf("write zeroes of %d bytes at offset %d goes past the end of the export: %w", length, off, nbd.ENOSPC))
		}
		return c.result(req, v.writeZeroes(off, length, req.Flags&nbd.CmdFlagNoHole != 0, req.Flags&nbd.CmdFlagFastZero != 0, fua))
	case nbd.CmdCache:
		if !inRange {
			return c.errorReply(req, fmt.Errorf("cache of %d bytes at offset %d goes past the end of the export: %w", length, off, nbd.EINVAL))
		}
		return c.result(req, v.cache(off, length))
	case nbd.CmdBlockStatus:
		return c.handleBlockStatus(req, inRange)
	case nbd.CmdResize:
		if !v.writable {
			return c.errorReply(req, errReadOnlyView)
		}
		return c.errorReply(req, fmt.Errorf("this server never resizes an image: %w", nbd.EINVAL))
	}
	return c.errorReply(req, fmt.Errorf("unknown command %d: %w", uint16(req.Type), nbd.EINVAL))
}

// handleInline runs the requests that cost little and never wait for a
// disk in the reader goroutine itself, and returns nil for the others. It
// saves a goroutine and a thread handoff per request where the kernel
// copy is the whole cost: a READ of cached live data (sent with sendfile)
// and a plain WRITE into the page cache while no snapshot needs
// copy-before-write. FUA writes, snapshot I/O and uncached reads go to the
// handlers, which run in parallel.
func (c *conn) handleInline(req nbd.Request, payload []byte) *reply {
	v := c.view
	off, length := int64(req.Offset), int64(req.Length)
	if req.Flags&^c.allowedFlags(req.Type) != 0 || req.Offset > uint64(v.exp.size) || length > v.exp.size-off || length == 0 {
		return nil
	}
	switch req.Type {
	case nbd.CmdRead:
		return c.sendfileRead(req, c.structured && req.Flags&nbd.CmdFlagDF == 0)
	case nbd.CmdWrite:
		if !v.writable || req.Flags&nbd.CmdFlagFUA != 0 {
			return nil
		}
		if live := v.exp.live.Load(); live != nil && len(*live) > 0 {
			return nil
		}
		return c.handle(req, payload)
	}
	return nil
}

var errReadOnlyView = fmt.Errorf("this connection is read-only: %w", nbd.EPERM)

func (c *conn) handleRead(req nbd.Request, inRange bool) *reply {
	off, length := int64(req.Offset), int64(req.Length)
	switch {
	case length > nbd.MaxPayload:
		return c.errorReply(req, fmt.Errorf("read of %d bytes exceeds the %d-byte maximum: %w", length, nbd.MaxPayload, nbd.EINVAL))
	case !inRange:
		return c.errorReply(req, fmt.Errorf("read of %d bytes at offset %d goes past the end of the export (%d bytes): %w", length, off, c.view.exp.size, nbd.EINVAL))
	case length == 0:
		return c.result(req, nil)
	}
	holes := c.structured && req.Flags&nbd.CmdFlagDF == 0
	if r := c.sendfileRead(req, holes); r != nil {
		return r
	}
	buf := getBuf(int(length))
	ext, err := c.view.read(buf, off, holes)
	if err != nil {
		putBuf(buf)
		return c.errorReply(req, err)
	}
	r := &reply{buf: buf}
	if !c.structured {
		r.bufs = net.Buffers{nbd.AppendSimpleReply(make([]byte, 0, nbd.SimpleReplyLen), 0, req.Cookie), buf}
		return r
	}
	if len(ext) == 0 {
		ext = []extent{{off: off, length: length}}
	}
	r.bufs = make(net.Buffers, 0, 2*len(ext))
	readChunks(req.Cookie, ext,
		func(h []byte) { r.bufs = append(r.bufs, h) },
		func(x extent) { r.bufs = append(r.bufs, buf[x.off-off:x.off-off+x.length]) })
	return r
}

// readChunks lays out the structured reply to a READ whose range
// splits into ext: per extent an OFFSET_HOLE chunk, or an OFFSET_DATA
// chunk header followed by the extent's data, which data places (bytes in
// memory, or a file range for sendfile). The last chunk carries
// NBD_REPLY_FLAG_DONE. Headers go into one slice sized up front, so the
// slices of it handed to header stay valid.
func readChunks(cookie uint64, ext []extent, header func([]byte), data func(extent)) {
	hdr := make([]byte, 0, len(ext)*(nbd.ChunkHeaderLen+12))
	for i, x := range ext {
		var flags uint16
		if i == len(ext)-1 {
			flags = nbd.ReplyFlagDone
		}
		start := len(hdr)
		if x.hole {
			hdr = nbd.AppendHoleChunk(hdr, flags, cookie, uint64(x.off), uint32(x.length))
			header(hdr[start:])
			continue
		}
		hdr = nbd.AppendDataChunkHeader(hdr, flags, cookie, uint64(x.off), uint32(x.length))
		header(hdr[start:])
		data(x)
	}
}

// sendfileMin is the smallest READ sent with sendfile: below it a copy
// through the process costs less than the extra system calls.
const sendfileMin = 32 << 10

// sendfileRead builds the reply to a READ of live data that is all in the
// page cache, to be sent with sendfile. It returns nil when the READ must
// take the ordinary path: snapshots (read under block locks), TLS, small
// or uncached ranges (read in parallel by the handlers rather than by the
// one writer).
func (c *conn) sendfileRead(req nbd.Request, holes bool) *reply {
	v := c.view
	off, length := int64(req.Offset), int64(req.Length)
	if v.snap != nil || c.sendfile == nil || length < sendfileMin || !exportResident(v.exp.mapping, off, length) {
		return nil
	}
	r := &reply{file: v.exp.file}
	if !c.structured {
		r.pieces = []piece{{b: nbd.AppendSimpleReply(nil, 0, req.Cookie)}, {off: off, n: length}}
		return r
	}
	ext := []extent{{off: off, length: length}}
	if holes {
		ext = imageExtents(v.exp.file, off, off+length, make([]extent, 0, 4), maxReadExtents)
	}
	r.pieces = make([]piece, 0, 2*len(ext))
	readChunks(req.Cookie, ext,
		func(h []byte) { r.pieces = append(r.pieces, piece{b: h}) },
		func(x extent) { r.pieces = append(r.pieces, piece{off: x.off, n: x.length}) })
	return r
}

// maxStatusExtents bounds the extents of one BLOCK_STATUS reply.
const maxStatusExtents = 2048

func (c *conn) handleBlockStatus(req nbd.Request, inRange bool) *reply {
	off, length := int64(req.Offset), int64(req.Length)
	switch {
	case !c.structured || !c.metaAlloc:
		return c.errorReply(req, fmt.Errorf("BLOCK_STATUS needs structured replies and base:allocation selected for this export: %w", nbd.EINVAL))
	case length == 0 || !inRange:
		return c.errorReply(req, fmt.Errorf("block status of %d bytes at offset %d is outside the export: %w", length, off, nbd.EINVAL))
	}
	maxExt := maxStatusExtents
	if req.Flags&nbd.CmdFlagReqOne != 0 {
		maxExt = 1
	}
	ext, err := c.view.blockStatus(off, length, maxExt)
	if err != nil {
		return c.errorReply(req, err)
	}
	wire := make([]nbd.WireExtent, 0, len(ext))
	for _, x := range ext {
		if len(wire) == maxExt {
			break
		}
		var st uint32
		if x.hole {
			st = nbd.StateHole | nbd.StateZero
		}
		wire = append(wire, nbd.WireExtent{Length: uint32(x.length), Flags: st})
	}
	payload := nbd.AppendBlockStatusPayload(nil, 1, wire)
	b := nbd.AppendChunkHeader(make([]byte, 0, nbd.ChunkHeaderLen+len(payload)), nbd.ReplyFlagDone, nbd.ChunkBlockStatus, req.Cookie, uint32(len(payload)))
	return &reply{bufs: net.Buffers{append(b, payload...)}}
}

// result is the reply to a command without reply payload.
func (c *conn) result(req nbd.Request, err error) *reply {
	if err != nil {
		return c.errorReply(req, err)
	}
	if c.structured && req.Type == nbd.CmdRead {
		b := nbd.AppendChunkHeader(nil, nbd.ReplyFlagDone, nbd.ChunkNone, req.Cookie, 0)
		return &reply{bufs: net.Buffers{b}}
	}
	return &reply{bufs: net.Buffers{nbd.AppendSimpleReply(nil, 0, req.Cookie)}}
}

// errorReply reports err for one request: an ERROR chunk with a message
// for READ and BLOCK_STATUS under structured replies, else a simple reply.
func (c *conn) errorReply(req nbd.Request, err error) *reply {
	errno := nbd.ErrnoOf(err)
	if errno == nbd.EIO || errors.Is(err, os.ErrClosed) {
		c.log.Warn("request failed", "cmd", req.Type, "offset", req.Offset, "length", req.Length, "err", err)
		errno = nbd.EIO
	} else {
		c.log.Debug("request refused", "cmd", req.Type, "offset", req.Offset, "length", req.Length, "err", err)
	}
	if c.structured && (req.Type == nbd.CmdRead || req.Type == nbd.CmdBlockStatus) {
		p := nbd.AppendErrorChunkPayload(nil, errno, err.Error(), -1)
		b := nbd.AppendChunkHeader(make([]byte, 0, nbd.ChunkHeaderLen+len(p)), nbd.ReplyFlagDone, nbd.ChunkError, req.Cookie, uint32(len(p)))
		return &reply{bufs: net.Buffers{append(b, p...)}}
	}
	return &reply{bufs: net.Buffers{nbd.AppendSimpleReply(nil, errno, req.Cookie)}}
}
