package nbd

// Every constant of the NBD protocol, grouped and named as doc/proto.md of
// NetworkBlockDevice/nbd names them (NBD_OPT_GO is OptGo, NBD_FLAG_READ_ONLY
// is FlagReadOnly, and so on). The values are exact; where a constant only
// exists on an experimental branch of the spec, its comment says so.
//
// https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md

import (
	"fmt"
	"strings"
)

// Magic numbers (proto.md "Handshake" and "Transmission").
const (
	Magic                uint64 = 0x4e42444d41474943 // "NBDMAGIC", first 8 bytes from the server
	OldstyleMagic        uint64 = 0x00420281861253   // cliserv_magic of the oldstyle handshake
	IHaveOpt             uint64 = 0x49484156454F5054 // "IHAVEOPT": newstyle greeting and every option request
	OptReplyMagic        uint64 = 0x0003e889045565a9 // every fixed-newstyle option reply
	RequestMagic         uint32 = 0x25609513         // compact request header
	ExtendedRequestMagic uint32 = 0x21e41c71         // extended request header (extension-ext-header branch)
	SimpleReplyMagic     uint32 = 0x67446698         // simple reply header
	StructuredReplyMagic uint32 = 0x668e33ef         // structured reply chunk header
	ExtendedReplyMagic   uint32 = 0x6e8a278c         // extended reply chunk (extension-ext-header branch)
)

// DefaultPort is the IANA port of NBD.
const DefaultPort = 10809

// Sizes of fixed headers on the wire.
const (
	GreetingLen        = 18  // NBDMAGIC + IHAVEOPT + u16 handshake flags
	OptionHeaderLen    = 16  // IHAVEOPT + u32 option + u32 length
	OptionReplyLen     = 20  // magic + u32 option + u32 type + u32 length
	RequestHeaderLen   = 28  // compact request
	SimpleReplyLen     = 16  // simple reply
	ChunkHeaderLen     = 20  // structured reply chunk
	ExportNameReplyLen = 10  // u64 size + u16 flags after NBD_OPT_EXPORT_NAME
	ExportNamePadLen   = 124 // zero padding after it unless NO_ZEROES
	OldstyleRestLen    = 152 - 16
)

// Limits the spec sets or that every peer honours.
const (
	// MaxStringLen caps export names, messages, descriptions and context
	// names (proto.md: strings MUST be <= 4096 bytes).
	MaxStringLen = 4096
	// MaxPayload is the largest READ or WRITE payload the spec says no one
	// may treat as a denial of service (2^25); the default maximum when the
	// server states none.
	MaxPayload = 32 << 20
	// DefaultMinBlock and DefaultPrefBlock apply when the server sends no
	// NBD_INFO_BLOCK_SIZE: interoperable clients align to 512 bytes.
	DefaultMinBlock  = 512
	DefaultPrefBlock = 4096
)

// HandshakeFlags are the server's 16 handshake flags (proto.md "Newstyle
// negotiation").
type HandshakeFlags uint16

const (
	HandshakeFixedNewstyle HandshakeFlags = 1 << 0 // NBD_FLAG_FIXED_NEWSTYLE
	HandshakeNoZeroes      HandshakeFlags = 1 << 1 // NBD_FLAG_NO_ZEROES
)

// ClientFlags are the client's 32 handshake flags.
type ClientFlags uint32

const (
	ClientFixedNewstyle ClientFlags = 1 << 0 // NBD_FLAG_C_FIXED_NEWSTYLE
	ClientNoZeroes      ClientFlags = 1 << 1 // NBD_FLAG_C_NO_ZEROES
)

// Option is an option a client sends during the handshake (NBD_OPT_*).
type Option uint32

const (
	OptExportName      Option = 1  // NBD_OPT_EXPORT_NAME
	OptAbort           Option = 2  // NBD_OPT_ABORT
	OptList            Option = 3  // NBD_OPT_LIST
	OptPeekExport      Option = 4  // NBD_OPT_PEEK_EXPORT, withdrawn: never reuse
	OptStartTLS        Option = 5  // NBD_OPT_STARTTLS
	OptInfo            Option = 6  // NBD_OPT_INFO
	OptGo              Option = 7  // NBD_OPT_GO
	OptStructuredReply Option = 8  // NBD_OPT_STRUCTURED_REPLY
	OptListMetaContext Option = 9  // NBD_OPT_LIST_META_CONTEXT
	OptSetMetaContext  Option = 10 // NBD_OPT_SET_META_CONTEXT
	OptExtendedHeaders Option = 11 // NBD_OPT_EXTENDED_HEADERS (extension-ext-header branch)

	// OptXReadOnly is snapmount's private option: the client promises to
	// be a reader. It is sent with no data after STARTTLS and
	// STRUCTURED_REPLY, before INFO/GO; a server that knows it answers
	// ACK and from then on treats the connection as read-only and never
	// as a writer. Stock servers answer NBD_REP_ERR_UNSUP. Bit 31 is clear
	// so it cannot be mistaken for an error reply in logs; the value spells
	// "SNP"+1. Keep it the one constant: it can be replaced if a number is
	// ever reserved upstream.
	OptXReadOnly Option = 0x534E5001
)

var optionNames = map[Option]string{
	OptExportName:      "EXPORT_NAME",
	OptAbort:           "ABORT",
	OptList:            "LIST",
	OptPeekExport:      "PEEK_EXPORT",
	OptStartTLS:        "STARTTLS",
	OptInfo:            "INFO",
	OptGo:              "GO",
	OptStructuredReply: "STRUCTURED_REPLY",
	OptListMetaContext: "LIST_META_CONTEXT",
	OptSetMetaContext:  "SET_META_CONTEXT",
	OptExtendedHeaders: "EXTENDED_HEADERS",
	OptXReadOnly:       "X_READ_ONLY",
}

func (o Option) String() string {
	if s, ok := optionNames[o]; ok {
		return "NBD_OPT_" + s
	}
	return fmt.Sprintf("NBD_OPT_%#x", uint32(o))
}

// Reply is the type of an option reply (NBD_REP_*). Error replies have
// bit 31 set.
type Reply uint32

const (
	RepAck         Reply = 1 // NBD_REP_ACK
	RepServer      Reply = 2 // NBD_REP_SERVER
	RepInfo        Reply = 3 // NBD_REP_INFO
	RepMetaContext Reply = 4 // NBD_REP_META_CONTEXT

	repErrBit           Reply = 1 << 31
	RepErrUnsup         Reply = repErrBit | 1  // NBD_REP_ERR_UNSUP
	RepErrPolicy        Reply = repErrBit | 2  // NBD_REP_ERR_POLICY
	RepErrInvalid       Reply = repErrBit | 3  // NBD_REP_ERR_INVALID
	RepErrPlatform      Reply = repErrBit | 4  // NBD_REP_ERR_PLATFORM
	RepErrTLSReqd       Reply = repErrBit | 5  // NBD_REP_ERR_TLS_REQD
	RepErrUnknown       Reply = repErrBit | 6  // NBD_REP_ERR_UNKNOWN
	RepErrShutdown      Reply = repErrBit | 7  // NBD_REP_ERR_SHUTDOWN
	RepErrBlockSizeReqd Reply = repErrBit | 8  // NBD_REP_ERR_BLOCK_SIZE_REQD
	RepErrTooBig        Reply = repErrBit | 9  // NBD_REP_ERR_TOO_BIG
	RepErrExtHeaderReqd Reply = repErrBit | 10 // NBD_REP_ERR_EXT_HEADER_REQD (extension-ext-header branch)
)

// IsError reports whether r is an error reply.
func (r Reply) IsError() bool { return r&repErrBit != 0 }

var replyNames = map[Reply]string{
	RepAck:              "ACK",
	RepServer:           "SERVER",
	RepInfo:             "INFO",
	RepMetaContext:      "META_CONTEXT",
	RepErrUnsup:         "ERR_UNSUP",
	RepErrPolicy:        "ERR_POLICY",
	RepErrInvalid:       "ERR_INVALID",
	RepErrPlatform:      "ERR_PLATFORM",
	RepErrTLSReqd:       "ERR_TLS_REQD",
	RepErrUnknown:       "ERR_UNKNOWN",
	RepErrShutdown:      "ERR_SHUTDOWN",
	RepErrBlockSizeReqd: "ERR_BLOCK_SIZE_REQD",
	RepErrTooBig:        "ERR_TOO_BIG",
	RepErrExtHeaderReqd: "ERR_EXT_HEADER_REQD",
}

func (r Reply) String() string {
	if s, ok := replyNames[r]; ok {
		return "NBD_REP_" + s
	}
	return fmt.Sprintf("NBD_REP_%#x", uint32(r))
}

// InfoType is the type of an NBD_REP_INFO payload (NBD_INFO_*).
type InfoType uint16

const (
	InfoExport      InfoType = 0 // NBD_INFO_EXPORT: size and transmission flags
	InfoName        InfoType = 1 // NBD_INFO_NAME: canonical export name
	InfoDescription InfoType = 2 // NBD_INFO_DESCRIPTION
	InfoBlockSize   InfoType = 3 // NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum
)

func (t InfoType) String() string {
	switch t {
	case InfoExport:
		return "NBD_INFO_EXPORT"
	case InfoName:
		return "NBD_INFO_NAME"
	case InfoDescription:
		return "NBD_INFO_DESCRIPTION"
	case InfoBlockSize:
		return "NBD_INFO_BLOCK_SIZE"
	}
	return fmt.Sprintf("NBD_INFO_%d", uint16(t))
}

// TransmissionFlags describe an export (NBD_FLAG_* in INFO_EXPORT and the
// EXPORT_NAME reply).
type TransmissionFlags uint16

const (
	FlagHasFlags           TransmissionFlags = 1 << 0  // NBD_FLAG_HAS_FLAGS, always set
	FlagReadOnly           TransmissionFlags = 1 << 1  // NBD_FLAG_READ_ONLY
	FlagSendFlush          TransmissionFlags = 1 << 2  // NBD_FLAG_SEND_FLUSH
	FlagSendFUA            TransmissionFlags = 1 << 3  // NBD_FLAG_SEND_FUA
	FlagRotational         TransmissionFlags = 1 << 4  // NBD_FLAG_ROTATIONAL
	FlagSendTrim           TransmissionFlags = 1 << 5  // NBD_FLAG_SEND_TRIM
	FlagSendWriteZeroes    TransmissionFlags = 1 << 6  // NBD_FLAG_SEND_WRITE_ZEROES
	FlagSendDF             TransmissionFlags = 1 << 7  // NBD_FLAG_SEND_DF
	FlagCanMultiConn       TransmissionFlags = 1 << 8  // NBD_FLAG_CAN_MULTI_CONN
	FlagSendResize         TransmissionFlags = 1 << 9  // NBD_FLAG_SEND_RESIZE (extension-resize branch)
	FlagSendCache          TransmissionFlags = 1 << 10 // NBD_FLAG_SEND_CACHE
	FlagSendFastZero       TransmissionFlags = 1 << 11 // NBD_FLAG_SEND_FAST_ZERO
	FlagBlockStatusPayload TransmissionFlags = 1 << 12 // NBD_FLAG_BLOCK_STATUS_PAYLOAD (extension-ext-header branch)
)

var transmissionFlagNames = []struct {
	f    TransmissionFlags
	name string
}{
	{FlagHasFlags, "HAS_FLAGS"},
	{FlagReadOnly, "READ_ONLY"},
	{FlagSendFlush, "SEND_FLUSH"},
	{FlagSendFUA, "SEND_FUA"},
	{FlagRotational, "ROTATIONAL"},
	{FlagSendTrim, "SEND_TRIM"},
	{FlagSendWriteZeroes, "SEND_WRITE_ZEROES"},
	{FlagSendDF, "SEND_DF"},
	{FlagCanMultiConn, "CAN_MULTI_CONN"},
	{FlagSendResize, "SEND_RESIZE"},
	{FlagSendCache, "SEND_CACHE"},
	{FlagSendFastZero, "SEND_FAST_ZERO"},
	{FlagBlockStatusPayload, "BLOCK_STATUS_PAYLOAD"},
}

// String lists the set flags by their spec names, separated by '|'.
func (f TransmissionFlags) String() string {
	var parts []string
	rest := f
	for _, n := range transmissionFlagNames {
		if f&n.f != 0 {
			parts = append(parts, n.name)
			rest &^= n.f
		}
	}
	if rest != 0 {
		parts = append(parts, fmt.Sprintf("%#x", uint16(rest)))
	}
	if len(parts) == 0 {
		return "0"
	}
	return strings.Join(parts, "|")
}

// Cmd is a request type in the transmission phase (NBD_CMD_*).
type Cmd uint16

const (
	CmdRead        Cmd = 0 // NBD_CMD_READ
	CmdWrite       Cmd = 1 // NBD_CMD_WRITE
	CmdDisc        Cmd = 2 // NBD_CMD_DISC
	CmdFlush       Cmd = 3 // NBD_CMD_FLUSH
	CmdTrim        Cmd = 4 // NBD_CMD_TRIM
	CmdCache       Cmd = 5 // NBD_CMD_CACHE
	CmdWriteZeroes Cmd = 6 // NBD_CMD_WRITE_ZEROES
	CmdBlockStatus Cmd = 7 // NBD_CMD_BLOCK_STATUS
	CmdResize      Cmd = 8 // NBD_CMD_RESIZE (extension-resize branch)
)

// IsWrite reports whether the command may change the export's data.
func (c Cmd) IsWrite() bool {
	switch c {
	case CmdWrite, CmdTrim, CmdWriteZeroes, CmdResize:
		return true
	}
	return false
}

var cmdNames = [...]string{"READ", "WRITE", "DISC", "FLUSH", "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS", "RESIZE"}

func (c Cmd) String() string {
	if int(c) < len(cmdNames) {
		return "NBD_CMD_" + cmdNames[c]
	}
	return fmt.Sprintf("NBD_CMD_%d", uint16(c))
}

// CmdFlags modify a request (NBD_CMD_FLAG_*).
type CmdFlags uint16

const (
	CmdFlagFUA        CmdFlags = 1 << 0 // NBD_CMD_FLAG_FUA
	CmdFlagNoHole     CmdFlags = 1 << 1 // NBD_CMD_FLAG_NO_HOLE
	CmdFlagDF         CmdFlags = 1 << 2 // NBD_CMD_FLAG_DF
	CmdFlagReqOne     CmdFlags = 1 << 3 // NBD_CMD_FLAG_REQ_ONE
	CmdFlagFastZero   CmdFlags = 1 << 4 // NBD_CMD_FLAG_FAST_ZERO
	CmdFlagPayloadLen CmdFlags = 1 << 5 // NBD_CMD_FLAG_PAYLOAD_LEN (extension-ext-header branch)
)

// ReplyFlagDone marks the last chunk of a structured reply
// (NBD_REPLY_FLAG_DONE).
const ReplyFlagDone uint16 = 1 << 0

// ChunkType is the type of a structured reply chunk (NBD_REPLY_TYPE_*).
type ChunkType uint16

const (
	ChunkNone           ChunkType = 0      // NBD_REPLY_TYPE_NONE
	ChunkOffsetData     ChunkType = 1      // NBD_REPLY_TYPE_OFFSET_DATA
	ChunkOffsetHole     ChunkType = 2      // NBD_REPLY_TYPE_OFFSET_HOLE
	ChunkBlockStatus    ChunkType = 5      // NBD_REPLY_TYPE_BLOCK_STATUS
	ChunkBlockStatusExt ChunkType = 6      // NBD_REPLY_TYPE_BLOCK_STATUS_EXT (extension-ext-header branch)
	ChunkError          ChunkType = 0x8001 // NBD_REPLY_TYPE_ERROR
	ChunkErrorOffset    ChunkType = 0x8002 // NBD_REPLY_TYPE_ERROR_OFFSET

	chunkErrorBit ChunkType = 1 << 15
)

// IsError reports whether the chunk type belongs to the error class.
func (t ChunkType) IsError() bool { return t&chunkErrorBit != 0 }

func (t ChunkType) String() string {
	switch t {
	case ChunkNone:
		return "NONE"
	case ChunkOffsetData:
		return "OFFSET_DATA"
	case ChunkOffsetHole:
		return "OFFSET_HOLE"
	case ChunkBlockStatus:
		return "BLOCK_STATUS"
	case ChunkBlockStatusExt:
		return "BLOCK_STATUS_EXT"
	case ChunkError:
		return "ERROR"
	case ChunkErrorOffset:
		return "ERROR_OFFSET"
	}
	return fmt.Sprintf("chunk type %#x", uint16(t))
}

// Metadata contexts (proto.md "Metadata querying").
const (
	ContextBaseAllocation = "base:allocation"

	// StateHole and StateZero are the base:allocation status bits.
	StateHole uint32 = 1 << 0 // NBD_STATE_HOLE: not allocated
	StateZero uint32 = 1 << 1 // NBD_STATE_ZERO: reads as zeros
)
