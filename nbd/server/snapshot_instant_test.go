package server

import (
	"bytes"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"snapmount/nbd"
)

// A snapshot READ whose reply sits in the socket, not yet read by the
// client, while a writer changes the same blocks, still carries the data of
// the snapshot's instant. sendfile and splice hand the socket references to
// the image's page-cache pages, not copies, so data sent that way would
// change with the write: snapshot data must be copied before it is sent.
func TestSnapshotReadInFlightKeepsItsInstant(t *testing.T) {
	img := testImage(t, testSize, 7)
	original, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	srv, addr := startTestServer(t, Config{}, img)
	reader := dialRaw(t, addr)
	if got := final(reader.option(nbd.OptStructuredReply, nil)); got != nbd.RepAck {
		t.Fatalf("STRUCTURED_REPLY: %s", got)
	}
	reader.mustGo("disk@snapshot")
	writer := mustView(t, srv, "disk", false)
	defer writer.release()

	// Page the image in, so that the server may take its fast paths.
	if data, e, _ := reader.readStructured(0, 1<<20, 0); e != 0 || !bytes.Equal(data, original[:1<<20]) {
		t.Fatalf("first READ: errno %s", e)
	}
	const n = 256 << 10
	cookie := reader.request(nbd.CmdRead, 0, 0, n, nil)
	// Wait until part of the reply is queued on the client's socket.
	raw, err := reader.c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		var queued int
		if err := raw.Control(func(fd uintptr) { queued, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil {
			t.Fatal(err)
		}
		if queued >= 64<<10 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited 10 s for the READ's reply to reach the socket; %d bytes queued", queued)
		}
	}
	if err := writer.write(bytes.Repeat([]byte{0x5a}, n), 0, false); err != nil {
		t.Fatal(err)
	}

	out := make([]byte, n)
	for {
		var b [nbd.ChunkHeaderLen]byte
		h, err := nbd.ReadReplyHeader(reader.c, &b)
		if err != nil {
			t.Fatal(err)
		}
		if h.Cookie != cookie {
			t.Fatalf("reply for cookie %d, want %d", h.Cookie, cookie)
		}
		p := make([]byte, h.Length)
		reader.readFull(p)
		switch {
		case h.Structured && h.Type == nbd.ChunkOffsetData:
			copy(out[be.Uint64(p):], p[8:])
		case h.Structured && h.Type.IsError():
			t.Fatalf("READ failed: chunk %s", h.Type)
		}
		if h.Flags&nbd.ReplyFlagDone != 0 {
			break
		}
	}
	if !bytes.Equal(out, original[:n]) {
		t.Fatalf("the snapshot's READ carried data written after its instant (first bytes % x)", out[:8])
	}
}
