package server

// The server: net/http-shaped. New opens the images, Serve runs an
// accept loop per listener, Shutdown stops accepting, lets requests in
// flight finish, flushes the images and frees the snapshot stores. Each
// connection has one reader (the handshake, then request headers and
// payloads), a bounded set of handlers and one writer of replies.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"snapmount/nbd"
)

// TLSMode says whether the server offers or requires TLS.
type TLSMode int

const (
	TLSOff     TLSMode = iota // STARTTLS is refused with ERR_POLICY
	TLSOn                     // STARTTLS is offered; plaintext is allowed
	TLSRequire                // everything but STARTTLS and ABORT needs TLS first (FORCEDTLS)
)

// BusyPolicy is what a client that did not promise to read only gets when
// every writer slot of an export is taken.
type BusyPolicy int

const (
	BusyReadOnly BusyPolicy = iota // a read-only live view
	BusyRefuse                     // NBD_REP_ERR_POLICY
)

// SnapshotFullPolicy is what happens when copy-before-write cannot save a
// block for a snapshot (its store is full or the copy failed).
type SnapshotFullPolicy int

const (
	BreakSnapshot SnapshotFullPolicy = iota // the snapshot breaks (its readers get EIO), the write goes on
	FailWriter                              // the write fails (ENOSPC or EIO), the snapshot stays intact
)

// ReaderView is what a client that sent NBD_OPT_X_READ_ONLY sees when it
// opens a plain export name.
type ReaderView int

const (
	ReaderViewSnapshot ReaderView = iota // a new point-in-time snapshot
	ReaderViewLive                       // the live image, read-only
)

// ExportConfig names one image to serve.
type ExportConfig struct {
	Name        string // export name; no '@'
	Path        string // image file or block device
	Description string // sent in NBD_REP_SERVER and NBD_INFO_DESCRIPTION
}

// Config configures a Server. The zero value of each field is a
// usable default except Exports, which must not be empty.
type Config struct {
	Exports []ExportConfig
	// ReadOnly serves every export read-only: no client is ever a writer.
	ReadOnly bool

	TLSMode   TLSMode
	TLSConfig *tls.Config // required unless TLSMode is TLSOff

	// MaxWriters limits writer connections per export; 0 is unlimited.
	MaxWriters int
	Busy       BusyPolicy

	// SnapshotDir holds the copy-before-write stores, files with no name
	// on disk that the kernel frees when the server ends, however it
	// ends (default: os.TempDir).
	SnapshotDir string
	// SnapshotMax bounds the bytes all snapshot stores may hold together;
	// 0 is no bound but the disk's.
	SnapshotMax int64
	// SnapshotLinger is how long a snapshot outlives its last connection
	// so that reconnects can join it (default 60 s; negative: drop at once).
	SnapshotLinger time.Duration
	OnSnapshotFull SnapshotFullPolicy
	// SnapshotBlock is the copy-before-write granularity, a power of two
	// between 4 KiB and 16 MiB (default 64 KiB).
	SnapshotBlock int
	ReaderView    ReaderView

	// MaxConns limits connections past their handshake (default 256):
	// past it, NBD_OPT_GO is refused with NBD_REP_ERR_POLICY (and
	// NBD_OPT_EXPORT_NAME, which cannot be refused, closes the
	// connection) until one ends.
	MaxConns int
	// MaxHandshakes limits connections still in their handshake (default
	// 32). Past it a new connection closes the oldest of them, so that
	// clients that never finish a handshake cannot lock others out.
	MaxHandshakes int
	// HandshakeTimeout bounds the whole handshake (default 30 s).
	HandshakeTimeout time.Duration
	// Workers is how many requests of one connection are handled at once
	// (default 16).
	Workers int

	Logger *slog.Logger // default: text lines on stderr
}

// Defaults of Config.
const (
	DefaultSnapshotBlock    = 64 << 10
	DefaultSnapshotLinger   = 60 * time.Second
	DefaultMaxConns         = 256
	DefaultMaxHandshakes    = 32
	DefaultHandshakeTimeout = 30 * time.Second
	DefaultWorkers          = 16
)

// ErrClosed is returned by Serve after Shutdown or Close.
var ErrClosed = errors.New("nbd: server closed")

// Server serves exports over NBD. Create it with New.
type Server struct {
	cfg     Config
	log     *slog.Logger
	exports []*export // in the order given; exports[0] answers the name ""
	byName  map[string]*export
	snapDir string

	storeUsed atomic.Int64 // bytes held by all snapshot stores
	connSeq   atomic.Uint64
	inShut    atomic.Bool

	mu        sync.Mutex // protects following
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	shaking   map[*conn]struct{} // the conns still in their handshake
	closed    bool
	connsDone chan struct{} // closed when conns becomes empty during shutdown

	evicted, refused *quietLog // handshakes closed for newer ones; connections past MaxConns
}

// New checks cfg and opens every image (read-write unless
// cfg.ReadOnly). The images are never truncated or resized.
func New(cfg Config) (*Server, error) {
	if len(cfg.Exports) == 0 {
		return nil, errors.New("nbd: no image to serve")
	}
	if cfg.SnapshotBlock == 0 {
		cfg.SnapshotBlock = DefaultSnapshotBlock
	}
	if b := cfg.SnapshotBlock; b < 4096 || b > 16<<20 || b&(b-1) != 0 {
		return nil, fmt.Errorf("nbd: snapshot block size %d is not a power of two between 4 KiB and 16 MiB", b)
	}
	if cfg.SnapshotLinger == 0 {
		cfg.SnapshotLinger = DefaultSnapshotLinger
	}
	if cfg.MaxConns <= 0 {
		cfg.MaxConns = DefaultMaxConns
	}
	if cfg.MaxHandshakes <= 0 {
		cfg.MaxHandshakes = DefaultMaxHandshakes
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.Workers <= 0 {
		cfg.Workers = DefaultWorkers
	}
	if cfg.MaxWriters < 0 || cfg.SnapshotMax < 0 {
		return nil, errors.New("nbd: negative limit")
	}
	if cfg.TLSMode != TLSOff && cfg.TLSConfig == nil {
		return nil, errors.New("nbd: TLS enabled without a certificate (give --tls-cert and --tls-key)")
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		byName:    map[string]*export{},
		listeners: map[net.Listener]struct{}{},
		conns:     map[*conn]struct{}{},
		shaking:   map[*conn]struct{}{},
	}
	if s.log == nil {
		s.log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	s.evicted = &quietLog{log: s.log, msg: "too many connections in their handshake: closed the oldest for newer ones"}
	s.refused = &quietLog{log: s.log, msg: "connection refused: too many connections"}
	for _, ec := range cfg.Exports {
		if err := nbd.CheckExportName(ec.Name); err != nil {
			s.closeExports()
			return nil, err
		}
		if _, dup := s.byName[ec.Name]; dup {
			s.closeExports()
			return nil, fmt.Errorf("nbd: export name %q given twice (use NAME=IMAGE to tell them apart)", ec.Name)
		}
		e, err := openExport(s, ec)
		if err != nil {
			s.closeExports()
			return nil, err
		}
		s.exports = append(s.exports, e)
		s.byName[e.name] = e
	}
	s.snapDir = cfg.SnapshotDir
	if s.snapDir == "" {
		s.snapDir = os.TempDir()
	}
	if st, err := os.Stat(s.snapDir); err != nil {
		s.closeExports()
		return nil, fmt.Errorf("nbd: snapshot directory: %w", err)
	} else if !st.IsDir() {
		s.closeExports()
		return nil, fmt.Errorf("nbd: snapshot directory %s is not a directory", s.snapDir)
	}
	return s, nil
}

func (s *Server) closeExports() {
	for _, e := range s.exports {
		e.file.Close()
	}
}

// Exports returns the names of the exports, in order.
func (s *Server) Exports() []string {
	names := make([]string, len(s.exports))
	for i, e := range s.exports {
		names[i] = e.name
	}
	return names
}

// Serve accepts connections on l until Shutdown or Close, serving each in
// its own goroutine. It always returns a non-nil error; after Shutdown or
// Close it is ErrClosed. TCP connections get TCP_NODELAY.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.Close()
		return ErrClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var backoff time.Duration
	for {
		c, err := l.Accept()
		if err != nil {
			if s.isClosed() {
				return ErrClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				// Out of descriptors or a transient error: wait and retry
				// as net/http does, rather than spin or give up.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "err", err, "in", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		backoff = 0
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetNoDelay(true)
		}
		sc := s.admit(c)
		if sc == nil {
			continue
		}
		go sc.serve()
	}
}

// admit registers a connection in its handshake, or closes it when the
// server is shutting down. Connections in their handshake are counted
// apart from those past it (see enterTransmission): when MaxHandshakes of
// them wait, the oldest is closed for the new one, so idle clients that
// never finish a handshake cannot keep others out.
func (s *Server) admit(c net.Conn) *conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		c.Close()
		return nil
	}
	if len(s.shaking) >= s.cfg.MaxHandshakes {
		var oldest *conn
		for sc := range s.shaking {
			if oldest == nil || sc.id < oldest.id {
				oldest = sc
			}
		}
		delete(s.shaking, oldest)
		oldest.close()
		s.evicted.add("max_handshakes", s.cfg.MaxHandshakes, "last_closed", oldest.peer)
	}
	sc := newConn(s, c, s.connSeq.Add(1))
	s.conns[sc] = struct{}{}
	s.shaking[sc] = struct{}{}
	return sc
}

// enterTransmission counts c, about to leave its handshake for an
// export, among the connections past it, unless MaxConns of them are
// there already: then it reports false, and c stays in its handshake.
func (s *Server) enterTransmission(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.shaking[c]; !ok {
		return true // counted already, or evicted (it is closed)
	}
	if len(s.conns)-len(s.shaking) >= s.cfg.MaxConns {
		s.refused.add("peer", c.peer, "max_conns", s.cfg.MaxConns)
		return false
	}
	delete(s.shaking, c)
	return true
}

// handshakeDone counts c out of the connections in their handshake.
func (s *Server) handshakeDone(c *conn) {
	s.mu.Lock()
	delete(s.shaking, c)
	s.mu.Unlock()
}

func (s *Server) connDone(sc *conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, sc)
	delete(s.shaking, sc)
	if len(s.conns) == 0 && s.connsDone != nil {
		close(s.connsDone)
		s.connsDone = nil
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Shutdown stops the listeners, ends connections still negotiating, lets
// requests in flight finish and closes every connection, then flushes the
// images and frees the snapshot stores. If ctx ends first the remaining
// connections are closed abruptly; the images are flushed either way.
func (s *Server) Shutdown(ctx context.Context) error {
	s.inShut.Store(true)
	s.mu.Lock()
	s.closed = true
	for l := range s.listeners {
		l.Close()
	}
	var wait chan struct{}
	if len(s.conns) > 0 {
		wait = make(chan struct{})
		s.connsDone = wait
	}
	for c := range s.conns {
		c.shutdown()
	}
	s.mu.Unlock()

	var err error
	if wait != nil {
		select {
		case <-wait:
		case <-ctx.Done():
			err = ctx.Err()
			s.mu.Lock()
			for c := range s.conns {
				c.close()
			}
			s.mu.Unlock()
		}
	}
	s.evicted.flush()
	s.refused.flush()
	if ferr := s.release(); err == nil {
		err = ferr
	}
	return err
}

// Close closes the listeners and every connection at once, then flushes
// the images and frees the snapshot stores.
func (s *Server) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := s.Shutdown(ctx)
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

// release flushes and closes the images and frees every snapshot store.
func (s *Server) release() error {
	var first error
	for _, e := range s.exports {
		if err := e.close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func peerName(c net.Conn) string {
	a := c.RemoteAddr()
	if a == nil || a.String() == "" || a.String() == "@" {
		return c.LocalAddr().Network() + ":local"
	}
	return a.Network() + ":" + a.String()
}
