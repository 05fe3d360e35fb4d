package test

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// peerServer is a running NBD server the client tests talk to.
type peerServer struct {
	uri  string // URI of the export holding the image
	proc *proc
}

// A stock server with the image as an export, started by one of these.
type peerStarter func(t *testing.T, dir, image string) peerServer

func nbdkitPeer(extra ...string) peerStarter {
	return func(t *testing.T, dir, image string) peerServer {
		sock, p := startNbdkit(t, dir, append(append([]string{}, extra...), "file", image)...)
		return peerServer{unixURI("", sock), p}
	}
}

func qemuNbdPeer(t *testing.T, dir, image string) peerServer {
	testenv.RequireCmd(t, "qemu-nbd")
	sock := filepath.Join(dir, "q.sock")
	p := startProc(t, "qemu-nbd", "-r", "-t", "-e", "0", "-k", sock, "-x", "disk", "-f", "raw", image)
	p.waitReady("unix", sock)
	return peerServer{unixURI("disk", sock), p}
}

func nbdServerPeer(t *testing.T, dir, image string) peerServer {
	testenv.RequireCmd(t, "nbd-server")
	sock := filepath.Join(dir, "n.sock")
	conf := filepath.Join(dir, "nbd.conf")
	pidfile := filepath.Join(dir, "n.pid")
	cfg := fmt.Sprintf("[generic]\nunixsock = %s\n[disk]\nexportname = %s\nreadonly = true\n", sock, image)
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	// nbd-server daemonizes; its pidfile names the daemon, which the
	// cleanup ends by that PID.
	mustRun(t, "nbd-server", "-C", conf, "-p", pidfile)
	t.Cleanup(func() { killPidfile(t, pidfile) })
	waitDial(t, "unix", sock)
	return peerServer{unixURI("disk", sock), nil}
}

// killPidfile ends the daemon whose PID a pidfile we asked for holds.
func killPidfile(t testing.TB, pidfile string) {
	b, err := os.ReadFile(pidfile)
	if err != nil {
		return
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil || pid <= 1 {
		return
	}
	if p, err := os.FindProcess(pid); err == nil {
		_ = p.Kill()
	}
}

// waitDial waits for a socket to accept connections (a daemon we cannot
// watch as a child).
func waitDial(t testing.TB, network, addr string) {
	t.Helper()
	(&proc{t: t, name: addr, exited: make(chan struct{})}).waitReady(network, addr)
}

var stockServers = []struct {
	name  string
	start peerStarter
	// what the server negotiates, as `snapmount info` prints it
	packets string
}{
	{"nbdkit", nbdkitPeer(), "structured packets"},
	{"nbdkit-no-sr", nbdkitPeer("--no-sr"), "simple packets"},
	{"nbdkit-export-name-only", nbdkitPeer("--mask-handshake=0"), "simple packets"},
	{"qemu-nbd", qemuNbdPeer, "structured packets"},
	{"nbd-server", nbdServerPeer, "simple packets"},
}

// Every stock server answers the read-only promise with ERR_UNSUP (or
// cannot be sent options at all) and the client still reads the whole
// export correctly, holes staying holes.
func TestCopyFromStockServers(t *testing.T) {
	for _, s := range stockServers {
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			dir := testenv.ShortTempDir(t)
			image := filepath.Join(dir, "disk.img")
			// 24 MiB with data in three places, holes between: the
			// copy must keep the holes.
			writeSparseImage(t, image, 24<<20, [][2]int64{{0, 1 << 20}, {8 << 20, 3 << 20}, {23 << 20, 1 << 20}}, 7)
			want := fileSHA256(t, image)
			srv := s.start(t, dir, image)

			info := snapmount(t, time.Minute, "info", srv.uri)
			if info.code != 0 {
				t.Fatalf("info: exit %d: %s", info.code, info.stderr)
			}
			for _, w := range []string{"export-size: 25165824", s.packets} {
				if !strings.Contains(info.stdout, w) {
					t.Errorf("info output lacks %q:\n%s", w, info.stdout)
				}
			}
			promise := "read-only-promise: not supported by the server (NBD_REP_ERR_UNSUP)"
			if s.name == "nbdkit-export-name-only" {
				// Not fixed-newstyle: no option can be sent at all.
				promise = "read-only-promise: not sent"
			}
			if !strings.Contains(info.stdout, promise) {
				t.Errorf("info output lacks %q:\n%s", promise, info.stdout)
			}

			out := filepath.Join(dir, "copy.img")
			r := snapmount(t, time.Minute, "copy", "--sha256", srv.uri, out)
			if r.code != 0 {
				t.Fatalf("copy: exit %d: %s", r.code, r.stderr)
			}
			if got := strings.Fields(r.stdout); len(got) != 2 || got[0] != want || got[1] != out {
				t.Fatalf("copy printed %q, want %q", r.stdout, want+"  "+out)
			}
			if got := fileSHA256(t, out); got != want {
				t.Fatalf("copied data differ: sha256 %s, want %s", got, want)
			}
			if st, _ := os.Stat(out); st.Size() != 24<<20 {
				t.Fatalf("copy has %d bytes, want %d", st.Size(), 24<<20)
			}
			// 5 MiB of data; allow filesystem slack, but not the 19 MiB
			// of holes.
			if a := allocatedBytes(t, out); a > 6<<20 {
				t.Errorf("copy allocates %d bytes: holes were written", a)
			}
		})
	}
}

func TestCopyToStdout(t *testing.T) {
	_, image, sock := nbdkitImage(t, 5<<20+512, 3) // not a multiple of the request size
	r := snapmount(t, time.Minute, "copy", "--sha256", "--conns", "2", unixURI("", sock), "-")
	if r.code != 0 {
		t.Fatalf("exit %d: %s", r.code, r.stderr)
	}
	b, _ := os.ReadFile(image)
	if r.stdout != string(b) {
		t.Fatalf("stdout has %d bytes, not the image's %d", len(r.stdout), len(b))
	}
	if want := fileSHA256(t, image); !strings.HasPrefix(r.stderr, want+"  ") {
		t.Fatalf("stderr %q lacks the SHA-256 %s", r.stderr, want)
	}
}

// With nbdkit's log filter recording every request, a whole session of
// info, info --map and copy sent nothing that writes.
func TestClientSendsNoWrites(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeSparseImage(t, image, 8<<20, [][2]int64{{1 << 20, 1 << 20}}, 1)
	logfile := filepath.Join(dir, "requests.log")
	// A writable export: the server would accept writes, so any the
	// client sent would show.
	sock, p := startNbdkit(t, dir, "--filter=log", "file", image, "logfile="+logfile)
	uri := unixURI("", sock)
	for _, args := range [][]string{{"info", uri}, {"info", "--map", uri}, {"copy", "--sha256", uri, filepath.Join(dir, "out.img")}} {
		if r := snapmount(t, time.Minute, args...); r.code != 0 {
			t.Fatalf("%v: exit %d: %s", args, r.code, r.stderr)
		}
	}
	p.stop() // flush the log
	verbs := logVerbs(t, logfile)
	for v, n := range verbs {
		switch v {
		case "Connect", "Disconnect", "Read", "Extents":
		default:
			t.Errorf("client sent %d %s request(s)", n, v)
		}
	}
	if verbs["Read"] == 0 || verbs["Extents"] == 0 {
		t.Errorf("log shows no reads or extents; is the log filter working? %v", verbs)
	}
}

var logVerb = regexp.MustCompile(`connection=\d+ (\w+) `)

// logVerbs counts the request kinds in an nbdkit log filter file.
func logVerbs(t testing.TB, path string) map[string]int {
	t.Helper()
	verbs := map[string]int{}
	for _, m := range logMatches(t, path, logVerb) {
		verbs[m[1]]++
	}
	return verbs
}

// logMatches returns re's submatches on every matching line of an nbdkit
// log filter's file.
func logMatches(t testing.TB, path string, re *regexp.Regexp) [][]string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if m := re.FindStringSubmatch(sc.Text()); m != nil {
			out = append(out, m)
		}
	}
	return out
}

// nbdkit's error filter makes every read fail with EIO: the copy fails
// with an error naming the offset, and exits non-zero.
func TestCopyReportsServerErrors(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 4<<20, 5)
	sock, _ := startNbdkit(t, dir, "--filter=error", "file", image, "error-pread=EIO", "error-pread-rate=100%")
	r := snapmount(t, time.Minute, "copy", unixURI("", sock), filepath.Join(dir, "out.img"))
	if r.code != 1 {
		t.Fatalf("exit %d, want 1; stderr %q", r.code, r.stderr)
	}
	if !regexp.MustCompile(`offset \d+.*EIO`).MatchString(r.stderr) {
		t.Fatalf("error does not name the offset and EIO: %q", r.stderr)
	}
}

// Slow replies (nbdkit's delay filter) are fine within --timeout, and a
// read the server does not answer within it fails instead of hanging.
func TestCopySlowServer(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 2<<20, 9)
	sock, _ := startNbdkit(t, dir, "--filter=delay", "file", image, "rdelay=300ms")
	out := filepath.Join(dir, "out.img")
	r := snapmount(t, time.Minute, "copy", "--sha256", "--request-size", "256K", unixURI("", sock), out)
	if r.code != 0 || !strings.HasPrefix(r.stdout, fileSHA256(t, image)) {
		t.Fatalf("slow copy: exit %d, %q %q", r.code, r.stdout, r.stderr)
	}
	failed := filepath.Join(dir, "failed.img")
	r = snapmount(t, time.Minute, "copy", "--timeout", "100ms", unixURI("", sock), failed)
	if r.code != 1 || !strings.Contains(r.stderr, "no reply") {
		t.Fatalf("copy with a timeout shorter than the delay: exit %d, stderr %q", r.code, r.stderr)
	}
	if _, err := os.Stat(failed); err == nil {
		t.Error("the failed copy left its destination")
	}
}

// A server killed in the middle of a copy makes the copy fail within its
// --timeout (plus boundSlack), exit 1 with one line saying why, and leave
// no DEST, nor anything else beside it.
func TestCopyKilledServer(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 16<<20, 13)
	logfile := filepath.Join(dir, "requests.log")
	sock, srv := startNbdkit(t, dir, "--filter=log", "--filter=delay", "file", image, "rdelay=200ms", "logfile="+logfile)
	outDir := filepath.Join(dir, "out")
	os.Mkdir(outDir, 0o755)
	out := filepath.Join(outDir, "out.img")
	copier := startProc(t, snapmountBin, "copy", "--timeout", boundTimeout.String(), "--request-size", "256K", unixURI("", sock), out)
	// The copy is under way once the server has logged a read.
	waitForFile(t, logfile, " Read ")
	srv.kill()
	killed := time.Now()
	err := copier.waitExit(time.Minute)
	took := time.Since(killed)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("copy from a killed server: %v, want exit 1", err)
	}
	if took > boundTimeout+boundSlack {
		t.Errorf("copy ended %v after the server was killed, more than the timeout %v plus %v", took.Round(time.Millisecond), boundTimeout, boundSlack)
	}
	msg := strings.TrimSpace(copier.out.String())
	if strings.Contains(msg, "\n") || !strings.Contains(msg, "out.img was not created") ||
		!strings.Contains(msg, "unreachable") && !strings.Contains(msg, "input/output error") && !strings.Contains(msg, "no reply") {
		t.Errorf("copy's error is not one line saying what happened: %q", msg)
	}
	if entries, _ := os.ReadDir(outDir); len(entries) != 0 {
		t.Errorf("the failed copy left %v in DEST's directory", entries)
	}
}

// copy never destroys data: it refuses an existing DEST that is not empty
// unless --force, and even with --force the image a local snapmount serve
// serves (named directly or through a symlink), which stays unchanged.
func TestCopyNeverDestroysData(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 2<<20, 19)
	want := fileSHA256(t, image)
	sock, _ := startServe(t, "disk="+image)
	uri := unixURI("disk@snapshot", sock)

	old := filepath.Join(dir, "old.img")
	os.WriteFile(old, []byte("evidence of another case"), 0o644)
	oldSum := fileSHA256(t, old)
	r := snapmount(t, time.Minute, "copy", uri, old)
	if r.code != 1 || !strings.Contains(r.stderr, "without --force") || fileSHA256(t, old) != oldSum {
		t.Errorf("copy onto an existing file: exit %d %q; want it refused, the file unchanged", r.code, r.stderr)
	}
	r = snapmount(t, time.Minute, "copy", "--force", "--sha256", uri, old)
	if r.code != 0 || fileSHA256(t, old) != want || !strings.HasPrefix(r.stdout, want) {
		t.Errorf("copy --force onto an existing file: exit %d %q %q; want the export there", r.code, r.stdout, r.stderr)
	}

	link := filepath.Join(dir, "link.img")
	os.Symlink(image, link)
	for _, dest := range []string{image, link} {
		for _, force := range [][]string{nil, {"--force"}} {
			args := append(append([]string{"copy", "--sha256"}, force...), uri, dest)
			r := snapmount(t, time.Minute, args...)
			if r.code != 1 || !strings.Contains(r.stderr, "a snapmount serve is serving") {
				t.Errorf("%v: exit %d %q; want it refused as a served image", args, r.code, r.stderr)
			}
		}
	}
	if got := fileSHA256(t, image); got != want {
		t.Fatalf("the served image changed: %s, was %s", got, want)
	}

	// A named pipe is written in place and never opened to look at
	// first (an open for reading waits for a writer, while the reader
	// at its other end waits for copy): its reader gets the export.
	fifo := filepath.Join(dir, "pipe")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // a reader copy never wrote to ends
		if f, err := os.OpenFile(fifo, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
	})
	piped := make(chan string, 1)
	go func() {
		f, err := os.Open(fifo)
		if err != nil {
			piped <- err.Error()
			return
		}
		defer f.Close()
		h := sha256.New()
		io.Copy(h, f)
		piped <- hex.EncodeToString(h.Sum(nil))
	}()
	r = snapmount(t, 30*time.Second, "copy", "--sha256", uri, fifo)
	if got := testenv.Receive(t, piped, "the pipe's reader to read to the end"); r.code != 0 || got != want {
		t.Errorf("copy into a pipe: exit %d %q, the reader got data with SHA-256 %s; want the export's, %s", r.code, r.stderr, got, want)
	}

	// With nobody reading the pipe, copy waits for a reader, and SIGTERM
	// ends the wait.
	p := startProc(t, snapmountBin, "copy", uri, fifo)
	waitFor(t, "copy to wait for the pipe's reader", func() bool { return waitsForPipePartner(p.cmd.Process.Pid) })
	p.cmd.Process.Signal(syscall.SIGTERM)
	testenv.Receive(t, p.exited, "copy to end at SIGTERM")
	if code := p.cmd.ProcessState.ExitCode(); code != 5 || !strings.Contains(p.out.String(), "interrupted") {
		t.Errorf("copy into a pipe nobody reads, at SIGTERM: exit %d %q, want 5, interrupted", code, p.out.String())
	}
}

// waitsForPipePartner reports whether a thread of process pid waits in
// open(2) for the other end of a named pipe.
func waitsForPipePartner(pid int) bool {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/wchan", pid))
	for _, task := range tasks {
		if b, _ := os.ReadFile(task); string(b) == "wait_for_partner" {
			return true
		}
	}
	return false
}

// copy writes its copy beside DEST and renames it into place, so DEST's
// directory must be writable: a user's copy into a directory it cannot
// write says so in one line, before connecting.
func TestCopyIntoUnwritableDirectorySaysWhy(t *testing.T) {
	a := testUser(t)
	dest := filepath.Join(a.dir, "out.img") // a.dir is root's
	r := a.run(t, "snapmount", "copy", unixURI("disk", filepath.Join(a.dir, "no.sock")), dest)
	msg := strings.TrimSpace(r.stderr)
	if r.code != 1 || strings.Contains(msg, "\n") || !strings.Contains(msg, "renamed into place") || !strings.Contains(msg, a.dir+" is not writable") {
		t.Errorf("copy into a directory the user cannot write: exit %d %q; want exit 1, one line saying why", r.code, msg)
	}
}

// waitForFile waits until a file contains substr (a log a daemon writes).
func waitForFile(t testing.TB, path, substr string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if b, err := os.ReadFile(path); err == nil && strings.Contains(string(b), substr) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never contained %q", path, substr)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Bad input: one line saying what is wrong, and the exit code of its class.
func TestClientBadInput(t *testing.T) {
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 1<<20, 1)
	qsock := filepath.Join(dir, "q.sock")
	testenv.RequireCmd(t, "qemu-nbd")
	q := startProc(t, "qemu-nbd", "-r", "-t", "-e", "0", "-k", qsock, "-x", "disk", "-f", "raw", image)
	q.waitReady("unix", qsock)
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"info", "nbd://localhost:99999/x"}, 2, "port"},
		{[]string{"info", "disk.img"}, 2, "no scheme"},
		{[]string{"info"}, 2, "want URI"},
		{[]string{"copy", "--conns", "0", unixURI("disk", qsock), "-"}, 2, "--conns"},
		{[]string{"info", "--bogus", unixURI("disk", qsock)}, 2, "unknown flag"},
		{[]string{"info", unixURI("disk", filepath.Join(dir, "missing.sock"))}, 3, "does not exist: is the server running?"},
		{[]string{"info", unixURI("nosuch", qsock)}, 3, `export "nosuch" does not exist`},
		{[]string{"copy", unixURI("disk", qsock), filepath.Join(dir, "no/such/dir/out")}, 1, "opening destination"},
		{[]string{"frobnicate"}, 2, "unknown command"},
	} {
		r := snapmount(t, time.Minute, c.args...)
		msg := strings.TrimSpace(r.stderr)
		if r.code != c.code || !strings.Contains(msg, c.want) || strings.Contains(msg, "\n") {
			t.Errorf("%v: exit %d, stderr %q; want exit %d and one line containing %q", c.args, r.code, msg, c.code, c.want)
		}
	}
}
