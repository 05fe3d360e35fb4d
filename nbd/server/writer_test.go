package server

import (
	"io"
	"log/slog"
	"net"
	"os"
	"syscall"
	"testing"
)

// socketPair returns two connected Unix stream sockets: a real, buffered,
// bidirectional stream (net.Pipe is synchronous and would deadlock a
// pipelined protocol).
func socketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
		t.Cleanup(func() { c.Close() })
	}
	return conns[0], conns[1]
}

// A reply queued while another goroutine is finishing its turn as the
// writer (it saw the lock taken, so it left the reply to the writer)
// must still be written. Losing it left clients waiting for ever.
func TestReplyWriterTakesReplyQueuedWhileUnlocking(t *testing.T) {
	srvEnd, cliEnd := socketPair(t)
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
		<-done
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
