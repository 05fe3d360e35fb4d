package nbd

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"syscall"
)

// maxOptionReply caps the data of one option reply the client accepts.
// The largest legitimate reply (NBD_REP_SERVER with a 4 KiB name and a
// 4 KiB description) is far below it.
const maxOptionReply = 1 << 20

// maxListEntries bounds NBD_OPT_LIST so a hostile server cannot make the
// client collect replies forever.
const maxListEntries = 1 << 16

// Negotiator drives the handshake (option haggling) of one connection on
// the client side. Options go one at a time: each method sends one option
// and reads every reply to it up to the final one.
type Negotiator struct {
	conn     net.Conn // becomes a *tls.Conn after StartTLS
	br       *bufio.Reader
	fixed    bool // fixed newstyle: options other than EXPORT_NAME allowed
	noZeroes bool

	tls          bool
	structured   bool
	promise      bool  // the server ACKed OptXReadOnly
	promiseReply Reply // its answer; 0 if the option was never sent
	contexts     map[uint32]string
	ctxExport    string // export the contexts were negotiated for
}

// Greet reads the server's greeting from conn and answers with the client
// flags. It recognises oldstyle servers and peers that are not NBD.
func Greet(conn net.Conn) (*Negotiator, error) {
	n := &Negotiator{conn: conn, br: bufio.NewReaderSize(conn, 64<<10)}
	var b [GreetingLen]byte
	if _, err := io.ReadFull(n.br, b[:16]); err != nil {
		return nil, fmt.Errorf("nbd: reading the server's greeting: %w", noEOF(err))
	}
	if be.Uint64(b[0:]) != Magic {
		return nil, ErrNotNBD
	}
	switch be.Uint64(b[8:]) {
	case IHaveOpt:
	case OldstyleMagic:
		return nil, ErrOldstyle
	default:
		return nil, ErrNotNBD
	}
	if _, err := io.ReadFull(n.br, b[16:18]); err != nil {
		return nil, fmt.Errorf("nbd: reading handshake flags: %w", noEOF(err))
	}
	// Unknown server bits MUST be ignored; answer only what was offered.
	flags := HandshakeFlags(be.Uint16(b[16:]))
	var cf ClientFlags
	if flags&HandshakeFixedNewstyle != 0 {
		n.fixed = true
		cf |= ClientFixedNewstyle
	}
	if flags&HandshakeNoZeroes != 0 {
		n.noZeroes = true
		cf |= ClientNoZeroes
	}
	if _, err := conn.Write(AppendClientFlags(nil, cf)); err != nil {
		return nil, fmt.Errorf("nbd: sending client flags: %w", err)
	}
	return n, nil
}

// FixedNewstyle reports whether options besides EXPORT_NAME may be sent.
func (n *Negotiator) FixedNewstyle() bool { return n.fixed }

// Promised reports whether the server accepted NBD_OPT_X_READ_ONLY.
func (n *Negotiator) Promised() bool { return n.promise }

// Conn returns the connection, which is a *tls.Conn after StartTLS.
func (n *Negotiator) Conn() net.Conn { return n.conn }

func (n *Negotiator) send(opt Option, data []byte) error {
	if !n.fixed && opt != OptExportName {
		return fmt.Errorf("nbd: server is not fixed-newstyle, %s cannot be sent", opt)
	}
	if _, err := n.conn.Write(AppendOption(nil, opt, data)); err != nil {
		return fmt.Errorf("nbd: sending %s: %w", opt, noEOF(err))
	}
	return nil
}

// reply reads one option reply to opt.
func (n *Negotiator) reply(opt Option) (Reply, []byte, error) {
	var h [OptionReplyLen]byte
	if _, err := io.ReadFull(n.br, h[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd: reading the reply to %s: %w", opt, noEOF(err))
	}
	echo, typ, length, err := ParseOptionReplyHeader(h[:])
	if err != nil {
		return 0, nil, err
	}
	if echo != opt {
		return 0, nil, protoErrorf("reply to %s names %s", opt, echo)
	}
	if length > maxOptionReply {
		return 0, nil, protoErrorf("reply to %s carries %d bytes, more than %d", opt, length, maxOptionReply)
	}
	data := make([]byte, length)
	if _, err := io.ReadFull(n.br, data); err != nil {
		return 0, nil, fmt.Errorf("nbd: reading the reply to %s: %w", opt, noEOF(err))
	}
	if typ == RepAck && length != 0 {
		return 0, nil, protoErrorf("ACK to %s carries %d bytes", opt, length)
	}
	return typ, data, nil
}

// optionError builds the error for an error reply, keeping the server's
// message when it is readable text.
func optionError(opt Option, typ Reply, data []byte) error {
	msg := ""
	if CheckString("message", data) == nil {
		msg = string(data)
	}
	if !typ.IsError() {
		return protoErrorf("unexpected %s in reply to %s", typ, opt)
	}
	return &OptionError{Opt: opt, Reply: typ, Msg: msg}
}

// ackOption sends an option whose only success reply is ACK.
func (n *Negotiator) ackOption(opt Option, data []byte) error {
	if err := n.send(opt, data); err != nil {
		return err
	}
	typ, d, err := n.reply(opt)
	if err != nil {
		return err
	}
	if typ == RepAck {
		return nil
	}
	return optionError(opt, typ, d)
}

// replyIs reports whether err is an option error with that reply.
func replyIs(err error, r Reply) bool {
	var oe *OptionError
	return errors.As(err, &oe) && oe.Reply == r
}

// StartTLS upgrades the connection. All state negotiated before it is
// void afterwards (the spec resets it), so it must come first.
func (n *Negotiator) StartTLS(cfg *tls.Config) error {
	if err := n.ackOption(OptStartTLS, nil); err != nil {
		return err
	}
	if n.br.Buffered() != 0 {
		return protoErrorf("server sent data after acknowledging STARTTLS")
	}
	tc := tls.Client(n.conn, cfg)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	n.conn, n.br = tc, bufio.NewReaderSize(tc, 64<<10)
	n.tls = true
	n.structured, n.promise, n.promiseReply, n.contexts, n.ctxExport = false, false, 0, nil, ""
	return nil
}

// StructuredReply asks for structured replies. false with a nil error
// means the server only speaks simple replies.
func (n *Negotiator) StructuredReply() (bool, error) {
	err := n.ackOption(OptStructuredReply, nil)
	var oe *OptionError
	switch {
	case err == nil:
		n.structured = true
		return true, nil
	case errors.As(err, &oe) && oe.Reply != RepErrTLSReqd:
		return false, nil
	}
	return false, err
}

// PromiseReadOnly sends NBD_OPT_X_READ_ONLY. true means the server took
// the promise and will treat this connection as a reader; false with a
// nil error means it does not know the option (every stock server), and
// the returned Reply says what it answered.
func (n *Negotiator) PromiseReadOnly() (bool, Reply, error) {
	err := n.ackOption(OptXReadOnly, nil)
	var oe *OptionError
	switch {
	case err == nil:
		n.promise, n.promiseReply = true, RepAck
	case errors.As(err, &oe) && oe.Reply != RepErrTLSReqd && oe.Reply != RepErrShutdown:
		n.promiseReply = oe.Reply
	default:
		return false, 0, err
	}
	return n.promise, n.promiseReply, nil
}

// SetMetaContext selects metadata contexts for export. It returns the
// contexts the server selected, by id.
func (n *Negotiator) SetMetaContext(export string, queries ...string) (map[uint32]string, error) {
	got, err := n.metaContext(OptSetMetaContext, export, queries)
	if err != nil {
		return nil, err
	}
	m := make(map[uint32]string, len(got))
	for _, c := range got {
		if _, dup := m[c.id]; dup {
			return nil, protoErrorf("server gave context id %d twice", c.id)
		}
		m[c.id] = c.name
	}
	n.contexts, n.ctxExport = m, export
	return m, nil
}

// ListMetaContext lists the contexts matching the queries (all if none).
func (n *Negotiator) ListMetaContext(export string, queries ...string) ([]string, error) {
	got, err := n.metaContext(OptListMetaContext, export, queries)
	if err != nil {
		return nil, err
	}
	names := make([]string, len(got))
	for i, c := range got {
		names[i] = c.name
	}
	return names, nil
}

type metaContext struct {
	id   uint32
	name string
}

func (n *Negotiator) metaContext(opt Option, export string, queries []string) ([]metaContext, error) {
	req := MetaContextRequest{Export: export, Queries: queries}
	if err := n.send(opt, req.Encode()); err != nil {
		return nil, err
	}
	var got []metaContext
	for {
		typ, d, err := n.reply(opt)
		if err != nil {
			return nil, err
		}
		switch typ {
		case RepMetaContext:
			id, name, err := ParseMetaContextReply(d)
			if err != nil {
				return nil, err
			}
			if len(got) >= maxListEntries {
				return nil, protoErrorf("more than %d meta contexts", maxListEntries)
			}
			got = append(got, metaContext{id, name})
		case RepAck:
			return got, nil
		default:
			return nil, optionError(opt, typ, d)
		}
	}
}

// List asks for the server's exports (NBD_OPT_LIST).
func (n *Negotiator) List() ([]ExportEntry, error) {
	if err := n.send(OptList, nil); err != nil {
		return nil, err
	}
	var list []ExportEntry
	for {
		typ, d, err := n.reply(OptList)
		if err != nil {
			return nil, err
		}
		switch typ {
		case RepServer:
			e, err := ParseServerReply(d)
			if err != nil {
				return nil, err
			}
			if len(list) >= maxListEntries {
				return nil, protoErrorf("more than %d exports listed", maxListEntries)
			}
			list = append(list, e)
		case RepAck:
			return list, nil
		default:
			return nil, optionError(OptList, typ, d)
		}
	}
}

// ExportInfo is what the handshake learned about an export.
type ExportInfo struct {
	Name          string // the name the client asked for
	CanonicalName string // NBD_INFO_NAME if the server sent one, else Name
	Description   string
	Size          uint64
	Flags         TransmissionFlags
	BlockSize     BlockSize // the server's limits, or the defaults
	HasBlockSize  bool      // the server sent NBD_INFO_BLOCK_SIZE
	Structured    bool      // structured replies negotiated
	Promise       bool      // the server accepted NBD_OPT_X_READ_ONLY
	PromiseReply  Reply     // what it answered to the promise (0: not sent)
	Contexts      map[uint32]string
	TLS           bool
	ExportName    bool // negotiated with NBD_OPT_EXPORT_NAME (GO unsupported)
}

// ReadOnly reports whether the server declared the export read-only.
func (i *ExportInfo) ReadOnly() bool { return i.Flags&FlagReadOnly != 0 }

// SnapmountSnapshot reports whether the export is a snapshot of snapmount
// serve, frozen at one instant: the server took the read-only promise
// (only snapmount serve knows it) and named the export NAME@sN. A stock
// server may call an export x@s1 too; that says nothing about its data.
func (i *ExportInfo) SnapmountSnapshot() bool {
	ref, err := ParseExportName(i.CanonicalName)
	return i.Promise && err == nil && ref.View == ViewJoinSnapshot
}

// CanMultiConn reports whether several connections may share the work.
func (i *ExportInfo) CanMultiConn() bool { return i.Flags&FlagCanMultiConn != 0 }

// ContextID returns the id of a negotiated metadata context.
func (i *ExportInfo) ContextID(name string) (uint32, bool) {
	for id, n := range i.Contexts {
		if n == name {
			return id, true
		}
	}
	return 0, false
}

// defaultInfos are the information types the client asks for in GO.
var defaultInfos = []InfoType{InfoBlockSize, InfoName, InfoDescription}

// Info asks about an export without entering transmission (NBD_OPT_INFO).
func (n *Negotiator) Info(export string) (*ExportInfo, error) {
	return n.infoOrGo(OptInfo, export)
}

// Go selects the export and ends the handshake. A server too old for GO
// (ERR_UNSUP) is asked with NBD_OPT_EXPORT_NAME instead.
func (n *Negotiator) Go(export string) (*ExportInfo, error) {
	if !n.fixed {
		return n.ExportName(export)
	}
	info, err := n.infoOrGo(OptGo, export)
	if replyIs(err, RepErrUnsup) {
		return n.ExportName(export)
	}
	return info, err
}

func (n *Negotiator) infoOrGo(opt Option, export string) (*ExportInfo, error) {
	req := ExportRequest{Name: export, Infos: defaultInfos}
	if err := n.send(opt, req.Encode()); err != nil {
		return nil, err
	}
	info := n.newInfo(export)
	haveExport := false
	for {
		typ, d, err := n.reply(opt)
		if err != nil {
			return nil, err
		}
		switch typ {
		case RepInfo:
			r, err := ParseInfoReply(d)
			if err != nil {
				return nil, err
			}
			switch r.Type {
			case InfoExport:
				info.Size, info.Flags, haveExport = r.Size, r.Flags, true
			case InfoName:
				info.CanonicalName = r.Text
			case InfoDescription:
				info.Description = r.Text
			case InfoBlockSize:
				if err := r.BlockSize.validate(); err != nil {
					return nil, err
				}
				info.BlockSize, info.HasBlockSize = r.BlockSize, true
			}
		case RepAck:
			if !haveExport {
				return nil, protoErrorf("server acknowledged %s without NBD_INFO_EXPORT", opt)
			}
			if err := info.check(); err != nil {
				return nil, err
			}
			return info, nil
		default:
			return nil, optionError(opt, typ, d)
		}
	}
}

func (n *Negotiator) newInfo(export string) *ExportInfo {
	info := &ExportInfo{
		Name:          export,
		CanonicalName: export,
		BlockSize:     BlockSize{Min: DefaultMinBlock, Preferred: DefaultPrefBlock, Max: MaxPayload},
		Structured:    n.structured,
		Promise:       n.promise,
		PromiseReply:  n.promiseReply,
		TLS:           n.tls,
	}
	if n.ctxExport == export {
		info.Contexts = n.contexts
	}
	return info
}

// check rejects export descriptions the client cannot work with.
func (i *ExportInfo) check() error {
	if i.Flags&FlagHasFlags == 0 {
		return protoErrorf("transmission flags %#x lack HAS_FLAGS", uint16(i.Flags))
	}
	if i.Size > 1<<62 {
		return protoErrorf("export size %d is not plausible", i.Size)
	}
	if i.BlockSize.Max > MaxPayload {
		// A client never needs more than 32 MiB per request.
		i.BlockSize.Max = MaxPayload
	}
	return nil
}

// ExportName selects the export with NBD_OPT_EXPORT_NAME, the only choice
// on non-fixed-newstyle servers. A server that does not know the export
// closes the connection, which is all the error it can give.
func (n *Negotiator) ExportName(export string) (*ExportInfo, error) {
	if err := n.send(OptExportName, []byte(export)); err != nil {
		return nil, err
	}
	var b [ExportNameReplyLen + ExportNamePadLen]byte
	want := ExportNameReplyLen
	if !n.noZeroes {
		want += ExportNamePadLen
	}
	if _, err := io.ReadFull(n.br, b[:want]); err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("nbd: server closed the connection on export %q: it does not exist or is refused", export)
		}
		return nil, fmt.Errorf("nbd: reading the reply to NBD_OPT_EXPORT_NAME: %w", err)
	}
	info := n.newInfo(export)
	info.Size, info.Flags = ParseExportNameReply(b[:])
	info.ExportName = true
	if err := info.check(); err != nil {
		return nil, err
	}
	return info, nil
}

// Abort ends the handshake politely (NBD_OPT_ABORT). The server may hang
// up without replying; that is fine.
func (n *Negotiator) Abort() {
	if n.fixed && n.send(OptAbort, nil) == nil {
		_, _, _ = n.reply(OptAbort)
	}
}

// errServerClosed is how noEOF reports a hang-up.
var errServerClosed = errors.New("server closed the connection")

// noEOF turns the ways a hang-up shows (EOF, EPIPE, ECONNRESET) into an
// error that says so.
func noEOF(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
		return errServerClosed
	}
	return err
}

// ExplainOptionError turns a handshake error into a line a user can act
// on, naming the export and what to do. The result still unwraps to the
// *OptionError.
func ExplainOptionError(err error, u *URI) error {
	var oe *OptionError
	if !errors.As(err, &oe) {
		return err
	}
	detail := ""
	if oe.Msg != "" {
		detail = " (" + strings.TrimSpace(oe.Msg) + ")"
	}
	var msg string
	switch oe.Reply {
	case RepErrUnknown:
		msg = fmt.Sprintf("export %q does not exist on %s%s; list the exports with: snapmount info --list '%s'", u.Export, u.Address, detail, u.WithExport(""))
	case RepErrTLSReqd:
		msg = fmt.Sprintf("server %s requires TLS%s: use an nbds:// or nbds+unix:// URI with tls-certificates=DIR", u.Address, detail)
	case RepErrPolicy:
		msg = fmt.Sprintf("server %s refused export %q by policy%s", u.Address, u.Export, detail)
	case RepErrShutdown:
		msg = fmt.Sprintf("server %s is shutting down%s", u.Address, detail)
	default:
		return err
	}
	return &explainedError{msg: "nbd: " + msg, err: err}
}

// explainedError is an error reworded for users that keeps its cause.
type explainedError struct {
	msg string
	err error
}

func (e *explainedError) Error() string { return e.msg }
func (e *explainedError) Unwrap() error { return e.err }
