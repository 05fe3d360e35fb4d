package nbd

// The codec: every message of the handshake and transmission phases,
// encoded and decoded by hand with encoding/binary (big-endian). The client
// here and the server (nbd/server) both use these functions; nothing else
// touches byte offsets. Decoders check every length before using or
// allocating it.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"unicode/utf8"
)

var be = binary.BigEndian

// CheckString enforces the spec's rules for strings on the wire: at most
// 4096 bytes, valid UTF-8, no NUL.
func CheckString(what string, b []byte) error {
	if len(b) > MaxStringLen {
		return protoErrorf("%s of %d bytes exceeds the 4096-byte limit", what, len(b))
	}
	if bytes.IndexByte(b, 0) >= 0 {
		return protoErrorf("%s contains a NUL byte", what)
	}
	if !utf8.Valid(b) {
		return protoErrorf("%s is not valid UTF-8", what)
	}
	return nil
}

// ---- Handshake: greeting ----

// AppendGreeting encodes the fixed-newstyle greeting a server sends first.
func AppendGreeting(b []byte, flags HandshakeFlags) []byte {
	b = be.AppendUint64(b, Magic)
	b = be.AppendUint64(b, IHaveOpt)
	return be.AppendUint16(b, uint16(flags))
}

// AppendClientFlags encodes the client's answer to the greeting.
func AppendClientFlags(b []byte, flags ClientFlags) []byte {
	return be.AppendUint32(b, uint32(flags))
}

// ParseClientFlags decodes the 4-byte answer to the greeting.
func ParseClientFlags(b []byte) ClientFlags { return ClientFlags(be.Uint32(b)) }

// ---- Handshake: option requests ----

// AppendOption encodes one option request with its data.
func AppendOption(b []byte, opt Option, data []byte) []byte {
	b = be.AppendUint64(b, IHaveOpt)
	b = be.AppendUint32(b, uint32(opt))
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// ParseOptionHeader decodes the 16-byte header of an option request. The
// caller decides, from the length, whether to read or drain the data.
func ParseOptionHeader(b []byte) (Option, uint32, error) {
	if m := be.Uint64(b[0:8]); m != IHaveOpt {
		return 0, 0, protoErrorf("option request magic %#x, want IHAVEOPT", m)
	}
	return Option(be.Uint32(b[8:12])), be.Uint32(b[12:16]), nil
}

// ---- Handshake: option replies ----

// AppendOptionReply encodes one option reply.
func AppendOptionReply(b []byte, opt Option, typ Reply, data []byte) []byte {
	b = be.AppendUint64(b, OptReplyMagic)
	b = be.AppendUint32(b, uint32(opt))
	b = be.AppendUint32(b, uint32(typ))
	b = be.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// ParseOptionReplyHeader decodes the 20-byte header of an option reply.
func ParseOptionReplyHeader(b []byte) (opt Option, typ Reply, length uint32, err error) {
	if m := be.Uint64(b[0:8]); m != OptReplyMagic {
		return 0, 0, 0, protoErrorf("option reply magic %#x, want %#x", m, OptReplyMagic)
	}
	return Option(be.Uint32(b[8:12])), Reply(be.Uint32(b[12:16])), be.Uint32(b[16:20]), nil
}

// ExportRequest is the data of NBD_OPT_INFO and NBD_OPT_GO: an export name
// and the information types the client asks for.
type ExportRequest struct {
	Name  string
	Infos []InfoType
}

// Encode returns the option data of INFO or GO.
func (r *ExportRequest) Encode() []byte {
	b := make([]byte, 0, 4+len(r.Name)+2+2*len(r.Infos))
	b = be.AppendUint32(b, uint32(len(r.Name)))
	b = append(b, r.Name...)
	b = be.AppendUint16(b, uint16(len(r.Infos)))
	for _, t := range r.Infos {
		b = be.AppendUint16(b, uint16(t))
	}
	return b
}

// ParseExportRequest decodes INFO/GO data: u32 name length, name, u16
// count, count x u16 info types. Every length must add up exactly.
func ParseExportRequest(data []byte) (ExportRequest, error) {
	var r ExportRequest
	if len(data) < 6 {
		return r, protoErrorf("INFO/GO data of %d bytes, want at least 6", len(data))
	}
	nameLen := be.Uint32(data[0:4])
	if uint64(nameLen) > uint64(len(data)-6) {
		return r, protoErrorf("INFO/GO name length %d does not fit in %d bytes of data", nameLen, len(data))
	}
	name := data[4 : 4+nameLen]
	if err := CheckString("export name", name); err != nil {
		return r, err
	}
	rest := data[4+nameLen:]
	n := int(be.Uint16(rest[0:2]))
	rest = rest[2:]
	if len(rest) != 2*n {
		return r, protoErrorf("INFO/GO asks for %d info types in %d bytes", n, len(rest))
	}
	r.Name = string(name)
	r.Infos = make([]InfoType, n)
	for i := range r.Infos {
		r.Infos[i] = InfoType(be.Uint16(rest[2*i:]))
	}
	return r, nil
}

// MetaContextRequest is the data of LIST_META_CONTEXT and
// SET_META_CONTEXT: the export and the context queries.
type MetaContextRequest struct {
	Export  string
	Queries []string
}

// Encode returns the option data of LIST or SET_META_CONTEXT.
func (r *MetaContextRequest) Encode() []byte {
	b := be.AppendUint32(nil, uint32(len(r.Export)))
	b = append(b, r.Export...)
	b = be.AppendUint32(b, uint32(len(r.Queries)))
	for _, q := range r.Queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// ParseMetaContextRequest decodes LIST/SET_META_CONTEXT data.
func ParseMetaContextRequest(data []byte) (MetaContextRequest, error) {
	var r MetaContextRequest
	rd := reader{b: data}
	name, err := rd.string32("meta context export name")
	if err != nil {
		return r, err
	}
	n, ok := rd.u32()
	if !ok {
		return r, protoErrorf("meta context request truncated before the query count")
	}
	// Each query needs at least its 4-byte length: bound n by the data
	// before allocating anything for it.
	if uint64(n)*4 > uint64(len(rd.b)) {
		return r, protoErrorf("meta context request claims %d queries in %d bytes", n, len(rd.b))
	}
	r.Export = name
	for i := uint32(0); i < n; i++ {
		q, err := rd.string32("meta context query")
		if err != nil {
			return r, err
		}
		r.Queries = append(r.Queries, q)
	}
	if len(rd.b) != 0 {
		return r, protoErrorf("meta context request has %d trailing bytes", len(rd.b))
	}
	return r, nil
}

// ExportEntry is one NBD_REP_SERVER reply to NBD_OPT_LIST.
type ExportEntry struct {
	Name        string
	Description string
}

// Encode returns the data of one NBD_REP_SERVER reply.
func (e *ExportEntry) Encode() []byte {
	b := be.AppendUint32(nil, uint32(len(e.Name)))
	b = append(b, e.Name...)
	return append(b, e.Description...)
}

// ParseServerReply decodes the data of one NBD_REP_SERVER reply.
func ParseServerReply(data []byte) (ExportEntry, error) {
	var e ExportEntry
	rd := reader{b: data}
	name, err := rd.string32("export name in NBD_REP_SERVER")
	if err != nil {
		return e, err
	}
	if err := CheckString("export description", rd.b); err != nil {
		return e, err
	}
	e.Name, e.Description = name, string(rd.b)
	return e, nil
}

// BlockSize is NBD_INFO_BLOCK_SIZE: the server's alignment and size limits.
type BlockSize struct {
	Min, Preferred, Max uint32
}

func (s BlockSize) validate() error {
	if s.Min == 0 || s.Min&(s.Min-1) != 0 || s.Min > 64<<10 {
		return protoErrorf("minimum block size %d is not a power of two <= 64 KiB", s.Min)
	}
	if s.Preferred&(s.Preferred-1) != 0 || s.Preferred < s.Min || s.Preferred < 512 {
		return protoErrorf("preferred block size %d is not a power of two >= max(minimum, 512)", s.Preferred)
	}
	if s.Max < s.Preferred {
		return protoErrorf("maximum payload %d is below the preferred block size %d", s.Max, s.Preferred)
	}
	return nil
}

// InfoReply is the decoded payload of one NBD_REP_INFO.
type InfoReply struct {
	Type        InfoType
	Size        uint64            // InfoExport
	Flags       TransmissionFlags // InfoExport
	Text        string            // InfoName, InfoDescription
	BlockSize   BlockSize         // InfoBlockSize
	UnknownType bool              // a type this code does not know: ignore it
}

// AppendInfoExport encodes NBD_INFO_EXPORT: the size and transmission flags.
func AppendInfoExport(b []byte, size uint64, flags TransmissionFlags) []byte {
	b = be.AppendUint16(b, uint16(InfoExport))
	b = be.AppendUint64(b, size)
	return be.AppendUint16(b, uint16(flags))
}

// AppendInfoText encodes NBD_INFO_NAME or NBD_INFO_DESCRIPTION.
func AppendInfoText(b []byte, t InfoType, s string) []byte {
	b = be.AppendUint16(b, uint16(t))
	return append(b, s...)
}

// AppendInfoBlockSize encodes NBD_INFO_BLOCK_SIZE.
func AppendInfoBlockSize(b []byte, s BlockSize) []byte {
	b = be.AppendUint16(b, uint16(InfoBlockSize))
	b = be.AppendUint32(b, s.Min)
	b = be.AppendUint32(b, s.Preferred)
	return be.AppendUint32(b, s.Max)
}

// ParseInfoReply decodes the data of one NBD_REP_INFO.
func ParseInfoReply(data []byte) (InfoReply, error) {
	var r InfoReply
	if len(data) < 2 {
		return r, protoErrorf("NBD_REP_INFO of %d bytes has no type", len(data))
	}
	r.Type = InfoType(be.Uint16(data))
	body := data[2:]
	switch r.Type {
	case InfoExport:
		if len(body) != 10 {
			return r, protoErrorf("NBD_INFO_EXPORT of %d bytes, want 12", len(data))
		}
		r.Size = be.Uint64(body)
		r.Flags = TransmissionFlags(be.Uint16(body[8:]))
	case InfoName, InfoDescription:
		if err := CheckString(r.Type.String(), body); err != nil {
			return r, err
		}
		r.Text = string(body)
	case InfoBlockSize:
		if len(body) != 12 {
			return r, protoErrorf("NBD_INFO_BLOCK_SIZE of %d bytes, want 14", len(data))
		}
		r.BlockSize = BlockSize{be.Uint32(body), be.Uint32(body[4:]), be.Uint32(body[8:])}
	default:
		r.UnknownType = true
	}
	return r, nil
}

// AppendMetaContextReply encodes the data of one NBD_REP_META_CONTEXT.
func AppendMetaContextReply(b []byte, id uint32, name string) []byte {
	b = be.AppendUint32(b, id)
	return append(b, name...)
}

// ParseMetaContextReply decodes the data of one NBD_REP_META_CONTEXT: the
// context's id and name.
func ParseMetaContextReply(data []byte) (uint32, string, error) {
	if len(data) < 4 {
		return 0, "", protoErrorf("NBD_REP_META_CONTEXT of %d bytes", len(data))
	}
	if err := CheckString("meta context name", data[4:]); err != nil {
		return 0, "", err
	}
	return be.Uint32(data), string(data[4:]), nil
}

// AppendExportNameReply encodes the reply to NBD_OPT_EXPORT_NAME: the size
// and flags, then the zero padding unless the client asked for NO_ZEROES.
func AppendExportNameReply(b []byte, size uint64, flags TransmissionFlags, noZeroes bool) []byte {
	b = be.AppendUint64(b, size)
	b = be.AppendUint16(b, uint16(flags))
	if !noZeroes {
		b = append(b, make([]byte, ExportNamePadLen)...)
	}
	return b
}

// ParseExportNameReply decodes the reply to NBD_OPT_EXPORT_NAME (without
// the optional padding).
func ParseExportNameReply(b []byte) (uint64, TransmissionFlags) {
	return be.Uint64(b), TransmissionFlags(be.Uint16(b[8:]))
}

// ---- Transmission: requests ----

// Request is a compact request header (28 bytes). For CmdWrite, Length
// bytes of payload follow it on the wire.
type Request struct {
	Flags  CmdFlags
	Type   Cmd
	Cookie uint64
	Offset uint64
	Length uint32
}

// Encode writes the header into b, which must hold 28 bytes.
func (r *Request) Encode(b []byte) {
	_ = b[RequestHeaderLen-1]
	be.PutUint32(b[0:], RequestMagic)
	be.PutUint16(b[4:], uint16(r.Flags))
	be.PutUint16(b[6:], uint16(r.Type))
	be.PutUint64(b[8:], r.Cookie)
	be.PutUint64(b[16:], r.Offset)
	be.PutUint32(b[24:], r.Length)
}

// ParseRequest decodes a compact request header. A bad magic means the
// stream is out of step: the caller must drop the connection.
func ParseRequest(b []byte) (Request, error) {
	_ = b[RequestHeaderLen-1]
	if m := be.Uint32(b); m != RequestMagic {
		return Request{}, protoErrorf("request magic %#x, want %#x", m, RequestMagic)
	}
	return Request{
		Flags:  CmdFlags(be.Uint16(b[4:])),
		Type:   Cmd(be.Uint16(b[6:])),
		Cookie: be.Uint64(b[8:]),
		Offset: be.Uint64(b[16:]),
		Length: be.Uint32(b[24:]),
	}, nil
}

// ---- Transmission: replies ----

// ReplyHeader is a decoded simple reply or structured chunk header.
type ReplyHeader struct {
	Structured bool
	Errno      Errno     // simple replies
	Flags      uint16    // structured
	Type       ChunkType // structured
	Cookie     uint64
	Length     uint32 // structured: payload length
}

// AppendSimpleReply encodes a simple reply header (errno 0: success).
func AppendSimpleReply(b []byte, errno Errno, cookie uint64) []byte {
	b = be.AppendUint32(b, SimpleReplyMagic)
	b = be.AppendUint32(b, uint32(errno))
	return be.AppendUint64(b, cookie)
}

// AppendChunkHeader encodes the header of a structured reply chunk whose
// payload has length bytes.
func AppendChunkHeader(b []byte, flags uint16, typ ChunkType, cookie uint64, length uint32) []byte {
	b = be.AppendUint32(b, StructuredReplyMagic)
	b = be.AppendUint16(b, flags)
	b = be.AppendUint16(b, uint16(typ))
	b = be.AppendUint64(b, cookie)
	return be.AppendUint32(b, length)
}

// AppendHoleChunk encodes a whole OFFSET_HOLE chunk: length bytes of zeros
// at off.
func AppendHoleChunk(b []byte, flags uint16, cookie, off uint64, length uint32) []byte {
	b = AppendChunkHeader(b, flags, ChunkOffsetHole, cookie, 12)
	b = be.AppendUint64(b, off)
	return be.AppendUint32(b, length)
}

// AppendDataChunkHeader encodes the header and offset of an OFFSET_DATA
// chunk; its length bytes of data follow.
func AppendDataChunkHeader(b []byte, flags uint16, cookie, off uint64, length uint32) []byte {
	b = AppendChunkHeader(b, flags, ChunkOffsetData, cookie, 8+length)
	return be.AppendUint64(b, off)
}

// ReadReplyHeader reads a simple reply (16 bytes) or a chunk header (20
// bytes), telling them apart by magic.
func ReadReplyHeader(r io.Reader, buf *[ChunkHeaderLen]byte) (ReplyHeader, error) {
	var h ReplyHeader
	if _, err := io.ReadFull(r, buf[:SimpleReplyLen]); err != nil {
		return h, err
	}
	switch m := be.Uint32(buf[0:]); m {
	case SimpleReplyMagic:
		h.Errno = Errno(be.Uint32(buf[4:]))
		h.Cookie = be.Uint64(buf[8:])
	case StructuredReplyMagic:
		if _, err := io.ReadFull(r, buf[SimpleReplyLen:ChunkHeaderLen]); err != nil {
			return h, err
		}
		h.Structured = true
		h.Flags = be.Uint16(buf[4:])
		h.Type = ChunkType(be.Uint16(buf[6:]))
		h.Cookie = be.Uint64(buf[8:])
		h.Length = be.Uint32(buf[16:])
	default:
		return h, protoErrorf("reply magic %#x is neither simple nor structured", m)
	}
	return h, nil
}

// AppendErrorChunkPayload encodes the payload of ERROR (offset < 0) or
// ERROR_OFFSET.
func AppendErrorChunkPayload(b []byte, errno Errno, msg string, offset int64) []byte {
	if len(msg) > MaxStringLen {
		msg = msg[:MaxStringLen]
	}
	b = be.AppendUint32(b, uint32(errno))
	b = be.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	if offset >= 0 {
		b = be.AppendUint64(b, uint64(offset))
	}
	return b
}

// ErrorChunk is a decoded ERROR or ERROR_OFFSET payload.
type ErrorChunk struct {
	Errno     Errno
	Msg       string
	Offset    uint64
	HasOffset bool
}

// ParseErrorChunk decodes the payload of an error chunk of type typ.
func ParseErrorChunk(typ ChunkType, p []byte) (ErrorChunk, error) {
	var e ErrorChunk
	if len(p) < 6 {
		return e, protoErrorf("error chunk of %d bytes, want at least 6", len(p))
	}
	e.Errno = Errno(be.Uint32(p))
	if e.Errno == 0 {
		return e, protoErrorf("error chunk carries error value 0")
	}
	n := int(be.Uint16(p[4:]))
	if n > len(p)-6 || n > MaxStringLen {
		return e, protoErrorf("error chunk message length %d does not fit in %d bytes", n, len(p))
	}
	// Messages are for humans: replace invalid UTF-8 rather than fail.
	e.Msg = string(bytes.ToValidUTF8(bytes.ReplaceAll(p[6:6+n], []byte{0}, nil), []byte("?")))
	rest := p[6+n:]
	switch typ {
	case ChunkErrorOffset:
		if len(rest) != 8 {
			return e, protoErrorf("ERROR_OFFSET chunk has %d bytes after its message, want 8", len(rest))
		}
		e.Offset, e.HasOffset = be.Uint64(rest), true
	case ChunkError:
		if len(rest) != 0 {
			return e, protoErrorf("ERROR chunk has %d trailing bytes", len(rest))
		}
	}
	// Other error-class types may carry more data; the caller only needs
	// the errno and message.
	return e, nil
}

// WireExtent is one (length, status) pair of a BLOCK_STATUS chunk.
type WireExtent struct {
	Length uint32
	Flags  uint32
}

// AppendBlockStatusPayload encodes the payload of a BLOCK_STATUS chunk.
func AppendBlockStatusPayload(b []byte, contextID uint32, extents []WireExtent) []byte {
	b = be.AppendUint32(b, contextID)
	for _, e := range extents {
		b = be.AppendUint32(b, e.Length)
		b = be.AppendUint32(b, e.Flags)
	}
	return b
}

// ParseBlockStatusPayload decodes the payload of a BLOCK_STATUS chunk: the
// context id and its extents.
func ParseBlockStatusPayload(p []byte) (uint32, []WireExtent, error) {
	if len(p) < 12 || (len(p)-4)%8 != 0 {
		return 0, nil, protoErrorf("BLOCK_STATUS chunk of %d bytes is not 4 + 8n with n >= 1", len(p))
	}
	id := be.Uint32(p)
	ext := make([]WireExtent, (len(p)-4)/8)
	for i := range ext {
		o := 4 + 8*i
		ext[i] = WireExtent{Length: be.Uint32(p[o:]), Flags: be.Uint32(p[o+4:])}
		if ext[i].Length == 0 {
			return 0, nil, protoErrorf("BLOCK_STATUS extent %d has length 0", i)
		}
	}
	return id, ext, nil
}

// reader walks a byte slice for the variable-length payloads.
type reader struct{ b []byte }

func (r *reader) u32() (uint32, bool) {
	if len(r.b) < 4 {
		return 0, false
	}
	v := be.Uint32(r.b)
	r.b = r.b[4:]
	return v, true
}

// string32 reads a u32 length and that many bytes of checked string.
func (r *reader) string32(what string) (string, error) {
	n, ok := r.u32()
	if !ok {
		return "", protoErrorf("%s: truncated length", what)
	}
	if uint64(n) > uint64(len(r.b)) {
		return "", protoErrorf("%s: length %d exceeds the %d bytes left", what, n, len(r.b))
	}
	s := r.b[:n]
	if err := CheckString(what, s); err != nil {
		return "", err
	}
	r.b = r.b[n:]
	return string(s), nil
}

// discard reads and drops n bytes from r.
func discard(r io.Reader, n int64) error {
	if n == 0 {
		return nil
	}
	m, err := io.CopyN(io.Discard, r, n)
	if err != nil && m < n {
		return fmt.Errorf("nbd: draining %d bytes: %w", n, err)
	}
	return nil
}
