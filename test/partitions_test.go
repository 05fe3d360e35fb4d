package test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"snapmount/test/partitiontest"
	"snapmount/test/testenv"
)

// From a disk to its files, as an ordinary user: mount --partitions shows
// each partition as a file that sleuthkit and fuse2fs read; with --overlay
// e2fsck replays a dirty journal into a private overlay, never into the
// export; and hostile tables give the whole disk alone and one line.

// openSocket lets the user connect to a Unix socket the test's server
// (running as root) listens on.
func openSocket(t *testing.T, sock string) {
	t.Helper()
	if err := os.Chmod(filepath.Dir(sock), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
}

// gptDisk writes a 40 MiB GPT disk image into dir: p1 ("one", 12 MiB) a
// clean ext4 of ext4Files("one"), p2 ("two") a dirty one (see makeDirty),
// p3 an empty swap partition. It returns the image and sfdisk's view.
func gptDisk(t *testing.T, dir string) (string, partitiontest.Table) {
	t.Helper()
	testenv.RequireCmd(t, "sfdisk", "mkfs.ext4", "debugfs")
	one := mkfsExt4(t, t.TempDir(), "one", 12<<20)
	two := mkfsExt4(t, t.TempDir(), "two", 12<<20)
	makeDirty(t, two)
	image := filepath.Join(dir, "disk.img")
	st := assembleDisk(t, image, 40<<20, "gpt",
		partSpec{`start=1MiB, size=12MiB, type=L, name="one"`, one},
		partSpec{`start=14MiB, size=12MiB, type=L, name="two"`, two},
		partSpec{`start=27MiB, size=4MiB, type=S`, ""})
	if err := os.Chmod(image, 0o644); err != nil {
		t.Fatal(err)
	}
	return image, st
}

// checkExt4Files reads files of the ext4 labelled label in image (a
// partition file) with sleuthkit as the user: fls -r lists them, icat
// extracts them byte for byte.
func checkExt4Files(t *testing.T, u *account, image, label string) {
	t.Helper()
	listing := u.must(t, "/usr/bin/fls", "-r", "-p", image)
	for name, data := range ext4Files(label) {
		if !strings.Contains(listing, "\t"+name+"\n") {
			t.Errorf("fls -r %s does not list %s:\n%s", image, name, listing)
			continue
		}
		inode := strings.TrimSpace(u.must(t, "/usr/bin/ifind", "-n", "/"+name, image))
		if got := u.must(t, "/usr/bin/icat", image, inode); got != string(data) {
			t.Errorf("icat %s %s (%s): %d bytes that differ from the %d written", image, inode, name, len(got), len(data))
		}
	}
}

// userStats reads a mount's counters as the user.
func userStats(t *testing.T, u *account, mnt string) mountStatsJSON {
	t.Helper()
	var st mountStatsJSON
	if err := json.Unmarshal([]byte(u.must(t, "snapmount", "stats", "--json", mnt)), &st); err != nil {
		t.Fatal(err)
	}
	return st
}

// mountStatsJSON is the part of 'snapmount stats --json' these tests read.
type mountStatsJSON struct {
	PID        int    `json:"pid"`
	Export     string `json:"export"`
	Frozen     bool   `json:"frozen_snapshot"`
	Partitions *struct {
		Scheme string `json:"scheme"`
		Files  []struct {
			Name   string `json:"name"`
			Offset int64  `json:"offset"`
			Size   int64  `json:"size"`
		} `json:"files"`
		Note string `json:"note"`
	} `json:"partitions"`
	Overlay *struct {
		Dir   string `json:"dir"`
		Bytes int64  `json:"bytes"`
	} `json:"overlay"`
}

// A GPT disk served by snapmount serve, mounted by an ordinary user with
// --partitions while a writer rewrites the whole disk: the partition
// files read the snapshot, which sleuthkit and fuse2fs read as the file
// systems that were there; the dirty one needs its journal replayed.
func TestPartitionsSnapshotUnderWriter(t *testing.T) {
	t.Parallel()
	testenv.RequireCmd(t, "qemu-io", "fls", "ifind", "icat", "fuse2fs")
	u := testUser(t)
	image, table := gptDisk(t, u.dir)
	original := fileSHA256(t, image)
	sock, _ := startServe(t, "--max-writers", "1", "disk="+image)
	openSocket(t, sock)

	mnt := u.mkdir(t, "snapshot")
	if stderr := u.mount(t, unixURI("disk", sock), mnt, "--partitions"); stderr != "" {
		t.Errorf("mount --partitions of a good table said: %q", stderr)
	}
	if got := u.listing(t, mnt); !slices.Equal(got, []string{"disk", "disk-p1", "disk-p2", "disk-p3"}) {
		t.Fatalf("the mount holds %v", got)
	}
	st := userStats(t, u, mnt)
	if !st.Frozen || st.Partitions == nil || st.Partitions.Scheme != "gpt" || len(st.Partitions.Files) != 3 {
		t.Fatalf("stats: %+v", st)
	}

	// The writer overwrites every byte, the partition table included.
	writer := startProc(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 40M", "-c", "flush", unixURI("disk", sock))

	// info reads the snapshot's table (by its canonical name): what
	// sfdisk read in the image before.
	checkInfoAgrees(t, u.must(t, "snapmount", "info", "--partitions", "--json", unixURI(st.Export, sock)), table, image)
	checkExt4Files(t, u, filepath.Join(mnt, "disk-p1"), "one")
	host, ok, msg := u.fuse2fs(t, filepath.Join(mnt, "disk-p1"), "etc/hostname")
	if !ok || host != "host of one\n" {
		t.Errorf("fuse2fs on disk-p1: %q, %s", host, msg)
	}
	// The dirty file system: fuse2fs -o ro refuses it.
	if _, ok, msg := u.fuse2fs(t, filepath.Join(mnt, "disk-p2"), "etc/hostname"); ok || !strings.Contains(msg, "Journal needs recovery") {
		t.Errorf("fuse2fs on the dirty disk-p2: ok=%v, %q; want a refusal, journal needs recovery", ok, msg)
	}

	if err := writer.waitExit(2 * time.Minute); err != nil {
		t.Fatalf("the writer: %v\n%s", err, writer.out.String())
	}
	if fileSHA256(t, image) == original {
		t.Fatal("the writer's data did not reach the image")
	}
	sum := u.must(t, "/usr/bin/sha256sum", filepath.Join(mnt, "disk"))
	if !strings.HasPrefix(sum, original) {
		t.Errorf("the snapshot's disk reads %s, not the original %s", sum, original)
	}
	checkExt4Files(t, u, filepath.Join(mnt, "disk-p1"), "one")
}

// With --overlay, e2fsck replays the dirty file system's journal through
// its partition file into the private overlay; fuse2fs then reads the
// replayed file system. The export (writable on the server) is not
// changed, the overlay has no name in its directory while it exists, and
// is gone with the mount.
func TestPartitionsOverlayReplaysJournal(t *testing.T) {
	t.Parallel()
	testenv.RequireCmd(t, "e2fsck", "fuse2fs")
	u := testUser(t)
	image, _ := gptDisk(t, u.dir)
	original := fileSHA256(t, image)
	sock, _ := startServe(t, "disk="+image)
	openSocket(t, sock)

	ovDir := u.mkdir(t, "overlay")
	mnt := u.mkdir(t, "mnt")
	u.mount(t, unixURI("disk", sock), mnt, "--partitions", "--overlay", "--overlay-dir", ovDir, "--overlay-max", "4M")
	if m := mountOptions(t, mnt); strings.Contains(","+m+",", ",ro,") {
		t.Errorf("the overlay mount is read-only: %s", m)
	}
	p2 := filepath.Join(mnt, "disk-p2")
	if _, ok, _ := u.fuse2fs(t, p2, "etc/hostname"); ok {
		t.Fatal("fuse2fs mounted the dirty file system before the replay")
	}

	r := u.run(t, "/sbin/e2fsck", "-E", "journal_only", "-y", p2)
	if r.code > 1 { // 1: the file system was changed, as a replay does
		t.Fatalf("e2fsck -E journal_only: exit %d\n%s%s", r.code, r.stdout, r.stderr)
	}
	host, ok, msg := u.fuse2fs(t, p2, "etc/hostname")
	if want := replayedHostname[:len("host of two\n")]; !ok || host != want {
		t.Errorf("after the replay, fuse2fs reads etc/hostname as %q (%s), want %q", host, msg, want)
	}

	// A write through a partition file shows through the whole disk.
	marker := filepath.Join(u.dir, "marker")
	if err := os.WriteFile(marker, bytes.Repeat([]byte("written through disk-p1\n"), 64)[:512], 0o644); err != nil {
		t.Fatal(err)
	}
	u.must(t, "/usr/bin/dd", "if="+marker, "of="+filepath.Join(mnt, "disk-p1"), "bs=512", "seek=7", "conv=notrunc", "status=none")
	p1 := userStats(t, u, mnt).Partitions.Files[0]
	got := u.must(t, "/usr/bin/dd", "if="+filepath.Join(mnt, "disk"), "bs=512", fmt.Sprintf("skip=%d", p1.Offset/512+7), "count=1", "status=none")
	if want, _ := os.ReadFile(marker); got != string(want) {
		t.Errorf("the whole disk reads %q where disk-p1 was written", got)
	}
	// The overlay is bounded: 4 MiB more than it holds is ENOSPC.
	r = u.run(t, "/usr/bin/dd", "if=/dev/zero", "of="+filepath.Join(mnt, "disk"), "bs=1M", "count=4", "seek=30", "conv=notrunc")
	if r.code == 0 || !strings.Contains(r.stderr, "No space left on device") {
		t.Errorf("writing past --overlay-max: exit %d, %s", r.code, r.stderr)
	}

	st := userStats(t, u, mnt)
	if st.Overlay == nil || st.Overlay.Bytes == 0 || st.Overlay.Dir != ovDir {
		t.Errorf("stats of the overlay: %+v", st.Overlay)
	}
	checkNoName(t, ovDir, st.PID)

	if r := u.run(t, "snapmount", "umount", mnt); r.code != 0 {
		t.Fatalf("umount: %s", r.stderr)
	}
	if ents, _ := os.ReadDir(ovDir); len(ents) != 0 {
		t.Errorf("the overlay directory holds %v after umount", ents)
	}
	if got := fileSHA256(t, image); got != original {
		t.Errorf("the served image changed: %s, was %s", got, original)
	}
}

// checkNoName fails unless the process pid has a file open in dir that has
// no name there (the overlay), and dir is empty.
func checkNoName(t *testing.T, dir string, pid int) {
	t.Helper()
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Errorf("the overlay directory holds %v (%v)", ents, err)
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, fd := range fds {
		link, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if strings.HasPrefix(link, dir+"/") && strings.HasSuffix(link, " (deleted)") {
			return
		}
	}
	t.Errorf("the mount process %d has no nameless file open in %s", pid, dir)
}

// An MBR disk with an extended partition holding two logical ones, served
// read-only by nbdkit: the files are numbered as fdisk numbers them (the
// extended container gets none), info agrees with sfdisk, and the logical
// partitions' file systems read right.
func TestPartitionsDOSLogicalFromNbdkit(t *testing.T) {
	t.Parallel()
	testenv.RequireCmd(t, "sfdisk", "mkfs.ext4", "fls", "ifind", "icat", "fuse2fs")
	u := testUser(t)
	tmp := t.TempDir()
	image := filepath.Join(u.dir, "mbr.img")
	table := assembleDisk(t, image, 30<<20, "dos",
		partSpec{"start=1MiB, size=8MiB, type=83", mkfsExt4(t, tmp, "one", 8<<20)},
		partSpec{"start=10MiB, size=20MiB, type=5", ""},
		partSpec{"start=11MiB, size=8MiB, type=83", mkfsExt4(t, tmp, "five", 8<<20)},
		partSpec{"start=20MiB, size=8MiB, type=83", mkfsExt4(t, tmp, "six", 8<<20)})
	os.Chmod(image, 0o644)
	sockDir := testenv.ShortTempDir(t)
	sock, _ := startNbdkit(t, sockDir, "-r", "file", image)
	openSocket(t, sock)

	mnt := u.mkdir(t, "mnt")
	u.mount(t, unixURI("", sock), mnt, "--partitions", "--name", "mbr")
	if got := u.listing(t, mnt); !slices.Equal(got, []string{"mbr", "mbr-p1", "mbr-p5", "mbr-p6"}) {
		t.Fatalf("the mount holds %v", got)
	}
	checkInfoAgrees(t, u.must(t, "snapmount", "info", "--partitions", "--json", unixURI("", sock)), table, image)
	checkExt4Files(t, u, filepath.Join(mnt, "mbr-p5"), "five")
	checkExt4Files(t, u, filepath.Join(mnt, "mbr-p1"), "one")
	if host, ok, msg := u.fuse2fs(t, filepath.Join(mnt, "mbr-p6"), "etc/hostname"); !ok || host != "host of six\n" {
		t.Errorf("fuse2fs on mbr-p6: %q, %s", host, msg)
	}
	if out := u.must(t, "snapmount", "stats", mnt); !strings.Contains(out, "partitions:     dos (512-byte sectors), 3 shown") {
		t.Errorf("stats do not name the table:\n%s", out)
	}
}

// A GPT disk whose first two sectors, the protective MBR and the primary
// GPT header, were wiped (as on a damaged disk), served read-only by
// nbdkit and mounted by root: the partitions are found from the backup
// GPT header, as sfdisk read them on the intact disk, sleuthkit reads the
// file system in p1, and mount and info say in one line which header was
// used.
func TestPartitionsGPTWithoutMBRFromNbdkit(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "sfdisk", "mkfs.ext4", "fls", "ifind", "icat")
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	table := assembleDisk(t, image, 24<<20, "gpt",
		partSpec{`start=1MiB, size=12MiB, type=L, name="one"`, mkfsExt4(t, t.TempDir(), "one", 12<<20)},
		partSpec{`start=14MiB, size=8MiB, type=L`, ""})
	mustRun(t, "dd", "if=/dev/zero", "of="+image, "bs=512", "count=2", "conv=notrunc", "status=none")
	sock, _ := startNbdkit(t, dir, "-r", "file", image)
	const note = "no protective MBR (no boot signature 55 AA at byte 510) and no primary GPT header at LBA 1; using the backup GPT header at LBA 49151 (512-byte sectors)"

	mnt := mountDir(t, dir, "mnt")
	r := snapmount(t, time.Minute, "mount", "--partitions", "--name", "disk", unixURI("", sock), mnt)
	if r.code != 0 {
		t.Fatalf("mount: exit %d: %s", r.code, r.stderr)
	}
	t.Cleanup(func() { unmountSM(t, mnt) })
	if got := testenv.DirNames(t, mnt); !slices.Equal(got, []string{"disk", "disk-p1", "disk-p2"}) {
		t.Fatalf("the mount holds %v", got)
	}
	if want := "partitions: gpt, 512-byte sectors: disk-p1, disk-p2; " + note; !strings.Contains(r.stderr, want) {
		t.Errorf("mount said %q; want a line saying %q", r.stderr, want)
	}
	checkExt4Files(t, nil, filepath.Join(mnt, "disk-p1"), "one")

	info := mustRun(t, snapmountBin, "info", "--partitions", unixURI("", sock)).stdout
	if !strings.Contains(info, "gpt partition table, 512-byte sectors") || !strings.Contains(info, "note: "+note+"\n") {
		t.Errorf("info --partitions does not print the table with the note %q:\n%s", note, info)
	}
	checkInfoAgrees(t, mustRun(t, snapmountBin, "info", "--partitions", "--json", unixURI("", sock)).stdout, table, image)
}

// Every hostile table gives the whole disk alone and one line saying why;
// a GPT of 4096-byte sectors is read as such. All disks are exports of one
// nbdkit (file plugin, dir=), mounted in parallel.
func TestPartitionsHostileTables(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	testenv.RequireCmd(t, "sfdisk", "fdisk")
	dir := testenv.ShortTempDir(t)
	disks := filepath.Join(dir, "disks")
	if err := os.Mkdir(disks, 0o755); err != nil {
		t.Fatal(err)
	}
	phrases := hostileDisks(t, disks)
	// A GPT of 4096-byte sectors, written by fdisk (this sfdisk has no
	// sector size option): new table, p1 of 4 MiB, p2 over the rest.
	gpt4k := filepath.Join(disks, "gpt-4k")
	if err := os.WriteFile(gpt4k, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	os.Truncate(gpt4k, 16<<20)
	cmd := exec.Command("/sbin/fdisk", "-b", "4096", gpt4k)
	cmd.Stdin = strings.NewReader("g\nn\n1\n\n+4M\nn\n2\n\n\nw\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("fdisk -b 4096: %v\n%s", err, out)
	}
	sock, _ := startNbdkit(t, dir, "-r", "file", "dir="+disks)

	for name, phrase := range phrases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			mnt := mountDir(t, dir, "m-"+name)
			r := snapmount(t, time.Minute, "mount", "--partitions", unixURI(name, sock), mnt)
			if r.code != 0 {
				t.Fatalf("mount: exit %d: %s", r.code, r.stderr)
			}
			t.Cleanup(func() { unmountSM(t, mnt) })
			if got := testenv.DirNames(t, mnt); !slices.Equal(got, []string{name}) {
				t.Errorf("the mount holds %v, want the whole disk alone", got)
			}
			var lines []string
			for _, l := range strings.Split(strings.TrimSpace(r.stderr), "\n") {
				if strings.Contains(l, "partition") {
					lines = append(lines, l)
				}
			}
			if len(lines) != 1 || !strings.Contains(lines[0], "no partitions shown, only the whole disk: ") || !strings.Contains(lines[0], phrase) {
				t.Errorf("mount said %q; want one line on the partitions, saying %q", r.stderr, phrase)
			}
			info := snapmount(t, time.Minute, "info", "--partitions", unixURI(name, sock))
			if info.code != 0 || !strings.Contains(info.stdout, phrase) {
				t.Errorf("info --partitions: exit %d, %q; want %q", info.code, info.stdout+info.stderr, phrase)
			}
		})
	}
	t.Run("gpt-4k", func(t *testing.T) {
		t.Parallel()
		mnt := mountDir(t, dir, "m-gpt-4k")
		mountSM(t, unixURI("gpt-4k", sock), mnt, "--partitions")
		if got := testenv.DirNames(t, mnt); !slices.Equal(got, []string{"gpt-4k", "gpt-4k-p1", "gpt-4k-p2"}) {
			t.Fatalf("the mount holds %v", got)
		}
		out := mustRun(t, "/sbin/fdisk", "-b", "4096", "-l", "-o", "Start,Sectors", gpt4k).stdout
		rows := regexp.MustCompile(`(?m)^\s*(\d+)\s+(\d+)\s*$`).FindAllStringSubmatch(out, -1)
		if len(rows) != 2 {
			t.Fatalf("fdisk -b 4096 -l:\n%s", out)
		}
		for i, row := range rows {
			sectors, _ := strconv.ParseInt(row[2], 10, 64)
			p := fmt.Sprintf("gpt-4k-p%d", i+1)
			if fi, err := os.Stat(filepath.Join(mnt, p)); err != nil || fi.Size() != sectors*4096 {
				t.Errorf("%s: %v, %v; fdisk -b 4096 says %d sectors of 4096", p, fi, err, sectors)
			}
		}
	})
}

// A server that answers the handshake but fails the table's reads is a
// failed operation (exit 1), not a failed connection (exit 3), for info
// and mount alike: the error line says what failed.
func TestPartitionsReadErrorExitsOne(t *testing.T) {
	t.Parallel()
	testenv.RequireFUSE(t)
	dir := testenv.ShortTempDir(t)
	image := filepath.Join(dir, "disk.img")
	writeRandomImage(t, image, 1<<20, 3)
	sock, _ := startNbdkit(t, dir, "-r", "--filter=error", "file", image, "error-pread=EIO", "error-pread-rate=100%")
	for _, args := range [][]string{
		{"info", "--partitions", "--timeout", "3s", unixURI("", sock)},
		{"mount", "--partitions", "--timeout", "3s", unixURI("", sock), mountDir(t, dir, "mnt")},
	} {
		r := snapmount(t, time.Minute, args...)
		lines := strings.Split(strings.TrimSpace(r.stderr), "\n") // mount may warn first
		msg := lines[len(lines)-1]
		if r.code != 1 || !strings.Contains(msg, "reading the partition table") || !strings.Contains(msg, "EIO") {
			t.Errorf("%s --partitions with reads failing: exit %d %q; want exit 1, one line saying the table's read failed", args[0], r.code, msg)
		}
	}
}
