package test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"snapmount/test/partitiontest"
)

// Disk images for the partition tests, built without root from files:
// mkfs.ext4 -d makes a file system from a directory tree into a file,
// sfdisk writes a table into the disk image, and dd conv=notrunc puts each
// file system at its partition's offset.

// ext4Files are the files of the test file systems: the same names in
// each, the content naming the file system.
func ext4Files(label string) map[string][]byte {
	blob := make([]byte, 300<<10)
	for i := range blob {
		blob[i] = byte(i*7 + len(label))
	}
	copy(blob, label)
	return map[string][]byte{
		"etc/hostname": []byte("host of " + label + "\n"),
		"data/blob":    blob,
	}
}

// mkfsExt4 makes an ext4 of size bytes labelled label, holding
// ext4Files(label), in a file in dir, and returns its path.
func mkfsExt4(t *testing.T, dir, label string, size int64) string {
	t.Helper()
	tree := filepath.Join(dir, "tree-"+label)
	for name, data := range ext4Files(label) {
		path := filepath.Join(tree, name)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	img := filepath.Join(dir, label+".ext4")
	mustRun(t, "/sbin/mkfs.ext4", "-q", "-F", "-L", label, "-d", tree, img, strconv.FormatInt(size>>10, 10)+"k")
	return img
}

// replayedHostname is what a dirty file system's etc/hostname reads once
// its journal is replayed.
const replayedHostname = "REPLAYED from the journal\n"

// makeDirty writes a journal transaction into the ext4 in img, with
// debugfs: it rewrites the block of etc/hostname with replayedHostname and
// sets needs_recovery, so that the file system reads the old hostname
// until the journal is replayed, and the new one after.
func makeDirty(t *testing.T, img string) {
	t.Helper()
	blk := strings.TrimSpace(mustRun(t, "/sbin/debugfs", "-R", "bmap /etc/hostname 0", img).stdout)
	if _, err := strconv.Atoi(blk); err != nil {
		t.Fatalf("debugfs bmap: %q", blk)
	}
	bs := 1024 // mkfs.ext4's block size for file systems this small
	if out := mustRun(t, "/sbin/dumpe2fs", "-h", img).stdout; !strings.Contains(out, "Block size:               1024") {
		t.Fatalf("the test file system's block size is not 1024:\n%s", out)
	}
	data := filepath.Join(t.TempDir(), "block")
	block := make([]byte, bs)
	copy(block, replayedHostname)
	if err := os.WriteFile(data, block, 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := fmt.Sprintf("jo\njw -b %s %s\njc\n", blk, data)
	script := filepath.Join(t.TempDir(), "debugfs.cmd")
	if err := os.WriteFile(script, []byte(cmd), 0o644); err != nil {
		t.Fatal(err)
	}
	mustRun(t, "/sbin/debugfs", "-w", "-f", script, img)
	if out := mustRun(t, "/sbin/dumpe2fs", "-h", img).stdout; !strings.Contains(out, "needs_recovery") {
		t.Fatalf("debugfs left no journal to recover:\n%s", out)
	}
}

// partSpec is one partition of a test disk: sfdisk's script line, and the
// file system image (if any) that goes at its start.
type partSpec struct {
	script string // e.g. "start=1MiB, size=12MiB, type=L"
	fs     string // file system image, or ""
}

// assembleDisk writes a disk image of size bytes with the table label
// ("gpt" or "dos") holding parts, copies each partition's file system to
// its start (as sfdisk placed it), and returns sfdisk's view of it.
func assembleDisk(t *testing.T, path string, size int64, label string, parts ...partSpec) partitiontest.Table {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	var script strings.Builder
	fmt.Fprintf(&script, "label: %s\n", label)
	for _, p := range parts {
		fmt.Fprintln(&script, p.script)
	}
	cmd := exec.Command("/sbin/sfdisk", "-q", path)
	cmd.Stdin = strings.NewReader(script.String())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v: %s", err, out)
	}
	st := partitiontest.Sfdisk(t, path)
	for i, p := range parts {
		if p.fs == "" {
			continue
		}
		start := st.Partitions[i].Start * st.SectorSize
		mustRun(t, "dd", "if="+p.fs, "of="+path, "bs=512", fmt.Sprintf("seek=%d", start/512), "conv=notrunc", "status=none")
	}
	return st
}

// infoPartitions is the JSON of `snapmount info --partitions --json`.
type infoPartitions struct {
	Scheme     string `json:"scheme"`
	SectorSize int64  `json:"sector_size"`
	ID         string `json:"id"`
	Note       string `json:"note"`
	Partitions []struct {
		Number   int    `json:"number"`
		Start    int64  `json:"start"`
		Size     int64  `json:"size"`
		Type     string `json:"type"`
		Extended bool   `json:"extended"`
		UUID     string `json:"uuid"`
		Name     string `json:"name"`
	} `json:"partitions"`
}

// checkInfoAgrees fails unless info (snapmount info --partitions --json)
// lists exactly what sfdisk --json listed on the image.
func checkInfoAgrees(t *testing.T, infoJSON string, st partitiontest.Table, image string) {
	t.Helper()
	var info infoPartitions
	if err := json.Unmarshal([]byte(infoJSON), &info); err != nil {
		t.Fatalf("info --partitions --json: %v\n%s", err, infoJSON)
	}
	got := []string{partitiontest.HeaderLine(info.Scheme, info.ID, info.SectorSize)}
	for _, p := range info.Partitions {
		got = append(got, partitiontest.PartitionLine(p.Number, p.Start, p.Size, p.Type, p.UUID, p.Name))
	}
	if want := st.Lines(image); !slices.Equal(got, want) {
		t.Errorf("info --partitions lists\n%s\nsfdisk --json lists\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// Hostile tables, made by damaging tables sfdisk wrote: the damage is
// what a disk we do not control may hold.

// patchGPTHeaders patches the primary and the backup GPT header of img.
func patchGPTHeaders(t *testing.T, img []byte, patch func(h []byte)) {
	t.Helper()
	last := int64(len(img))/512 - 1
	for _, lba := range []int64{1, last} {
		h := img[lba*512 : lba*512+92]
		if string(h[:8]) != "EFI PART" {
			t.Fatalf("no GPT header at LBA %d", lba)
		}
		patch(h)
	}
}

// hostileDisks writes, into dir, disk images whose tables must give the
// whole disk alone, and returns their names (the export names) with a
// phrase the one line of explanation must contain.
func hostileDisks(t *testing.T, dir string) map[string]string {
	t.Helper()
	const size = 8 << 20
	base := func(label string, parts ...partSpec) []byte {
		path := filepath.Join(t.TempDir(), "base.img")
		assembleDisk(t, path, size, label, parts...)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	gpt := base("gpt", partSpec{script: "start=1MiB, size=2MiB, type=L"}, partSpec{script: "start=4MiB, size=2MiB, type=L"})
	dos := base("dos", partSpec{script: "start=2048, size=4096, type=83"}, partSpec{script: "start=8192, size=4096, type=83"})
	ext := base("dos", partSpec{script: "start=2048, size=12288, type=5"}, partSpec{script: "start=4096, size=2048, type=83"})
	le := binary.LittleEndian
	disks := map[string]struct {
		img    []byte
		phrase string
	}{}
	add := func(name string, img []byte, phrase string, patch func([]byte)) {
		img = bytes.Clone(img)
		patch(img)
		disks[name] = struct {
			img    []byte
			phrase string
		}{img, phrase}
	}
	add("gpt-past-end", gpt, "skipped p1 ends past the end of the disk", func(b []byte) {
		// Both partitions end 512 MiB later, the CRCs made right again.
		patchGPTEntries(t, b, func(e []byte) { le.PutUint64(e[40:], le.Uint64(e[40:])+1<<20) })
		patchGPTHeaders(t, b, func(h []byte) {
			lba := le.Uint64(h[72:])
			le.PutUint32(h[88:], crc32.ChecksumIEEE(b[lba*512:lba*512+128*128]))
			partitiontest.ResealGPTHeader(h)
		})
	})
	add("dos-past-end", dos, "ends past the end of the disk", func(b []byte) {
		le.PutUint32(b[446+12:], 1<<24) // p1: 8 GiB
		le.PutUint32(b[446+16+12:], 1<<24)
	})
	add("dos-overlap", dos, "p1 overlaps another partition, p2 overlaps another partition", func(b []byte) {
		le.PutUint32(b[446+16+8:], 3000) // p2 starts inside p1
	})
	add("ebr-loop", ext, "loops back to sector 2048", func(b []byte) {
		ebr := b[2048*512:]
		clear(ebr[446:462])             // no data entry
		le.PutUint32(ebr[446+16+8:], 0) // the link points to this EBR
		ebr[446+16+4] = 0x05
		le.PutUint32(ebr[446+16+12:], 1)
	})
	add("ebr-deep", ext, "longer than 256 links", func(b []byte) {
		// 3000 EBRs, one every 2 sectors, each linking to the next.
		for i := range 3000 {
			ebr := b[(2048+2*i)*512:]
			clear(ebr[446:510])
			ebr[446+16+4] = 0x05
			le.PutUint32(ebr[446+16+8:], uint32(2*(i+1)))
			le.PutUint32(ebr[446+16+12:], 2)
			ebr[510], ebr[511] = 0x55, 0xaa
		}
	})
	add("gpt-header-crc", gpt, "CRC", func(b []byte) {
		patchGPTHeaders(t, b, func(h []byte) { h[16] ^= 0xff })
	})
	add("gpt-entries-crc", gpt, "GPT entry array", func(b []byte) {
		patchGPTEntries(t, b, func(e []byte) { e[56] ^= 0xff }) // a name byte; the CRCs stay
	})
	add("gpt-entry-size", gpt, "entry size 100", func(b []byte) {
		patchGPTHeaders(t, b, func(h []byte) { le.PutUint32(h[84:], 100); partitiontest.ResealGPTHeader(h) })
	})
	add("gpt-entry-count", gpt, "4294967295 entries", func(b []byte) {
		patchGPTHeaders(t, b, func(h []byte) { le.PutUint32(h[80:], 0xffffffff); partitiontest.ResealGPTHeader(h) })
	})
	add("pmbr-without-gpt", gpt, "protective MBR (type ee) without a valid GPT", func(b []byte) {
		patchGPTHeaders(t, b, func(h []byte) { clear(h) })
	})
	phrases := map[string]string{}
	for name, d := range disks {
		if err := os.WriteFile(filepath.Join(dir, name), d.img, 0o644); err != nil {
			t.Fatal(err)
		}
		phrases[name] = d.phrase
	}
	return phrases
}

// patchGPTEntries patches the used entries of both GPT entry arrays (as
// sfdisk lays them out: 128 entries of 128 bytes, after the primary header
// and before the backup) and fixes nothing: the entry CRCs go stale unless
// the caller reseals.
func patchGPTEntries(t *testing.T, img []byte, patch func(e []byte)) {
	t.Helper()
	last := int64(len(img))/512 - 1
	for _, lba := range []int64{2, last - 32} {
		arr := img[lba*512 : lba*512+128*128]
		for i := 0; i < 128; i++ {
			e := arr[i*128 : (i+1)*128]
			if !bytes.Equal(e[:16], make([]byte, 16)) {
				patch(e)
			}
		}
	}
}
