package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"snapmount/test/testenv"
)

// A mounted sparse export looks sparse: st_blocks counts what the server
// stores (its allocation map; unknown counts as allocated), so du shows
// the real use and cp --sparse=auto keeps the holes.
func TestMountSparseLooksSparse(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "nbdkit", "du", "cp", "cmp")
	const size = 256 << 20
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeSparseImage(t, image, size, [][2]int64{{0, 1 << 20}, {100 << 20, 2<<20 + 4096}, {size - 1<<20, 1 << 20}}, 9)
	stored := allocatedBytes(t, image)
	if stored > 8<<20 {
		t.Skipf("the temporary file system stored %d bytes of a sparse %d-byte file: it keeps no holes", stored, size)
	}
	// The image's st_blocks may count a block or two of the file
	// system's own (an extent tree block) that no allocation map shows.
	var fs syscall.Statfs_t
	if err := syscall.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	slack := 2 * fs.Bsize

	for _, c := range []struct {
		name  string
		flags []string
		want  int64 // du of the mounted file
	}{
		{"allocation map", nil, stored},
		{"no allocation map", []string{"--no-sr"}, size}, // unknown counts as allocated
	} {
		t.Run(c.name, func(t *testing.T) {
			sock, _ := startNbdkit(t, dir, append(append([]string{"-r"}, c.flags...), "file", image)...)
			mnt := mountDir(t, dir, "mnt-"+strconv.Itoa(len(c.flags)))
			mountSM(t, unixURI("", sock), mnt)
			file := filepath.Join(mnt, "nbd")

			// Until the mount has learned the whole map, a stat does not
			// wait for it and counts the rest as allocated.
			var out string
			waitFor(t, "du to count what the image stores", func() bool {
				out = mustRun(t, "du", "-B1", file).stdout
				du, err := strconv.ParseInt(strings.Fields(out)[0], 10, 64)
				return err == nil && du >= c.want-slack && du <= c.want+slack
			})
			if c.want != stored {
				return
			}
			dest := filepath.Join(dir, "copy.img")
			mustRun(t, "cp", "--sparse=auto", file, dest)
			defer os.Remove(dest)
			if got := allocatedBytes(t, dest); got > stored+1<<20 {
				t.Errorf("cp --sparse=auto stored %d bytes of the copy, want about %d: the holes were filled", got, stored)
			}
			if out, err := exec.Command("cmp", image, dest).CombinedOutput(); err != nil {
				t.Errorf("the copy differs from the image: %v %s", err, out)
			}
		})
	}
}
