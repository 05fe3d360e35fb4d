package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// A qcow2 image, as qemu-img makes it: serve refuses it in one line with
// exit 2 and what to use instead (--format raw serves it anyway); mount
// and copy of an export holding one say so in one warning line and still
// do their job.
func TestQcow2ImageRefusedAndWarned(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "qemu-img", "nbdkit")
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "vm.qcow2")
	mustRun(t, "qemu-img", "create", "-q", "-f", "qcow2", image, "16M")

	sock := filepath.Join(dir, "serve.sock")
	r := snapmount(t, time.Minute, "serve", "--no-tcp", "--socket", sock, image)
	if r.code != 2 || strings.Count(r.stderr, "\n") != 1 ||
		!strings.Contains(r.stderr, "vm.qcow2 is a qcow2 image, not a raw disk") || !strings.Contains(r.stderr, "qemu-nbd -f qcow2") {
		t.Fatalf("serve of a qcow2 image: exit %d, %q; want exit 2 and one line naming qcow2 and qemu-nbd -f qcow2", r.code, r.stderr)
	}
	if _, err := os.Stat(sock); err == nil {
		t.Fatal("serve listened before refusing")
	}
	p := startProc(t, snapmountBin, "serve", "--no-tcp", "--socket", sock, "--format", "raw", image)
	p.waitOutput("exports: vm.qcow2", time.Minute)
	p.stop()

	nbdkit, _ := startNbdkit(t, dir, "-r", "file", image)
	uri := unixURI("", nbdkit)
	const warning = "warning: this export holds a qcow2 image, not a disk"
	mnt := mountDir(t, dir, "mnt")
	m := snapmount(t, time.Minute, "mount", uri, mnt)
	if m.code == 0 {
		t.Cleanup(func() { unmountSM(t, mnt) })
	}
	if m.code != 0 || strings.Count(m.stderr, warning) != 1 {
		t.Errorf("mount of an export holding qcow2: exit %d, %q; want exit 0 and one %q", m.code, m.stderr, warning)
	}
	c := snapmount(t, time.Minute, "copy", "--sha256", uri, "/dev/null")
	if c.code != 0 || strings.Count(c.stderr, warning) != 1 || strings.Count(c.stderr, "\n") != 1 || !strings.HasPrefix(c.stdout, fileSHA256(t, image)) {
		t.Errorf("copy of an export holding qcow2: exit %d, %q, %q; want the image's digest and one warning line", c.code, c.stdout, c.stderr)
	}

	// A raw disk: no word.
	raw := filepath.Join(dir, "disk.img")
	writeRandomImage(t, raw, 1<<20, 4)
	rawSock, _ := startNbdkit(t, dir, "-r", "file", raw)
	if c := snapmount(t, time.Minute, "copy", unixURI("", rawSock), "/dev/null"); c.code != 0 || c.stderr != "" {
		t.Errorf("copy of a raw export: exit %d, stderr %q; want nothing said", c.code, c.stderr)
	}
}
