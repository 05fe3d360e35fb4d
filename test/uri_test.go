package test

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"snapmount/test/testenv"
)

// A socket path with '+', spaces and non-ASCII characters: snapmount reads
// URIs as libnbd and qemu do (percent-encoding only, '+' is a plus sign),
// and the uri: line it prints is one nbdinfo and qemu-img connect with.
func TestURIOddSocketPath(t *testing.T) {
	t.Parallel()
	testenv.RequireCmd(t, "nbdkit", "nbdinfo", "qemu-img")
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 1<<20, 5)
	sock := filepath.Join(dir, "a+b c\u00e9.sock")
	p := startProc(t, "nbdkit", "-f", "-r", "-U", sock, "file", image)
	p.waitReady("unix", sock)

	for _, uri := range []string{
		"nbd+unix:///?socket=" + dir + "/a+b%20c%C3%A9.sock", // as libnbd users write it
		"nbd+unix:///?socket=" + dir + "/a%2Bb%20c%C3%A9.sock",
	} {
		r := snapmount(t, time.Minute, "info", uri)
		if r.code != 0 {
			t.Fatalf("snapmount info %s: exit %d: %s", uri, r.code, r.stderr)
		}
		printed := ""
		for _, line := range strings.Split(r.stdout, "\n") {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "uri: "); ok {
				printed = v
			}
		}
		if want := "nbd+unix:///?socket=" + dir + "/a%2Bb%20c%C3%A9.sock"; printed != want {
			t.Fatalf("snapmount info %s printed uri: %q, want %q", uri, printed, want)
		}
		if out := mustRun(t, "nbdinfo", "--size", printed).stdout; strings.TrimSpace(out) != "1048576" {
			t.Errorf("nbdinfo --size %s: %q", printed, out)
		}
		var info struct {
			Size int64 `json:"virtual-size"`
		}
		out := mustRun(t, "qemu-img", "info", "--output=json", printed).stdout
		if err := json.Unmarshal([]byte(out), &info); err != nil || info.Size != 1<<20 {
			t.Errorf("qemu-img info %s: %v: %s", printed, err, out)
		}
	}
}
