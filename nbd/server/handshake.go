package server

// One connection's life: the handshake (option haggling) here, the
// transmission phase in transmission.go.

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"syscall"
	"time"

	"snapmount/nbd"
)

// Limits on what a client may send before it picks an export.
const (
	// maxOptionData is the largest option data the server reads: the
	// biggest legitimate option (SET_META_CONTEXT with a few 4096-byte
	// strings) is far smaller.
	maxOptionData = 64 << 10
	// maxOptionDrain is the largest option data the server swallows to
	// answer ERR_TOO_BIG; beyond it the client is treated as hostile and
	// the connection is dropped.
	maxOptionDrain = 16 << 20
	// maxOptions bounds the options before GO or EXPORT_NAME.
	maxOptions = 256
	// maxInFlightBytes bounds the payload buffers (WRITE data and READ
	// replies) one connection holds at a time.
	maxInFlightBytes = 2 * nbd.MaxPayload
)

// conn is one client connection.
type conn struct {
	server *Server
	id     uint64
	raw    net.Conn // as accepted
	conn   net.Conn // raw, or the TLS connection over it after STARTTLS
	peer   string
	log    *slog.Logger

	// Negotiated state, touched only by the connection's own goroutine
	// until the transmission phase starts. STARTTLS resets all of it.
	tls        bool
	structured bool
	promised   bool   // NBD_OPT_X_READ_ONLY was ACKed
	metaSet    bool   // base:allocation selected by SET_META_CONTEXT
	metaExport string // ... for this export name
	noZeroes   bool

	view      *exportView
	metaAlloc bool // BLOCK_STATUS allowed: base:allocation set for the export opened
	// sendfile is the socket for sendfile(2), nil under TLS (the data
	// must pass through the process to be encrypted).
	sendfile syscall.RawConn

	mu           sync.Mutex // protects following
	transmitting bool
}

func newConn(s *Server, c net.Conn, id uint64) *conn {
	sc := &conn{server: s, id: id, raw: c, conn: c, peer: peerName(c)}
	sc.log = s.log.With("conn", id, "peer", sc.peer)
	return sc
}

// shutdown asks the connection to end: at once while it negotiates, after
// the requests in flight once it transmits (the reader stops reading).
func (c *conn) shutdown() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.transmitting {
		c.raw.SetReadDeadline(time.Now())
		return
	}
	c.raw.Close()
}

// close ends the connection abruptly.
func (c *conn) close() { c.raw.Close() }

// errAbort ends a handshake that the client ended politely.
var errAbort = errors.New("client sent NBD_OPT_ABORT")

// protoErrorf reports a violation of the protocol by the client.
func protoErrorf(format string, args ...any) error {
	return &nbd.ProtocolError{Msg: fmt.Sprintf(format, args...)}
}

func (c *conn) serve() {
	defer c.server.connDone(c)
	defer c.raw.Close()
	c.raw.SetDeadline(time.Now().Add(c.server.cfg.HandshakeTimeout))
	view, err := c.handshake()
	c.server.handshakeDone(c)
	if err != nil {
		if errors.Is(err, errAbort) {
			c.log.Debug("handshake ended", "reason", err)
		} else {
			c.log.Info("handshake failed", "err", err)
		}
		return
	}
	c.view = view
	defer view.release()

	c.mu.Lock()
	if c.server.inShut.Load() {
		c.mu.Unlock()
		return
	}
	c.transmitting = true
	c.raw.SetDeadline(time.Time{})
	c.mu.Unlock()
	if sc, ok := c.conn.(syscall.Conn); ok && !c.tls {
		c.sendfile, _ = sc.SyscallConn()
	}

	c.log.Info("connection", "export", view.name, "mode", view.mode, "tls", c.tls,
		"structured_replies", c.structured, "promised_read_only", c.promised)
	n, err := c.transmit()
	if err != nil {
		c.log.Info("connection closed", "export", view.name, "requests", n, "reason", err)
	} else {
		c.log.Info("connection closed", "export", view.name, "requests", n)
	}
}

func (c *conn) send(b []byte) error {
	_, err := c.conn.Write(b)
	return err
}

func (c *conn) reply(opt nbd.Option, typ nbd.Reply, data []byte) error {
	return c.send(nbd.AppendOptionReply(nil, opt, typ, data))
}

// replyErr answers an option with an error reply carrying a message.
func (c *conn) replyErr(opt nbd.Option, typ nbd.Reply, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if len(msg) > nbd.MaxStringLen {
		msg = msg[:nbd.MaxStringLen]
	}
	c.log.Debug("option refused", "option", opt, "reply", typ, "msg", msg)
	return c.reply(opt, typ, []byte(msg))
}

// handshake runs the fixed-newstyle negotiation until the client opens an
// export (GO or EXPORT_NAME) and returns the view it opened.
func (c *conn) handshake() (*exportView, error) {
	if err := c.send(nbd.AppendGreeting(nil, nbd.HandshakeFixedNewstyle|nbd.HandshakeNoZeroes)); err != nil {
		return nil, err
	}
	var buf [nbd.OptionHeaderLen]byte
	if _, err := io.ReadFull(c.conn, buf[:4]); err != nil {
		return nil, fmt.Errorf("reading client flags: %w", err)
	}
	flags := nbd.ParseClientFlags(buf[:4])
	if flags&^(nbd.ClientFixedNewstyle|nbd.ClientNoZeroes) != 0 {
		return nil, protoErrorf("client flags %#x has bits the server did not offer", uint32(flags))
	}
	fixed := flags&nbd.ClientFixedNewstyle != 0
	c.noZeroes = flags&nbd.ClientNoZeroes != 0

	for n := 0; ; n++ {
		if n >= maxOptions {
			return nil, protoErrorf("more than %d options without choosing an export", maxOptions)
		}
		if _, err := io.ReadFull(c.conn, buf[:]); err != nil {
			return nil, fmt.Errorf("reading option: %w", err)
		}
		opt, length, err := nbd.ParseOptionHeader(buf[:])
		if err != nil {
			return nil, err
		}
		if !fixed && opt != nbd.OptExportName {
			return nil, protoErrorf("client without fixed newstyle sent %s", opt)
		}
		if length > maxOptionData {
			if length > maxOptionDrain {
				return nil, protoErrorf("%s with %d bytes of data", opt, length)
			}
			if _, err := io.CopyN(io.Discard, c.conn, int64(length)); err != nil {
				return nil, fmt.Errorf("nbd: draining %d bytes: %w", length, err)
			}
			if err := c.replyErr(opt, nbd.RepErrTooBig, "option data of %d bytes exceeds the server's %d-byte limit", length, maxOptionData); err != nil {
				return nil, err
			}
			continue
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(c.conn, data); err != nil {
			return nil, fmt.Errorf("reading %s data: %w", opt, err)
		}
		view, err := c.option(opt, data)
		if view != nil || err != nil {
			return view, err
		}
	}
}

// option answers one option. It returns a view when the client opened an
// export, and an error when the connection must end.
func (c *conn) option(opt nbd.Option, data []byte) (*exportView, error) {
	if c.server.inShut.Load() && opt != nbd.OptAbort {
		return nil, c.replyErr(opt, nbd.RepErrShutdown, "server is shutting down")
	}
	if c.server.cfg.TLSMode == TLSRequire && !c.tls && opt != nbd.OptStartTLS && opt != nbd.OptAbort {
		if opt == nbd.OptExportName {
			return nil, protoErrorf("NBD_OPT_EXPORT_NAME before STARTTLS on a server that requires TLS")
		}
		return nil, c.replyErr(opt, nbd.RepErrTLSReqd, "this server requires TLS: send NBD_OPT_STARTTLS first")
	}
	switch opt {
	case nbd.OptExportName:
		return c.optExportName(data)
	case nbd.OptAbort:
		c.reply(opt, nbd.RepAck, nil) // the client may already be gone
		return nil, errAbort
	case nbd.OptList:
		return nil, c.optList(data)
	case nbd.OptStartTLS:
		return nil, c.optStartTLS(data)
	case nbd.OptInfo, nbd.OptGo:
		return c.optInfo(opt, data)
	case nbd.OptStructuredReply:
		if len(data) != 0 {
			return nil, c.replyErr(opt, nbd.RepErrInvalid, "%s carries no data", opt)
		}
		c.structured = true
		return nil, c.reply(opt, nbd.RepAck, nil)
	case nbd.OptListMetaContext, nbd.OptSetMetaContext:
		return nil, c.optMetaContext(opt, data)
	case nbd.OptXReadOnly:
		if len(data) != 0 {
			return nil, c.replyErr(opt, nbd.RepErrInvalid, "%s carries no data", opt)
		}
		c.promised = true
		return nil, c.reply(opt, nbd.RepAck, nil)
	}
	return nil, c.replyErr(opt, nbd.RepErrUnsup, "option %s is not supported by this server", opt)
}

func (c *conn) optExportName(data []byte) (*exportView, error) {
	if err := nbd.CheckString("export name", data); err != nil {
		return nil, err
	}
	name := string(data)
	v, _, err := c.server.openView(name, c.promised, true)
	if err != nil {
		// The protocol has no way to report this but hanging up.
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %w", name, err)
	}
	if !c.server.enterTransmission(c) {
		v.release()
		return nil, fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %s", name, c.tooMany())
	}
	b := nbd.AppendExportNameReply(nil, uint64(v.exp.size), exportFlags(v.writable, c.structured), c.noZeroes)
	if err := c.send(b); err != nil {
		v.release()
		return nil, err
	}
	c.metaAlloc = c.metaSet && c.metaExport == name
	return v, nil
}

func (c *conn) optList(data []byte) error {
	if len(data) != 0 {
		return c.replyErr(nbd.OptList, nbd.RepErrInvalid, "NBD_OPT_LIST carries no data")
	}
	var b []byte
	for _, e := range c.server.exports {
		entry := nbd.ExportEntry{Name: e.name, Description: e.listDescription()}
		b = nbd.AppendOptionReply(b, nbd.OptList, nbd.RepServer, entry.Encode())
	}
	b = nbd.AppendOptionReply(b, nbd.OptList, nbd.RepAck, nil)
	return c.send(b)
}

// listDescription is the export's description, or a reminder of the view
// names when none was configured.
func (e *export) listDescription() string {
	if e.description != "" {
		return e.description
	}
	if e.readOnly {
		return "read-only image; " + e.name + "@snapshot for a point-in-time view"
	}
	return "read-write image; " + e.name + "@snapshot for a point-in-time view, " + e.name + "@live to read live"
}

func (c *conn) optStartTLS(data []byte) error {
	switch {
	case len(data) != 0:
		return c.replyErr(nbd.OptStartTLS, nbd.RepErrInvalid, "NBD_OPT_STARTTLS carries no data")
	case c.tls:
		return c.replyErr(nbd.OptStartTLS, nbd.RepErrInvalid, "TLS is already on")
	case c.server.cfg.TLSMode == TLSOff:
		return c.replyErr(nbd.OptStartTLS, nbd.RepErrPolicy, "TLS is not enabled on this server")
	}
	if err := c.reply(nbd.OptStartTLS, nbd.RepAck, nil); err != nil {
		return err
	}
	tc := tls.Server(c.raw, c.server.cfg.TLSConfig)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.conn, c.tls = tc, true
	// Everything negotiated in plaintext is forgotten (proto.md: STARTTLS).
	c.structured, c.promised, c.metaSet, c.metaExport = false, false, false, ""
	return nil
}

// advertisedBlockSize is what NBD_INFO_BLOCK_SIZE says: any alignment works,
// 4 KiB is the natural size, and payloads up to 32 MiB.
var advertisedBlockSize = nbd.BlockSize{Min: 1, Preferred: 4096, Max: nbd.MaxPayload}

func (c *conn) optInfo(opt nbd.Option, data []byte) (*exportView, error) {
	req, err := nbd.ParseExportRequest(data)
	if err != nil {
		return nil, c.replyErr(opt, nbd.RepErrInvalid, "%v", err)
	}
	v, code, err := c.server.openView(req.Name, c.promised, opt == nbd.OptGo)
	if err != nil {
		return nil, c.replyErr(opt, code, "%v", err)
	}
	if opt == nbd.OptGo && !c.server.enterTransmission(c) {
		v.release()
		return nil, c.replyErr(opt, nbd.RepErrPolicy, "%s", c.tooMany())
	}
	var wantName, wantDesc bool
	for _, t := range req.Infos {
		switch t {
		case nbd.InfoName:
			wantName = true
		case nbd.InfoDescription:
			wantDesc = true
		}
	}
	b := nbd.AppendOptionReply(nil, opt, nbd.RepInfo, nbd.AppendInfoExport(nil, uint64(v.exp.size), exportFlags(v.writable, c.structured)))
	// The canonical name of a snapshot goes out unasked, so every further
	// connection of the same client joins the same instant.
	if wantName || v.snap != nil {
		b = nbd.AppendOptionReply(b, opt, nbd.RepInfo, nbd.AppendInfoText(nil, nbd.InfoName, v.name))
	}
	if desc := v.description(); wantDesc && desc != "" {
		b = nbd.AppendOptionReply(b, opt, nbd.RepInfo, nbd.AppendInfoText(nil, nbd.InfoDescription, desc))
	}
	b = nbd.AppendOptionReply(b, opt, nbd.RepInfo, nbd.AppendInfoBlockSize(nil, advertisedBlockSize))
	b = nbd.AppendOptionReply(b, opt, nbd.RepAck, nil)
	if err := c.send(b); err != nil {
		if opt == nbd.OptGo {
			v.release()
		}
		return nil, err
	}
	if opt != nbd.OptGo {
		return nil, nil
	}
	c.metaAlloc = c.metaSet && c.metaExport == req.Name
	return v, nil
}

// tooMany says why a connection cannot have an export now.
func (c *conn) tooMany() string {
	return fmt.Sprintf("too many connections: the server serves %d at most (--max-conns); try again once one ends", c.server.cfg.MaxConns)
}

func (c *conn) optMetaContext(opt nbd.Option, data []byte) error {
	set := opt == nbd.OptSetMetaContext
	if set {
		c.metaSet = false // a SET replaces the selection even when it fails
	}
	if set && !c.structured {
		return c.replyErr(opt, nbd.RepErrInvalid, "%s needs NBD_OPT_STRUCTURED_REPLY first", opt)
	}
	req, err := nbd.ParseMetaContextRequest(data)
	if err != nil {
		return c.replyErr(opt, nbd.RepErrInvalid, "%v", err)
	}
	if _, _, err := c.server.openView(req.Export, c.promised, false); err != nil && !errors.Is(err, errBusy) {
		return c.replyErr(opt, nbd.RepErrUnknown, "%v", err)
	}
	match := !set && len(req.Queries) == 0 // LIST with no query lists everything
	for _, q := range req.Queries {
		// "base:" is a wildcard only for LIST; unknown leafs and other
		// namespaces are ignored.
		if q == nbd.ContextBaseAllocation || !set && q == "base:" {
			match = true
		}
	}
	var b []byte
	if match {
		var id uint32
		if set {
			id = 1
		}
		b = nbd.AppendOptionReply(b, opt, nbd.RepMetaContext, nbd.AppendMetaContextReply(nil, id, nbd.ContextBaseAllocation))
	}
	b = nbd.AppendOptionReply(b, opt, nbd.RepAck, nil)
	if set && match {
		c.metaSet, c.metaExport = true, req.Export
	}
	return c.send(b)
}
