package test

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// mountSM runs `snapmount mount URI DIR extra...` in the default
// background mode, which returns once the file is readable, and unmounts
// in t.Cleanup, checking that nothing of ours stays in /proc/mounts.
func mountSM(t testing.TB, uri, dir string, extra ...string) {
	t.Helper()
	testenv.RequireFUSE(t)
	args := append([]string{"mount"}, extra...)
	args = append(args, uri, dir)
	r := snapmount(t, time.Minute, args...)
	if r.code != 0 {
		t.Fatalf("snapmount %s: exit %d: %s", strings.Join(args, " "), r.code, r.stderr)
	}
	t.Cleanup(func() { unmountSM(t, dir) })
}

// unmountSM unmounts dir with snapmount umount (which waits for the mount
// process) unless it is already gone, and fails if it stays mounted.
func unmountSM(t testing.TB, dir string) {
	t.Helper()
	if isMounted(dir) {
		if r := snapmount(t, time.Minute, "umount", dir); r.code != 0 {
			t.Errorf("umount %s: exit %d: %s", dir, r.code, r.stderr)
			_ = exec.Command("fusermount3", "-u", "-z", dir).Run()
		}
	}
	if isMounted(dir) {
		t.Errorf("%s is still mounted", dir)
	}
}

// isMounted reports whether /proc/mounts lists a mount at dir.
func isMounted(dir string) bool {
	f, err := os.Open("/proc/mounts")
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 2 && fields[1] == dir {
			return true
		}
	}
	return false
}

// mountDir makes an empty mountpoint.
func mountDir(t testing.TB, parent, name string) string {
	t.Helper()
	dir := filepath.Join(parent, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// checkReadOnlyFile checks the mounted file's mode, size and that every
// way of changing it fails with EROFS.
func checkReadOnlyFile(t *testing.T, path string, size int64) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != size || st.Mode().Perm() != 0o444 || !st.Mode().IsRegular() {
		t.Errorf("%s: size %d mode %v, want %d and -r--r--r--", path, st.Size(), st.Mode(), size)
	}
	for name, op := range map[string]func() error{
		"open for writing": func() error {
			f, err := os.OpenFile(path, os.O_WRONLY, 0)
			if err == nil {
				f.Close()
			}
			return err
		},
		"truncate": func() error { return os.Truncate(path, 0) },
		"chmod":    func() error { return os.Chmod(path, 0o666) },
		"create":   func() error { return os.WriteFile(filepath.Join(filepath.Dir(path), "new"), nil, 0o644) },
		"remove":   func() error { return os.Remove(path) },
	} {
		if err := op(); !errors.Is(err, syscall.EROFS) {
			t.Errorf("%s: got %v, want EROFS", name, err)
		}
	}
}

// Mounts of every stock server give the image byte for byte, read-only.
func TestMountStockServers(t *testing.T) {
	for _, s := range []struct {
		name  string
		start peerStarter
		file  string
	}{
		{"nbdkit", nbdkitPeer("-r"), "nbd"},
		{"nbdkit-no-sr", nbdkitPeer("-r", "--no-sr"), "nbd"},
		{"qemu-nbd", qemuNbdPeer, "disk"},
		{"nbd-server", nbdServerPeer, "disk"},
	} {
		t.Run(s.name, func(t *testing.T) {
			testenv.RequireFUSE(t)
			dir := testenv.ShortTempDir(t)
			image := filepath.Join(dir, "disk.img")
			writeSparseImage(t, image, 20<<20, [][2]int64{{0, 3 << 20}, {9 << 20, 2<<20 + 4096}, {19 << 20, 1 << 20}}, 21)
			srv := s.start(t, dir, image)
			mnt := mountDir(t, dir, "mnt")
			mountSM(t, srv.uri, mnt)
			file := filepath.Join(mnt, s.file)
			if got, want := fileSHA256(t, file), fileSHA256(t, image); got != want {
				t.Fatalf("sha256 of the mounted file %s, want %s", got, want)
			}
			checkReadOnlyFile(t, file, 20<<20)
			if m := mountOptions(t, mnt); !strings.Contains(m, "fuse.snapmount ro,") {
				t.Errorf("mount is not read-only: %s", m)
			}
		})
	}
}

// mountOptions returns the /proc/mounts line of the mount at dir.
func mountOptions(t testing.TB, dir string) string {
	b, err := os.ReadFile("/proc/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 3 && f[1] == dir {
			return strings.Join(f[2:4], " ")
		}
	}
	return ""
}

// A whole mount session, reads and refused writes included, sends the
// server nothing but reads and block-status queries, even when the export
// is writable.
func TestMountSendsNoWrites(t *testing.T) {
	testenv.RequireFUSE(t)
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeSparseImage(t, image, 16<<20, [][2]int64{{2 << 20, 4 << 20}}, 4)
	logfile := filepath.Join(dir, "requests.log")
	sock, srv := startNbdkit(t, dir, "--filter=log", "file", image, "logfile="+logfile)
	mnt := mountDir(t, dir, "mnt")
	// Writable export, stock server: the mount refuses unless allowed.
	r := snapmount(t, time.Minute, "mount", unixURI("", sock), mnt)
	if r.code != 3 || !strings.Contains(r.stderr, "--allow-writable") || isMounted(mnt) {
		t.Fatalf("mount of a writable export without a promise: exit %d, %q", r.code, r.stderr)
	}
	mountSM(t, unixURI("", sock), mnt, "--allow-writable")
	file := filepath.Join(mnt, "nbd")
	if fileSHA256(t, file) != fileSHA256(t, image) {
		t.Fatal("mounted data differ")
	}
	checkReadOnlyFile(t, file, 16<<20)
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	_ = f.Sync() // fsync on the read-only file must not become a FLUSH either
	f.Close()
	unmountSM(t, mnt)
	srv.stop()
	verbs := logVerbs(t, logfile)
	for v, n := range verbs {
		switch v {
		case "Connect", "Disconnect", "Read", "Extents":
		default:
			t.Errorf("the mount sent %d %s request(s)", n, v)
		}
	}
	if verbs["Read"] == 0 {
		t.Errorf("no reads logged: %v", verbs)
	}
}

// The mount command returns with the file readable, and after umount
// nothing is mounted and the mount process has exited.
func TestMountReadinessAndUmount(t *testing.T) {
	testenv.RequireFUSE(t)
	dir, _, sock := nbdkitImage(t, 4<<20, 8)
	mnt := mountDir(t, dir, "mnt")
	pidfile := filepath.Join(dir, "mount.pid")
	r := snapmount(t, time.Minute, "mount", "--pidfile", pidfile, "--name", "evidence.raw", unixURI("", sock), mnt)
	if r.code != 0 {
		t.Fatalf("mount: %d %s", r.code, r.stderr)
	}
	t.Cleanup(func() { unmountSM(t, mnt) })
	if !strings.Contains(r.stderr, "warning: this server does not say whether") || strings.Count(r.stderr, "warning") != 1 {
		t.Errorf("a view that may be live must be warned about exactly once: %q", r.stderr)
	}
	// No waiting: the file is there and readable the moment mount returns.
	head := make([]byte, 4096)
	f, err := os.Open(filepath.Join(mnt, "evidence.raw"))
	if err != nil {
		t.Fatalf("file not there when mount returned: %v", err)
	}
	if _, err := f.ReadAt(head, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	b, err := os.ReadFile(pidfile)
	if err != nil {
		t.Fatalf("pidfile: %v", err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	st := snapmount(t, time.Minute, "stats", mnt)
	if st.code != 0 || !strings.Contains(st.stdout, fmt.Sprintf("pid:            %d", pid)) || !strings.Contains(st.stdout, "connections:    4 of 4 alive") {
		t.Errorf("stats: %d %q %q", st.code, st.stdout, st.stderr)
	}
	// The mount runs with one Go processor more than a Go program's
	// default here (tuneMountRuntime), unless the environment sets one.
	if os.Getenv("GOMAXPROCS") == "" && !strings.Contains(st.stdout, fmt.Sprintf(", %d Go processors", defaultProcs+1)) {
		t.Errorf("stats do not show %d Go processors: %q", defaultProcs+1, st.stdout)
	}
	if r := snapmount(t, time.Minute, "umount", mnt); r.code != 0 {
		t.Fatalf("umount: %d %s", r.code, r.stderr)
	}
	if isMounted(mnt) {
		t.Fatal("still mounted after umount")
	}
	if processRunning(pid) {
		t.Errorf("mount process %d still running after umount returned", pid)
	}
	if _, err := os.Stat(pidfile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pidfile left behind: %v", err)
	}
}

// In the foreground, SIGTERM unmounts cleanly and the process exits 0.
func TestMountForegroundSignal(t *testing.T) {
	testenv.RequireFUSE(t)
	dir, image, sock := nbdkitImage(t, 1<<20, 2)
	mnt := mountDir(t, dir, "mnt")
	p := startProc(t, snapmountBin, "mount", "-f", "-v", unixURI("", sock), mnt)
	p.waitOutput("mounted ", 30*time.Second)
	t.Cleanup(func() { unmountSM(t, mnt) })
	if got := fileSHA256(t, filepath.Join(mnt, "nbd")); got != fileSHA256(t, image) {
		t.Fatal("data differ")
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	if err := p.waitExit(30 * time.Second); err != nil {
		t.Fatalf("after SIGTERM: %v\n%s", err, p.out.String())
	}
	if isMounted(mnt) {
		t.Fatal("still mounted after SIGTERM")
	}
	if !strings.Contains(p.out.String(), "counters:") {
		t.Errorf("-v did not log the counters at unmount:\n%s", p.out.String())
	}
}

// SIGTERM with a file open and its server healthy lets the reader go on:
// the mount is detached, the reader gets all the data, not EIO, and the
// process ends once the file is closed. A second signal ends it at once.
func TestMountSignalLetsReadersFinish(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	dir, image, sock := nbdkitImage(t, 32<<20, 4)
	mount := func(name string) (*proc, *os.File) {
		mnt := mountDir(t, dir, name)
		p := startProc(t, snapmountBin, "mount", "-f", "--timeout", "3s", unixURI("", sock), mnt)
		p.waitOutput("mounted ", 30*time.Second)
		t.Cleanup(func() { // a mount the test left behind
			if isMounted(mnt) {
				_ = exec.Command("fusermount3", "-u", "-z", mnt).Run()
			}
		})
		f, err := os.Open(filepath.Join(mnt, "nbd"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return p, f
	}

	p, f := mount("mnt")
	h := sha256.New()
	if _, err := io.CopyN(h, f, 4096); err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.waitOutput("is still open: detaching", 30*time.Second)
	if _, err := io.Copy(h, f); err != nil {
		t.Fatalf("reading on after SIGTERM, with the server healthy: %v", err)
	}
	if got, want := hex.EncodeToString(h.Sum(nil)), fileSHA256(t, image); got != want {
		t.Errorf("read after SIGTERM: SHA-256 %s, want the image's %s", got, want)
	}
	f.Close()
	if err := p.waitExit(30 * time.Second); err != nil {
		t.Errorf("the mount process, its file closed after SIGTERM: %v", err)
	}

	p, _ = mount("mnt2")
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.waitOutput("is still open: detaching", 30*time.Second)
	p.cmd.Process.Signal(syscall.SIGTERM)
	testenv.Receive(t, p.exited, "the mount process to end at a second SIGTERM")
	if ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGTERM {
		t.Errorf("the mount process at a second SIGTERM: %v, want killed by it", p.cmd.ProcessState)
	}
}

// crashedMount mounts nbdkit's image of seed and kills the mount process,
// as a crash would: the kernel keeps a dead mount ("transport endpoint is
// not connected"), removed when the test ends if still there.
func crashedMount(t *testing.T, seed int64) (image, sock, mnt string) {
	t.Helper()
	testenv.RequireFUSE(t)
	dir, image, sock := nbdkitImage(t, 1<<20, seed)
	mnt = mountDir(t, dir, "mnt")
	p := startProc(t, snapmountBin, "mount", "-f", unixURI("", sock), mnt)
	p.waitOutput("mounted ", 30*time.Second)
	t.Cleanup(func() {
		if isMounted(mnt) {
			_ = exec.Command("fusermount3", "-u", "-z", mnt).Run()
		}
	})
	p.kill()
	return image, sock, mnt
}

// A mountpoint left by a crashed run (ENOTCONN) is recovered.
func TestMountStaleMountpoint(t *testing.T) {
	image, sock, mnt := crashedMount(t, 3)
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(mnt, &sfs); !errors.Is(err, syscall.ENOTCONN) {
		t.Fatalf("after the crash statfs gives %v, want ENOTCONN", err)
	}
	mountSM(t, unixURI("", sock), mnt)
	if got := fileSHA256(t, filepath.Join(mnt, "nbd")); got != fileSHA256(t, image) {
		t.Fatal("data differ after recovering the stale mountpoint")
	}
}

func TestMountBadInput(t *testing.T) {
	testenv.RequireFUSE(t)
	dir, image, sock := nbdkitImage(t, 1<<20, 3)
	uri := unixURI("", sock)
	full := mountDir(t, dir, "full")
	os.WriteFile(filepath.Join(full, "x"), nil, 0o644)
	busy := mountDir(t, dir, "busy")
	mountSM(t, uri, busy)
	empty := mountDir(t, dir, "empty")
	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{uri, filepath.Join(dir, "missing")}, 4, "does not exist"},
		{[]string{uri, image}, 4, "not a directory"},
		{[]string{uri, full}, 4, "not empty"},
		{[]string{uri, busy}, 4, "already a mount point"},
		{[]string{unixURI("", filepath.Join(dir, "nope.sock")), empty}, 3, "is the server running?"},
		{[]string{"nbd:/x", empty}, 2, "bad NBD URI"},
		{[]string{"--block-size", "3K", uri, empty}, 2, "--block-size"},
		{[]string{"--name", "a/b", uri, empty}, 2, "--name"},
		{[]string{uri}, 2, "want URI and MOUNTPOINT"},
	} {
		r := snapmount(t, time.Minute, append([]string{"mount"}, c.args...)...)
		msg := strings.TrimSpace(r.stderr)
		if r.code != c.code || !strings.Contains(msg, c.want) || strings.Contains(msg, "\n") {
			t.Errorf("mount %v: exit %d, stderr %q; want exit %d and one line with %q", c.args, r.code, msg, c.code, c.want)
		}
	}
	if isMounted(empty) {
		t.Error("a failed mount left something mounted")
	}
}

// nbdkit's error filter, switched on by a file: reads of the affected
// (uncached) ranges fail with EIO, everything else stays correct, and an
// error is not cached: once the fault is gone the same range reads fine.
func TestMountServerErrors(t *testing.T) {
	testenv.RequireFUSE(t)
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 8<<20, 6)
	want, _ := os.ReadFile(image)
	trigger := filepath.Join(dir, "fail-now")
	sock, _ := startNbdkit(t, dir, "-r", "--filter=error", "file", image,
		"error-pread=EIO", "error-pread-rate=100%", "error-pread-file="+trigger)
	mnt := mountDir(t, dir, "mnt")
	mountSM(t, unixURI("", sock), mnt, "--readahead", "0", "--timeout", "5s")
	f, err := os.Open(filepath.Join(mnt, "nbd"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, want[:len(buf)]) {
		t.Fatalf("healthy read: %v", err)
	}
	os.WriteFile(trigger, nil, 0o644)
	const far = 6 << 20
	if _, err := f.ReadAt(buf, far); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read while the server fails: %v, want EIO", err)
	}
	// Cached data is still served.
	if _, err := f.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, want[:len(buf)]) {
		t.Fatalf("cached read while the server fails: %v", err)
	}
	os.Remove(trigger)
	if _, err := f.ReadAt(buf, far); err != nil || !bytes.Equal(buf, want[far:far+len(buf)]) {
		t.Fatalf("read after the fault cleared: %v", err)
	}
}

// processRunning reports whether pid is alive. A zombie counts as ended:
// the background mount process is reparented to PID 1, which in some
// sandboxes never reaps.
func processRunning(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || (s[i+2] != 'Z' && s[i+2] != 'X')
}

// The mount process collects garbage at GOGC 200, so that starting a
// mount runs no collection. GODEBUG=gctrace=1 makes the runtime print a
// line per collection, with its heap goal: the first goal is 4 MB times
// GOGC/100, 4 MB at the default. (A mount built without -race usually
// starts, reads and ends without any; a -race build allocates more.)
func TestMountCollectsAtGOGC200(t *testing.T) {
	testenv.RequireFUSE(t)
	dir, _, sock := nbdkitImage(t, 1<<20, 3)
	mnt := mountDir(t, dir, "mnt")
	logfile := filepath.Join(dir, "mount.log")
	env := []string{"GODEBUG=gctrace=1"}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "GOGC=") && !strings.HasPrefix(kv, "GODEBUG=") {
			env = append(env, kv)
		}
	}
	// The log goes to a file, so the runtime's trace is alone on stderr.
	p := startProcEnv(t, env, snapmountBin, "mount", "-f", "--log", logfile, unixURI("", sock), mnt)
	waitForFile(t, logfile, "mounted ")
	t.Cleanup(func() { unmountSM(t, mnt) })
	f, err := os.Open(filepath.Join(mnt, "nbd"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.ReadAt(make([]byte, 4096), 0)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	unmountSM(t, mnt)
	if err := p.waitExit(30 * time.Second); err != nil {
		t.Fatalf("after unmount: %v", err)
	}
	m := regexp.MustCompile(`(\d+) MB goal`).FindStringSubmatch(p.out.String())
	if m == nil {
		return // no collection at all
	}
	if goal, _ := strconv.Atoi(m[1]); goal < 8 {
		t.Errorf("the mount's first collection had a heap goal of %d MB, want 8 (GOGC 200):\n%s", goal, p.out.String())
	}
}
