package test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// writeTestPKI writes a CA, a server certificate and a client certificate
// into dir, named as libnbd's tls-certificates directory expects
// (ca-cert.pem, client-cert.pem, client-key.pem) plus server-cert.pem and
// server-key.pem.
func writeTestPKI(t testing.TB, dir string) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "snapmount test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	write := func(name, typ string, der []byte) {
		b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("ca-cert.pem", "CERTIFICATE", caDER)
	for i, who := range []string{"server", "client"} {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(int64(2 + i)),
			Subject:      pkix.Name{CommonName: "localhost"},
			NotBefore:    time.Now().Add(-time.Hour),
			NotAfter:     time.Now().Add(24 * time.Hour),
			DNSNames:     []string{"localhost"},
			IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, _ := x509.MarshalPKCS8PrivateKey(key)
		write(who+"-cert.pem", "CERTIFICATE", der)
		write(who+"-key.pem", "PRIVATE KEY", kder)
	}
}

// TestServeTLS: --tls=require with client certificates, against libnbd
// (GnuTLS) over TCP on 127.0.0.1.
func TestServeTLS(t *testing.T) {
	pki := t.TempDir()
	writeTestPKI(t, pki)
	img := filepath.Join(t.TempDir(), "disk.img")
	writeRandomImage(t, img, 4<<20, 16)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	p := startProc(t, snapmountBin, "serve", "--listen", addr, "--tls", "require",
		"--tls-cert", filepath.Join(pki, "server-cert.pem"), "--tls-key", filepath.Join(pki, "server-key.pem"),
		"--tls-ca", filepath.Join(pki, "ca-cert.pem"), "disk="+img)
	p.waitOutput("snapmount serve: listening on", 60*time.Second)
	out := pyLibnbd(t, `
import nbd, sys
addr, pki = sys.argv[1], sys.argv[2]
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri("nbds://%s/disk?tls-certificates=%s" % (addr, pki))
assert h.get_tls_negotiated()
assert len(h.pread(65536, 0)) == 65536
h.pwrite(b"\x61" * 4096, 0)
h.flush()
print("tls ok")
# Without TLS the server says TLS is required.
p = nbd.NBD()
try:
    p.connect_uri("nbd://%s/disk" % addr)
    print("plaintext accepted")
except nbd.Error as e:
    print("plaintext refused")
`, addr, pki)
	if !strings.Contains(out, "tls ok") || !strings.Contains(out, "plaintext refused") {
		t.Errorf("TLS checks printed %q", out)
	}
}
