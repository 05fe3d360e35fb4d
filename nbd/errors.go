package nbd

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
)

// Errno is an error value carried in a reply (proto.md "Error values").
// The wire values are fixed by the spec and happen to equal Linux errnos.
type Errno uint32

const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

var errnoNames = map[Errno]string{
	EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL",
	ENOSPC: "ENOSPC", EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN",
}

func (e Errno) String() string {
	if s, ok := errnoNames[e]; ok {
		return s
	}
	return fmt.Sprintf("errno %d", uint32(e))
}

// Error makes an Errno usable as an error on its own.
func (e Errno) Error() string { return e.String() }

// Syscall maps the wire value to the local errno. A client MUST treat an
// unknown value as EINVAL.
func (e Errno) Syscall() syscall.Errno {
	if _, ok := errnoNames[e]; ok {
		return syscall.Errno(e)
	}
	return syscall.EINVAL
}

// ErrnoOf picks the wire errno that best describes a local error: an Errno
// or syscall.Errno it wraps, else EIO. EDQUOT and EFBIG become ENOSPC as
// the spec asks.
func ErrnoOf(err error) Errno {
	var e Errno
	if errors.As(err, &e) {
		return e
	}
	var re *RequestError
	if errors.As(err, &re) {
		return re.Errno
	}
	var se syscall.Errno
	if errors.As(err, &se) {
		switch se {
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return EPERM
		case syscall.ENOMEM:
			return ENOMEM
		case syscall.EINVAL:
			return EINVAL
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EOVERFLOW:
			return EOVERFLOW
		case syscall.ENOTSUP:
			return ENOTSUP
		case syscall.ESHUTDOWN:
			return ESHUTDOWN
		}
	}
	return EIO
}

// RequestError is an error the server reported for one request. It fails
// that request only; the connection stays usable.
type RequestError struct {
	Cmd    Cmd
	Offset uint64 // where the server said the error is (ERROR_OFFSET), else the request's offset
	Length uint32
	Errno  Errno
	Msg    string // the server's message, if it sent one
}

func (e *RequestError) Error() string {
	s := fmt.Sprintf("nbd: %s of %d bytes at offset %d: server replied %s", e.Cmd, e.Length, e.Offset, e.Errno)
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	return s
}

// Unwrap lets errors.Is(err, syscall.EIO) match a server's EIO.
func (e *RequestError) Unwrap() error { return e.Errno.Syscall() }

// ProtocolError is a violation of the protocol by the peer. The connection
// it happened on cannot be trusted any more and is closed.
type ProtocolError struct{ Msg string }

func (e *ProtocolError) Error() string { return "nbd: protocol error: " + e.Msg }

func protoErrorf(format string, args ...any) error {
	return &ProtocolError{Msg: fmt.Sprintf(format, args...)}
}

// OptionError is an error reply to an option in the handshake.
type OptionError struct {
	Opt   Option
	Reply Reply
	Msg   string // the server's message, if any
}

func (e *OptionError) Error() string {
	s := fmt.Sprintf("nbd: server answered %s with %s", e.Opt, e.Reply)
	if e.Msg != "" {
		s += ": " + e.Msg
	}
	return s
}

// Errors a caller can test for with errors.Is.
var (
	// ErrClosed is returned for requests on a connection or client that
	// was closed by its user.
	ErrClosed = errors.New("nbd: connection closed")
	// ErrOldstyle is returned when the server speaks the oldstyle
	// handshake, which has no export names and no options.
	ErrOldstyle = errors.New("nbd: server uses the oldstyle handshake, which is not supported (upgrade the server or use its newstyle mode)")
	// ErrNotNBD is returned when the peer's first bytes are not NBD.
	ErrNotNBD = errors.New("nbd: peer does not speak NBD (bad greeting magic)")
	// ErrWriteRefused is what a read-only view answers to any attempt to
	// change data.
	ErrWriteRefused = errors.New("nbd: write-type commands are never sent by a read-only client")
)

// SnapshotBrokenError is what snapmount serve answers for a snapshot it
// broke (its store full, or a copy into it failed): EIO, with a text that
// names the snapshot and the reason. The protocol carries the why only as
// that text, so a client that wants to tell a broken snapshot from other
// errors matches it with IsSnapshotBroken, the one reading of this one
// wording.
type SnapshotBrokenError struct {
	Snapshot string // canonical name, "disk@s7"
	Reason   string
}

// snapshotBrokenText and snapshotBrokenMark word SnapshotBrokenError.
const (
	snapshotBrokenText = "snapshot "
	snapshotBrokenMark = " is broken ("
)

func (e *SnapshotBrokenError) Error() string {
	return snapshotBrokenText + e.Snapshot + snapshotBrokenMark + e.Reason + ")"
}

// Unwrap makes the error an EIO (ErrnoOf, errors.Is).
func (e *SnapshotBrokenError) Unwrap() error { return EIO }

// IsSnapshotBroken reports whether msg, the text of an error a server
// sent, is a SnapshotBrokenError's.
func IsSnapshotBroken(msg string) bool {
	rest, ok := strings.CutPrefix(msg, snapshotBrokenText)
	return ok && strings.Contains(rest, snapshotBrokenMark)
}
