package server

import (
	"bytes"
	"os"
	"testing"

	"snapmount/nbd"
)

// A READ of a snapshot whose blocks were never written since its instant
// is sent from the image (sendfile, as a live READ is): its data chunk
// does not end the reply, a NONE chunk sent after the data does. Should a
// block be preserved between the READ's handling and its sending, the
// reply still carries the snapshot's data (from its store); should the
// snapshot break meanwhile, the reply ends in an error. Large READs fill
// the socket before the client reads: the rest is read from the image
// while the blocks are still locked, and arrives right.
func TestSnapshotReadSentFromTheImage(t *testing.T) {
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
	read := func(off, n int) ([]byte, nbd.Errno, int) {
		t.Helper()
		return reader.readStructured(uint64(off), uint32(n), 0)
	}

	if data, e, chunks := read(0, 1<<20); e != 0 || chunks != 2 || !bytes.Equal(data, original[:1<<20]) {
		t.Fatalf("READ of untouched blocks: errno %s, %d chunks (want a data chunk, then NONE), data right: %v", e, chunks, bytes.Equal(data, original[:1<<20]))
	}
	if data, e, _ := read(0, testSize); e != 0 || !bytes.Equal(data, original) {
		t.Fatalf("READ of the whole %d bytes: errno %s, data right: %v", testSize, e, bytes.Equal(data, original))
	}

	// Handled, then written (and so preserved) before it goes out.
	writer := mustView(t, srv, "disk", false)
	defer writer.release()
	t.Cleanup(func() { testHookSnapshotData = func(*snapshot) {} })
	testHookSnapshotData = func(*snapshot) {
		testHookSnapshotData = func(*snapshot) {}
		if err := writer.write(bytes.Repeat([]byte{0x5a}, 64<<10), 1<<20, false); err != nil {
			t.Errorf("writing under the READ: %v", err)
		}
	}
	if data, e, _ := read(1<<20, 1<<20); e != 0 || !bytes.Equal(data, original[1<<20:2<<20]) {
		t.Fatalf("READ of blocks written before it was sent: errno %s, snapshot's data: %v", e, bytes.Equal(data, original[1<<20:2<<20]))
	}

	// Handled, then the snapshot breaks before it goes out.
	testHookSnapshotData = func(s *snapshot) {
		testHookSnapshotData = func(*snapshot) {}
		s.breakSnapshot("broken by the test")
	}
	if _, e, _ := read(3<<20, 1<<20); e != nbd.EIO {
		t.Fatalf("READ of a snapshot broken before it was sent: errno %s, want EIO", e)
	}
}
