package nbd

import (
	"strings"
	"testing"
)

func TestParseURI(t *testing.T) {
	for _, c := range []struct {
		in                    string
		network, addr, export string
		tls                   bool
	}{
		{"nbd://localhost/disk", "tcp", "localhost:10809", "disk", false},
		{"nbd://127.0.0.1:10901/", "tcp", "127.0.0.1:10901", "", false},
		{"nbd://127.0.0.1", "tcp", "127.0.0.1:10809", "", false},
		{"nbd://h//disk", "tcp", "h:10809", "/disk", false},
		{"nbd://[::1]:99/a%20b", "tcp", "[::1]:99", "a b", false},
		{"nbds://example.com/x", "tcp", "example.com:10809", "x", true},
		{"nbd+unix:///disk?socket=/tmp/s.sock", "unix", "/tmp/s.sock", "disk", false},
		{"nbd+unix:///?socket=rel.sock", "unix", "rel.sock", "", false},
		{"nbds+unix:///disk@s3?socket=/s&tls-certificates=/pki", "unix", "/s", "disk@s3", true},
		{"nbd+unix:///x?socket=%00abstract", "unix", "@abstract", "x", false},
		// Percent-encoding only: '+' is a plus sign, as libnbd and qemu read it.
		{"nbd+unix:///a+b?socket=/run/a+b.sock", "unix", "/run/a+b.sock", "a+b", false},
		{"nbd+unix:///a%20b?socket=/run/a%2Bb%20c%C3%A9.sock", "unix", "/run/a+b c\u00e9.sock", "a b", false},
		{"nbd+unix:///?socket=/run/x.sock&&x-ro-promise=1", "unix", "/run/x.sock", "", false},
	} {
		u, err := ParseURI(c.in)
		if err != nil {
			t.Errorf("%s: %v", c.in, err)
			continue
		}
		if u.Network != c.network || u.Address != c.addr || u.Export != c.export || u.TLS != c.tls {
			t.Errorf("%s: got %+v", c.in, u)
		}
	}
}

func TestParseURIErrors(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"", "empty"},
		{"disk.img", "no scheme"},
		{"http://h/x", "unknown scheme"},
		{"nbd+unix:///x", "needs ?socket=PATH"},
		{"nbd+unix://host/x?socket=/s", "has no host"},
		{"nbd:///x", "no host"},
		{"nbd://h:99999/x", "port"},
		{"nbd://h/x?socket=/s", "socket= needs"},
		{"nbd://h/x?colour=blue", "unknown parameter"},
		{"nbds://h/x?tls-psk-file=/k", "pre-shared keys"},
		{"nbd+vsock://1:2/x", "vsock"},
		{"nbd://u:pw@h/x", "passwords"},
		{"nbd:h/x", "'//'"},
		{"nbd://h/x?tls-verify-peer=maybe", "tls-verify-peer"},
		{"nbd+unix:///x?socket=/run/%zz.sock", "bad percent-encoding"},
	} {
		_, err := ParseURI(c.in)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%q: got %v, want an error containing %q", c.in, err, c.want)
			continue
		}
		if strings.Contains(err.Error(), "\n") {
			t.Errorf("%q: error spans lines: %q", c.in, err)
		}
	}
}

func TestURIOptions(t *testing.T) {
	u, err := ParseURI("nbds://alice@h:1/x?tls-verify-peer=false&tls-hostname=srv&x-ro-promise=0")
	if err != nil {
		t.Fatal(err)
	}
	if u.User != "alice" || u.TLSVerify || u.TLSHost != "srv" || !u.NoPromise {
		t.Fatalf("%+v", u)
	}
	back, err := ParseURI(u.String())
	if err != nil || back.Address != u.Address || back.Export != u.Export || back.NoPromise != u.NoPromise || back.TLSVerify != u.TLSVerify {
		t.Fatalf("String() round trip: %q -> %+v, %v", u.String(), back, err)
	}
	if back.TLSHost != "srv" {
		t.Fatalf("String() dropped tls-hostname: %q", u.String())
	}
	if got := u.WithExport("y@s2").Export; got != "y@s2" || u.Export != "x" {
		t.Fatalf("WithExport: %q / %q", got, u.Export)
	}
}

// String percent-encodes what a reader could take for something else, and
// only that; ParseURI reads back what String wrote.
func TestURIStringEscapes(t *testing.T) {
	for _, c := range []struct {
		u    URI
		want string
	}{
		{URI{Scheme: "nbd+unix", Network: "unix", Address: "/run/a+b c\u00e9;&=#?%.sock", Export: "a b+c", TLSVerify: true},
			"nbd+unix:///a%20b+c?socket=/run/a%2Bb%20c%C3%A9%3B%26%3D%23%3F%25.sock"},
		{URI{Scheme: "nbd+unix", Network: "unix", Address: "@abstract", TLSVerify: true},
			"nbd+unix:///?socket=%00abstract"},
		{URI{Scheme: "nbds", Network: "tcp", Address: "[::1]:10809", Export: "disk@s3", TLSCertDir: "/etc/pki/a b", TLSHost: "::1"},
			"nbds://[::1]:10809/disk@s3?tls-certificates=/etc/pki/a%20b&tls-verify-peer=false"},
	} {
		got := c.u.String()
		if got != c.want {
			t.Errorf("String() = %q, want %q", got, c.want)
		}
		back, err := ParseURI(got)
		if err != nil {
			t.Errorf("ParseURI(%q): %v", got, err)
			continue
		}
		if back.Address != c.u.Address || back.Export != c.u.Export || back.TLSCertDir != c.u.TLSCertDir || back.TLSVerify != c.u.TLSVerify {
			t.Errorf("round trip of %q: %+v, want %+v", got, *back, c.u)
		}
	}
}
