package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runArgs(args ...string) (int, string, string) {
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestRunUsage(t *testing.T) {
	notMounted := t.TempDir()
	os.WriteFile(filepath.Join(notMounted, "disk"), nil, 0o644)
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
		{[]string{"copy", "--requests", "-1", "nbd://h/x", "-"}, exitUsage, "", "--requests"},
		{[]string{"info", "--tls-ca", "/ca.pem", "nbd://h/x"}, exitUsage, "", "need an nbds://"},
		{[]string{"info", "--timeout", "0s", "nbd://h/x"}, exitUsage, "", "--timeout"},
		{[]string{"help", "copy"}, exitOK, "how long one outage of the server", ""},
		{[]string{"help", "stats"}, exitOK, "server unreachable since", ""},
		{[]string{"stats", notMounted}, exitMount, "", notMounted + " is not a snapmount mount (nothing is mounted there)"},
		{[]string{"stats", "/proc"}, exitMount, "", "/proc is a proc mount, not snapmount's"},
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
