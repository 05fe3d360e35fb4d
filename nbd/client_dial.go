package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// replyReadBuffer is the size of a connection's read buffer in the
// transmission phase; see Dial.
const replyReadBuffer = 4 << 10

// DialOptions configure how a client connection is negotiated.
type DialOptions struct {
	// TLS is used when the URI asks for TLS (nbds://, nbds+unix://). If
	// nil, it is built from the URI with TLSConfig.
	TLS *tls.Config
	// NoPromise stops the client from sending NBD_OPT_X_READ_ONLY (also
	// set by the URI parameter x-ro-promise=0).
	NoPromise bool
	// NoMetaContext skips SET_META_CONTEXT base:allocation.
	NoMetaContext bool
	// HandshakeTimeout bounds connecting and negotiating [30s].
	HandshakeTimeout time.Duration
}

// Negotiate connects to the server named by u and runs the first steps
// every connection shares: the greeting, STARTTLS when the URI asks for
// TLS, STRUCTURED_REPLY, and the read-only promise. The caller continues
// with List, Info, SetMetaContext or Go. The connection's deadline stays
// set until the caller clears it (Dial does).
func Negotiate(ctx context.Context, u *URI, opt DialOptions) (*Negotiator, error) {
	timeout := opt.HandshakeTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	deadline := time.Now().Add(timeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	d := net.Dialer{Deadline: deadline}
	nc, err := d.DialContext(ctx, u.Network, u.Address)
	if err != nil {
		return nil, explainDialError(err, u)
	}
	// A cancelled ctx must interrupt a handshake blocked on the socket.
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	_ = nc.SetDeadline(deadline)
	n, err := negotiate(nc, u, opt)
	if err != nil {
		nc.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if isTimeout(err) {
			return nil, fmt.Errorf("nbd: %s did not complete the handshake within %v", u.Address, timeout)
		}
		return nil, ExplainOptionError(err, u)
	}
	return n, nil
}

func negotiate(nc net.Conn, u *URI, opt DialOptions) (*Negotiator, error) {
	n, err := Greet(nc)
	if err != nil {
		return nil, err
	}
	var tw tlsWatch
	if u.TLS {
		if !n.fixed {
			return nil, errors.New("nbd: server is not fixed-newstyle and cannot do TLS, but the URI requires it")
		}
		cfg := opt.TLS
		if cfg == nil {
			if cfg, err = TLSConfig(u, "", "", ""); err != nil {
				return nil, err
			}
		}
		if err := n.StartTLS(tw.watch(cfg)); err != nil {
			var oe *OptionError
			if errors.As(err, &oe) {
				return nil, fmt.Errorf("nbd: server %s refused TLS (%s); use nbd:// without TLS if it serves plaintext", u.Address, oe.Reply)
			}
			return nil, tw.explain(err, u)
		}
	}
	if !n.fixed {
		return n, nil // only EXPORT_NAME is possible
	}
	// Under TLS 1.3 a server refuses our certificate after the
	// handshake: the refusal is the reply to the first option.
	if _, err := n.StructuredReply(); err != nil {
		return nil, tw.explain(err, u)
	}
	if !opt.NoPromise && !u.NoPromise {
		if _, _, err := n.PromiseReadOnly(); err != nil {
			return nil, tw.explain(err, u)
		}
	}
	return n, nil
}

// Dial connects to u and negotiates the export it names with everything
// the read-only client wants: TLS if asked, structured replies, the
// read-only promise, base:allocation, and GO with block sizes and the
// canonical name (EXPORT_NAME on servers without GO).
func Dial(ctx context.Context, u *URI, opt DialOptions) (*Conn, error) {
	return dial(ctx, u, opt, nil)
}

// dial is Dial for a pool: the connection marks each reply it reads on
// answered (nil: nowhere), which the pool shares among its connections.
func dial(ctx context.Context, u *URI, opt DialOptions, answered *answerClock) (*Conn, error) {
	n, err := Negotiate(ctx, u, opt)
	if err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = n.conn.SetDeadline(time.Unix(1, 0)) })
	info, err := selectExport(n, u.Export, opt)
	stop()
	if err != nil {
		n.conn.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if isTimeout(err) {
			return nil, fmt.Errorf("nbd: %s did not complete the handshake in time", u.Address)
		}
		return nil, ExplainOptionError(err, u)
	}
	_ = n.conn.SetDeadline(time.Time{})
	br := n.br
	if br.Buffered() == 0 {
		// bufio reads straight into the caller's slice only when the
		// slice is at least its buffer: with a small buffer, READ
		// payloads go from the socket into the cache's blocks with no
		// copy in between (a large buffer would copy every small payload
		// once more), while reply headers are still read in batches.
		br = bufio.NewReaderSize(n.conn, replyReadBuffer)
	}
	return newConn(n.conn, br, info, answered), nil
}

func selectExport(n *Negotiator, export string, opt DialOptions) (*ExportInfo, error) {
	if n.fixed && n.structured && !opt.NoMetaContext {
		if _, err := n.SetMetaContext(export, ContextBaseAllocation); err != nil {
			var oe *OptionError
			if !errors.As(err, &oe) || oe.Reply == RepErrUnknown || oe.Reply == RepErrTLSReqd {
				return nil, err
			}
			// Other refusals only cost the allocation map.
		}
	}
	return n.Go(export)
}

// TLSConfig builds the client's TLS configuration from the URI and files.
// With tls-certificates=DIR it takes DIR/ca-cert.pem, DIR/client-cert.pem
// and DIR/client-key.pem where present (the layout libnbd, qemu and nbdkit
// use); explicit files override them. Without a CA, the system roots
// verify the server.
func TLSConfig(u *URI, caFile, certFile, keyFile string) (*tls.Config, error) {
	if u.TLSCertDir != "" {
		pick := func(cur, name string) string {
			p := filepath.Join(u.TLSCertDir, name)
			if _, err := os.Stat(p); cur == "" && err == nil {
				return p
			}
			return cur
		}
		caFile = pick(caFile, "ca-cert.pem")
		certFile = pick(certFile, "client-cert.pem")
		keyFile = pick(keyFile, "client-key.pem")
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: u.TLSHost}
	if cfg.ServerName == "" {
		// A Unix socket has no host name; certificates for local
		// servers are usually made for localhost.
		cfg.ServerName = "localhost"
	}
	if !u.TLSVerify {
		cfg.InsecureSkipVerify = true
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("nbd: reading TLS CA certificate: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("nbd: %s holds no PEM certificate", caFile)
		}
		cfg.RootCAs = pool
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("nbd: a TLS client certificate needs both a certificate and a key file")
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("nbd: loading TLS client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// explainDialError says what is wrong with the address in a way a user
// can act on.
func explainDialError(err error, u *URI) error {
	switch {
	case errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("nbd: socket %s does not exist: is the server running?", u.Address)
	case errors.Is(err, syscall.ECONNREFUSED):
		if u.Network == "unix" {
			return fmt.Errorf("nbd: nothing listens on socket %s: is the server running?", u.Address)
		}
		return fmt.Errorf("nbd: connection to %s refused: is the server running on that port?", u.Address)
	case errors.Is(err, syscall.EACCES) && u.Network == "unix":
		return fmt.Errorf("nbd: no permission to connect to %s%s: ask the server's owner for access, e.g. snapmount serve --socket-group GROUP", u.Address, socketOwner(u.Address))
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("nbd: no permission to connect to %s", u.Address)
	case isTimeout(err):
		return fmt.Errorf("nbd: connecting to %s timed out", u.Address)
	}
	var dnsErr *net.DNSError
	if errors.As(err, &dnsErr) {
		return fmt.Errorf("nbd: cannot resolve host %q: %v", dnsErr.Name, dnsErr.Err)
	}
	return fmt.Errorf("nbd: connecting to %s: %w", u.Address, err)
}

// socketOwner describes who may connect to a socket file, e.g.
// " (srwxr-x--- root:kvm)", or "" if it cannot be seen.
func socketOwner(path string) string {
	var st syscall.Stat_t
	if path == "" || path[0] == '@' || syscall.Stat(path, &st) != nil {
		return ""
	}
	owner, group := strconv.Itoa(int(st.Uid)), strconv.Itoa(int(st.Gid))
	if u, err := user.LookupId(owner); err == nil {
		owner = u.Username
	}
	if g, err := user.LookupGroupId(group); err == nil {
		group = g.Name
	}
	mode := os.FileMode(st.Mode & 0o777)
	return fmt.Sprintf(" (s%s %s:%s)", mode.String()[1:], owner, group)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
