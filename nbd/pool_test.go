package nbd

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
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
	answerReads(s, nil)
}

// answerReads answers every READ with bytes that are their offset's low
// byte, but those unanswered says to leave unanswered, until the client
// disconnects.
func answerReads(s *fakeServer, unanswered func(Request) bool) {
	for {
		r := s.readRequest()
		if r.Type != CmdRead {
			return
		}
		if unanswered != nil && unanswered(r) {
			continue
		}
		b := AppendSimpleReply(nil, 0, r.Cookie)
		for i := range uint64(r.Length) {
			b = append(b, byte(r.Offset+i))
		}
		s.write(b)
	}
}

// openPool opens a pool of conns connections to u with timeout, closed
// when the test ends, and waits until they have all joined.
func openPool(t *testing.T, u *URI, conns int, timeout time.Duration) *Client {
	t.Helper()
	cl, err := Open(context.Background(), u, ClientOptions{Conns: conns, Timeout: timeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	if err := cl.WaitConns(context.Background()); err != nil {
		t.Fatal(err)
	}
	return cl
}

// serveExport answers the handshake (see handshake), then reads requests
// until the client disconnects.
func serveExport(s *fakeServer, canonical string) {
	handshake(s, canonical)
	for s.readRequest().Type != CmdDisc {
	}
}

// handshake answers the handshake with a multi-conn read-only export of
// 1 MiB whose canonical name is canonical, taking the read-only promise
// as snapmount serve does (every other option is unsupported); from then
// on the client may hang up at any time.
func handshake(s *fakeServer, canonical string) {
	handshakeDescribed(s, canonical, "")
}

// handshakeDescribed is handshake with NBD_INFO_DESCRIPTION desc, unless
// empty.
func handshakeDescribed(s *fakeServer, canonical, desc string) {
	s.greet(HandshakeFixedNewstyle | HandshakeNoZeroes)
	for {
		opt, _ := s.readOption()
		if opt == OptXReadOnly {
			s.reply(opt, RepAck, nil)
			continue
		}
		if opt != OptGo {
			s.reply(opt, RepErrUnsup, nil)
			continue
		}
		s.reply(OptGo, RepInfo, AppendInfoText(nil, InfoName, canonical))
		if desc != "" {
			s.reply(OptGo, RepInfo, AppendInfoText(nil, InfoDescription, desc))
		}
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

// timedRead reads 4 KiB at off and returns how long it took and its
// error.
func timedRead(cl *Client, off int64) (time.Duration, error) {
	start := time.Now()
	_, err := cl.ReadAt(make([]byte, 4096), off)
	return time.Since(start), err
}

// waitState waits until the pool's state is want.
func waitState(t *testing.T, cl *Client, want string) {
	t.Helper()
	waitPool(t, cl, fmt.Sprintf("the pool to be %s", want), func(st ClientStats) bool { return st.State == want })
}

// waitPool waits until cond holds for the pool's stats; what says what
// for.
func waitPool(t *testing.T, cl *Client, what string, cond func(ClientStats) bool) {
	t.Helper()
	for deadline := time.Now().Add(testenv.WaitLimit); ; {
		st := cl.Stats()
		if cond(st) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s: %+v", testenv.WaitLimit, what, st)
		}
		time.Sleep(time.Millisecond)
	}
}

// waitConns waits until n connections are in the pool.
func waitConns(t *testing.T, cl *Client, n int) {
	t.Helper()
	waitPool(t, cl, fmt.Sprintf("%d connections in the pool", n), func(st ClientStats) bool { return st.Conns == n })
}

// listenHangable serves disk@s1 as a server that hangs while hung is
// set: new connections get no greeting (a stopped server's backlog) and
// the reads unanswered picks get no reply.
func listenHangable(t *testing.T, hung *atomic.Bool, unanswered func(Request) bool) *URI {
	over := make(chan struct{})
	u := listenPool(t, func(n int, s *fakeServer) {
		if hung.Load() {
			<-over
			return
		}
		handshake(s, "disk@s1")
		answerReads(s, unanswered)
	})
	t.Cleanup(func() { close(over) }) // before listenPool's cleanup waits for its handlers
	return u
}

// A server that stops answering (as under SIGSTOP) makes the first read
// fail with EIO once Timeout has passed, and a read waiting beside it on
// the other connection fails then too, ended by the outage rather than
// by its own deadline. From then on every read fails at once, until the
// server answers again: the pool reconnects by itself and reads are
// served. Once nothing is in flight, the guard stops (an idle mount runs
// no timer).
func TestClientHungServerIsOneOutage(t *testing.T) {
	var hung atomic.Bool
	u := listenHangable(t, &hung, func(Request) bool { return hung.Load() })
	const timeout = 500 * time.Millisecond
	cl := openPool(t, u, 2, timeout)
	if _, err := timedRead(cl, 0); err != nil {
		t.Fatal(err)
	}
	hung.Store(true)
	first, beside := make(chan error, 1), make(chan error, 1)
	var took time.Duration
	go func() {
		var err error
		took, err = timedRead(cl, 4096)
		first <- err
	}()
	// The read beside it goes out once the first has waited half its
	// time: its own deadline is well after the first's.
	waitPool(t, cl, "the first read to wait half its time", func(st ClientStats) bool { return st.OldestWait >= timeout/2 })
	go func() {
		_, err := timedRead(cl, 8192)
		beside <- err
	}()
	var err error
	select {
	case err = <-first:
	case <-time.After(timeout + testenv.WaitLimit):
		t.Fatal("a read the server never answers still waits, long past the timeout")
	}
	if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "no reply") {
		t.Fatalf("read the server never answers: %v after %v, want EIO, no reply", err, took)
	}
	var ue *UnreachableError
	if err := testenv.Receive(t, beside, "the read beside it"); !errors.As(err, &ue) || !errors.Is(err, syscall.EIO) {
		t.Errorf("the read beside it: %v, want it failed by the outage (EIO, unreachable)", err)
	}
	failsFast(t, cl)
	st := cl.Stats()
	if st.State != "unreachable" || !strings.Contains(st.Reason, "no reply") || st.Timeouts != 1 || st.FailedFast < 1 {
		t.Errorf("stats during the outage: %+v", st)
	}

	hung.Store(false) // the server answers again (new connections)
	waitState(t, cl, "connected")
	buf := make([]byte, 4096)
	if _, err := cl.ReadAt(buf, 4096); err != nil {
		t.Fatalf("read once the server answers again: %v", err)
	}
	waitConns(t, cl, 2)
	cl.mu.Lock()
	conns := append([]*Conn(nil), cl.conns...)
	cl.mu.Unlock()
	for _, conn := range conns {
		for deadline := time.Now().Add(testenv.WaitLimit); conn.guarding.Load(); {
			if time.Now().After(deadline) {
				t.Fatal("the guard still runs on an idle connection")
			}
			time.Sleep(guardInterval)
		}
	}
}

// A server that stops just after answering one request, while another
// request was already waiting (a streaming reader's readahead), stops
// answering from that answer on: the outage counts from it, not from
// when the waiting request had no reply for Timeout and its connection
// was dropped. A read after that waits for the rest of one Timeout, not
// for a second one.
func TestClientHangRightAfterAReplyIsOneOutage(t *testing.T) {
	var hung atomic.Bool
	u := listenHangable(t, &hung, func(r Request) bool { return r.Offset == 0 || hung.Load() })
	const timeout = time.Second
	cl := openPool(t, u, 1, timeout)
	waiting := make(chan error, 1)
	go func() {
		_, err := timedRead(cl, 0) // never answered
		waiting <- err
	}()
	waitPool(t, cl, "the first read to be in flight", func(st ClientStats) bool { return st.OldestWait > 0 })
	if _, err := timedRead(cl, 4096); err != nil {
		t.Fatal(err)
	}
	hung.Store(true)
	hungAt := time.Now()
	if err := testenv.Receive(t, waiting, "the unanswered read"); !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "no reply") {
		t.Fatalf("the unanswered read: %v, want EIO, no reply", err)
	}
	_, err := timedRead(cl, 8192)
	var ue *UnreachableError
	if !errors.As(err, &ue) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("read after the first failed: %v, want EIO from the outage (unreachable)", err)
	}
	if ue.Since.After(hungAt) {
		t.Errorf("the outage counts from %v after the server stopped (%v), want from its last answer",
			ue.Since.Sub(hungAt).Round(time.Millisecond), ue.Cause)
	}
	if st := cl.Stats(); st.State != "unreachable" || st.Since.After(hungAt) || !strings.Contains(st.Reason, "no reply") {
		t.Errorf("stats during the outage: %s since %v after the server stopped (%s)", st.State, st.Since.Sub(hungAt).Round(time.Millisecond), st.Reason)
	}
}

// failsFast checks that a read during an outage fails at once: with the
// outage's EIO, counted as failed without waiting (a loaded machine may
// take its time, so no clock says it).
func failsFast(t *testing.T, cl *Client) {
	t.Helper()
	before := cl.Stats().FailedFast
	_, err := cl.ReadAt(make([]byte, 4096), 0)
	var ue *UnreachableError
	if !errors.As(err, &ue) || !errors.Is(err, syscall.EIO) || cl.Stats().FailedFast <= before {
		t.Errorf("a read during the outage: %v, %d failed at once before it and %d after, want it to fail at once with EIO", err, before, cl.Stats().FailedFast)
	}
}

// A server that goes away (as under SIGKILL) leaves the pool without a
// connection: requests wait for one until Timeout after the last one was
// lost, whenever they started, then the server counts as unreachable and
// requests fail at once, saying why. When it is back, reads are served
// again.
func TestClientGoneServerIsOneOutage(t *testing.T) {
	var gone atomic.Bool
	hangUp := make(chan struct{})
	u := listenPool(t, func(n int, s *fakeServer) {
		if gone.Load() {
			return // refused: closed at once
		}
		handshake(s, "disk@s1")
		if n <= 2 {
			go func() {
				<-hangUp
				s.c.Close()
			}()
		}
		answerReads(s, nil)
	})
	const timeout = time.Second
	cl := openPool(t, u, 2, timeout)
	gone.Store(true)
	close(hangUp)
	// The idle connections notice; a read starts once the pool has been
	// empty for half the timeout, so its own deadline comes well after
	// the outage's.
	waitPool(t, cl, "the pool to have been empty for half the timeout", func(st ClientStats) bool {
		return st.State == "reconnecting" && time.Since(st.Since) >= timeout/2
	})
	took, err := timedRead(cl, 0)
	var ue *UnreachableError
	if !errors.As(err, &ue) || !errors.Is(err, syscall.EIO) {
		t.Fatalf("read with the server gone: %v after %v, want EIO from the outage (unreachable)", err, took)
	}
	failsFast(t, cl)
	if st := cl.Stats(); st.State != "unreachable" || !strings.Contains(st.Reason, "no connection") {
		t.Errorf("stats during the outage: %s (%s)", st.State, st.Reason)
	}
	gone.Store(false)
	waitState(t, cl, "connected")
	if _, err := timedRead(cl, 0); err != nil {
		t.Fatalf("read once the server is back: %v", err)
	}
	waitConns(t, cl, 2) // no handshake under way at Close
}

// A request the server does not answer while it answers others is a slow
// request, not an outage: it fails with EIO after Timeout and the next
// read is served.
func TestClientSlowRequestIsNoOutage(t *testing.T) {
	u := listenPool(t, func(n int, s *fakeServer) {
		handshake(s, "disk@s1")
		answerReads(s, func(r Request) bool { return r.Offset == 0 }) // never answered
	})
	const timeout = 500 * time.Millisecond
	cl := openPool(t, u, 2, timeout)
	slow := make(chan error, 1)
	go func() {
		_, err := timedRead(cl, 0)
		slow <- err
	}()
	// Other reads are answered meanwhile, on the other connection.
	for {
		select {
		case err := <-slow:
			if !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "no reply") {
				t.Fatalf("the unanswered read: %v, want EIO, no reply", err)
			}
			if st := cl.Stats(); st.State != "connected" || st.FailedFast != 0 {
				t.Errorf("a slow request counted as an outage: %+v", st)
			}
			if _, err := timedRead(cl, 4096); err != nil {
				t.Errorf("read after the slow request: %v", err)
			}
			waitConns(t, cl, 2) // no handshake under way at Close
			return
		default:
		}
		if _, err := timedRead(cl, 8192); err != nil {
			t.Fatalf("read beside the slow one: %v", err)
		}
	}
}

// A server restarted with another snapshot under the pool's snapshot name
// (snapmount serve numbers them from 1 again) is told apart by the
// instant in its description: the pool does not read the new snapshot,
// it reports the export changed, for good.
func TestClientRefusesAnotherSnapshotOfTheSameName(t *testing.T) {
	var restarted atomic.Bool
	hangUp := make(chan struct{})
	u := listenPool(t, func(n int, s *fakeServer) {
		if restarted.Load() {
			handshakeDescribed(s, "disk@s1", "snapshot taken 2026-12-04T17:00:01Z")
			for s.readRequest().Type != CmdDisc {
			}
			return
		}
		handshakeDescribed(s, "disk@s1", "snapshot taken 2026-12-04T16:00:00Z")
		go func() {
			<-hangUp
			s.c.Close()
		}()
		for s.readRequest().Type != CmdDisc {
		}
	})
	cl, err := Open(context.Background(), u, ClientOptions{Conns: 1, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	restarted.Store(true)
	close(hangUp)
	waitState(t, cl, "changed")
	var changed *changedError
	if _, err := timedRead(cl, 0); !errors.As(err, &changed) || !errors.Is(err, syscall.EIO) || !strings.Contains(err.Error(), "another snapshot") {
		t.Errorf("read after the snapshot's name came back as another: %v, want EIO, another snapshot", err)
	}
}
