package test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// mount --frozen is the user's word that an export does not change, as
// qemu's fleecing export does not: the mount keeps the kernel's page cache
// across opens (a second read of the file asks the server for nothing) and
// gives no warning. Without it, the warning says that the server does not
// say whether the export changes, and every open drops the page cache.
// --no-cache: every read that reaches the mount goes to the server, so the
// server's byte count shows what the page cache did not answer.
func TestMountFrozenKeepsPageCache(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	const size = 2 << 20
	dir, image, sock := nbdkitImage(t, size, 23)
	want, err := os.ReadFile(image)
	if err != nil {
		t.Fatal(err)
	}
	for _, frozen := range []bool{false, true} {
		mnt := mountDir(t, dir, map[bool]string{false: "live", true: "frozen"}[frozen])
		args := []string{"mount", "--no-cache"}
		if frozen {
			args = append(args, "--frozen")
		}
		r := snapmount(t, time.Minute, append(args, unixURI("", sock), mnt)...)
		if r.code != 0 {
			t.Fatalf("%v: exit %d: %s", args, r.code, r.stderr)
		}
		t.Cleanup(func() { unmountSM(t, mnt) })
		warned := strings.Contains(r.stderr, "this server does not say whether its default export changes; snapmount treats it as live")
		if warned == frozen || frozen && r.stderr != "" {
			t.Errorf("%v said %q; want the warning that the server does not say only without --frozen", args, r.stderr)
		}

		testenv.CheckPageCache(t, filepath.Join(mnt, "nbd"), want, frozen, func() int64 {
			nbd, _ := statsJSON(t, mnt)["nbd"].(map[string]any)
			n, _ := nbd["bytes_read"].(float64)
			return int64(n)
		})
		if st := statsJSON(t, mnt); st["frozen_snapshot"] != frozen {
			t.Errorf("frozen %v: stats say frozen_snapshot %v", frozen, st["frozen_snapshot"])
		}
	}
}
