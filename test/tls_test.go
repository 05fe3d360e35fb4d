package test

// The TLS matrix: every kind of certificate (tls_pki_test.go) with
// "snapmount serve --tls require", with and without --tls-ca, against the
// GnuTLS clients VM hosts run (nbdinfo, nbdcopy, qemu-img, qemu-io,
// python3-libnbd); snapmount's client (mount, info, copy) against nbdkit
// and qemu-nbd requiring TLS; and each refusal, which must be one line
// that names its cause.

import (
	"bytes"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"snapmount/test/testenv"
)

const tlsImageSize = 4 << 20

// startServeTLS runs snapmount serve --tls require on 127.0.0.1, on a
// port it picks, with pki's server certificate (and --tls-ca pki's CA
// when withCA), and returns the address it printed.
func startServeTLS(t testing.TB, pki string, withCA bool, images ...string) (addr string, p *proc) {
	t.Helper()
	args := []string{"serve", "--listen", "127.0.0.1:0", "--tls", "require",
		"--tls-cert", filepath.Join(pki, "server-cert.pem"), "--tls-key", filepath.Join(pki, "server-key.pem")}
	if withCA {
		args = append(args, "--tls-ca", filepath.Join(pki, "ca-cert.pem"))
	}
	p = startProc(t, snapmountBin, append(args, images...)...)
	p.waitOutput(" (exports: ", 60*time.Second)
	m := regexp.MustCompile(`listening on tcp:(\S+) `).FindStringSubmatch(p.out.String())
	if m == nil {
		t.Fatalf("no TCP address in %q", p.out.String())
	}
	return m[1], p
}

// qemuTLSArgs are the qemu-img/qemu-io arguments that open export over
// TLS as qemu's documentation shows: an x509 credentials object for the
// client end and --image-opts naming it.
func qemuTLSArgs(pki, addr, export string) []string {
	host, port, _ := net.SplitHostPort(addr)
	return []string{"--object", "tls-creds-x509,id=tls0,dir=" + pki + ",endpoint=client", "--image-opts",
		fmt.Sprintf("driver=nbd,server.type=inet,server.host=%s,server.port=%s,export=%s,tls-creds=tls0", host, port, export)}
}

// GnuTLS clients against snapmount serve. The export "disk" is only read;
// "w" takes qemu-io's and libnbd's writes at offsets of their own.
func TestTLSServeMatrix(t *testing.T) {
	for _, kind := range pkiKinds {
		for _, withCA := range []bool{false, true} {
			name := kind + "/no-tls-ca"
			if withCA {
				name = kind + "/tls-ca"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				pki := testPKI(t, kind)
				dir := t.TempDir()
				disk, w := filepath.Join(dir, "disk.img"), filepath.Join(dir, "w.img")
				writeRandomImage(t, disk, tlsImageSize, 31)
				writeRandomImage(t, w, tlsImageSize, 32)
				addr, _ := startServeTLS(t, pki, withCA, "disk="+disk, "w="+w)
				uri := func(export, certs string) string {
					return "nbds://" + addr + "/" + export + "?tls-certificates=" + certs
				}
				sum := fileSHA256(t, disk)

				t.Run("nbdinfo", func(t *testing.T) {
					testenv.RequireCmd(t, "nbdinfo")
					out := mustRun(t, "nbdinfo", uri("disk", pki)).stdout
					if !strings.Contains(out, "with TLS") || !strings.Contains(out, fmt.Sprintf("export-size: %d ", tlsImageSize)) {
						t.Errorf("nbdinfo over TLS:\n%s", out)
					}
					// Without --tls-ca the server asks for no certificate.
					r := runCmd(t, time.Minute, "nbdinfo", "--size", uri("disk", filepath.Join(pki, "ca-only")))
					if withCA == (r.code == 0) {
						t.Errorf("nbdinfo without a client certificate, --tls-ca %v: exit %d %s", withCA, r.code, r.stderr)
					}
				})
				t.Run("nbdcopy", func(t *testing.T) {
					testenv.RequireCmd(t, "nbdcopy")
					out := filepath.Join(t.TempDir(), "out.img")
					mustRun(t, "nbdcopy", uri("disk", pki), out)
					if fileSHA256(t, out) != sum {
						t.Error("nbdcopy over TLS copied other data")
					}
				})
				t.Run("qemu-img", func(t *testing.T) {
					testenv.RequireCmd(t, "qemu-img")
					out := filepath.Join(t.TempDir(), "out.img")
					mustRun(t, "qemu-img", append(append([]string{"convert"}, qemuTLSArgs(pki, addr, "disk")...), "-O", "raw", out)...)
					if fileSHA256(t, out) != sum {
						t.Error("qemu-img convert over TLS copied other data")
					}
				})
				t.Run("qemu-io", func(t *testing.T) {
					testenv.RequireCmd(t, "qemu-io")
					args := append([]string{"-c", "write -P 0x5a 0 64k", "-c", "flush"}, qemuTLSArgs(pki, addr, "w")...)
					mustRun(t, "qemu-io", args...)
					if !bytes.Equal(readFileRange(t, w, 0, 64<<10), bytes.Repeat([]byte{0x5a}, 64<<10)) {
						t.Error("qemu-io's write over TLS is not in the image")
					}
				})
				t.Run("python3-libnbd", func(t *testing.T) {
					out := pyLibnbd(t, `
import nbd, sys
h = nbd.NBD()
h.set_uri_allow_local_file(True)
h.connect_uri(sys.argv[1])
assert h.get_tls_negotiated()
h.pwrite(b"\x61" * 4096, 1 << 20)
h.flush()
assert h.pread(4096, 1 << 20) == b"\x61" * 4096
print("ok")
`, uri("w", pki))
					if strings.TrimSpace(out) != "ok" || !bytes.Equal(readFileRange(t, w, 1<<20, 4096), bytes.Repeat([]byte{0x61}, 4096)) {
						t.Errorf("libnbd over TLS: %q, or its write is not in the image", out)
					}
				})
			})
		}
	}
}

// TLS peers for snapmount's client, each on a Unix socket in dir serving
// image read-only; the URI's host for the certificate is localhost.
var tlsPeers = []struct {
	name, file string // the mounted file's name
	start      func(t *testing.T, dir, pki, image string) (uri string)
}{
	{"nbdkit", "nbd", func(t *testing.T, dir, pki, image string) string {
		sock, _ := startNbdkit(t, dir, "-r", "--tls=require", "--tls-certificates="+pki, "file", image)
		return "nbds+unix:///?socket=" + sock
	}},
	{"nbdkit-verify-peer", "nbd", func(t *testing.T, dir, pki, image string) string {
		sock, _ := startNbdkit(t, dir, "-r", "--tls=require", "--tls-certificates="+pki, "--tls-verify-peer", "file", image)
		return "nbds+unix:///?socket=" + sock
	}},
	{"qemu-nbd", "disk", startQemuNbdTLS},
}

// startQemuNbdTLS serves image with qemu-nbd, TLS required and the
// client's certificate verified, as qemu's documentation configures it.
func startQemuNbdTLS(t *testing.T, dir, pki, image string) string {
	testenv.RequireCmd(t, "qemu-nbd")
	sock := filepath.Join(dir, "q.sock")
	p := startProc(t, "qemu-nbd", "-r", "-t", "-e", "0", "-k", sock, "-x", "disk", "-f", "raw",
		"--object", "tls-creds-x509,id=tls0,dir="+pki+",endpoint=server,verify-peer=on", "--tls-creds", "tls0", image)
	p.waitReady("unix", sock)
	return "nbds+unix:///disk?socket=" + sock
}

// snapmount's client against stock servers that require TLS: info and
// mount find the certificates by tls-certificates=DIR, copy by
// --tls-ca/--tls-cert/--tls-key.
func TestTLSClientMatrix(t *testing.T) {
	for _, kind := range pkiKinds {
		for _, peer := range tlsPeers {
			t.Run(kind+"/"+peer.name, func(t *testing.T) {
				t.Parallel()
				pki := testPKI(t, kind)
				dir := testenv.ShortTempDir(t)
				image := filepath.Join(dir, "disk.img")
				writeRandomImage(t, image, tlsImageSize, 33)
				uri := peer.start(t, dir, pki, image)
				withDir := uri + "&tls-certificates=" + pki

				info := snapmount(t, time.Minute, "info", withDir)
				if info.code != 0 || !strings.Contains(info.stdout, "with TLS") {
					t.Errorf("info: exit %d\n%s%s", info.code, info.stdout, info.stderr)
				}
				if peer.name == "nbdkit" {
					// A server that does not verify peers needs no client certificate.
					r := snapmount(t, time.Minute, "info", uri+"&tls-certificates="+filepath.Join(pki, "ca-only"))
					if r.code != 0 {
						t.Errorf("info without a client certificate: exit %d %s", r.code, r.stderr)
					}
				}
				cp := snapmount(t, time.Minute, "copy", "--sha256", "--tls-ca", filepath.Join(pki, "ca-cert.pem"),
					"--tls-cert", filepath.Join(pki, "client-cert.pem"), "--tls-key", filepath.Join(pki, "client-key.pem"),
					uri, filepath.Join(dir, "out.img"))
				if want := fileSHA256(t, image); cp.code != 0 || !strings.HasPrefix(cp.stdout, want) {
					t.Errorf("copy: exit %d, printed %q, want %s: %s", cp.code, cp.stdout, want, cp.stderr)
				}
				mnt := mountDir(t, dir, "mnt")
				mountSM(t, withDir, mnt)
				if got, want := fileSHA256(t, filepath.Join(mnt, peer.file)), fileSHA256(t, image); got != want {
					t.Errorf("sha256 of the mounted file %s, want %s", got, want)
				}
			})
		}
	}
}

// checkRefusal checks that a command failed with exit code 3 (could not
// connect) and one line of stderr holding every one of wants.
func checkRefusal(t *testing.T, r result, wants ...string) {
	t.Helper()
	line := strings.TrimSpace(r.stderr)
	if r.code != 3 || strings.Contains(line, "\n") {
		t.Errorf("exit %d (want 3), stderr not one line: %q", r.code, r.stderr)
	}
	for _, w := range wants {
		if !strings.Contains(line, w) {
			t.Errorf("stderr %q lacks %q", line, w)
		}
	}
}

// Each refusal is one line naming its cause, on the side the user sees.
func TestTLSRefusals(t *testing.T) {
	pki := testPKI(t, "certtool-rsa")
	ref := testPKI(t, "refusals")
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, tlsImageSize, 34)
	noCert := filepath.Join(pki, "ca-only")
	otherClient := filepath.Join(ref, "otherclient")
	expiredClient := filepath.Join(ref, "expiredclient")
	const needCert = "the server requires a client certificate: pass --tls-cert and --tls-key"

	t.Run("serve", func(t *testing.T) {
		t.Parallel()
		testenv.RequireCmd(t, "nbdinfo")
		addr, srv := startServeTLS(t, pki, true, "disk="+image)
		uri := func(certs string) string { return "nbds://" + addr + "/disk?tls-certificates=" + certs }
		// GnuTLS says only that an alert came; the server's log says why.
		for _, c := range []struct{ certs, logged string }{
			{noCert, "client didn't provide a certificate"},
			{otherClient, `client certificate \"CN=client,O=snapmount test\" (issued by \"CN=another CA\") is not signed by the --tls-ca CA`},
			{expiredClient, `client certificate \"CN=client,O=snapmount test\" expired on 2021-01-01 00:00:00 UTC`},
		} {
			if r := runCmd(t, time.Minute, "nbdinfo", "--size", uri(c.certs)); r.code == 0 {
				t.Errorf("nbdinfo with %s was let in", c.certs)
			}
			srv.waitOutput(c.logged, 30*time.Second)
		}
		checkRefusal(t, snapmount(t, time.Minute, "info", uri(noCert)), needCert)
		checkRefusal(t, snapmount(t, time.Minute, "info", uri(otherClient)),
			`the server refused the client certificate "CN=client,O=snapmount test" (issued by "CN=another CA")`)
		checkRefusal(t, snapmount(t, time.Minute, "info", uri(expiredClient)),
			`the server refused the client certificate "CN=client,O=snapmount test": it expired on 2021-01-01 00:00:00 UTC`)
		checkRefusal(t, snapmount(t, time.Minute, "info", "nbd://"+addr+"/disk"), "requires TLS")
	})
	t.Run("serve-expired-certificate", func(t *testing.T) {
		t.Parallel()
		exp := filepath.Join(ref, "expired")
		r := snapmount(t, 20*time.Second, "serve", "--listen", "127.0.0.1:0", "--tls", "require",
			"--tls-cert", filepath.Join(exp, "server-cert.pem"), "--tls-key", filepath.Join(exp, "server-key.pem"), image)
		if line := strings.TrimSpace(r.stderr); r.code == 0 || strings.Contains(line, "\n") ||
			!strings.Contains(line, "server-cert.pem expired on 2021-01-01 00:00:00 UTC") {
			t.Errorf("serve with an expired certificate: exit %d, stderr %q", r.code, r.stderr)
		}
	})
	for _, peer := range tlsPeers[1:] { // the peers that verify client certificates
		t.Run(peer.name, func(t *testing.T) {
			t.Parallel()
			uri := peer.start(t, testenv.ShortTempDir(t), pki, image)
			checkRefusal(t, snapmount(t, time.Minute, "info", uri+"&tls-certificates="+noCert), needCert)
			checkRefusal(t, snapmount(t, time.Minute, "info", uri+"&tls-certificates="+otherClient),
				`the server refused the client certificate "CN=client,O=snapmount test": it is issued by "CN=another CA", and the server accepts only "CN=snapmount test CA"`)
			checkRefusal(t, snapmount(t, time.Minute, "info", uri+"&tls-certificates="+filepath.Join(ref, "othertrust")),
				`the server's certificate "CN=localhost,O=snapmount test" (issued by "CN=snapmount test CA") is not signed by the CA we trust`)
		})
	}
	for certs, want := range map[string]string{
		"expired":   `the server's certificate "CN=localhost,O=snapmount test" expired on 2021-01-01 00:00:00 UTC`,
		"wronghost": "the server's certificate is for elsewhere.example, not localhost",
	} {
		t.Run("server-certificate-"+certs, func(t *testing.T) {
			t.Parallel()
			uri := tlsPeers[0].start(t, testenv.ShortTempDir(t), filepath.Join(ref, certs), image)
			checkRefusal(t, snapmount(t, time.Minute, "info", uri+"&tls-certificates="+pki), want)
		})
	}
}
