// Package testenv holds what snapmount's tests need of the machine they
// run on: the peers and FUSE they require (a test without them skips with
// the reason, or fails when SNAPMOUNT_REQUIRE_PEERS=1, as CI sets it),
// short temporary directories for Unix sockets, the unprivileged user and
// the /dev/fuse mode for tests that mount as that user, and small helpers
// several packages' tests share. Only tests import it.
package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// RequirePeers reports whether a missing prerequisite must fail the test
// instead of skipping it (SNAPMOUNT_REQUIRE_PEERS=1).
func RequirePeers() bool { return os.Getenv("SNAPMOUNT_REQUIRE_PEERS") == "1" }

// SkipOrFail skips the test with the reason, or fails it when
// SNAPMOUNT_REQUIRE_PEERS=1.
func SkipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if RequirePeers() {
		t.Fatalf("%s (SNAPMOUNT_REQUIRE_PEERS=1 turns this skip into a failure)", msg)
	}
	t.Skip(msg)
}

// RequireCmd skips (or fails) unless every named program is on PATH.
func RequireCmd(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		if _, err := exec.LookPath(n); err != nil {
			SkipOrFail(t, "%s is not installed (apt-get install %s)", n, debianPackage(n))
		}
	}
}

// debianPackage names the package that installs a program.
func debianPackage(cmd string) string {
	switch cmd {
	case "qemu-nbd", "qemu-img", "qemu-io":
		return "qemu-utils"
	case "qemu-storage-daemon":
		return "qemu-system-common"
	case "nbdinfo", "nbdcopy", "nbdfuse", "nbdsh":
		return "libnbd-bin"
	case "fusermount3":
		return "fuse3"
	case "useradd":
		return "passwd"
	case "certtool":
		return "gnutls-bin"
	case "sfdisk":
		return "fdisk"
	case "mkfs.ext4", "debugfs", "dumpe2fs", "e2fsck":
		return "e2fsprogs"
	case "mmls", "fls", "ifind", "icat":
		return "sleuthkit"
	}
	return cmd
}

// RequireFUSE skips (or fails) unless /dev/fuse and fusermount3 exist.
func RequireFUSE(t testing.TB) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		SkipOrFail(t, "/dev/fuse is missing, FUSE mounts are impossible here: %v", err)
	}
	RequireCmd(t, "fusermount3")
}

// ShortTempDir returns a new temporary directory, removed when the test
// ends, whose path is short enough for Unix sockets (107 bytes at most;
// t.TempDir's paths can be longer).
func ShortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "sm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// TestUser is the unprivileged account tests mount and read as. It is
// created when missing and left in place: another run may be using it.
const TestUser = "snapmount-test"

// UnprivilegedUser returns the uid and gid of TestUser, creating it (a
// system account without home or login shell) if needed. Only root can:
// for anyone else the test skips (or fails).
func UnprivilegedUser(t testing.TB) (uid, gid uint32) {
	t.Helper()
	if os.Geteuid() != 0 {
		SkipOrFail(t, "must run as root to create the user %s and run processes as that user", TestUser)
	}
	u, err := user.Lookup(TestUser)
	if errors.As(err, new(user.UnknownUserError)) {
		RequireCmd(t, "useradd")
		out, aerr := exec.Command("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TestUser).CombinedOutput()
		// Another package's test may have created it meanwhile.
		if u, err = user.Lookup(TestUser); err != nil {
			t.Fatalf("useradd %s: %v: %s", TestUser, aerr, out)
		}
	}
	if err != nil {
		t.Fatalf("looking up %s: %v", TestUser, err)
	}
	id, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	g, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(id), uint32(g)
}

// OpenDevFuse makes /dev/fuse usable by every user while the test runs,
// as desktop distributions ship it (0666), and puts the old mode back
// once no test needs it any more. Tests of several packages (processes)
// do this at once, so they share the work through files next to each
// other in the temporary directory: each test holds a shared lock on the
// users file while it needs the mode; the first to find the mode narrow
// saves it in the mode file and widens it, and the last to leave puts it
// back. An exclusive lock on the guard file orders these steps, so tests
// that run as the unprivileged user still run in parallel.
func OpenDevFuse(t testing.TB) {
	t.Helper()
	widenMode(t, "/dev/fuse", filepath.Join(os.TempDir(), "snapmount-dev-fuse"))
}

// widenMode makes path readable and writable by all until the last test
// that asked is done, with the files prefix.lock, prefix.users and
// prefix.mode (see OpenDevFuse).
func widenMode(t testing.TB, path, prefix string) {
	t.Helper()
	guard := lockFile(t, prefix+".lock")
	defer guard.Close()
	users, err := os.OpenFile(prefix+".users", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	saved := prefix + ".mode"
	st, err := os.Stat(path)
	if err != nil {
		users.Close()
		SkipOrFail(t, "%s is missing, FUSE mounts are impossible here: %v", path, err)
	}
	if old := st.Mode().Perm(); old&0o666 != 0o666 {
		if err := os.WriteFile(saved, []byte(strconv.FormatUint(uint64(old), 8)), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, old|0o666); err != nil {
			t.Fatalf("chmod %s: %v", path, err)
		}
	}
	if err := syscall.Flock(int(users.Fd()), syscall.LOCK_SH); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		guard := lockFile(t, prefix+".lock")
		defer guard.Close()
		defer users.Close()
		syscall.Flock(int(users.Fd()), syscall.LOCK_UN)
		if syscall.Flock(int(users.Fd()), syscall.LOCK_EX|syscall.LOCK_NB) != nil {
			return // another test still needs the mode
		}
		b, err := os.ReadFile(saved)
		if err != nil {
			return // the mode was wide before us
		}
		mode, err := strconv.ParseUint(string(b), 8, 32)
		if err != nil {
			t.Errorf("%s holds %q, not a mode", saved, b)
			return
		}
		if err := os.Chmod(path, os.FileMode(mode)); err != nil {
			t.Errorf("restoring the mode of %s: %v", path, err)
		}
		os.Remove(saved)
	})
}

// lockFile opens path and takes an exclusive lock on it, which closing
// the file releases.
func lockFile(t testing.TB, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		t.Fatal(err)
	}
	return f
}

// SparseFile makes a file at path of size bytes that holds no data: one
// hole, as the tests' disk images start.
func SparseFile(t testing.TB, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

// DirNames returns the names in dir, sorted.
func DirNames(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// CheckPageCache reads the file at path twice, each pass through an open
// of its own, and fails unless both passes give want, the first fetched
// all of it from the file system below the page cache and the second
// fetched, if kept (the file system keeps the page cache across opens,
// FOPEN_KEEP_CACHE), none of it, else all of it again. fetched returns
// how many bytes the file system has fetched so far, e.g. from its reader
// or its server.
func CheckPageCache(t testing.TB, path string, want []byte, kept bool, fetched func() int64) {
	t.Helper()
	for pass := 1; pass <= 2; pass++ {
		before := fetched()
		got, err := os.ReadFile(path)
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s, pass %d: %d bytes (%v), not the %d expected", path, pass, len(got), err, len(want))
		}
		n := fetched() - before
		switch {
		case pass == 1 && n < int64(len(want)):
			t.Errorf("%s: the first pass fetched %d bytes, want >= %d", path, n, len(want))
		case pass == 2 && kept && n != 0:
			t.Errorf("%s: the second pass fetched %d bytes, want 0 (the page cache kept across opens)", path, n)
		case pass == 2 && !kept && n < int64(len(want)):
			t.Errorf("%s: the second pass fetched %d bytes, want >= %d (the page cache dropped at open)", path, n, len(want))
		}
	}
}

// SocketPair returns two connected Unix stream sockets, closed when the
// test ends: a real, buffered, bidirectional stream (net.Pipe is
// synchronous and would deadlock a pipelined protocol).
func SocketPair(t testing.TB) (net.Conn, net.Conn) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		conns[i] = c
		t.Cleanup(func() { c.Close() })
	}
	return conns[0], conns[1]
}

// Dial connects to addr, closes the connection when the test ends, and
// gives every read and write on it a deadline a minute away, so that a
// peer that stops answering fails the test instead of hanging it.
func Dial(t testing.TB, network, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(time.Minute))
	return c
}

// WaitLimit bounds every wait in a test: far above what a working test
// needs, so that it only turns a hang into a failure saying what hung.
const WaitLimit = time.Minute

// Receive returns the next value from ch (the zero value once ch is
// closed), or fails the test if none comes within WaitLimit; what says
// what the test waited for.
func Receive[T any](t testing.TB, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(WaitLimit):
		t.Fatalf("waited %v for %s", WaitLimit, what)
	}
	var zero T
	return zero
}

// Wait waits for wg, or fails the test after WaitLimit; what says what
// the test waited for.
func Wait(t testing.TB, wg *sync.WaitGroup, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	Receive(t, done, what)
}

// Buffer is a bytes.Buffer that a process or goroutine may write while
// the test reads it, and whose writes a test can wait for.
type Buffer struct {
	mu      sync.Mutex
	b       bytes.Buffer
	changed chan struct{} // closed by the next Write; nil until asked for
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.changed != nil {
		close(b.changed)
		b.changed = nil
	}
	return b.b.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// Changed returns a channel that the next Write closes. Take it before
// looking at the content, so that no write falls in between.
func (b *Buffer) Changed() <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.changed == nil {
		b.changed = make(chan struct{})
	}
	return b.changed
}

// Gate is an io.ReaderAt of zeros that holds every read until Open, so
// that a test can keep reads in flight; each read announces itself on
// Entered as it arrives.
type Gate struct {
	Entered chan struct{}
	open    chan struct{}
}

// NewGate returns a closed gate whose Entered holds n announcements.
func NewGate(n int) *Gate {
	return &Gate{Entered: make(chan struct{}, n), open: make(chan struct{})}
}

// Open lets every read through, those waiting and those to come.
func (g *Gate) Open() { close(g.open) }

func (g *Gate) ReadAt(p []byte, off int64) (int, error) {
	g.Entered <- struct{}{}
	<-g.open
	clear(p)
	return len(p), nil
}

// HoldReads starts n O_DIRECT reads of 4 KiB, 64 KiB apart, of the file
// at path, served by a mount whose reader is g, and waits until all of
// them are held at the gate. It returns a function that opens the gate
// and waits for the reads to succeed; if the test ends first, the gate
// is opened in t.Cleanup so that the mount can go.
func HoldReads(t testing.TB, path string, g *Gate, n int) (finish func()) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	var open sync.Once
	t.Cleanup(func() {
		open.Do(g.Open)
		f.Close()
	})
	errs := make(chan error, n)
	for i := range n {
		go func() {
			_, err := f.ReadAt(AlignedBuf(4096), int64(i)*65536)
			errs <- err
		}()
	}
	for range n {
		Receive(t, g.Entered, "the O_DIRECT reads to reach the reader")
	}
	return func() {
		t.Helper()
		open.Do(g.Open)
		for range n {
			if err := Receive(t, errs, "the reads to return once the gate opened"); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// AlignedBuf returns a page-aligned buffer of n bytes, as O_DIRECT wants.
func AlignedBuf(n int) []byte {
	const page = 4096
	b := make([]byte, n+page)
	off := int(uintptr(unsafe.Pointer(&b[0])) & (page - 1))
	if off != 0 {
		off = page - off
	}
	return b[off : off+n]
}
