package nbd

import (
	"context"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// serveReads answers the handshake like serveExport, then every READ
// with bytes that are their offset's low byte, until the client
// disconnects.
func serveReads(s *fakeServer, canonical string) {
	handshake(s, canonical)
	for {
		r := s.readRequest()
		if r.Type != CmdRead {
			return
		}
		b := AppendSimpleReply(nil, 0, r.Cookie)
		for i := range uint64(r.Length) {
			b = append(b, byte(r.Offset+i))
		}
		s.write(b)
	}
}

// serveExport answers the handshake (see handshake), then reads requests
// until the client disconnects.
func serveExport(s *fakeServer, canonical string) {
	handshake(s, canonical)
	for s.readRequest().Type != CmdDisc {
	}
}

// handshake answers the handshake with a multi-conn read-only export of
// 1 MiB whose canonical name is canonical (every other option is
// unsupported); from then on the client may hang up at any time.
func handshake(s *fakeServer, canonical string) {
	s.greet(HandshakeFixedNewstyle | HandshakeNoZeroes)
	for {
		opt, _ := s.readOption()
		if opt != OptGo {
			s.reply(opt, RepErrUnsup, nil)
			continue
		}
		s.reply(OptGo, RepInfo, AppendInfoText(nil, InfoName, canonical))
		s.reply(OptGo, RepInfo, AppendInfoExport(nil, 1<<20, FlagHasFlags|FlagReadOnly|FlagCanMultiConn))
		s.reply(OptGo, RepAck, nil)
		break
	}
	s.stopped.Store(true)
}

// Open returns with the first connection; the others join in the
// background, and WaitConns waits for them and reports one that found the
// export changed.
func TestOpenJoinsConnectionsInBackground(t *testing.T) {
	for _, c := range []struct {
		name     string
		renamed  int // connection that reports another canonical name (0: none)
		wantErr  bool
		wantLive int
	}{
		{"all join", 0, false, 4},
		{"one finds the export changed", 3, true, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			release := make(chan struct{})
			u := listenPool(t, func(n int, s *fakeServer) {
				if n == 1 {
					serveExport(s, "disk@s1")
					return
				}
				<-release
				if n == c.renamed {
					serveExport(s, "disk@s2")
					return
				}
				serveExport(s, "disk@s1")
			})
			opened := make(chan *Client, 1)
			go func() {
				cl, err := Open(context.Background(), u, ClientOptions{Conns: 4})
				if err != nil {
					t.Errorf("Open: %v", err)
				}
				opened <- cl
			}()
			var cl *Client
			select {
			case cl = <-opened:
			case <-time.After(20 * time.Second):
				close(release)
				t.Fatal("Open waited for the connections beside the first")
			}
			if cl == nil {
				close(release)
				return
			}
			t.Cleanup(func() { cl.Close() })

			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if err := cl.WaitConns(ctx); !errors.Is(err, context.Canceled) {
				t.Errorf("WaitConns while connections join: %v, want it to wait (context canceled)", err)
			}
			close(release)
			err := cl.WaitConns(context.Background())
			var changed *changedError
			if c.wantErr != errors.As(err, &changed) {
				t.Fatalf("WaitConns: %v, want a changed export: %v", err, c.wantErr)
			}
			if live := cl.Stats().Conns; live != c.wantLive {
				t.Errorf("%d connections alive, want %d", live, c.wantLive)
			}
			if !c.wantErr {
				return
			}
			if _, err := cl.ReadAt(make([]byte, 512), 0); !errors.As(err, &changed) {
				t.Errorf("read after the export changed: %v, want the change reported", err)
			}
		})
	}
}

// A request waiting for a connection (the first one lost) is served as
// soon as one of the others joins.
func TestJoinWakesWaitingRequests(t *testing.T) {
	release, over := make(chan struct{}), make(chan struct{})
	u := listenPool(t, func(n int, s *fakeServer) {
		switch {
		case n == 1:
			handshake(s, "disk@s1") // and hang up
		case n <= 4:
			<-release
			serveReads(s, "disk@s1")
		default: // the first slot's redials: never answered
			<-over
		}
	})
	t.Cleanup(func() { close(over) })
	cl, err := Open(context.Background(), u, ClientOptions{Conns: 4, Timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	read := make(chan error, 1)
	buf := make([]byte, 4096)
	go func() {
		_, err := cl.ReadAt(buf, 8192)
		read <- err
	}()
	// The read found the first connection gone; the others are held.
	deadline := time.Now().Add(testenv.WaitLimit)
	for cl.Stats().Retries == 0 {
		select {
		case err := <-read:
			t.Fatalf("read ended while no connection could serve it: %v", err)
		case <-time.After(time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for the read to find the first connection gone and retry", testenv.WaitLimit)
		}
	}
	close(release)
	if err := testenv.Receive(t, read, "the read's result"); err != nil {
		t.Fatalf("read after the other connections joined: %v", err)
	}
	if buf[0] != 0 || buf[1] != 1 {
		t.Fatalf("read got % x...", buf[:2])
	}
	// The fake server takes a hang-up in the middle of a handshake for a
	// failure: let the joins still under way end before Close.
	if err := cl.WaitConns(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// A read the server never answers fails with EIO once Timeout has
// passed; the guard fails the stuck connection, the pool replaces it,
// and the next read is served. Once nothing is in flight, the guard stops
// (an idle mount runs no timer).
func TestClientTimeoutReplacesAStuckConnection(t *testing.T) {
	over := make(chan struct{})
	u := listenPool(t, func(n int, s *fakeServer) {
		if n > 1 {
			serveReads(s, "disk@s1")
			return
		}
		handshake(s, "disk@s1")
		s.readRequest() // and never answer it
		<-over
	})
	t.Cleanup(func() { close(over) })
	const timeout = 300 * time.Millisecond
	cl, err := Open(context.Background(), u, ClientOptions{Conns: 1, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	start := time.Now()
	read := make(chan error, 1)
	go func() {
		_, err := cl.ReadAt(make([]byte, 4096), 0)
		read <- err
	}()
	select {
	case err = <-read:
	case <-time.After(timeout + 10*time.Second):
		t.Fatal("a read the server never answers still waits, long past the timeout")
	}
	if took := time.Since(start); err == nil || !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "no reply") {
		t.Fatalf("read the server never answers: %v after %v, want EIO, no reply", err, took)
	} else if took < timeout {
		t.Errorf("the read failed after %v, before its timeout of %v", took, timeout)
	}
	if st := cl.Stats(); st.Timeouts != 1 {
		t.Errorf("%d timeouts counted, want 1", st.Timeouts)
	}
	buf := make([]byte, 4096)
	if _, err := cl.ReadAt(buf, 4096); err != nil || buf[1] != 1 {
		t.Fatalf("read after the stuck connection was replaced: %v, % x...", err, buf[:2])
	}
	cl.mu.Lock()
	conn := cl.conns[0]
	cl.mu.Unlock()
	for deadline := time.Now().Add(10 * time.Second); conn.guarding.Load(); {
		if time.Now().After(deadline) {
			t.Fatal("the guard still runs on an idle connection")
		}
		time.Sleep(guardInterval)
	}
}
