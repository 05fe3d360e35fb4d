package nbd

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
)

// URI is a parsed NBD URI (doc/uri.md of NetworkBlockDevice/nbd):
//
//	nbd://host[:port]/export            TCP, plaintext
//	nbds://host[:port]/export           TCP, TLS required
//	nbd+unix:///export?socket=PATH      Unix socket
//	nbds+unix:///export?socket=PATH     Unix socket, TLS required
//
// TLS parameters follow libnbd's spelling: tls-certificates=DIR (a
// directory holding ca-cert.pem, client-cert.pem and client-key.pem),
// tls-verify-peer=false, tls-hostname=NAME. x-ro-promise=0 stops the
// client from sending NBD_OPT_X_READ_ONLY.
type URI struct {
	Scheme     string
	Network    string // "tcp" or "unix"
	Address    string // host:port, or the socket path
	Export     string // percent-decoded path without its leading '/'
	User       string // TLS user name, if the URI has one
	TLS        bool   // nbds / nbds+unix
	TLSCertDir string // tls-certificates
	TLSVerify  bool   // tls-verify-peer (default true)
	TLSHost    string // tls-hostname: name to verify in the server's certificate
	NoPromise  bool   // x-ro-promise=0
}

// ParseURI parses an NBD URI. Its errors are one line saying what is
// wrong and what a valid URI looks like.
func ParseURI(s string) (*URI, error) {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("bad NBD URI %q: %s (want nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)", s, fmt.Sprintf(format, args...))
	}
	if s == "" {
		return nil, bad("empty")
	}
	u, err := url.Parse(s)
	if err != nil {
		// url.Parse errors repeat the whole input; keep only the reason.
		var ue *url.Error
		if errors.As(err, &ue) {
			return nil, bad("%v", ue.Err)
		}
		return nil, bad("%v", err)
	}
	r := &URI{Scheme: u.Scheme, TLSVerify: true}
	switch u.Scheme {
	case "nbd":
		r.Network = "tcp"
	case "nbds":
		r.Network, r.TLS = "tcp", true
	case "nbd+unix":
		r.Network = "unix"
	case "nbds+unix":
		r.Network, r.TLS = "unix", true
	case "nbd+vsock", "nbds+vsock":
		return nil, bad("vsock is not supported; use nbd:// or nbd+unix://")
	case "":
		return nil, bad("no scheme")
	default:
		return nil, bad("unknown scheme %q", u.Scheme)
	}
	if u.Opaque != "" {
		return nil, bad("missing '//' after the scheme")
	}
	if u.User != nil {
		r.User = u.User.Username()
		if _, has := u.User.Password(); has {
			return nil, bad("passwords do not belong in NBD URIs")
		}
	}
	// The export name is the path without its first '/', so
	// nbd://h//disk names "/disk".
	r.Export = strings.TrimPrefix(u.Path, "/")
	if err := CheckString("export name", []byte(r.Export)); err != nil {
		return nil, bad("%v", err)
	}
	q, err := parseQuery(u.RawQuery)
	if err != nil {
		return nil, bad("%v", err)
	}
	socket := ""
	for _, kv := range q {
		k, v := kv[0], kv[1]
		switch k {
		case "socket":
			socket = v
		case "tls-certificates":
			r.TLSCertDir = v
		case "tls-verify-peer":
			b, err := parseURIBool(v)
			if err != nil {
				return nil, bad("tls-verify-peer=%q: %v", v, err)
			}
			r.TLSVerify = b
		case "tls-hostname":
			r.TLSHost = v
		case "tls-type":
			if v != "x509" {
				return nil, bad("tls-type=%s is not supported; only x509 certificates are", v)
			}
		case "tls-psk-file":
			return nil, bad("TLS with pre-shared keys is not supported; use x509 certificates (tls-certificates=DIR)")
		case "x-ro-promise":
			b, err := parseURIBool(v)
			if err != nil {
				return nil, bad("x-ro-promise=%q: %v", v, err)
			}
			r.NoPromise = !b
		default:
			return nil, bad("unknown parameter %q (known: socket, tls-certificates, tls-verify-peer, tls-hostname, tls-type, x-ro-promise)", k)
		}
	}
	if r.Network == "unix" {
		if u.Host != "" {
			return nil, bad("a Unix-socket URI has no host: write %s:///%s?socket=PATH", u.Scheme, r.Export)
		}
		if socket == "" {
			return nil, bad("%s needs ?socket=PATH", u.Scheme)
		}
		if strings.HasPrefix(socket, "\x00") {
			r.Address = "@" + socket[1:] // Go spells Linux abstract sockets with '@'
		} else {
			r.Address = socket
		}
		return r, nil
	}
	if socket != "" {
		return nil, bad("socket= needs the %s+unix scheme", u.Scheme)
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		return nil, bad("no host")
	}
	if port == "" {
		port = strconv.Itoa(DefaultPort)
	} else if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return nil, bad("port %q is not a number from 1 to 65535", port)
	}
	r.Address = net.JoinHostPort(host, port)
	if r.TLSHost == "" {
		r.TLSHost = host
	}
	return r, nil
}

func parseURIBool(v string) (bool, error) {
	switch strings.ToLower(v) {
	case "1", "true", "on", "yes":
		return true, nil
	case "0", "false", "off", "no":
		return false, nil
	}
	return false, fmt.Errorf("want true or false")
}

// parseQuery splits a URI's query into name and value pairs in their
// order, as libnbd and qemu read it: pairs are separated by '&', and names
// and values are percent-decoded and nothing else ('+' is a plus sign, not
// a space as in HTML forms). A name without '=' has the value "".
func parseQuery(raw string) ([][2]string, error) {
	var out [][2]string
	for _, part := range strings.Split(raw, "&") {
		if part == "" {
			continue
		}
		k, v, _ := strings.Cut(part, "=")
		name, err := url.PathUnescape(k)
		if err != nil {
			return nil, fmt.Errorf("query parameter %q: bad percent-encoding", k)
		}
		value, err := url.PathUnescape(v)
		if err != nil {
			return nil, fmt.Errorf("query parameter %s: bad percent-encoding in %q", name, v)
		}
		out = append(out, [2]string{name, value})
	}
	return out, nil
}

// escapeQueryValue percent-encodes a query value so that every reader of
// NBD URIs (libnbd, qemu, this package) gets it back: unreserved
// characters and the harmless '/', ':', '@' and ',' stay as they are;
// everything else, '+', spaces, separators and non-ASCII bytes included,
// becomes %XX.
func escapeQueryValue(v string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(v); i++ {
		c := v[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			strings.IndexByte("-._~/:@,", c) >= 0:
			b.WriteByte(c)
		default:
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		}
	}
	return b.String()
}

// String rebuilds the URI with percent-encoding only, so that nbdinfo,
// nbdcopy and qemu-img read it as this package does. Paths in the query
// keep their slashes, as libnbd prints them.
func (u *URI) String() string {
	v := url.URL{Scheme: u.Scheme, Path: "/" + u.Export}
	var q []string
	add := func(k, val string) {
		q = append(q, k+"="+escapeQueryValue(val))
	}
	if u.Network == "unix" {
		if abstract, ok := strings.CutPrefix(u.Address, "@"); ok {
			add("socket", "\x00"+abstract)
		} else {
			add("socket", u.Address)
		}
	} else {
		v.Host = u.Address
	}
	if u.User != "" {
		v.User = url.User(u.User)
	}
	if u.TLSCertDir != "" {
		add("tls-certificates", u.TLSCertDir)
	}
	if !u.TLSVerify {
		add("tls-verify-peer", "false")
	}
	if u.TLSHost != "" && u.TLSHost != hostOnly(u.Address) {
		add("tls-hostname", u.TLSHost)
	}
	if u.NoPromise {
		add("x-ro-promise", "0")
	}
	v.RawQuery = strings.Join(q, "&")
	return v.String()
}

// WithExport returns a copy of u naming another export (e.g. the
// canonical snapshot name the server gave).
func (u *URI) WithExport(name string) *URI {
	c := *u
	c.Export = name
	return &c
}

// Display is a short form for logs and the mount table: scheme, where,
// and export, without query parameters.
func (u *URI) Display() string {
	if u.Network == "unix" {
		return fmt.Sprintf("%s:%s/%s", u.Scheme, filepath.Clean(u.Address), u.Export)
	}
	return fmt.Sprintf("%s://%s/%s", u.Scheme, u.Address, u.Export)
}

// hostOnly is the host part of a host:port address.
func hostOnly(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
