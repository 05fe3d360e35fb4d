package test

import (
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// The flow of the README: root serves, an ordinary user mounts. Without
// --socket-group the root-made socket (srwxr-xr-x) keeps the user out,
// and the mount says whom to ask; with it the user's group connects,
// mounts and reads the image.
func TestServeRootMountUser(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	u := testUser(t)
	dir := u.dir
	group, err := user.LookupGroupId(strconv.Itoa(int(u.gid)))
	if err != nil {
		t.Fatalf("the test user's group %d: %v", u.gid, err)
	}
	image := filepath.Join(dir, "vm.img")
	writeRandomImage(t, image, 4<<20, 8)
	mnt := u.mkdir(t, "mnt")
	serve := func(sock string, flags ...string) *proc {
		p := startProc(t, snapmountBin, append(append([]string{"serve", "--no-tcp", "--socket", sock}, flags...), image)...)
		p.waitOutput("snapmount serve: listening on", 60*time.Second)
		return p
	}

	closed := filepath.Join(dir, "closed.sock")
	first := serve(closed)
	r := u.run(t, "snapmount", "mount", unixURI("vm.img", closed), mnt)
	if r.code != 3 || !strings.Contains(r.stderr, "ask the server's owner for access, e.g. snapmount serve --socket-group") ||
		!strings.Contains(r.stderr, "srwxr-xr-x root:") || strings.Count(r.stderr, "\n") != 1 {
		t.Fatalf("mount of a root-only socket as %s: exit %d, %q; want exit 3 and one line with the socket's owner and the hint", testenv.TestUser, r.code, r.stderr)
	}

	first.stop() // one server at a time may write the image
	open := filepath.Join(dir, "vm.sock")
	serve(open, "--socket-group", group.Name)
	if r := u.run(t, "snapmount", "mount", unixURI("vm.img", open), mnt); r.code != 0 {
		t.Fatalf("mount with --socket-group %s as %s: exit %d: %s", group.Name, testenv.TestUser, r.code, r.stderr)
	}
	t.Cleanup(func() {
		if isMounted(mnt) {
			u.run(t, "snapmount", "umount", mnt)
		}
	})
	sum := u.run(t, "/usr/bin/sha256sum", filepath.Join(mnt, "vm.img"))
	if sum.code != 0 || !strings.HasPrefix(sum.stdout, fileSHA256(t, image)) {
		t.Fatalf("sha256sum of the mounted snapshot as %s: %q %q", testenv.TestUser, sum.stdout, sum.stderr)
	}
	if r := u.run(t, "snapmount", "umount", mnt); r.code != 0 || isMounted(mnt) {
		t.Fatalf("umount as %s: exit %d: %s", testenv.TestUser, r.code, r.stderr)
	}
}
