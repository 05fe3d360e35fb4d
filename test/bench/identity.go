package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// identity is who runs a mount group: the mounts, the tools that read
// them and their unmounts. An ordinary user's mount takes other paths
// than root's: fusermount3 instead of mount(2), the kernel's readahead
// window left at 128 KiB (so the cache reads ahead itself), no
// processor governor.
type identity struct {
	name string              // "user" or "root", as the table shows it
	cred *syscall.Credential // nil: the benchmark's own
	dir  string              // where it may make mount points and pid files
	// calls runs functions on a thread with id's credentials (see
	// userThread); nil for the benchmark's own.
	calls chan<- func()
}

// command is exec.Command run as id.
func (id *identity) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	if id.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: id.cred}
	}
	return cmd
}

// do runs fn in this process as id (FUSE lets only the mounting user
// into a mount).
func (id *identity) do(fn func() error) error {
	if id.calls == nil {
		return fn()
	}
	errc := make(chan error, 1)
	id.calls <- func() { errc <- fn() }
	return <-errc
}

// The main goroutine keeps the main thread, so that the ordinary user's
// thread (userThread) is never the main thread: that one cannot end, and
// its ids are what /proc shows as the process's (userdel would refuse).
func init() { runtime.LockOSThread() }

// userThread starts a goroutine locked to a thread whose credentials
// become cred's, and returns the channel of functions it runs. FUSE
// checks the real, effective and saved ids, so the thread cannot become
// root again: it stays locked, and runs nothing else, for the whole
// run. (A thread that ended would also send its parent-death signal to
// children started from it, such as a foreground nbdfuse.)
func userThread(cred *syscall.Credential) (chan<- func(), error) {
	calls := make(chan func())
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		uid, gid := uintptr(cred.Uid), uintptr(cred.Gid)
		for _, call := range [][4]uintptr{
			{syscall.SYS_SETGROUPS, 0, 0, 0},
			{syscall.SYS_SETRESGID, gid, gid, gid},
			{syscall.SYS_SETRESUID, uid, uid, uid},
		} {
			if _, _, e := syscall.RawSyscall(call[0], call[1], call[2], call[3]); e != 0 {
				errc <- fmt.Errorf("becoming %s: %v", benchUser, e)
				return
			}
		}
		errc <- nil
		for fn := range calls {
			fn()
		}
	}()
	return calls, <-errc
}

// stopUserThread ends id's thread and waits (a few seconds at most) until
// the kernel has let it go.
func stopUserThread(id *identity) {
	close(id.calls)
	uid := fmt.Sprintf("Uid:\t%d\t", id.cred.Uid)
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		tasks, _ := filepath.Glob("/proc/self/task/*/status")
		found := false
		for _, t := range tasks {
			if b, err := os.ReadFile(t); err == nil && strings.Contains(string(b), uid) {
				found = true
			}
		}
		if !found {
			return
		}
	}
}

// self is the benchmark's own process as an identity.
func (b *bench) self() *identity { return &identity{name: "root", dir: b.cfg.dir} }

// benchUser is the system account the benchmark makes for its ordinary
// user's rows (and deletes afterwards, if it made it).
const benchUser = "snapmount-bench"

// setupIdentities decides who runs the mount groups (b.ids, the ordinary
// user first) and prepares the ordinary user: the account, /dev/fuse
// readable and writable by all as desktops ship it, and a directory of
// its own. The returned function undoes it; so does fatalf or a signal.
func (b *bench) setupIdentities() func() {
	if os.Geteuid() != 0 {
		// Without root there is only the caller, an ordinary user.
		b.logf("note: not root: the mount groups run as this user only")
		b.ids = []*identity{{name: "user", dir: b.cfg.dir}}
		return func() {}
	}
	if b.cfg.as["user"] {
		b.ids = append(b.ids, b.ordinaryUser())
	}
	if b.cfg.as["root"] {
		b.ids = append(b.ids, b.self())
	}
	if len(b.ids) == 0 {
		fatalf("--as wants user, root or both")
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		s := <-sigs
		b.logf("bench: %v: restoring /dev/fuse and the user accounts", s)
		runAtExit()
		os.Exit(1)
	}()
	return runAtExit
}

// ordinaryUser makes (or reuses) benchUser and returns it as an
// identity; what it changes is undone by runAtExit.
func (b *bench) ordinaryUser() *identity {
	u, err := user.Lookup(benchUser)
	var unknown user.UnknownUserError
	if errors.As(err, &unknown) {
		out, err := exec.Command("useradd", "--system", "--user-group", "--no-create-home",
			"--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", benchUser).CombinedOutput()
		if err != nil {
			fatalf("useradd %s: %v: %s", benchUser, err, out)
		}
		atExit = append(atExit, func() {
			// The user's last processes (an unmounted mount's, our own
			// thread of it) may take a moment to go: userdel refuses a
			// busy user with status 8.
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
				out, err := exec.Command("userdel", benchUser).CombinedOutput()
				var ee *exec.ExitError
				if err == nil || !errors.As(err, &ee) || ee.ExitCode() != 8 || time.Now().After(deadline) {
					if err != nil {
						b.logf("userdel %s: %v: %s", benchUser, err, out)
					}
					return
				}
			}
		})
	}
	if err != nil {
		u, err = user.Lookup(benchUser)
	}
	if err != nil {
		fatalf("looking up %s: %v", benchUser, err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	id := &identity{name: "user", cred: &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}}
	if id.calls, err = userThread(id.cred); err != nil {
		fatalf("%v", err)
	}
	// Before userdel, which refuses while a thread of ours is the user.
	atExit = append(atExit, func() { stopUserThread(id) })

	// /dev/fuse as desktops ship it; CI machines have 0600.
	st, err := os.Stat("/dev/fuse")
	if err != nil {
		fatalf("/dev/fuse: %v", err)
	}
	if mode := st.Mode().Perm(); mode != 0o666 {
		if err := os.Chmod("/dev/fuse", 0o666); err != nil {
			fatalf("%v", err)
		}
		atExit = append(atExit, func() {
			if err := os.Chmod("/dev/fuse", mode); err != nil {
				b.logf("restoring /dev/fuse's mode %o: %v", mode, err)
			}
		})
	}

	// The user reaches the servers' sockets in the work directory and
	// owns a directory of its own in it.
	if err := os.Chmod(b.cfg.dir, 0o711); err != nil {
		fatalf("%v", err)
	}
	id.dir = filepath.Join(b.cfg.dir, "user")
	if err := os.Mkdir(id.dir, 0o755); err != nil && !os.IsExist(err) {
		fatalf("%v", err)
	}
	if err := os.Chown(id.dir, int(uid), int(gid)); err != nil {
		fatalf("%v", err)
	}
	b.logf("ordinary user: %s (uid %d), /dev/fuse mode 0666", benchUser, uid)
	return id
}
