package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// TestServeUsageErrors: every mistake on the command line is one line on
// stderr and exit code 2, before anything listens.
func TestServeUsageErrors(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "s.sock")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"serve"}, exitUsage, "want at least one"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "a@b=" + img}, exitUsage, "'@'"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--busy", "maybe", img}, exitUsage, "--busy"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--tls", "sometimes", img}, exitUsage, "--tls"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--tls", "on", img}, exitUsage, "--tls-cert"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--snapshot-max", "lots", img}, exitUsage, `"--snapshot-max" flag: "lots" is not a size`},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--snapshot-block", "-4K", img}, exitUsage, `"--snapshot-block" flag: "-4K" is not a size`},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--snapshot-block", "1000", img}, exitUsage, "--snapshot-block"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--on-snapshot-full", "panic", img}, exitUsage, "--on-snapshot-full"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--reader-view", "x", img}, exitUsage, "--reader-view"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--max-writers", "-1", img}, exitUsage, "--max-writers"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--description", "nope=x", img}, exitUsage, "--description"},
		{[]string{"serve", "--no-tcp", img}, exitUsage, "nothing to listen on"},
		{[]string{"serve", "--bogus-flag", img}, exitUsage, "bogus-flag"},
		{[]string{"serve", "--listen", "127.0.0.1:99999", img}, exitUsage, "invalid port 99999"},
		{[]string{"serve", "--listen", "garbage", img}, exitUsage, "want HOST:PORT"},
		{[]string{"serve", "--no-tcp", "--socket", sock, "--max-handshakes", "0", img}, exitUsage, "--max-handshakes"},
		{[]string{"serve", "--listen", "127.0.0.1:nope", img}, exitUsage, "invalid port"},
		{[]string{"serve", "--no-tcp", "--socket", sock, img + ".missing"}, exitFailure, "no such file"},
		{[]string{"serve", "--no-tcp", "--socket", sock, img, img}, exitFailure, "given twice"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), tc.args, &stdout, &stderr)
		msg := stderr.String()
		if code != tc.code || !strings.Contains(msg, tc.want) || strings.Count(msg, "\n") != 1 {
			t.Errorf("snapmount %s: exit %d, stderr %q; want exit %d and one line containing %q",
				strings.Join(tc.args, " "), code, msg, tc.code, tc.want)
		}
	}
	if _, err := os.Stat(sock); err == nil {
		t.Error("a failed start left a socket behind")
	}
}

// serve's sizes are size flags, as mount's and copy's are: the help shows
// them as such, with the default in the same units.
func TestServeSizeFlagsHelp(t *testing.T) {
	code, out, _ := runArgs("serve", "--help")
	for _, want := range []string{"--snapshot-max size ", "--snapshot-block size ", "from 4K to 16M (default 64K)"} {
		if code != exitOK || !strings.Contains(out, want) {
			t.Errorf("serve --help: exit %d, no %q in\n%s", code, want, out)
		}
	}
}

// TestServeRunsUntilCancelled starts the server in-process on a Unix
// socket, waits for its ready line and stops it through the context.
func TestServeRunsUntilCancelled(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(testenv.ShortTempDir(t), "s.sock")
	ctx, cancel := context.WithCancel(context.Background())
	var stdout, stderr testenv.Buffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--no-tcp", "--socket", sock, "vm=" + img}, &stdout, &stderr)
	}()
	ready := "listening on unix:" + sock
	deadline := time.After(30 * time.Second)
	for {
		changed := stdout.Changed()
		if strings.Contains(stdout.String(), ready) {
			break
		}
		select {
		case code := <-done:
			t.Fatalf("serve exited %d early: %s", code, stderr.String())
		case <-changed:
		case <-deadline:
			t.Fatalf("serve did not print %q within 30 s; stdout %q, stderr %q", ready, stdout.String(), stderr.String())
		}
	}
	if !strings.Contains(stdout.String(), "exports: vm") {
		t.Errorf("ready line %q does not name the export", stdout.String())
	}
	cancel()
	select {
	case code := <-done:
		if code != exitOK {
			t.Errorf("serve exited %d after cancel, want 0; stderr: %s", code, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("serve still running 30 s after its context was cancelled; stderr: %s", stderr.String())
	}
	if _, err := os.Stat(sock); err == nil {
		t.Error("the socket was not removed at exit")
	}
}

func TestParseExportArg(t *testing.T) {
	for _, tc := range []struct {
		in, name, path string
		bad            bool
	}{
		{"disk.img", "disk.img", "disk.img", false},
		{"/var/lib/vm/disk.img", "disk.img", "/var/lib/vm/disk.img", false},
		{"vm=/var/lib/vm/disk.img", "vm", "/var/lib/vm/disk.img", false},
		{"./a=b.img", "a=b.img", "./a=b.img", false},
		{"x@y=disk.img", "", "", true},
		{"/tmp/x@y.img", "", "", true},
		{"vm=", "", "", true},
		{"=disk.img", "disk.img", "disk.img", false},
	} {
		ec, err := parseExportArg(tc.in)
		if (err != nil) != tc.bad {
			t.Errorf("parseExportArg(%q) error %v, want error %v", tc.in, err, tc.bad)
			continue
		}
		if !tc.bad && (ec.Name != tc.name || ec.Path != tc.path) {
			t.Errorf("parseExportArg(%q) = %+v, want name %q path %q", tc.in, ec, tc.name, tc.path)
		}
	}
}
