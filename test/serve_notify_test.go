package test

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// A service manager (systemd, Type=notify) learns when serve is ready and
// when it stops: a fake notify socket, named by a path or abstract ('@'),
// gets READY=1 once the server answers NBD clients, and STOPPING=1 on
// SIGTERM.
func TestServeNotifiesServiceManager(t *testing.T) {
	t.Parallel()
	testenv.RequireCmd(t, "nbdinfo")
	for _, kind := range []string{"path", "abstract"} {
		t.Run(kind, func(t *testing.T) {
			t.Parallel()
			dir := testenv.ShortTempDir(t)
			addr := filepath.Join(dir, "notify.sock")
			if kind == "abstract" {
				addr = fmt.Sprintf("@snapmount-test-notify-%d-%d", os.Getpid(), time.Now().UnixNano())
			}
			l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			image := filepath.Join(dir, "disk.img")
			writeRandomImage(t, image, 1<<20, 3)
			sock := filepath.Join(dir, "nbd.sock")
			p := startProcEnv(t, append(os.Environ(), "NOTIFY_SOCKET="+addr), snapmountBin, "serve", "--no-tcp", "--socket", sock, image)

			if msg := readNotify(t, l); !hasLine(msg, "READY=1") {
				t.Fatalf("first notification %q, want READY=1", msg)
			}
			// Ready means ready: no retry, the first client is served.
			if out := mustRun(t, "nbdinfo", "--size", unixURI("disk.img", sock)).stdout; strings.TrimSpace(out) != "1048576" {
				t.Fatalf("nbdinfo --size right after READY=1: %q", out)
			}
			p.cmd.Process.Signal(syscall.SIGTERM)
			if msg := readNotify(t, l); !hasLine(msg, "STOPPING=1") {
				t.Fatalf("notification after SIGTERM %q, want STOPPING=1", msg)
			}
			if err := p.waitExit(30 * time.Second); err != nil {
				t.Fatalf("serve after SIGTERM: %v\n%s", err, p.out.String())
			}
		})
	}
}

// readNotify waits up to 30 s for one datagram on the fake notify socket.
func readNotify(t *testing.T, l *net.UnixConn) string {
	t.Helper()
	l.SetReadDeadline(time.Now().Add(30 * time.Second))
	buf := make([]byte, 4096)
	n, err := l.Read(buf)
	if err != nil {
		t.Fatalf("waiting for a notification on NOTIFY_SOCKET: %v", err)
	}
	return string(buf[:n])
}

func hasLine(msg, line string) bool {
	for _, l := range strings.Split(msg, "\n") {
		if l == line {
			return true
		}
	}
	return false
}
