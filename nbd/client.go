package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// ClientOptions configure a Client.
type ClientOptions struct {
	Dial DialOptions
	// Conns is how many connections to open when the export allows
	// multi-conn [4]. Without CAN_MULTI_CONN the client uses one.
	Conns int
	// Timeout bounds how long the pool waits for the server, once per
	// outage rather than per request [30s]: a request without a reply
	// for Timeout, or a pool without a working connection for Timeout,
	// makes the server count as unreachable, and from then on every
	// request fails at once with EIO until a connection works again.
	Timeout time.Duration
	// Logf receives warnings (connection lost, reconnected). Nil: silent.
	Logf func(format string, args ...any)
}

// Client is a read-only view of one export over a pool of connections.
// It is an io.ReaderAt, safe for concurrent use. Requests go to the least
// loaded live connection; a lost connection is re-established in the
// background (to the canonical name, with size and flags re-checked) and
// requests wait for one, retrying on it.
//
// The wait is bounded once per outage, as qemu's NBD client bounds it
// with reconnect-delay: when the pool has had no connection for
// ClientOptions.Timeout (the server is gone), or a request has had no
// reply for Timeout and the server has answered nothing for Timeout
// either (it hangs), the server counts as unreachable. Both count from
// the server's last answer, not from when the client noticed. Its connections are dropped, and
// every request fails at once with EIO (an *UnreachableError) however
// the caller splits its reads, until a connection is re-established:
// then requests are served again by themselves.
//
// Client has no method that writes: the protocol's write-type commands
// cannot be sent through it.
type Client struct {
	uri      *URI // names the canonical export
	opt      ClientOptions
	info     *ExportInfo
	size     int64
	minBlock int64
	maxPiece int64 // largest READ the client sends

	mu      sync.Mutex // protects following
	conns   []*Conn    // one per slot; nil while a slot reconnects
	closed  bool
	broken  error         // the export changed or vanished: permanent
	changed chan struct{} // closed and replaced when a slot comes back or the state changes
	lostAt  time.Time     // since when the pool has had no working connection; zero while one works
	lostErr error         // why, or why the latest attempt to reconnect failed
	quiet   time.Time     // a request had no reply, and the server has answered nothing since quiet
	down    *UnreachableError
	downT   *time.Timer // runs checkDown at downAt: Timeout after lostAt or quiet
	downAt  time.Time
	lastErr serverError // the latest error the server reported for a request

	dialCtx  context.Context // cancelled by Close, ends redials
	stopDial context.CancelFunc
	wg       sync.WaitGroup // join, watch and redial goroutines
	joining  atomic.Int32   // joins Open started that have not ended
	joined   chan struct{}  // closed when joining reaches 0

	answered   *answerClock // when the server last answered, on any connection
	reconnects atomic.Int64
	requests   atomic.Int64
	bytesRead  atomic.Int64
	retries    atomic.Int64
	timeouts   atomic.Int64
	failedFast atomic.Int64
}

// Open connects to the export u names and opens the connection pool. It
// returns once the first connection is up; the others (up to
// ClientOptions.Conns, if the server allows multi-conn) connect in the
// background, and WaitConns waits for them.
func Open(ctx context.Context, u *URI, opt ClientOptions) (*Client, error) {
	if opt.Conns <= 0 {
		opt.Conns = 4
	}
	if opt.Timeout <= 0 {
		opt.Timeout = 30 * time.Second
	}
	c := &Client{opt: opt, changed: make(chan struct{}), answered: newAnswerClock()}
	first, err := dial(ctx, u, opt.Dial, c.answered)
	if err != nil {
		return nil, err
	}
	info := first.Info()
	c.uri = u.WithExport(info.CanonicalName)
	c.info = info
	c.size = int64(info.Size)
	c.minBlock = int64(info.BlockSize.Min)
	c.maxPiece = min(int64(info.BlockSize.Max), 8<<20)
	c.maxPiece -= c.maxPiece % c.minBlock
	c.dialCtx, c.stopDial = context.WithCancel(context.Background())
	n := 1
	if info.CanMultiConn() {
		n = opt.Conns
	}
	c.conns = make([]*Conn, n)
	c.conns[0] = first
	c.watch(0, first)
	// The other connections join the canonical name, so with snapshot
	// servers they all see the same instant. They connect while the
	// caller goes on (WaitConns waits for them): a mount sets up FUSE
	// meanwhile, so its file is readable sooner.
	c.joined = make(chan struct{})
	c.joining.Store(int32(n - 1))
	if n == 1 {
		close(c.joined)
	}
	for i := 1; i < n; i++ {
		c.wg.Add(1)
		go c.join(i)
	}
	return c, nil
}

// join opens slot i's first connection, and retries in the background if
// that attempt fails for a reason that may pass.
func (c *Client) join(i int) {
	defer c.wg.Done()
	defer func() {
		if c.joining.Add(-1) == 0 {
			close(c.joined)
		}
	}()
	if _, err := c.connectSlot(i); err != nil {
		c.logf("connection %d of %d failed, retrying in the background: %v", i+1, len(c.conns), err)
		c.startRedial(i)
	}
}

// connectSlot makes one attempt to connect slot i. It installs the
// connection, or breaks the pool on a permanent error (the export changed
// or vanished since the first connection), or does nothing once the pool
// is closed; it returns the error of an attempt worth repeating.
func (c *Client) connectSlot(i int) (installed bool, retry error) {
	ctx, cancel := context.WithTimeout(c.dialCtx, min(redialTimeout, c.opt.Timeout))
	conn, err := c.dialVerified(ctx)
	cancel()
	switch {
	case err == nil:
		return c.install(i, conn), nil
	case c.dialCtx.Err() != nil:
		return false, nil
	case c.isPermanent(err):
		c.breakPool(err)
		return false, nil
	}
	c.mu.Lock()
	if !c.lostAt.IsZero() {
		c.lostErr = err // what an outage will report
	}
	c.mu.Unlock()
	return false, err
}

// WaitConns waits until each connection Open started beside the first
// has connected or failed once, and returns the error that broke the pool
// if one did (a failure that is not permanent leaves the slot
// reconnecting in the background, and is no error).
func (c *Client) WaitConns(ctx context.Context) error {
	select {
	case <-c.joined:
	case <-ctx.Done():
		return ctx.Err()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.broken
}

// install puts conn in slot i, ends an outage, wakes requests waiting
// for a connection, and watches it; it reports false (closing conn) if
// the pool is closed.
func (c *Client) install(i int, conn *Conn) bool {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		conn.Close()
		return false
	}
	c.conns[i] = conn
	down := c.down
	c.down, c.lostAt, c.lostErr, c.quiet = nil, time.Time{}, nil, time.Time{}
	c.disarmLocked()
	c.wakeLocked()
	c.mu.Unlock()
	if down != nil {
		c.logf("%s answers again, %v after it stopped; requests are served again", c.uri.Display(), time.Since(down.Since).Round(time.Millisecond))
	}
	c.watch(i, conn)
	return true
}

// wakeLocked wakes every request waiting in pick to look again.
func (c *Client) wakeLocked() {
	close(c.changed)
	c.changed = make(chan struct{})
}

// liveLocked counts the connections in the pool.
func (c *Client) liveLocked() int {
	n := 0
	for _, cn := range c.conns {
		if cn != nil {
			n++
		}
	}
	return n
}

// UnreachableError is what requests fail with at once while the server
// counts as unreachable (see Client). It unwraps to EIO.
type UnreachableError struct {
	Server string    // the server, for display
	Since  time.Time // when it stopped answering
	Cause  string    // "no reply for 30s", "no connection for 30s: ..."
}

func (e *UnreachableError) Error() string {
	return fmt.Sprintf("nbd: %s unreachable since %s (%s); requests that need it fail at once until it answers again",
		e.Server, e.Since.Format("15:04:05"), e.Cause)
}

func (e *UnreachableError) Unwrap() error { return syscall.EIO }

// errUnreachable ends the connections of a server that counts as
// unreachable; requests on them retry and find the outage.
var errUnreachable = errors.New("the server counts as unreachable")

// declareUnreachable starts an outage that began at since: requests fail
// at once from now on, and connections still in the pool (to a server
// that does not answer) are dropped and re-established in the background.
func (c *Client) declareUnreachable(since time.Time, cause string) {
	c.mu.Lock()
	if c.closed || c.broken != nil || c.down != nil {
		c.mu.Unlock()
		return
	}
	c.down = &UnreachableError{Server: c.uri.Display(), Since: since, Cause: cause}
	var drop []*Conn
	for _, cn := range c.conns {
		if cn != nil {
			drop = append(drop, cn)
		}
	}
	c.wakeLocked()
	err := c.down
	c.mu.Unlock()
	c.logf("%v", err)
	for _, cn := range drop {
		cn.fail(errUnreachable)
	}
}

// checkDown is the outage timer. The server counts as unreachable once
// the pool has had no connection for Timeout since lostAt, or a request
// had no reply and the server has answered nothing for Timeout since
// quiet; otherwise the timer is set again for whichever is still to come.
func (c *Client) checkDown() {
	c.mu.Lock()
	now := time.Now()
	if c.downT != nil && !now.Before(c.downAt) {
		c.downT, c.downAt = nil, time.Time{}
	}
	if c.closed || c.broken != nil || c.down != nil {
		c.mu.Unlock()
		return
	}
	if !c.quiet.IsZero() && c.answered.at().After(c.quiet) {
		c.quiet = time.Time{} // it answered since
	}
	empty := !c.lostAt.IsZero() && c.liveLocked() == 0
	var since time.Time
	var cause string
	switch {
	case !c.quiet.IsZero() && !now.Before(c.quiet.Add(c.opt.Timeout)):
		since, cause = c.quiet, fmt.Sprintf("no reply for %v", c.opt.Timeout)
	case empty && !now.Before(c.lostAt.Add(c.opt.Timeout)):
		since, cause = c.lostAt, noConnection(c.opt.Timeout, c.lostErr)
	default:
		if !c.quiet.IsZero() {
			c.armLocked(c.quiet.Add(c.opt.Timeout))
		}
		if empty {
			c.armLocked(c.lostAt.Add(c.opt.Timeout))
		}
	}
	c.mu.Unlock()
	if !since.IsZero() {
		c.declareUnreachable(since, cause)
	}
}

// armLocked makes the outage timer run checkDown at the latest at at.
func (c *Client) armLocked(at time.Time) {
	if c.downT != nil {
		if !c.downAt.After(at) {
			return
		}
		c.downT.Stop()
	}
	c.downT, c.downAt = time.AfterFunc(time.Until(at), c.checkDown), at
}

// disarmLocked stops the outage timer.
func (c *Client) disarmLocked() {
	if c.downT != nil {
		c.downT.Stop()
		c.downT, c.downAt = nil, time.Time{}
	}
}

func noConnection(timeout time.Duration, why error) string {
	if why == nil {
		return fmt.Sprintf("no connection for %v", timeout)
	}
	return fmt.Sprintf("no connection for %v: %v", timeout, why)
}

// noReply handles a request that had no reply for Timeout from start. If
// the server has answered nothing since, it does not answer at all: the
// outage begins. If it answered another request since, this one may
// only be slow, or the server stopped just after that answer: it counts
// as unreachable Timeout after that answer unless it answers again.
func (c *Client) noReply(start time.Time) {
	answered := c.answered.at()
	c.mu.Lock()
	if answered.After(start) {
		c.quiet = answered
		if c.down == nil {
			c.armLocked(answered.Add(c.opt.Timeout))
		}
		c.mu.Unlock()
		return
	}
	cause := fmt.Sprintf("no reply for %v", c.opt.Timeout)
	if !c.lostAt.IsZero() && c.liveLocked() == 0 {
		if c.lostAt.Before(start) {
			start = c.lostAt
		}
		cause = noConnection(c.opt.Timeout, c.lostErr)
	}
	c.mu.Unlock()
	c.declareUnreachable(start, cause)
}

// answerClock records when the server last answered a request, on any
// connection of a pool.
type answerClock struct {
	epoch time.Time    // its monotonic reading makes a step of the wall clock harmless
	last  atomic.Int64 // time.Since(epoch) at the latest answer
}

func newAnswerClock() *answerClock { return &answerClock{epoch: time.Now()} }

func (a *answerClock) mark() { a.last.Store(int64(time.Since(a.epoch))) }

func (a *answerClock) at() time.Time { return a.epoch.Add(time.Duration(a.last.Load())) }

// breakPool records a permanent error: every request fails with it from
// now on.
func (c *Client) breakPool(err error) {
	c.mu.Lock()
	if c.broken == nil {
		c.broken = err
		c.wakeLocked()
	}
	c.mu.Unlock()
	c.logf("%v", err)
}

// Info describes the export (from the first connection).
func (c *Client) Info() *ExportInfo { return c.info }

// Size is the export's size in bytes.
func (c *Client) Size() int64 { return c.size }

// URI names the canonical export the pool connects to.
func (c *Client) URI() *URI { return c.uri }

func (c *Client) logf(format string, args ...any) {
	if c.opt.Logf != nil {
		c.opt.Logf(format, args...)
	}
}

// ClientStats are the pool's counters and its state.
type ClientStats struct {
	// State is "connected" (at least one connection works),
	// "reconnecting" (none does; requests wait, for Timeout at most),
	// "unreachable" (requests fail at once until a connection works
	// again), "gone" (the export, e.g. a snapshot, no longer exists),
	// "changed" (it is not the export the pool opened) or "closed".
	State  string    `json:"state"`
	Since  time.Time `json:"state_since,omitzero"` // when the state began (not for connected)
	Reason string    `json:"state_reason,omitempty"`

	Conns      int    `json:"conns"`       // connections alive now
	Slots      int    `json:"conn_slots"`  // connections wanted
	Reconnects int64  `json:"reconnects"`  // connections re-established
	Requests   int64  `json:"requests"`    // READ and BLOCK_STATUS requests sent
	BytesRead  int64  `json:"bytes_read"`  // payload bytes read
	Retries    int64  `json:"retries"`     // requests retried after a lost connection
	Timeouts   int64  `json:"timeouts"`    // requests failed after Timeout without a reply
	FailedFast int64  `json:"failed_fast"` // requests failed at once: server unreachable
	Export     string `json:"export"`      // the canonical export name
	// OldestWait is how long the oldest request now in flight has
	// waited for its reply.
	OldestWait time.Duration `json:"oldest_wait_ns"`
	// LastServerError is the latest error the server reported for a
	// request (the server's errno and message), if any.
	LastServerError *ServerErrorReport `json:"last_server_error,omitempty"`
}

// ServerErrorReport is an error the server reported for a request.
type ServerErrorReport struct {
	At      time.Time `json:"at"`
	Errno   string    `json:"errno"`
	Message string    `json:"message,omitempty"`
	Count   int64     `json:"count"` // errors the server reported in all
}

// serverError keeps the latest error the server reported.
type serverError struct {
	at    time.Time
	err   *RequestError
	count int64
}

func (c *Client) noteServerError(re *RequestError) {
	c.mu.Lock()
	c.lastErr = serverError{at: time.Now(), err: re, count: c.lastErr.count + 1}
	c.mu.Unlock()
}

// Stats returns the pool's counters and state.
func (c *Client) Stats() ClientStats {
	now := time.Now()
	st := ClientStats{
		Reconnects: c.reconnects.Load(), Requests: c.requests.Load(),
		BytesRead: c.bytesRead.Load(), Retries: c.retries.Load(),
		Timeouts: c.timeouts.Load(), FailedFast: c.failedFast.Load(),
		Export: c.info.CanonicalName,
	}
	c.mu.Lock()
	var conns []*Conn
	for _, cn := range c.conns {
		if cn != nil {
			conns = append(conns, cn)
		}
	}
	st.Conns, st.Slots = len(conns), len(c.conns)
	switch {
	case c.closed:
		st.State = "closed"
	case c.broken != nil:
		var g *goneError
		st.State, st.Reason = "changed", c.broken.Error()
		if errors.As(c.broken, &g) {
			st.State = "gone"
		}
	case c.down != nil:
		st.State, st.Since, st.Reason = "unreachable", c.down.Since, c.down.Cause
	case len(conns) == 0:
		st.State, st.Since = "reconnecting", c.lostAt
		if c.lostErr != nil {
			st.Reason = c.lostErr.Error()
		}
	default:
		st.State = "connected"
	}
	if e := c.lastErr; e.err != nil {
		st.LastServerError = &ServerErrorReport{At: e.at, Errno: e.err.Errno.String(), Message: e.err.Msg, Count: e.count}
	}
	c.mu.Unlock()
	for _, cn := range conns {
		if dl, ok := cn.oldestDeadline(); ok {
			st.OldestWait = max(st.OldestWait, now.Sub(dl.Add(-c.opt.Timeout)))
		}
	}
	return st
}

// Close ends every connection. Reads in flight fail with ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	conns := append([]*Conn(nil), c.conns...)
	c.disarmLocked()
	close(c.changed)
	c.mu.Unlock()
	c.stopDial()
	for _, cn := range conns {
		if cn != nil {
			cn.Close()
		}
	}
	c.wg.Wait()
	return nil
}

// dialVerified opens one more connection to the canonical export and
// checks it is the same export the pool started with.
func (c *Client) dialVerified(ctx context.Context) (*Conn, error) {
	conn, err := dial(ctx, c.uri, c.opt.Dial, c.answered)
	if err != nil {
		var oe *OptionError
		if errors.As(err, &oe) && oe.Reply == RepErrUnknown {
			return nil, &goneError{c.uri.Export, err}
		}
		return nil, err
	}
	got := conn.Info()
	switch {
	case got.Size != c.info.Size:
		err = fmt.Errorf("size is now %d bytes, was %d", got.Size, c.info.Size)
	case got.ReadOnly() != c.info.ReadOnly():
		err = fmt.Errorf("read-only flag changed (now %v)", got.ReadOnly())
	case got.CanonicalName != c.info.CanonicalName:
		err = fmt.Errorf("canonical name is now %q, was %q", got.CanonicalName, c.info.CanonicalName)
	case c.info.SnapmountSnapshot() && got.Description != c.info.Description:
		// snapmount serve numbers snapshots from 1 again after a
		// restart: the instant in the description tells them apart.
		err = fmt.Errorf("%q is another snapshot now (%q, was %q)", got.CanonicalName, got.Description, c.info.Description)
	}
	if err != nil {
		conn.Close()
		return nil, &changedError{c.uri.Export, err}
	}
	return conn, nil
}

// goneError: the export (typically a snapshot) no longer exists.
type goneError struct {
	export string
	err    error
}

func (e *goneError) Error() string {
	return fmt.Sprintf("nbd: export %q is gone (%v); a snapshot that is gone cannot be read again", e.export, e.err)
}
func (e *goneError) Unwrap() error { return syscall.EIO }

// changedError: the reconnected export is not the one the pool opened.
type changedError struct {
	export string
	err    error
}

func (e *changedError) Error() string {
	return fmt.Sprintf("nbd: export %q changed since the client first connected: %v", e.export, e.err)
}
func (e *changedError) Unwrap() error { return syscall.EIO }

func (c *Client) isPermanent(err error) bool {
	var g *goneError
	var ch *changedError
	return errors.As(err, &g) || errors.As(err, &ch)
}

// watch replaces a slot's connection when it dies.
func (c *Client) watch(i int, conn *Conn) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		select {
		case <-conn.Dead():
		case <-c.dialCtx.Done():
			return
		}
		c.mu.Lock()
		if c.closed || c.conns[i] != conn {
			c.mu.Unlock()
			return
		}
		c.conns[i] = nil
		if c.liveLocked() == 0 && c.lostAt.IsZero() {
			// The pool is empty: requests wait for a connection, for
			// Timeout at most from when the server stopped answering.
			// That is now, unless the guard dropped the connection for
			// a request without a reply for Timeout: then it is the
			// server's last answer, or that request's start if later.
			lost := time.Now()
			if errors.Is(conn.Err(), errNoReply) {
				lost = later(c.answered.at(), lost.Add(-c.opt.Timeout))
			}
			c.lostAt, c.lostErr = lost, conn.Err()
			if c.down == nil {
				c.armLocked(lost.Add(c.opt.Timeout))
			}
		}
		c.mu.Unlock()
		if !errors.Is(conn.Err(), errUnreachable) {
			c.logf("connection to %s lost: %v; reconnecting", c.uri.Display(), conn.Err())
		}
		c.startRedial(i)
	}()
}

// redialTimeout bounds one background connection attempt (and so does
// ClientOptions.Timeout, if shorter).
const redialTimeout = 10 * time.Second

// startRedial reconnects slot i in the background with backoff.
func (c *Client) startRedial(i int) {
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		backoff := 20 * time.Millisecond
		for {
			installed, err := c.connectSlot(i)
			if installed {
				c.reconnects.Add(1)
				c.logf("reconnected to %s", c.uri.Display())
			}
			if err == nil {
				return
			}
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-c.dialCtx.Done():
				t.Stop()
				return
			}
			backoff = min(backoff*2, 2*time.Second)
		}
	}()
}

// pick returns the live connection with the least work in flight, waiting
// for one to come back if all are down, until ctx ends or the deadline
// passes (then errNoReply). While the server counts as unreachable it
// fails at once.
func (c *Client) pick(ctx context.Context, deadline time.Time) (*Conn, error) {
	var timeout <-chan time.Time // made only when there is nothing to pick
	for {
		c.mu.Lock()
		if c.closed {
			c.mu.Unlock()
			return nil, ErrClosed
		}
		if c.broken != nil {
			err := c.broken
			c.mu.Unlock()
			return nil, err
		}
		if c.down != nil {
			err := c.down
			c.mu.Unlock()
			c.failedFast.Add(1)
			return nil, err
		}
		var best *Conn
		for _, cn := range c.conns {
			if cn != nil && (best == nil || cn.Inflight() < best.Inflight()) {
				best = cn
			}
		}
		changed := c.changed
		c.mu.Unlock()
		if best != nil {
			return best, nil
		}
		if timeout == nil {
			t := time.NewTimer(time.Until(deadline))
			defer t.Stop()
			timeout = t.C
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timeout:
			return nil, errNoReply
		}
	}
}

// do runs one request with retries on other or re-established connections
// until it succeeds, the server reports an error, ctx ends, Timeout
// passes, or the server counts as unreachable. The timeout is a deadline
// that each connection's guard enforces, not a context with a timer per
// request (see Conn for why).
func (c *Client) do(ctx context.Context, op func(ctx context.Context, deadline time.Time, conn *Conn) error) error {
	start := time.Now()
	deadline := start.Add(c.opt.Timeout)
	for {
		conn, err := c.pick(ctx, deadline)
		if err == nil {
			c.requests.Add(1)
			err = op(ctx, deadline, conn)
		}
		var ce *ConnError
		var re *RequestError
		switch {
		case err == nil:
			return nil
		case errors.Is(err, errNoReply) && !time.Now().Before(deadline):
			// Our own deadline, not the caller's: the server did not
			// answer in time (the guard has replaced a stuck connection).
			c.timeouts.Add(1)
			c.noReply(start)
			return fmt.Errorf("nbd: no reply from %s within %v: %w", c.uri.Display(), c.opt.Timeout, syscall.EIO)
		case errors.As(err, &ce):
			c.retries.Add(1)
			continue
		case errors.As(err, &re) && re.Errno == ESHUTDOWN:
			// The server is going away: soft-disconnect and retry
			// once it (or its successor) is back.
			conn.Close()
			c.retries.Add(1)
			continue
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.As(err, &re):
			c.noteServerError(re)
		}
		return err
	}
}

// ReadAt reads len(p) bytes at off. At the end of the export it returns a
// short count and io.EOF, like os.File.
func (c *Client) ReadAt(p []byte, off int64) (int, error) {
	return c.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt with cancellation (a FUSE interrupt).
func (c *Client) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("nbd: negative offset %d", off)
	}
	if off >= c.size {
		return 0, io.EOF
	}
	n := int64(len(p))
	var eof error
	if n > c.size-off {
		n, eof = c.size-off, io.EOF
	}
	if err := c.ReadVecContext(ctx, [][]byte{p[:n]}, off); err != nil {
		return 0, err
	}
	return int(n), eof
}

// ReadVecContext reads the total length of bufs at off into bufs in
// order. The range must lie inside the export. Large ranges are split and
// read in parallel over the pool; unaligned ones are widened to the
// server's minimum block size.
func (c *Client) ReadVecContext(ctx context.Context, bufs [][]byte, off int64) error {
	var n int64
	for _, b := range bufs {
		n += int64(len(b))
	}
	if n == 0 {
		return nil
	}
	if off < 0 || off > c.size || n > c.size-off {
		return fmt.Errorf("nbd: read [%d, +%d) outside the export of %d bytes: %w", off, n, c.size, syscall.EINVAL)
	}
	if off%c.minBlock != 0 || (n%c.minBlock != 0 && off+n != c.size) {
		return c.readUnaligned(ctx, bufs, off, n)
	}
	if n <= c.maxPiece {
		return c.readPiece(ctx, bufs, off, n)
	}
	// Split into pieces of at most maxPiece, read concurrently.
	var wg sync.WaitGroup
	var firstErr error
	var errMu sync.Mutex
	for pos := int64(0); pos < n; pos += c.maxPiece {
		plen := min(c.maxPiece, n-pos)
		piece := sliceVec(bufs, pos, plen)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.readPiece(ctx, piece, off+pos, plen); err != nil {
				errMu.Lock()
				if firstErr == nil {
					firstErr = err
				}
				errMu.Unlock()
			}
		}()
	}
	wg.Wait()
	return firstErr
}

func (c *Client) readPiece(ctx context.Context, bufs [][]byte, off, n int64) error {
	err := c.do(ctx, func(ctx context.Context, deadline time.Time, conn *Conn) error {
		return conn.readVec(ctx, deadline, bufs, off)
	})
	if err == nil {
		c.bytesRead.Add(n)
	}
	return err
}

// readUnaligned reads the aligned range around [off, off+n) into a
// scratch buffer and copies the wanted part out.
func (c *Client) readUnaligned(ctx context.Context, bufs [][]byte, off, n int64) error {
	start := off - off%c.minBlock
	end := off + n
	if r := end % c.minBlock; r != 0 {
		end = min(end+c.minBlock-r, c.size)
	}
	tmp := make([]byte, end-start)
	if err := c.ReadVecContext(ctx, [][]byte{tmp}, start); err != nil {
		return err
	}
	src := tmp[off-start:]
	for _, b := range bufs {
		src = src[copy(b, src):]
	}
	return nil
}

// sliceVec returns the part [pos, pos+n) of a vector of buffers, sharing
// their memory.
func sliceVec(bufs [][]byte, pos, n int64) [][]byte {
	var out [][]byte
	for _, b := range bufs {
		if n == 0 {
			break
		}
		if pos >= int64(len(b)) {
			pos -= int64(len(b))
			continue
		}
		take := min(int64(len(b))-pos, n)
		out = append(out, b[pos:pos+take])
		n -= take
		pos = 0
	}
	return out
}

// BlockStatus returns the base:allocation extents from off, covering at
// least one byte and at most about length bytes.
func (c *Client) BlockStatus(ctx context.Context, off, length int64) ([]Extent, error) {
	if off < 0 || off >= c.size {
		return nil, fmt.Errorf("nbd: block status at %d outside the export of %d bytes: %w", off, c.size, syscall.EINVAL)
	}
	if _, ok := c.info.ContextID(ContextBaseAllocation); !ok {
		return nil, ErrNoAllocation
	}
	// Keep the request aligned to the minimum block size.
	aligned := off - off%c.minBlock
	length = min(length+(off-aligned), c.size-aligned)
	if r := length % c.minBlock; r != 0 && aligned+length != c.size {
		length += c.minBlock - r
		length = min(length, c.size-aligned)
	}
	var ext []Extent
	err := c.do(ctx, func(ctx context.Context, deadline time.Time, conn *Conn) error {
		var err error
		ext, err = conn.blockStatus(ctx, deadline, aligned, length)
		return err
	})
	if err != nil {
		return nil, err
	}
	// Drop what lies before off (alignment).
	for len(ext) > 0 && ext[0].Offset+ext[0].Length <= off {
		ext = ext[1:]
	}
	if len(ext) > 0 && ext[0].Offset < off {
		ext[0].Length -= off - ext[0].Offset
		ext[0].Offset = off
	}
	if len(ext) == 0 {
		return nil, protoErrorf("BLOCK_STATUS at %d returned no extent", off)
	}
	return ext, nil
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
