package partition

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"snapmount/test/partitiontest"
	"snapmount/test/testenv"
)

// Tables written by sfdisk and fdisk on image files, read by Read and
// compared with what sfdisk (or fdisk) and sleuthkit's mmls read in them.

func run(t *testing.T, stdin string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("%s %s: %v\n%s%s", name, strings.Join(args, " "), err, out, stderr)
	}
	return string(out)
}

// imageFile makes an empty (sparse) image file of size bytes.
func imageFile(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	testenv.SparseFile(t, path, size)
	return path
}

// readFile reads the table a tool wrote in the image file path: it must
// need no note.
func readFile(t *testing.T, path string) *Table {
	t.Helper()
	tab := readDamaged(t, path)
	if tab.Note != "" {
		t.Errorf("a table a tool wrote gave the note %q", tab.Note)
	}
	return tab
}

// readDamaged reads the table in the image file path, which a test may
// have damaged: the note is the caller's to check.
func readDamaged(t *testing.T, path string) *Table {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	tab, err := Read(f, fi.Size())
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	checkInvariants(t, tab, fi.Size())
	return tab
}

// compareSfdisk fails unless tab lists exactly what sfdisk --json lists.
func compareSfdisk(t *testing.T, path string, tab *Table) {
	t.Helper()
	compareLines(t, tab, partitiontest.Sfdisk(t, path).Lines(path))
}

// compareLines fails unless tab is want, sfdisk's reading of a table in
// the form of partitiontest.Table.Lines.
func compareLines(t *testing.T, tab *Table, want []string) {
	t.Helper()
	got := []string{partitiontest.HeaderLine(string(tab.Scheme), tab.ID, int64(tab.SectorSize))}
	for _, p := range tab.Partitions {
		got = append(got, partitiontest.PartitionLine(p.Number, p.Start, p.Size, p.Type, p.UUID, p.Name))
	}
	if !slices.Equal(got, want) {
		t.Errorf("Read gives\n%s\nsfdisk --json lists\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// mmlsRow is one partition row of mmls: "004:  000  0000002048  0000010239
// 0000008192  root" (GPT) or "002:  000:000  ..." (DOS, table:entry).
var mmlsRow = regexp.MustCompile(`(?m)^\d+:\s+(\d+)(?::(\d+))?\s+(\d+)\s+\d+\s+(\d+)`)

// compareMmls fails unless the data partitions of tab are those mmls lists.
// mmls numbers GPT entries from 0, and DOS entries by table (0 the MBR, k
// the k-th EBR) and entry; extended partitions are its "Meta" rows.
func compareMmls(t *testing.T, path string, tab *Table) {
	t.Helper()
	out := run(t, "", "mmls", path)
	units := regexp.MustCompile(`Units are in (\d+)-byte sectors`).FindStringSubmatch(out)
	if units == nil {
		t.Fatalf("mmls printed no unit:\n%s", out)
	}
	unit, _ := strconv.ParseInt(units[1], 10, 64)
	var want []string
	for _, m := range mmlsRow.FindAllStringSubmatch(out, -1) {
		slot, _ := strconv.Atoi(m[1])
		start, _ := strconv.ParseInt(m[3], 10, 64)
		length, _ := strconv.ParseInt(m[4], 10, 64)
		number := slot + 1 // GPT
		if m[2] != "" {
			entry, _ := strconv.Atoi(m[2])
			number = entry + 1
			if slot > 0 {
				number = 4 + slot
			}
		}
		want = append(want, fmt.Sprintf("p%d %d+%d", number, start*unit, length*unit))
	}
	var got []string
	for _, p := range tab.Partitions {
		if !p.Extended {
			got = append(got, fmt.Sprintf("p%d %d+%d", p.Number, p.Start, p.Size))
		}
	}
	if strings.Join(got, ", ") != strings.Join(want, ", ") {
		t.Errorf("got %v, mmls lists %v:\n%s", got, want, out)
	}
}

// sfdiskImage writes the table script describes with sfdisk on a 20 MiB
// image file and reads it back with Read.
func sfdiskImage(t *testing.T, script string) (string, *Table) {
	t.Helper()
	testenv.RequireCmd(t, "sfdisk", "mmls")
	path := imageFile(t, 20*MiB)
	run(t, script, "sfdisk", "-q", path)
	return path, readFile(t, path)
}

func TestSfdiskGPT(t *testing.T) {
	t.Parallel()
	path, tab := sfdiskImage(t, `label: gpt
size=4M, type=L, name=root
size=3M, type=S
size=5M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system"
type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="data two"
`)
	if tab.Scheme != GPT || len(tab.Partitions) != 4 || tab.Partitions[2].Description() != "EFI System" {
		t.Fatalf("table %+v", tab)
	}
	compareSfdisk(t, path, tab)
	compareMmls(t, path, tab)
}

func TestSfdiskDOSLogicals(t *testing.T) {
	t.Parallel()
	// p1 (bootable), then p2 extended over the rest, holding p5 and p6.
	path, tab := sfdiskImage(t, "label: dos\n,4M,83,*\n,,5\n,3M,83\n,,7\n")
	if tab.Scheme != DOS || len(tab.Partitions) != 4 || !tab.Partitions[1].Extended || tab.Partitions[3].Number != 6 || !tab.Partitions[0].Bootable {
		t.Fatalf("table %+v", tab)
	}
	compareSfdisk(t, path, tab)
	compareMmls(t, path, tab)
}

// TestFdisk4KGPT reads a GPT of 4096-byte sectors, written by fdisk -b 4096
// (this sfdisk has no sector size option), from an image file that does not
// say its sector size.
func TestFdisk4KGPT(t *testing.T) {
	t.Parallel()
	path := fdisk4KImage(t)
	tab := readFile(t, path)
	if tab.Scheme != GPT || tab.SectorSize != 4096 || len(tab.Partitions) != 2 {
		t.Fatalf("table %+v", tab)
	}
	compare4K(t, tab, fdisk4K(t, path))
	compareMmls(t, path, tab)
}

// fdisk4KImage writes a GPT of 4096-byte sectors with fdisk -b 4096 on a
// 40 MiB image file: p1 of 4 MiB, p2 over the rest.
func fdisk4KImage(t *testing.T) string {
	t.Helper()
	testenv.RequireCmd(t, "fdisk", "mmls")
	path := imageFile(t, 40*MiB)
	// New GPT; p1 of 4 MiB, p2 over the rest; write.
	run(t, "g\nn\n1\n\n+4M\nn\n2\n\n\nw\n", "fdisk", "-b", "4096", path)
	return path
}

// fdisk4K is fdisk -b 4096's reading of the partitions in path, in the form
// compare4K compares: "p1 4194304+... TYPE-UUID UUID".
func fdisk4K(t *testing.T, path string) []string {
	t.Helper()
	out := run(t, "", "fdisk", "-b", "4096", "-l", "-o", "Device,Start,Sectors,Type-UUID,UUID", path)
	var want []string
	for _, m := range regexp.MustCompile(`(?m)^`+regexp.QuoteMeta(path)+`(\d+)\s+(\d+)\s+(\d+)\s+(\S+)\s+(\S+)`).FindAllStringSubmatch(out, -1) {
		start, _ := strconv.ParseInt(m[2], 10, 64)
		sectors, _ := strconv.ParseInt(m[3], 10, 64)
		want = append(want, fmt.Sprintf("p%s %d+%d %s %s", m[1], start*4096, sectors*4096, m[4], m[5]))
	}
	if len(want) != 2 {
		t.Fatalf("fdisk -b 4096 -l lists %d partitions, not 2:\n%s", len(want), out)
	}
	return want
}

// compare4K fails unless tab lists the partitions fdisk4K listed.
func compare4K(t *testing.T, tab *Table, want []string) {
	t.Helper()
	var got []string
	for _, p := range tab.Partitions {
		got = append(got, fmt.Sprintf("p%d %d+%d %s %s", p.Number, p.Start, p.Size, p.Type, p.UUID))
	}
	if !slices.Equal(got, want) {
		t.Errorf("got %v, fdisk -b 4096 lists %v", got, want)
	}
}

// zeroBytes overwrites n bytes at off in the file path with zeros, as dd
// conv=notrunc from /dev/zero would.
func zeroBytes(t *testing.T, path string, off, n int64) {
	t.Helper()
	patchFile(t, path, off, n, func(b []byte) { clear(b) })
}

// flipByte inverts the byte at off in the file path.
func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	patchFile(t, path, off, 1, func(b []byte) { b[0] ^= 0xff })
}

// patchFile reads n bytes at off in the file path, lets edit change them
// and writes them back.
func patchFile(t *testing.T, path string, off, n int64, edit func([]byte)) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, n)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	edit(b)
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// noMBR begins the note of a GPT read without its protective MBR.
const noMBR = "no protective MBR (no boot signature 55 AA at byte 510)"

// TestSfdiskGPTWithoutMBR wipes the protective MBR (sector 0) of a GPT
// sfdisk wrote, as a damaged disk may hold it: the GPT alone says where
// the partitions are, as gdisk recovers them, so Read finds what sfdisk
// read on the intact disk, from the primary header or else the backup. A
// GPT without a header that checks out is no table, as before.
func TestSfdiskGPTWithoutMBR(t *testing.T) {
	t.Parallel()
	const last = 20*MiB/512 - 1 // the backup header's LBA
	for _, tc := range []struct {
		name   string
		damage func(t *testing.T, path string)
		note   []string // what the note says; nil: no table
	}{
		{"sector 0 wiped", func(t *testing.T, path string) {
			zeroBytes(t, path, 0, 512)
		}, []string{noMBR + "; using the GPT header at LBA 1 (512-byte sectors)"}},
		{"sector 0 and the primary header wiped", func(t *testing.T, path string) {
			zeroBytes(t, path, 0, 1024)
		}, []string{noMBR + " and no primary GPT header at LBA 1; using the backup GPT header at LBA 40959 (512-byte sectors)"}},
		{"sector 0 wiped, the primary header damaged", func(t *testing.T, path string) {
			zeroBytes(t, path, 0, 512)
			flipByte(t, path, 512+40) // first usable LBA: the CRC no longer matches
		}, []string{noMBR + " and primary GPT header (512-byte sectors): CRC ", "; using the backup GPT header at LBA 40959 (512-byte sectors)"}},
		{"sector 0 wiped, both headers damaged", func(t *testing.T, path string) {
			zeroBytes(t, path, 0, 512)
			flipByte(t, path, 512+40)
			flipByte(t, path, last*512+40)
		}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path, _ := sfdiskImage(t, `label: gpt
size=4M, type=L, name=root
size=3M, type=S
type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="data two"
`)
			want := partitiontest.Sfdisk(t, path).Lines(path)
			tc.damage(t, path)
			tab := readDamaged(t, path)
			if tc.note == nil {
				if tab.Scheme != None || tab.Note != "no partition table (no boot signature 55 AA at byte 510)" {
					t.Errorf("table %+v; want none, with today's note on a sector 0 without a boot signature", tab)
				}
				return
			}
			compareLines(t, tab, want)
			checkNote(t, tab, tc.note...)
		})
	}
}

// TestFdisk4KGPTWithoutMBR wipes the protective MBR (sector 0, 4096 bytes)
// of a GPT of 4096-byte sectors, then its primary header too: Read finds
// what fdisk -b 4096 read on the intact disk.
func TestFdisk4KGPTWithoutMBR(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		wiped int64 // bytes wiped from the start
		note  string
	}{
		{"sector 0 wiped", 4096, noMBR + "; using the GPT header at LBA 1 (4096-byte sectors)"},
		{"sector 0 and the primary header wiped", 2 * 4096, noMBR + " and no primary GPT header at LBA 1; using the backup GPT header at LBA 10239 (4096-byte sectors)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := fdisk4KImage(t)
			want := fdisk4K(t, path)
			zeroBytes(t, path, 0, tc.wiped)
			tab := readDamaged(t, path)
			if tab.Scheme != GPT || tab.SectorSize != 4096 || tab.Note != tc.note {
				t.Errorf("table %s with %d-byte sectors, note %q; want gpt, 4096, %q", tab.Scheme, tab.SectorSize, tab.Note, tc.note)
			}
			compare4K(t, tab, want)
		})
	}
}
