package nbd

import (
	"context"
	"errors"
	"testing"
	"time"
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
		b := appendSimpleReply(nil, 0, r.Cookie)
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
		s.reply(OptGo, RepInfo, appendInfoText(nil, InfoName, canonical))
		s.reply(OptGo, RepInfo, appendInfoExport(nil, 1<<20, FlagHasFlags|FlagReadOnly|FlagCanMultiConn))
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
	for cl.Stats().Retries == 0 {
		select {
		case err := <-read:
			t.Fatalf("read ended while no connection could serve it: %v", err)
		case <-time.After(time.Millisecond):
		}
	}
	close(release)
	if err := <-read; err != nil {
		t.Fatalf("read after the other connections joined: %v", err)
	}
	if buf[0] != 0 || buf[1] != 1 {
		t.Fatalf("read got % x...", buf[:2])
	}
}
