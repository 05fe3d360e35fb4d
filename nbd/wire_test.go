package nbd

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
)

func TestRequestRoundTrip(t *testing.T) {
	r := Request{Flags: CmdFlagFUA | CmdFlagNoHole, Type: CmdWriteZeroes, Cookie: 0x0102030405060708, Offset: 1 << 40, Length: 65536}
	var b [RequestHeaderLen]byte
	r.Encode(b[:])
	want := []byte{
		0x25, 0x60, 0x95, 0x13, // magic
		0x00, 0x03, // flags
		0x00, 0x06, // type
		1, 2, 3, 4, 5, 6, 7, 8, // cookie
		0, 0, 1, 0, 0, 0, 0, 0, // offset
		0, 1, 0, 0, // length
	}
	if !bytes.Equal(b[:], want) {
		t.Fatalf("encoded %x, want %x", b, want)
	}
	got, err := ParseRequest(b[:])
	if err != nil || got != r {
		t.Fatalf("ParseRequest = %+v, %v; want %+v", got, err, r)
	}
	b[0] = 0
	if _, err := ParseRequest(b[:]); !isProtocolError(err) {
		t.Fatalf("bad magic: got %v, want a protocol error", err)
	}
}

func isProtocolError(err error) bool {
	var pe *ProtocolError
	return errors.As(err, &pe)
}

func TestOptionRoundTrip(t *testing.T) {
	b := AppendOption(nil, OptGo, []byte("abc"))
	if len(b) != OptionHeaderLen+3 {
		t.Fatalf("length %d", len(b))
	}
	opt, n, err := ParseOptionHeader(b)
	if err != nil || opt != OptGo || n != 3 || string(b[16:]) != "abc" {
		t.Fatalf("got %v %d %v", opt, n, err)
	}
	b[0] ^= 1
	if _, _, err := ParseOptionHeader(b); !isProtocolError(err) {
		t.Fatalf("bad magic: got %v", err)
	}

	r := AppendOptionReply(nil, OptXReadOnly, RepErrUnsup, []byte("no"))
	opt, typ, length, err := ParseOptionReplyHeader(r)
	if err != nil || opt != OptXReadOnly || typ != RepErrUnsup || length != 2 {
		t.Fatalf("reply header: %v %v %d %v", opt, typ, length, err)
	}
	if !typ.IsError() || RepAck.IsError() {
		t.Fatal("IsError wrong")
	}
}

func TestExportRequest(t *testing.T) {
	in := ExportRequest{Name: "disk@s7", Infos: []InfoType{InfoBlockSize, InfoName}}
	got, err := ParseExportRequest(in.Encode())
	if err != nil || !reflect.DeepEqual(got, in) {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	for name, data := range map[string][]byte{
		"short":          {0, 0, 0},
		"name too long":  append(be.AppendUint32(nil, 100), 0, 0, 0, 0),
		"count mismatch": {0, 0, 0, 1, 'a', 0, 2, 0, 1},
		"NUL in name":    {0, 0, 0, 1, 0, 0, 0},
		"huge name len":  {0xff, 0xff, 0xff, 0xff, 0, 0},
	} {
		if _, err := ParseExportRequest(data); !isProtocolError(err) {
			t.Errorf("%s: got %v, want a protocol error", name, err)
		}
	}
	long := ExportRequest{Name: strings.Repeat("x", MaxStringLen+1)}
	if _, err := ParseExportRequest(long.Encode()); !isProtocolError(err) {
		t.Errorf("4097-byte name accepted: %v", err)
	}
}

func TestMetaContextRequest(t *testing.T) {
	in := MetaContextRequest{Export: "disk", Queries: []string{"base:allocation", "qemu:dirty-bitmap:x"}}
	got, err := ParseMetaContextRequest(in.Encode())
	if err != nil || !reflect.DeepEqual(got, in) {
		t.Fatalf("round trip: %+v, %v", got, err)
	}
	empty := MetaContextRequest{Export: ""}
	if got, err := ParseMetaContextRequest(empty.Encode()); err != nil || got.Export != "" || len(got.Queries) != 0 {
		t.Fatalf("empty: %+v %v", got, err)
	}
	// A query count that cannot fit must be rejected before allocating.
	huge := be.AppendUint32(be.AppendUint32(nil, 0), 0xffffffff)
	if _, err := ParseMetaContextRequest(huge); !isProtocolError(err) {
		t.Fatalf("huge count: %v", err)
	}
	trailing := append(in.Encode(), 0)
	if _, err := ParseMetaContextRequest(trailing); !isProtocolError(err) {
		t.Fatalf("trailing bytes: %v", err)
	}
}

func TestServerReply(t *testing.T) {
	e := ExportEntry{Name: "disk", Description: "a disk"}
	got, err := ParseServerReply(e.Encode())
	if err != nil || got != e {
		t.Fatalf("%+v %v", got, err)
	}
	if _, err := ParseServerReply([]byte{0, 0, 0, 9, 'a'}); !isProtocolError(err) {
		t.Fatalf("short name: %v", err)
	}
}

func TestInfoReplies(t *testing.T) {
	r, err := ParseInfoReply(AppendInfoExport(nil, 1<<30, FlagHasFlags|FlagReadOnly))
	if err != nil || r.Type != InfoExport || r.Size != 1<<30 || r.Flags != FlagHasFlags|FlagReadOnly {
		t.Fatalf("export: %+v %v", r, err)
	}
	r, err = ParseInfoReply(AppendInfoText(nil, InfoName, "disk@s3"))
	if err != nil || r.Text != "disk@s3" {
		t.Fatalf("name: %+v %v", r, err)
	}
	bs := BlockSize{512, 4096, 32 << 20}
	r, err = ParseInfoReply(AppendInfoBlockSize(nil, bs))
	if err != nil || r.BlockSize != bs || bs.validate() != nil {
		t.Fatalf("block size: %+v %v", r, err)
	}
	r, err = ParseInfoReply([]byte{0, 99, 1, 2, 3})
	if err != nil || !r.UnknownType {
		t.Fatalf("unknown type must be ignored, got %+v %v", r, err)
	}
	for name, d := range map[string][]byte{
		"empty":            {},
		"export too short": {0, 0, 1, 2},
		"block too long":   append(AppendInfoBlockSize(nil, bs), 0),
	} {
		if _, err := ParseInfoReply(d); !isProtocolError(err) {
			t.Errorf("%s: %v", name, err)
		}
	}
	for _, bad := range []BlockSize{{0, 4096, 1 << 20}, {3, 4096, 1 << 20}, {512, 256, 1 << 20}, {4096, 4096, 1024}, {128 << 10, 128 << 10, 1 << 20}} {
		if bad.validate() == nil {
			t.Errorf("block size %+v accepted", bad)
		}
	}
}

func TestChunkPayloads(t *testing.T) {
	p := AppendErrorChunkPayload(nil, EIO, "disk on fire", 4096)
	e, err := ParseErrorChunk(ChunkErrorOffset, p)
	if err != nil || e.Errno != EIO || e.Msg != "disk on fire" || !e.HasOffset || e.Offset != 4096 {
		t.Fatalf("%+v %v", e, err)
	}
	p = AppendErrorChunkPayload(nil, EPERM, "", -1)
	e, err = ParseErrorChunk(ChunkError, p)
	if err != nil || e.Errno != EPERM || e.HasOffset {
		t.Fatalf("%+v %v", e, err)
	}
	for name, c := range map[string]struct {
		typ ChunkType
		p   []byte
	}{
		"errno 0":       {ChunkError, AppendErrorChunkPayload(nil, 0, "", -1)},
		"msg too long":  {ChunkError, []byte{0, 0, 0, 5, 0, 9, 'a'}},
		"offset extra":  {ChunkError, AppendErrorChunkPayload(nil, EIO, "", 7)},
		"offset absent": {ChunkErrorOffset, AppendErrorChunkPayload(nil, EIO, "x", -1)},
		"too short":     {ChunkError, []byte{0, 0, 0}},
	} {
		if _, err := ParseErrorChunk(c.typ, c.p); !isProtocolError(err) {
			t.Errorf("%s: %v", name, err)
		}
	}

	ext := []WireExtent{{65536, 0}, {1 << 20, StateHole | StateZero}}
	id, got, err := ParseBlockStatusPayload(AppendBlockStatusPayload(nil, 7, ext))
	if err != nil || id != 7 || !reflect.DeepEqual(got, ext) {
		t.Fatalf("block status: %d %v %v", id, got, err)
	}
	for name, p := range map[string][]byte{
		"no extents":  be.AppendUint32(nil, 1),
		"odd length":  append(AppendBlockStatusPayload(nil, 1, ext), 0),
		"zero length": AppendBlockStatusPayload(nil, 1, []WireExtent{{0, 0}}),
	} {
		if _, _, err := ParseBlockStatusPayload(p); !isProtocolError(err) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestReplyHeaders(t *testing.T) {
	var hb [ChunkHeaderLen]byte
	h, err := ReadReplyHeader(bytes.NewReader(AppendSimpleReply(nil, EINVAL, 42)), &hb)
	if err != nil || h.Structured || h.Errno != EINVAL || h.Cookie != 42 {
		t.Fatalf("simple: %+v %v", h, err)
	}
	h, err = ReadReplyHeader(bytes.NewReader(AppendChunkHeader(nil, ReplyFlagDone, ChunkOffsetHole, 9, 12)), &hb)
	if err != nil || !h.Structured || h.Type != ChunkOffsetHole || h.Flags != ReplyFlagDone || h.Cookie != 9 || h.Length != 12 {
		t.Fatalf("chunk: %+v %v", h, err)
	}
	if _, err := ReadReplyHeader(bytes.NewReader(make([]byte, 20)), &hb); !isProtocolError(err) {
		t.Fatalf("zero magic: %v", err)
	}
}

func TestNames(t *testing.T) {
	if s := (FlagHasFlags | FlagReadOnly | FlagCanMultiConn).String(); s != "HAS_FLAGS|READ_ONLY|CAN_MULTI_CONN" {
		t.Errorf("flags: %s", s)
	}
	if s := OptXReadOnly.String(); s != "NBD_OPT_X_READ_ONLY" {
		t.Errorf("option: %s", s)
	}
	if uint32(OptXReadOnly) != 0x534E5001 || OptXReadOnly&(1<<31) != 0 {
		t.Errorf("OptXReadOnly = %#x", uint32(OptXReadOnly))
	}
	if s := RepErrUnsup.String(); s != "NBD_REP_ERR_UNSUP" {
		t.Errorf("reply: %s", s)
	}
	if s := CmdBlockStatus.String(); s != "NBD_CMD_BLOCK_STATUS" {
		t.Errorf("cmd: %s", s)
	}
	for _, c := range []Cmd{CmdWrite, CmdTrim, CmdWriteZeroes, CmdResize} {
		if !c.IsWrite() {
			t.Errorf("%s must count as a write", c)
		}
	}
	for _, c := range []Cmd{CmdRead, CmdFlush, CmdBlockStatus, CmdCache, CmdDisc} {
		if c.IsWrite() {
			t.Errorf("%s must not count as a write", c)
		}
	}
	if Errno(99).Syscall() != 22 || EIO.Syscall() != 5 {
		t.Errorf("unknown errno must map to EINVAL")
	}
}

func TestSpans(t *testing.T) {
	var s spans
	for _, c := range []struct {
		start, n uint64
		ok       bool
	}{{100, 50, true}, {0, 50, true}, {50, 50, true}, {150, 10, true}, {120, 5, false}, {49, 2, false}, {300, 1, true}, {160, 140, true}} {
		if got := s.add(c.start, c.n); got != c.ok {
			t.Fatalf("add(%d, %d) = %v, want %v (list %v)", c.start, c.n, got, c.ok, s.list)
		}
	}
	if s.total != 301 || len(s.list) != 1 || s.list[0] != (span{0, 301}) {
		t.Fatalf("total %d list %v", s.total, s.list)
	}
}

func TestScatter(t *testing.T) {
	a, b, c := make([]byte, 4), make([]byte, 4), make([]byte, 4)
	s := scatter{a, b, c}
	if err := s.readFrom(bytes.NewReader([]byte("12345678")), 2, 8); err != nil {
		t.Fatal(err)
	}
	if string(a[2:]) != "12" || string(b) != "3456" || string(c[:2]) != "78" {
		t.Fatalf("%q %q %q", a, b, c)
	}
	s.zero(3, 6)
	if string(a[2:]) != "1\x00" || string(b) != "\x00\x00\x00\x00" || string(c[:2]) != "\x008" {
		t.Fatalf("after zero %q %q %q", a, b, c)
	}
	if err := s.readFrom(bytes.NewReader(make([]byte, 20)), 10, 5); !isProtocolError(err) {
		t.Fatalf("overrun: %v", err)
	}
}

// The server's side of the greeting, EXPORT_NAME and READ chunks decodes
// back to what was encoded.
func TestServerMessagesRoundTrip(t *testing.T) {
	if got := ParseClientFlags(AppendClientFlags(nil, ClientFixedNewstyle|ClientNoZeroes)); got != ClientFixedNewstyle|ClientNoZeroes {
		t.Errorf("client flags round trip: %#x", got)
	}
	for _, noZeroes := range []bool{true, false} {
		b := AppendExportNameReply(nil, 1<<40, FlagHasFlags|FlagReadOnly, noZeroes)
		want := ExportNameReplyLen
		if !noZeroes {
			want += ExportNamePadLen
		}
		size, flags := ParseExportNameReply(b)
		if len(b) != want || size != 1<<40 || flags != FlagHasFlags|FlagReadOnly || !AllZero(b[ExportNameReplyLen:]) {
			t.Errorf("EXPORT_NAME reply (NO_ZEROES %v): %d bytes, size %d, flags %s", noZeroes, len(b), size, flags)
		}
	}
	var buf [ChunkHeaderLen]byte
	hole := AppendHoleChunk(nil, ReplyFlagDone, 7, 4096, 512)
	h, err := ReadReplyHeader(bytes.NewReader(hole), &buf)
	if err != nil || h.Type != ChunkOffsetHole || h.Cookie != 7 || h.Flags != ReplyFlagDone || h.Length != 12 || len(hole) != ChunkHeaderLen+12 ||
		be.Uint64(hole[ChunkHeaderLen:]) != 4096 || be.Uint32(hole[ChunkHeaderLen+8:]) != 512 {
		t.Errorf("hole chunk %x: %+v, %v", hole, h, err)
	}
	data := AppendDataChunkHeader(nil, 0, 8, 8192, 1000)
	h, err = ReadReplyHeader(bytes.NewReader(data), &buf)
	if err != nil || h.Type != ChunkOffsetData || h.Cookie != 8 || h.Flags != 0 || h.Length != 1008 || len(data) != ChunkHeaderLen+8 ||
		be.Uint64(data[ChunkHeaderLen:]) != 8192 {
		t.Errorf("data chunk header %x: %+v, %v", data, h, err)
	}
}
