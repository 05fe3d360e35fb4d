package test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"snapmount/fusefs"
	"snapmount/test/testenv"
)

// The failure bound of issue 14, end to end: with --timeout 3s, whatever
// the kernel makes of a read and however many readers there are, each
// read of data the mount does not hold fails with EIO within the timeout
// (plus boundSlack) of the server going away or stopping.
const (
	boundTimeout = 3 * time.Second
	boundSlack   = 2 * time.Second
)

// readOutcome is how a reader process ended.
type readOutcome struct {
	what  string
	ended time.Time
	code  int
	out   string
}

// startRead reads 64 KiB of path at off with dd, as a, through the page
// cache or with O_DIRECT; the outcome arrives on the channel.
func (a *account) startRead(t testing.TB, what, path string, off int64, direct bool) <-chan readOutcome {
	t.Helper()
	args := []string{"if=" + path, "of=/dev/null", "bs=64k", fmt.Sprintf("skip=%d", off/(64<<10)), "count=1", "status=none"}
	if direct {
		args = append(args, "iflag=direct")
	}
	return a.start(t, what, "dd", args...)
}

// startStream reads n MiB of path from off MiB on with dd, as a, again
// and again until a read fails; the outcome arrives on the channel.
func (a *account) startStream(t testing.TB, what, path string, off, n int) <-chan readOutcome {
	t.Helper()
	return a.start(t, what, "sh", "-c", `while dd if="$1" of=/dev/null bs=1M skip=$2 count=$3 status=none; do :; done; exit 1`,
		"sh", path, strconv.Itoa(off), strconv.Itoa(n))
}

// start runs a command as a; its outcome arrives on the channel.
func (a *account) start(t testing.TB, what, name string, args ...string) <-chan readOutcome {
	t.Helper()
	cmd := a.command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	ch := make(chan readOutcome, 1)
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	t.Cleanup(func() { cmd.Process.Kill() })
	go func() {
		err := cmd.Wait()
		o := readOutcome{what: what, ended: time.Now(), out: strings.TrimSpace(out.String())}
		if ee, ok := err.(*exec.ExitError); ok {
			o.code = ee.ExitCode()
		}
		ch <- o
	}()
	return ch
}

// boundScenario is one server, one fault, one user.
type boundScenario struct {
	server string // nbdkit or serve
	fault  syscall.Signal
	user   *account // nil: root, with the kernel readahead raised
}

// TestMountOutageBound kills (SIGKILL) or stops (SIGSTOP) nbdkit or
// snapmount serve under a mount made by root (kernel readahead 4 MiB) or
// by an ordinary user (128 KiB, the cache reading ahead), and then:
//
//   - a buffered read of a region never read, an O_DIRECT read and four
//     more buffered readers, all at once, each get EIO within the
//     timeout plus boundSlack of the fault, and the stats say why, while
//     data in the mount's cache is still served; and so does a reader
//     that streams the live view through a mount of one connection
//     without a cache, whose last replies arrive as the server stops;
//   - with the server restarted on the same socket, a live view reads
//     again without a remount, while a snapshot mount keeps failing with
//     EIO and its stats say the snapshot is gone, even though the
//     restarted snapmount serve has a new snapshot of the same name;
//   - with the server faulted again and a reader blocked on it,
//     'snapmount umount' ends the mount within seconds: the mount is gone,
//     its process has exited and the reader failed.
func TestMountOutageBound(t *testing.T) {
	t.Parallel() // it mostly waits for timeouts; nothing it changes is shared
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "nbdkit", "dd", "qemu-io")
	user := testUser(t) // root: the root scenarios need it too
	bin := user.bin
	// The scenarios mostly wait for timeouts: all of them run at once
	// (concurrent Runs, not t.Parallel, which -parallel would limit to
	// the number of CPUs).
	var wg sync.WaitGroup
	for _, sc := range []boundScenario{
		{"nbdkit", syscall.SIGKILL, nil}, {"nbdkit", syscall.SIGSTOP, nil},
		{"serve", syscall.SIGKILL, nil}, {"serve", syscall.SIGSTOP, nil},
		{"nbdkit", syscall.SIGKILL, user}, {"nbdkit", syscall.SIGSTOP, user},
		{"serve", syscall.SIGKILL, user}, {"serve", syscall.SIGSTOP, user},
	} {
		who := "root"
		if sc.user != nil {
			who = "user"
		}
		wg.Go(func() {
			t.Run(fmt.Sprintf("%s/%s/%s", sc.server, strings.ToUpper(unixSignalName(sc.fault)), who), func(t *testing.T) {
				testOutageBound(t, bin, sc)
			})
		})
	}
	// Each scenario bounds its own waits.
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(5 * testenv.WaitLimit):
		panic("the outage scenarios still run after 5 minutes") // t.Fatal would race with them
	}
}

func unixSignalName(s syscall.Signal) string {
	switch s {
	case syscall.SIGKILL:
		return "kill"
	case syscall.SIGSTOP:
		return "stop"
	}
	return s.String()
}

// boundServer is a server of the scenario on a fixed socket, restartable.
type boundServer struct {
	t           *testing.T
	kind, sock  string
	image       string
	p           *proc
	faultSignal syscall.Signal
}

func (s *boundServer) start() {
	s.t.Helper()
	os.Remove(s.sock)
	if s.kind == "nbdkit" {
		// Each read takes a while, as over a network: a reader that
		// streams has requests in flight, some answered, when the
		// fault comes.
		s.p = startProc(s.t, "nbdkit", "-f", "-r", "-U", s.sock, "--filter=delay", "file", s.image, "rdelay=20ms")
		s.p.waitReady("unix", s.sock)
	} else {
		s.p = startProc(s.t, snapmountBin, "serve", "--no-tcp", "--socket", s.sock, "disk="+s.image)
		s.p.waitOutput("listening on", time.Minute)
	}
	os.Chmod(s.sock, 0o666) // for the user's mounts
	p := s.p
	s.t.Cleanup(func() { p.cmd.Process.Signal(syscall.SIGCONT) }) // before stop's SIGTERM
}

// fault sends the scenario's signal to the server.
func (s *boundServer) fault() {
	if err := s.p.cmd.Process.Signal(s.faultSignal); err != nil {
		s.t.Fatal(err)
	}
	if s.faultSignal == syscall.SIGKILL {
		testenv.Receive(s.t, s.p.exited, "the killed server to exit")
		return
	}
	// A signal is delivered asynchronously: a thread of the server may
	// still answer a request until every thread has stopped.
	waitFor(s.t, "every thread of the stopped server to stop", func() bool {
		return allThreadsStopped(s.p.cmd.Process.Pid)
	})
}

// allThreadsStopped reports whether every thread of process pid is in the
// stopped state ('T' in /proc/PID/task/TID/stat).
func allThreadsStopped(pid int) bool {
	stats, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	if len(stats) == 0 {
		return false
	}
	for _, f := range stats {
		b, err := os.ReadFile(f)
		i := bytes.LastIndexByte(b, ')')
		if err != nil || i < 0 || i+2 >= len(b) || b[i+2] != 'T' {
			return false
		}
	}
	return true
}

// restart ends the faulted server and starts a new one on the socket.
func (s *boundServer) restart() {
	s.p.kill()
	s.start()
}

func testOutageBound(t *testing.T, bin string, sc boundScenario) {
	dir := testenv.ShortTempDir(t)
	os.Chmod(dir, 0o755)
	image := filepath.Join(dir, "disk.img")
	const size = 36 << 20
	writeRandomImage(t, image, size, int64(sc.fault))
	want, _ := os.ReadFile(image)
	srv := &boundServer{t: t, kind: sc.server, sock: filepath.Join(dir, "s.sock"), image: image, faultSignal: sc.fault}
	srv.start()

	// nbdkit serves a live view; on snapmount serve, "disk" is a
	// snapshot and "disk@live" a live view, mounted both. The live view
	// is mounted once more for the streaming reader, with one
	// connection and no cache: every read it makes goes to the server.
	type mount struct {
		dir, file string
		frozen    bool
	}
	var mounts []mount
	exports := []string{""}
	if sc.server == "serve" {
		exports = []string{"disk", "disk@live"}
	}
	exports = append(exports, exports[len(exports)-1])
	for i, export := range exports {
		var flags []string
		if i == len(exports)-1 {
			flags = []string{"--conns", "1", "--no-cache"}
		}
		mnt := filepath.Join(dir, fmt.Sprintf("m%d", i))
		if err := os.Mkdir(mnt, 0o755); err != nil {
			t.Fatal(err)
		}
		if sc.user != nil {
			os.Chown(mnt, int(sc.user.uid), int(sc.user.gid))
		}
		logfile := filepath.Join(dir, fmt.Sprintf("m%d.log", i))
		os.WriteFile(logfile, nil, 0o666)
		os.Chmod(logfile, 0o666) // the user's mount appends to it
		r := sc.user.run(t, bin, append([]string{"mount", "--log", logfile, "--timeout", boundTimeout.String(), unixURI(export, srv.sock), mnt}, flags...)...)
		if r.code != 0 {
			t.Fatalf("mount %q: exit %d: %s", export, r.code, r.stderr)
		}
		t.Cleanup(func() {
			if b, _ := os.ReadFile(logfile); t.Failed() {
				t.Logf("log of the mount of %q:\n%s", export, b)
			}
			if isMounted(mnt) {
				if r := sc.user.run(t, bin, "umount", "--lazy", mnt); r.code != 0 || isMounted(mnt) {
					exec.Command("fusermount3", "-u", "-z", mnt).Run()
				}
			}
		})
		name := "nbd"
		if export != "" {
			name = "disk"
		}
		mounts = append(mounts, mount{mnt, filepath.Join(mnt, name), i == 0 && sc.server == "serve"})
	}
	main, live, streamed := mounts[0], mounts[len(mounts)-2], mounts[len(mounts)-1]
	if sc.user == nil {
		if kra, err := fusefs.KernelReadahead(main.dir); err != nil || kra < 1<<20 {
			t.Fatalf("root's mount has a kernel readahead of %d bytes (%v), want it raised", kra, err)
		}
	}
	// The first MiB, read twice, is in the mount's cache (the second
	// miss admits a block), which O_DIRECT reads reach past the kernel's.
	head := []string{"if=" + main.file, "bs=64k", "count=16", "iflag=direct", "status=none"}
	for range 2 {
		if r := sc.user.run(t, "dd", head...); r.code != 0 || r.stdout != string(want[:1<<20]) {
			t.Fatalf("read with the server up: exit %d %s", r.code, r.stderr)
		}
	}

	// 1. The fault, while two readers stream (each half of the file:
	// the replies of one arrive while the other's requests wait), then
	// six readers of regions never read, all at once.
	reads := []<-chan readOutcome{
		sc.user.startStream(t, "streaming reader 0", streamed.file, 0, size>>21),
		sc.user.startStream(t, "streaming reader 1", streamed.file, size>>21, size>>21),
	}
	waitFor(t, "the streaming readers to read 4 MiB", func() bool {
		nbd, _ := mountStatsAs(t, sc.user, bin, streamed.dir)["nbd"].(map[string]any)
		return nbd["bytes_read"].(float64) >= 4<<20
	})
	srv.fault()
	faulted := time.Now()
	for i, off := range []int64{6 << 20, 11 << 20, 16 << 20, 21 << 20, 26 << 20, 31 << 20} {
		what, direct := fmt.Sprintf("buffered reader %d", i), false
		if i == 1 {
			what, direct = "O_DIRECT reader", true
		}
		reads = append(reads, sc.user.startRead(t, what, main.file, off, direct))
	}
	for _, ch := range reads {
		o := testenv.Receive(t, ch, "a reader to end")
		took := o.ended.Sub(faulted)
		t.Logf("%s: exit %d after %v: %s", o.what, o.code, took.Round(time.Millisecond), o.out)
		if o.code == 0 {
			t.Errorf("%s succeeded with the server down", o.what)
		} else if !strings.Contains(o.out, "Input/output error") {
			t.Errorf("%s failed otherwise than with EIO: %s", o.what, o.out)
		}
		if took > boundTimeout+boundSlack {
			t.Errorf("%s ended %v after the fault, more than the timeout %v plus %v", o.what, took.Round(time.Millisecond), boundTimeout, boundSlack)
		}
	}
	st := mountStatsAs(t, sc.user, bin, main.dir)
	if st["state"] != "server unreachable" {
		t.Errorf("stats after the reads failed: state %v (%v), want server unreachable", st["state"], st["state_detail"])
	}
	if r := sc.user.run(t, "dd", head...); r.code != 0 || r.stdout != string(want[:1<<20]) {
		t.Errorf("cached data with the server down: exit %d %s", r.code, r.stderr)
	}

	// 2. The server is back on the same socket.
	srv.restart()
	if sc.server == "serve" {
		// A new snapshot on the restarted server takes the old one's
		// number (disk@s1): the snapshot mount must not read it.
		mustRun(t, "qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", unixURI("disk@snapshot", srv.sock))
	}
	for _, m := range mounts {
		if m.frozen {
			waitOutageEnd(t, sc.user, bin, m.dir, "snapshot gone")
			if o := testenv.Receive(t, sc.user.startRead(t, "read of the gone snapshot", m.file, 6<<20, false), "the read of the gone snapshot"); o.code == 0 || !strings.Contains(o.out, "Input/output error") {
				t.Errorf("read of a snapshot that is gone: exit %d %s, want EIO", o.code, o.out)
			}
			text := sc.user.run(t, bin, "stats", m.dir)
			if !strings.Contains(text.stdout, "state:          snapshot gone") {
				t.Errorf("stats of a gone snapshot:\n%s", text.stdout)
			}
			continue
		}
		waitOutageEnd(t, sc.user, bin, m.dir, "connected")
		got := sc.user.run(t, "dd", "if="+m.file, "bs=64k", "skip=96", "count=1", "status=none")
		if got.code != 0 || got.stdout != string(want[6<<20:6<<20+64<<10]) {
			t.Errorf("live view after the server came back: exit %d, %s", got.code, got.stderr)
		}
		if nbd, _ := mountStatsAs(t, sc.user, bin, m.dir)["nbd"].(map[string]any); nbd["reconnects"].(float64) == 0 {
			t.Errorf("the stats count no reconnect: %v", nbd)
		}
	}

	// 3. umount with a reader blocked on the faulted server.
	pid := int(mountStatsAs(t, sc.user, bin, live.dir)["pid"].(float64))
	srv.fault()
	reader := sc.user.startRead(t, "blocked reader", live.file, 21<<20, false)
	waitFor(t, "the reader to wait for the server", func() bool {
		st := mountStatsAs(t, sc.user, bin, live.dir)
		nbd, _ := st["nbd"].(map[string]any)
		return st["state"] != "connected" || nbd["oldest_wait_ns"].(float64) > 0
	})
	began := time.Now()
	r := sc.user.run(t, bin, "umount", live.dir)
	took := time.Since(began)
	t.Logf("umount with a reader blocked: exit %d after %v: %s", r.code, took.Round(time.Millisecond), strings.TrimSpace(r.stderr))
	if r.code != 0 || isMounted(live.dir) {
		t.Errorf("umount with a reader blocked: exit %d, %s; mounted: %v", r.code, r.stderr, isMounted(live.dir))
	}
	if took > 5*time.Second {
		t.Errorf("umount with a reader blocked took %v", took)
	}
	if processRunning(pid) {
		t.Errorf("the mount process %d still runs after umount returned", pid)
	}
	if o := testenv.Receive(t, reader, "the blocked reader to end"); o.code == 0 || !strings.Contains(o.out, "Input/output error") {
		t.Errorf("the blocked reader: exit %d %s, want EIO", o.code, o.out)
	}
}

// mountStatsAs reads a mount's stats as a.
func mountStatsAs(t *testing.T, a *account, bin, mnt string) map[string]any {
	t.Helper()
	r := a.run(t, bin, "stats", "--json", mnt)
	var m map[string]any
	if r.code != 0 || json.Unmarshal([]byte(r.stdout), &m) != nil {
		t.Fatalf("stats %s: exit %d: %s%s", mnt, r.code, r.stdout, r.stderr)
	}
	return m
}

// waitOutageEnd waits until the mount's stats no longer say that it is
// without its server, and fails unless they then say state.
func waitOutageEnd(t *testing.T, a *account, bin, mnt, state string) {
	t.Helper()
	for deadline := time.Now().Add(testenv.WaitLimit); ; {
		st := mountStatsAs(t, a, bin, mnt)
		switch st["state"] {
		case "server unreachable", "reconnecting":
		case state:
			return
		default:
			t.Fatalf("%s is %v (%v) once the server is back, want %s", mnt, st["state"], st["state_detail"], state)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is still %v (%v) after %v, not %s", mnt, st["state"], st["state_detail"], testenv.WaitLimit, state)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitFor polls cond until it holds, for testenv.WaitLimit at most.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(testenv.WaitLimit); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", testenv.WaitLimit, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
