package test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// requireLibnbdPython skips unless Debian's python3 can import nbd.
func requireLibnbdPython(t testing.TB) string {
	t.Helper()
	py := "/usr/bin/python3"
	if err := exec.Command(py, "-c", "import nbd").Run(); err != nil {
		testenv.SkipOrFail(t, "python3-libnbd is not installed for %s (apt-get install python3-libnbd)", py)
	}
	return py
}

// proc is a daemon started by a test. It is ended by PID in t.Cleanup.
type proc struct {
	t      testing.TB
	name   string
	cmd    *exec.Cmd
	out    testenv.Buffer // stdout and stderr, interleaved
	exited chan struct{}
	err    error // set before exited is closed
}

// startProc starts a daemon in the foreground as a child of the test. The
// child dies with the test process (Pdeathsig) and is ended by its PID when
// the test ends; its output is printed if the test failed.
func startProc(t testing.TB, name string, args ...string) *proc {
	t.Helper()
	return startProcEnv(t, nil, name, args...)
}

// startProcEnv is startProc with env as the child's environment (nil: the
// test's).
func startProcEnv(t testing.TB, env []string, name string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, exited: make(chan struct{})}
	p.cmd = exec.Command(name, args...)
	p.cmd.Env = env
	p.cmd.Stdout = &p.out
	p.cmd.Stderr = &p.out
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("output of %s %s:\n%s", name, strings.Join(args, " "), p.out.String())
		}
	})
	return p
}

// stop sends SIGTERM to the process (by PID) and waits; SIGKILL after 10 s.
func (p *proc) stop() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// kill ends the process with SIGKILL and waits for it.
func (p *proc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// waitExit waits for the process to exit by itself and returns its error.
func (p *proc) waitExit(timeout time.Duration) error {
	select {
	case <-p.exited:
		return p.err
	case <-time.After(timeout):
		return fmt.Errorf("%s did not exit within %v", p.name, timeout)
	}
}

// waitReady polls dial until it succeeds, the process exits or 30 s pass.
// Polling a socket is the readiness check: nothing else is waited for.
func (p *proc) waitReady(network, addr string) {
	p.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout(network, addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-p.exited:
			p.t.Fatalf("%s exited before listening on %s: %v\n%s", p.name, addr, p.err, p.out.String())
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s not listening on %s after 30 s: %v\n%s", p.name, addr, err, p.out.String())
		}
	}
}

// waitOutput waits until the process has printed substr.
func (p *proc) waitOutput(substr string, timeout time.Duration) {
	p.t.Helper()
	deadline := time.Now().Add(timeout)
	for !strings.Contains(p.out.String(), substr) {
		select {
		case <-p.exited:
			p.t.Fatalf("%s exited before printing %q: %v\n%s", p.name, substr, p.err, p.out.String())
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("%s did not print %q within %v:\n%s", p.name, substr, timeout, p.out.String())
		}
	}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
// Only for peers that cannot listen on a Unix socket or port 0.
func freePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// writeRandomImage writes size bytes of seeded pseudo-random data.
func writeRandomImage(t testing.TB, path string, size int64, seed int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := rand.New(rand.NewSource(seed))
	if _, err := io.CopyN(f, r, size); err != nil {
		t.Fatal(err)
	}
}

// writeSparseImage makes a sparse file of size bytes with data only in
// the given [offset, offset+len) extents (pseudo-random content).
func writeSparseImage(t testing.TB, path string, size int64, extents [][2]int64, seed int64) {
	t.Helper()
	testenv.SparseFile(t, path, size)
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r := rand.New(rand.NewSource(seed))
	for _, e := range extents {
		buf := make([]byte, e[1])
		r.Read(buf)
		if _, err := f.WriteAt(buf, e[0]); err != nil {
			t.Fatal(err)
		}
	}
}

// fileSHA256 returns the hex SHA-256 of a file's content.
func fileSHA256(t testing.TB, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("hashing %s: %v", path, err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// allocatedBytes returns the bytes a file really occupies on disk.
func allocatedBytes(t testing.TB, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// result is what a finished command printed and how it exited.
type result struct {
	stdout, stderr string
	code           int
}

// runCmd runs a program to completion (at most timeout) and returns its
// output and exit code. A failure to start is fatal.
func runCmd(t testing.TB, timeout time.Duration, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	r := result{stdout: so.String(), stderr: se.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("running %s: %v", name, err)
	}
	if ctx.Err() != nil {
		t.Fatalf("%s %s did not finish within %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), timeout, r.stdout, r.stderr)
	}
	return r
}

// mustRun runs a program and fails the test unless it exits 0.
func mustRun(t testing.TB, name string, args ...string) result {
	t.Helper()
	r := runCmd(t, 2*time.Minute, name, args...)
	if r.code != 0 {
		t.Fatalf("%s %s: exit %d\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), r.code, r.stdout, r.stderr)
	}
	return r
}

// snapmount runs the binary under test.
func snapmount(t testing.TB, timeout time.Duration, args ...string) result {
	t.Helper()
	return runCmd(t, timeout, snapmountBin, args...)
}

// nbdkitImage writes a random image of size bytes (from seed) in a new
// temporary directory and serves it read-only with nbdkit file; it
// returns the directory, the image's path and nbdkit's socket.
func nbdkitImage(t testing.TB, size, seed int64) (dir, image, sock string) {
	t.Helper()
	dir = testenv.ShortTempDir(t)
	image = filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, size, seed)
	sock, _ = startNbdkit(t, dir, "-r", "file", image)
	return dir, image, sock
}

// startNbdkit starts nbdkit in the foreground on a Unix socket in dir and
// waits until it accepts connections. args are plugin, filters and params.
func startNbdkit(t testing.TB, dir string, args ...string) (sock string, p *proc) {
	t.Helper()
	testenv.RequireCmd(t, "nbdkit")
	sock = filepath.Join(dir, fmt.Sprintf("nbdkit-%d.sock", time.Now().UnixNano()%1e9))
	p = startProc(t, "nbdkit", append([]string{"-f", "-U", sock}, args...)...)
	p.waitReady("unix", sock)
	return sock, p
}

// unixURI is the NBD URI of an export on a Unix socket.
func unixURI(export, sock string) string {
	return "nbd+unix:///" + export + "?socket=" + sock
}
