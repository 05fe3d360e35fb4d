package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"snapmount/test/testenv"
)

// The certificate sets the TLS tests use, each made the way a peer's
// documentation makes them: certtool as qemu's TLS guide does (its
// default key is RSA), and openssl req -newkey as most guides do.
var pkiKinds = []string{"certtool-rsa", "certtool-ecdsa", "openssl-rsa", "openssl-ecdsa"}

// A kind's directory has ca-cert.pem, ca-key.pem, server-cert.pem,
// server-key.pem (for localhost and 127.0.0.1), client-cert.pem and
// client-key.pem: the names nbdkit, qemu's tls-creds-x509 and libnbd's
// tls-certificates=DIR look for. ca-only/ holds the CA alone, for a
// client without a certificate of its own.

// certtool templates, after qemu's TLS documentation.
const (
	certtoolCA     = "cn = snapmount test CA\nca\ncert_signing_key\n"
	certtoolServer = "organization = snapmount test\ncn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n"
	certtoolClient = "organization = snapmount test\ncn = client\ntls_www_client\nencryption_key\nsigning_key\n"
)

type pkiSet struct {
	once sync.Once
	dir  string
	err  error
}

var pkiSets sync.Map // kind -> *pkiSet

// testPKI returns the directory of a kind's certificates (pkiKinds, or
// "refusals"), made once for the whole test binary next to the binary
// under test, which TestMain removes.
func testPKI(t testing.TB, kind string) string {
	t.Helper()
	tool := strings.Split(kind, "-")[0]
	if kind == "refusals" {
		tool = "certtool"
	}
	testenv.RequireCmd(t, tool)
	base := ""
	if kind == "refusals" {
		base = testPKI(t, "certtool-rsa")
	}
	v, _ := pkiSets.LoadOrStore(kind, new(pkiSet))
	s := v.(*pkiSet)
	s.once.Do(func() {
		s.dir = filepath.Join(filepath.Dir(snapmountBin), "pki", kind)
		if kind == "refusals" {
			s.err = makeRefusalPKI(s.dir, base)
			return
		}
		s.err = makePKI(s.dir, tool, strings.Split(kind, "-")[1])
	})
	if s.err != nil {
		t.Fatalf("making the %s certificates: %v", kind, s.err)
	}
	return s.dir
}

// makePKI makes a CA and a server and a client certificate it signed.
func makePKI(dir, tool, key string) error {
	if err := os.MkdirAll(filepath.Join(dir, "ca-only"), 0o700); err != nil {
		return err
	}
	var err error
	if tool == "certtool" {
		err = certtoolCert(dir, "ca", key, certtoolCA, nil)
		for _, who := range []string{"server", "client"} {
			if err == nil {
				tmpl := map[string]string{"server": certtoolServer, "client": certtoolClient}[who]
				err = certtoolCert(dir, who, key, tmpl, caOf(dir))
			}
		}
	} else {
		err = opensslPKI(dir, key)
	}
	if err != nil {
		return err
	}
	return copyTo(filepath.Join(dir, "ca-cert.pem"), filepath.Join(dir, "ca-only", "ca-cert.pem"))
}

// caOf names the CA in dir that signs a certificate.
func caOf(dir string) []string {
	return []string{"--load-ca-certificate", filepath.Join(dir, "ca-cert.pem"), "--load-ca-privkey", filepath.Join(dir, "ca-key.pem")}
}

// certtoolCert makes NAME-key.pem and NAME-cert.pem in dir from a
// template: self-signed when ca is nil, else signed by the CA it names.
func certtoolCert(dir, name, key, template string, ca []string) error {
	tmpl := filepath.Join(dir, name+".info")
	if err := os.WriteFile(tmpl, []byte(template), 0o600); err != nil {
		return err
	}
	keyFile := filepath.Join(dir, name+"-key.pem")
	if err := runIn(dir, "certtool", "--generate-privkey", "--key-type", key, "--outfile", keyFile); err != nil {
		return err
	}
	args := []string{"--generate-self-signed"}
	if ca != nil {
		args = append([]string{"--generate-certificate"}, ca...)
	}
	args = append(args, "--load-privkey", keyFile, "--template", tmpl, "--outfile", filepath.Join(dir, name+"-cert.pem"))
	return runIn(dir, "certtool", args...)
}

// opensslPKI makes the set with openssl req -newkey and openssl x509 -req.
func opensslPKI(dir, key string) error {
	newkey := []string{"-newkey", "rsa:2048"}
	if key == "ecdsa" {
		newkey = []string{"-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"}
	}
	req := func(name, subj string, extra ...string) error {
		args := append([]string{"req", "-nodes", "-keyout", name + "-key.pem", "-subj", subj}, newkey...)
		return runIn(dir, "openssl", append(args, extra...)...)
	}
	if err := req("ca", "/CN=snapmount test CA", "-x509", "-days", "30", "-out", "ca-cert.pem",
		"-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"); err != nil {
		return err
	}
	for i, leaf := range []struct{ name, subj, ext string }{
		{"server", "/O=snapmount test/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"},
		{"client", "/O=snapmount test/CN=client", "extendedKeyUsage=clientAuth\n"},
	} {
		ext := leaf.name + ".ext"
		if err := os.WriteFile(filepath.Join(dir, ext), []byte(leaf.ext+"keyUsage=critical,digitalSignature,keyEncipherment\n"), 0o600); err != nil {
			return err
		}
		if err := req(leaf.name, leaf.subj, "-out", leaf.name+".csr"); err != nil {
			return err
		}
		if err := runIn(dir, "openssl", "x509", "-req", "-in", leaf.name+".csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
			"-set_serial", fmt.Sprint(i+2), "-days", "30", "-extfile", ext, "-out", leaf.name+"-cert.pem"); err != nil {
			return err
		}
	}
	return nil
}

// makeRefusalPKI makes, beside the certtool-rsa set in base, what each
// refusal needs, as directories a peer or client is pointed at:
// otherclient/ (base's CA, a client certificate of "another CA"),
// expiredclient/ (base's CA, a client certificate of base's that expired),
// othertrust/ (another CA's certificate to trust, base's client),
// expired/ and wronghost/ (base's CA, a server certificate that expired or
// is for elsewhere.example).
func makeRefusalPKI(dir, base string) error {
	other := filepath.Join(dir, "other")
	for _, d := range []string{"other", "otherclient", "expiredclient", "othertrust", "expired", "wronghost"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return err
		}
	}
	err := certtoolCert(other, "ca", "ecdsa", "cn = another CA\nca\ncert_signing_key\n", nil)
	if err == nil {
		err = certtoolCert(other, "client", "ecdsa", certtoolClient, caOf(other))
	}
	const expired = "activation_date = \"2020-01-01 00:00:00\"\nexpiration_date = \"2021-01-01 00:00:00\"\n"
	if err == nil {
		err = certtoolCert(filepath.Join(dir, "expired"), "server", "rsa", certtoolServer+expired, caOf(base))
	}
	if err == nil {
		err = certtoolCert(filepath.Join(dir, "expiredclient"), "client", "rsa", certtoolClient+expired, caOf(base))
	}
	if err == nil {
		err = certtoolCert(filepath.Join(dir, "wronghost"), "server", "rsa",
			"cn = elsewhere.example\ndns_name = elsewhere.example\ntls_www_server\nencryption_key\nsigning_key\n", caOf(base))
	}
	for _, c := range [][2]string{
		{filepath.Join(base, "ca-cert.pem"), "otherclient/ca-cert.pem"},
		{filepath.Join(other, "client-cert.pem"), "otherclient/client-cert.pem"},
		{filepath.Join(other, "client-key.pem"), "otherclient/client-key.pem"},
		{filepath.Join(other, "ca-cert.pem"), "othertrust/ca-cert.pem"},
		{filepath.Join(base, "client-cert.pem"), "othertrust/client-cert.pem"},
		{filepath.Join(base, "client-key.pem"), "othertrust/client-key.pem"},
		{filepath.Join(base, "ca-cert.pem"), "expiredclient/ca-cert.pem"},
		{filepath.Join(base, "ca-cert.pem"), "expired/ca-cert.pem"},
		{filepath.Join(base, "ca-cert.pem"), "wronghost/ca-cert.pem"},
	} {
		if err == nil {
			err = copyTo(c[0], filepath.Join(dir, c[1]))
		}
	}
	return err
}

// runIn runs a certificate tool in dir; its output only matters when it
// fails.
func runIn(dir, name string, args ...string) error {
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return nil
}

func copyTo(src, dst string) error {
	b, err := os.ReadFile(src)
	if err == nil {
		err = os.WriteFile(dst, b, 0o600)
	}
	return err
}
