package server

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"snapmount/nbd"
)

// TLSConfig builds the server's TLS configuration from PEM files: its
// certificate and key, and, if caFile is set, the CA whose certificates
// clients must present. A certificate outside its validity is refused
// here, since every verifying client would refuse it.
func TLSConfig(certFile, keyFile, caFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("loading the TLS certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("TLS certificate %s: %w", certFile, err)
	}
	if why := nbd.CertValidity(leaf, time.Now()); why != "" {
		return nil, fmt.Errorf("TLS certificate %s %s: clients will refuse it", certFile, why)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if caFile == "" {
		return tc, nil
	}
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("reading the TLS CA certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("TLS CA file %s holds no PEM certificate", caFile)
	}
	// The request names no CA: GnuTLS clients (qemu, libnbd) keep an RSA
	// certificate back from a TLS 1.3 request that names CAs and, as Go's
	// does, offers RSA only as RSA-PSS. Asked for any certificate, they
	// send the one they have; it is checked here.
	tc.ClientAuth = tls.RequireAnyClientCert
	tc.VerifyConnection = func(cs tls.ConnectionState) error {
		return verifyClientCert(cs.PeerCertificates, pool, time.Now())
	}
	return tc, nil
}

// verifyClientCert checks a client's chain against the CA pool, as
// tls.RequireAndVerifyClientCert would, and says in one line why it fails.
func verifyClientCert(chain []*x509.Certificate, pool *x509.CertPool, now time.Time) error {
	leaf := chain[0] // RequireAnyClientCert refused an empty chain already
	opts := x509.VerifyOptions{
		Roots:         pool,
		Intermediates: x509.NewCertPool(),
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	for _, c := range chain[1:] {
		opts.Intermediates.AddCert(c)
	}
	_, err := leaf.Verify(opts)
	if err == nil {
		return nil
	}
	var invalid x509.CertificateInvalidError
	var unknown x509.UnknownAuthorityError
	switch {
	case errors.As(err, &unknown):
		return fmt.Errorf("client certificate %q (issued by %q) is not signed by the --tls-ca CA", leaf.Subject, leaf.Issuer)
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired && nbd.CertValidity(leaf, now) != "":
		return fmt.Errorf("client certificate %q %s", leaf.Subject, nbd.CertValidity(leaf, now))
	case errors.As(err, &invalid) && invalid.Reason == x509.IncompatibleUsage:
		return fmt.Errorf("client certificate %q is not for client authentication (its extended key usage lacks clientAuth)", leaf.Subject)
	}
	return fmt.Errorf("client certificate %q: %w", leaf.Subject, err)
}
