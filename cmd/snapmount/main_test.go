package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func runArgs(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestRunUsage(t *testing.T) {
	for _, c := range []struct {
		args       []string
		code       int
		out, errIn string
	}{
		{nil, exitUsage, "", "Commands:"},
		{[]string{"help"}, exitOK, "Commands:", ""},
		{[]string{"--version"}, exitOK, "snapmount ", ""},
		{[]string{"help", "copy"}, exitOK, "--sha256", ""},
		{[]string{"copy", "--help"}, exitOK, "Usage: snapmount copy", ""},
		{[]string{"nope"}, exitUsage, "", `unknown command "nope"`},
		{[]string{"info", "--nope"}, exitUsage, "", "unknown flag: --nope"},
		{[]string{"info", "a", "b"}, exitUsage, "", "want URI, got 2"},
		{[]string{"copy", "nbd://h/x"}, exitUsage, "", "want URI and DEST"},
		{[]string{"copy", "--request-size", "3000", "nbd://h/x", "-"}, exitUsage, "", "--request-size"},
		{[]string{"copy", "--request-size", "lots", "nbd://h/x", "-"}, exitUsage, "", "is not a size"},
		{[]string{"info", "--tls-ca", "/ca.pem", "nbd://h/x"}, exitUsage, "", "need an nbds://"},
		{[]string{"info", "--timeout", "0s", "nbd://h/x"}, exitUsage, "", "--timeout"},
	} {
		code, out, errs := runArgs(c.args...)
		if code != c.code || !strings.Contains(out, c.out) || !strings.Contains(errs, c.errIn) {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want exit %d, stdout with %q, stderr with %q", c.args, code, out, errs, c.code, c.out, c.errIn)
		}
		if strings.Count(strings.TrimSpace(errs), "\n") > 0 && c.code != exitOK && c.args != nil {
			t.Errorf("%q: error is not one line: %q", c.args, errs)
		}
	}
}

func TestSizes(t *testing.T) {
	for in, want := range map[string]int64{"4096": 4096, "64K": 64 << 10, "256M": 256 << 20, "1G": 1 << 30, "2GiB": 2 << 30, "1t": 1 << 40, "0": 0} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1", "1.5G", "12Q", "99999999999T"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) accepted", in)
		}
	}
	for n, want := range map[uint64]string{0: "0", 512: "512", 1 << 20: "1M", 64 << 20: "64M", 3 << 30: "3G", 1536: "1.5K", 1<<30 + 1: "1G"} {
		if got := humanSize(n); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", n, got, want)
		}
	}
}
