package main

import (
	"bytes"
	"context"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

func TestServeSocketPermUsageErrors(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(testenv.ShortTempDir(t), "s.sock")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--listen", "127.0.0.1:0", "--socket-mode", "0660", img}, "need --socket"},
		{[]string{"--no-tcp", "--socket", sock, "--socket-mode", "0999", img}, "--socket-mode"},
		{[]string{"--no-tcp", "--socket", sock, "--socket-mode", "01777", img}, "--socket-mode"},
		{[]string{"--no-tcp", "--socket", sock, "--socket-group", "no-such-group-here", img}, "no such group"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), append([]string{"serve"}, tc.args...), &stdout, &stderr)
		if msg := stderr.String(); code != exitUsage || !strings.Contains(msg, tc.want) || strings.Count(msg, "\n") != 1 {
			t.Errorf("serve %v: exit %d, %q; want exit %d and one line with %q", tc.args, code, msg, exitUsage, tc.want)
		}
	}
	if _, err := os.Stat(sock); err == nil {
		t.Error("a refused start left a socket behind")
	}
}

// The socket gets the mode and group asked for; without them, what the
// umask gives, as before.
func TestServeSocketPerm(t *testing.T) {
	img := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	// A group this process may give files to: its own.
	g, err := user.LookupGroupId(strconv.Itoa(os.Getgid()))
	if err != nil {
		t.Skipf("the process's group %d has no name: %v", os.Getgid(), err)
	}
	umask := processUmask(t)
	for _, tc := range []struct {
		flags []string
		mode  os.FileMode
	}{
		{nil, 0o777 &^ os.FileMode(umask)},
		{[]string{"--socket-group", g.Name}, 0o660},
		{[]string{"--socket-group", g.Gid, "--socket-mode", "640"}, 0o640},
		{[]string{"--socket-mode", "0600"}, 0o600},
	} {
		sock := filepath.Join(testenv.ShortTempDir(t), "s.sock")
		stop := serveInProcess(t, append(append([]string{"--no-tcp", "--socket", sock}, tc.flags...), img)...)
		var st syscall.Stat_t
		if err := syscall.Stat(sock, &st); err != nil {
			t.Fatal(err)
		}
		if got := os.FileMode(st.Mode & 0o777); got != tc.mode || int(st.Gid) != os.Getgid() {
			t.Errorf("serve %v: socket mode %o group %d, want %o and %d", tc.flags, got, st.Gid, tc.mode, os.Getgid())
		}
		stop()
	}
}

// processUmask reads the umask without changing it (tests run in parallel).
func processUmask(t *testing.T) int {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Umask:"); ok {
			m, err := strconv.ParseUint(strings.TrimSpace(v), 8, 32)
			if err == nil {
				return int(m)
			}
		}
	}
	t.Fatal("no Umask in /proc/self/status")
	return 0
}

// serveInProcess runs serve with args in this process until it printed its
// ready line. stop (also run when the test ends) cancels it and checks it
// ended cleanly.
func serveInProcess(t *testing.T, args ...string) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var stdout, stderr testenv.Buffer
	done := make(chan int, 1)
	go func() { done <- run(ctx, append([]string{"serve"}, args...), &stdout, &stderr) }()
	deadline := time.After(testenv.WaitLimit)
	for {
		changed := stdout.Changed()
		if strings.Contains(stdout.String(), "snapmount serve: listening on") {
			break
		}
		select {
		case code := <-done:
			cancel()
			t.Fatalf("serve %v exited %d before listening: %s", args, code, stderr.String())
		case <-changed:
		case <-deadline:
			cancel()
			t.Fatalf("serve %v did not print its ready line within %v; stderr %q", args, testenv.WaitLimit, stderr.String())
		}
	}
	stopped := false
	stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		select {
		case code := <-done:
			if code != exitOK {
				t.Errorf("serve %v exited %d after cancel: %s", args, code, stderr.String())
			}
		case <-time.After(testenv.WaitLimit):
			t.Errorf("serve %v still running %v after its context was cancelled", args, testenv.WaitLimit)
		}
	}
	t.Cleanup(stop)
	return stop
}
