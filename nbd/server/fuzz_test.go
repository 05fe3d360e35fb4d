package server

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"snapmount/nbd"
)

// fuzzServer is one server shared by all inputs of a fuzz target: a 1 MiB
// image with a tiny snapshot budget, so inputs reach copy-before-write and
// breaking snapshots too.
var fuzzServer struct {
	once sync.Once
	srv  *Server
	err  error
}

func getFuzzServer(t testing.TB) *Server {
	fuzzServer.once.Do(func() {
		dir, err := os.MkdirTemp("", "nbd-fuzz-")
		if err != nil {
			fuzzServer.err = err
			return
		}
		img := dir + "/disk.img"
		if err := os.WriteFile(img, bytes.Repeat([]byte{0x11}, 1<<20), 0o644); err != nil {
			fuzzServer.err = err
			return
		}
		fuzzServer.srv, fuzzServer.err = New(Config{
			Exports:          []ExportConfig{{Name: "disk", Path: img}},
			SnapshotDir:      dir,
			SnapshotMax:      256 << 10,
			SnapshotBlock:    4096,
			SnapshotLinger:   -1,
			HandshakeTimeout: 5 * time.Second,
			Logger:           discardLogger,
		})
	})
	if fuzzServer.err != nil {
		t.Fatal(fuzzServer.err)
	}
	return fuzzServer.srv
}

var discardLogger = testLoggerTo(io.Discard, slog.LevelError)

// runServerOn feeds input to one server connection over a pipe, as a
// client that then hangs up, and fails if the connection does not end.
func runServerOn(t *testing.T, input []byte) {
	srv := getFuzzServer(t)
	client, server := net.Pipe()
	sc := srv.admit(server)
	if sc == nil {
		t.Fatal("server refused the connection")
	}
	done := make(chan struct{})
	go func() {
		sc.serve()
		close(done)
	}()
	go io.Copy(io.Discard, client) // whatever the server says
	client.Write(input)            // fails once the server hangs up: fine
	client.Close()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("server connection did not end after the client hung up")
	}
}

// handshakePrefix is a valid handshake: flags, STRUCTURED_REPLY,
// SET_META_CONTEXT base:allocation and GO for export name.
func handshakePrefix(name string, promise bool) []byte {
	b := be.AppendUint32(nil, uint32(nbd.ClientFixedNewstyle|nbd.ClientNoZeroes))
	b = nbd.AppendOption(b, nbd.OptStructuredReply, nil)
	if promise {
		b = nbd.AppendOption(b, nbd.OptXReadOnly, nil)
	}
	mc := nbd.MetaContextRequest{Export: name, Queries: []string{nbd.ContextBaseAllocation}}
	b = nbd.AppendOption(b, nbd.OptSetMetaContext, mc.Encode())
	req := nbd.ExportRequest{Name: name, Infos: []nbd.InfoType{nbd.InfoName, nbd.InfoBlockSize}}
	return nbd.AppendOption(b, nbd.OptGo, req.Encode())
}

func requestBytes(typ nbd.Cmd, flags nbd.CmdFlags, off uint64, length uint32, payload []byte) []byte {
	b := make([]byte, nbd.RequestHeaderLen)
	(&nbd.Request{Flags: flags, Type: typ, Cookie: 7, Offset: off, Length: length}).Encode(b)
	return append(b, payload...)
}

// FuzzServerHandshake drives a whole connection, handshake first, with
// arbitrary bytes. The server must not panic, hang or over-allocate.
func FuzzServerHandshake(f *testing.F) {
	f.Add([]byte{})
	f.Add(be.AppendUint32(nil, 3))
	f.Add(handshakePrefix("disk", false))
	f.Add(handshakePrefix("disk@snapshot", true))
	f.Add(append(be.AppendUint32(nil, 3), nbd.AppendOption(nil, nbd.OptList, nil)...))
	f.Add(append(be.AppendUint32(nil, 3), nbd.AppendOption(nil, nbd.OptExportName, []byte("disk"))...))
	f.Add(append(be.AppendUint32(nil, 3), nbd.AppendOption(nil, nbd.OptInfo, []byte{0, 0, 0, 4, 'd', 'i', 's', 'k', 0, 1, 0, 3})...))
	f.Add(append(be.AppendUint32(nil, 3), nbd.AppendOption(nil, nbd.OptListMetaContext, []byte{0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, 'b', 'a', 's', 'e', ':'})...))
	f.Add(append(be.AppendUint32(nil, 3), nbd.AppendOption(nil, nbd.OptAbort, nil)...))
	f.Add(append(be.AppendUint32(nil, 3), nbd.AppendOption(nil, nbd.Option(0x12345678), []byte("junk"))...))
	hdr := be.AppendUint32(nil, 3)
	hdr = be.AppendUint64(hdr, nbd.IHaveOpt)
	hdr = be.AppendUint32(hdr, uint32(nbd.OptGo))
	f.Add(be.AppendUint32(hdr, 0xffffffff))
	f.Fuzz(func(t *testing.T, input []byte) {
		runServerOn(t, input)
	})
}

// FuzzServerRequests drives the transmission phase: a valid handshake
// (writer, snapshot or promised reader) and then arbitrary request bytes.
func FuzzServerRequests(f *testing.F) {
	f.Add(uint8(0), requestBytes(nbd.CmdRead, 0, 0, 4096, nil))
	f.Add(uint8(0), requestBytes(nbd.CmdWrite, nbd.CmdFlagFUA, 4096, 8, []byte("abcdefgh")))
	f.Add(uint8(1), requestBytes(nbd.CmdRead, nbd.CmdFlagDF, 1000, 70000, nil))
	f.Add(uint8(0), requestBytes(nbd.CmdBlockStatus, nbd.CmdFlagReqOne, 0, 1<<20, nil))
	f.Add(uint8(0), requestBytes(nbd.CmdWriteZeroes, nbd.CmdFlagNoHole|nbd.CmdFlagFastZero, 0, 1<<20, nil))
	f.Add(uint8(0), requestBytes(nbd.CmdTrim, 0, 1<<19, 1<<19, nil))
	f.Add(uint8(2), requestBytes(nbd.CmdWrite, 0, 0, 3, []byte{1, 2, 3}))
	f.Add(uint8(1), requestBytes(nbd.CmdCache, 0, 0, 1<<20, nil))
	f.Add(uint8(0), requestBytes(nbd.CmdWrite, 0, 0, nbd.MaxPayload+1, nil))
	f.Add(uint8(0), requestBytes(nbd.CmdRead, 0, 1<<63, 1<<31, nil))
	f.Add(uint8(0), append(requestBytes(nbd.CmdFlush, 0, 0, 0, nil), requestBytes(nbd.CmdDisc, 0, 0, 0, nil)...))
	f.Fuzz(func(t *testing.T, which uint8, input []byte) {
		var prefix []byte
		switch which % 3 {
		case 0:
			prefix = handshakePrefix("disk", false)
		case 1:
			prefix = handshakePrefix("disk@snapshot", false)
		case 2:
			prefix = handshakePrefix("disk", true)
		}
		runServerOn(t, append(prefix, input...))
	})
}
