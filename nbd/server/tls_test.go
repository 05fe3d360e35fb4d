package server

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"strings"
	"testing"
	"time"
)

// testCert makes a certificate signed by parent (self-signed if nil).
func testCert(t *testing.T, cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, ca bool, usage []x509.ExtKeyUsage, notAfter time.Time) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-48 * time.Hour),
		NotAfter:              notAfter,
		IsCA:                  ca,
		BasicConstraintsValid: true,
		ExtKeyUsage:           usage,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c, key
}

func TestVerifyClientCertNamesTheCause(t *testing.T) {
	later := time.Now().Add(24 * time.Hour)
	ca, caKey := testCert(t, "our CA", nil, nil, true, nil, later)
	other, otherKey := testCert(t, "another CA", nil, nil, true, nil, later)
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	clientAuth := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}

	good, _ := testCert(t, "client", ca, caKey, false, clientAuth, later)
	foreign, _ := testCert(t, "client", other, otherKey, false, clientAuth, later)
	expired, _ := testCert(t, "client", ca, caKey, false, clientAuth, time.Now().Add(-time.Hour))
	serverOnly, _ := testCert(t, "client", ca, caKey, false, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, later)

	if err := verifyClientCert([]*x509.Certificate{good}, pool, time.Now()); err != nil {
		t.Errorf("a client certificate of the CA is refused: %v", err)
	}
	for _, tc := range []struct {
		name string
		cert *x509.Certificate
		want string
	}{
		{"another CA", foreign, `issued by "CN=another CA") is not signed by the --tls-ca CA`},
		{"expired", expired, "expired on"},
		{"not for clients", serverOnly, "lacks clientAuth"},
	} {
		err := verifyClientCert([]*x509.Certificate{tc.cert}, pool, time.Now())
		if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: got %v, want one line containing %q", tc.name, err, tc.want)
		}
	}
}
