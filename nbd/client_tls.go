package nbd

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"net"
	"strings"
	"syscall"
	"time"
)

// tlsWatch remembers what the server asked for in the TLS handshake, so
// that a refusal, which under TLS 1.3 only arrives with the first reply
// after the handshake, can be explained by its cause.
type tlsWatch struct {
	asked *tls.CertificateRequestInfo // nil while the server asked for no certificate
	sent  *x509.Certificate           // the client certificate sent, if any
}

// watch returns a copy of cfg that records the server's certificate
// request in w. It sends the configured certificate whatever CAs the
// server names, as libnbd and qemu do, so that a refusal names its cause.
func (w *tlsWatch) watch(cfg *tls.Config) *tls.Config {
	cfg = cfg.Clone()
	get := cfg.GetClientCertificate
	certs := cfg.Certificates
	cfg.GetClientCertificate = func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
		w.asked = cri
		cert := &tls.Certificate{}
		if get != nil {
			c, err := get(cri)
			if err != nil {
				return nil, err
			}
			cert = c
		} else if len(certs) > 0 {
			cert = &certs[0]
		}
		if len(cert.Certificate) > 0 {
			w.sent, _ = x509.ParseCertificate(cert.Certificate[0])
		}
		return cert, nil
	}
	return cfg
}

// explain turns a TLS failure into one line that names its cause: the
// server's certificate (expired, another host, unknown CA) or the server
// refusing ours. Other errors pass unchanged.
func (w *tlsWatch) explain(err error, u *URI) error {
	if err == nil {
		return nil
	}
	if msg := serverCertProblem(err); msg != "" {
		return &explainedError{msg: "nbd: " + msg, err: err}
	}
	if w.asked == nil || !refusedByServer(err) {
		return err
	}
	var msg string
	switch {
	case w.sent == nil:
		msg = "the server requires a client certificate: pass --tls-cert and --tls-key"
		if u.TLSCertDir != "" {
			msg += " (or put client-cert.pem and client-key.pem in " + u.TLSCertDir + ")"
		}
	case CertValidity(w.sent, time.Now()) != "":
		msg = fmt.Sprintf("the server refused the client certificate %q: it %s", w.sent.Subject, CertValidity(w.sent, time.Now()))
	case len(w.asked.AcceptableCAs) > 0 && !acceptedIssuer(w.sent, w.asked.AcceptableCAs):
		msg = fmt.Sprintf("the server refused the client certificate %q: it is issued by %q, and the server accepts only %s",
			w.sent.Subject, w.sent.Issuer, caNames(w.asked.AcceptableCAs))
	default:
		msg = fmt.Sprintf("the server refused the client certificate %q (issued by %q): %s; its log says why",
			w.sent.Subject, w.sent.Issuer, refusalText(err))
	}
	return &explainedError{msg: "nbd: " + msg, err: err}
}

// serverCertProblem says why we refused the server's certificate, or ""
// when err is not that.
func serverCertProblem(err error) string {
	var he x509.HostnameError
	var invalid x509.CertificateInvalidError
	var unknown x509.UnknownAuthorityError
	switch {
	case errors.As(err, &he):
		return fmt.Sprintf("the server's certificate is for %s, not %s: connect by one of those names or give tls-hostname=NAME in the URI",
			strings.Join(certNames(he.Certificate), ", "), he.Host)
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired && CertValidity(invalid.Cert, time.Now()) != "":
		return fmt.Sprintf("the server's certificate %q %s", invalid.Cert.Subject, CertValidity(invalid.Cert, time.Now()))
	case errors.As(err, &unknown) && unknown.Cert != nil:
		return fmt.Sprintf("the server's certificate %q (issued by %q) is not signed by the CA we trust (ca-cert.pem in tls-certificates=DIR, or --tls-ca)",
			unknown.Cert.Subject, unknown.Cert.Issuer)
	}
	return ""
}

// CertValidity says how a certificate is outside its validity at now, or
// "" if it is valid then. Client and server both name it in their errors.
func CertValidity(c *x509.Certificate, now time.Time) string {
	const when = "2006-01-02 15:04:05 MST"
	switch {
	case now.After(c.NotAfter):
		return "expired on " + c.NotAfter.UTC().Format(when)
	case now.Before(c.NotBefore):
		return "is not valid before " + c.NotBefore.UTC().Format(when) + " (check the clocks)"
	}
	return ""
}

// refusedByServer reports whether err is the server ending the
// connection: a TLS alert, or a hang-up (GnuTLS servers hang up without
// an alert when they refuse a client certificate under TLS 1.3).
func refusedByServer(err error) bool {
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Op == "remote error" ||
		errors.Is(err, errServerClosed) || errors.Is(err, syscall.ECONNRESET)
}

// refusalText says how the server refused: the TLS alert it sent, or
// that it hung up.
func refusalText(err error) string {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "remote error" {
		return fmt.Sprintf("it sent the TLS alert %q", strings.TrimPrefix(oe.Err.Error(), "tls: "))
	}
	return "it closed the connection"
}

func acceptedIssuer(c *x509.Certificate, cas [][]byte) bool {
	for _, ca := range cas {
		if bytes.Equal(ca, c.RawIssuer) {
			return true
		}
	}
	return false
}

// caNames lists the CA names a certificate request carries (DER subjects).
func caNames(cas [][]byte) string {
	var names []string
	for _, der := range cas {
		var seq pkix.RDNSequence
		if rest, err := asn1.Unmarshal(der, &seq); err == nil && len(rest) == 0 {
			var n pkix.Name
			n.FillFromRDNSequence(&seq)
			names = append(names, fmt.Sprintf("%q", n.String()))
		}
	}
	return strings.Join(names, ", ")
}

func certNames(c *x509.Certificate) []string {
	names := append([]string(nil), c.DNSNames...)
	for _, ip := range c.IPAddresses {
		names = append(names, ip.String())
	}
	if len(names) == 0 {
		names = append(names, c.Subject.CommonName)
	}
	return names
}
