package server

import (
	"io"
	"log/slog"
	"testing"

	"snapmount/test/testenv"
)

// A reply queued while another goroutine is finishing its turn as the
// writer (it saw the lock taken, so it left the reply to the writer)
// must still be written. Losing it left clients waiting for ever.
func TestReplyWriterTakesReplyQueuedWhileUnlocking(t *testing.T) {
	srvEnd, cliEnd := testenv.SocketPair(t)
	c := &conn{raw: srvEnd, conn: srvEnd, log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	slots := make(chan struct{}, 2)
	w := &replyWriter{c: c, slots: slots, budget: newByteBudget(1 << 20)}

	late := &reply{bufs: [][]byte{[]byte("second")}}
	injected := false
	testHookWriterUnlocking = func() {
		if injected {
			return
		}
		injected = true
		// Another handler finishes now: the lock is still held, so its
		// send only queues the reply and returns.
		done := make(chan struct{})
		go func() {
			slots <- struct{}{}
			w.send(late)
			close(done)
		}()
		testenv.Receive(t, done, "the other handler's send to return")
	}
	defer func() { testHookWriterUnlocking = func() {} }()

	slots <- struct{}{}
	w.send(&reply{bufs: [][]byte{[]byte("first.")}})
	srvEnd.Close()
	got, _ := io.ReadAll(cliEnd)
	if string(got) != "first.second" {
		t.Fatalf("socket got %q, want both replies", got)
	}
}
