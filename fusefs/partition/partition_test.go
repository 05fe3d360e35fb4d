package partition

import (
	"errors"
	"fmt"
	"strings"
	"syscall"
	"testing"

	"snapmount/test/partitiontest"
)

const MiB = 1 << 20

// want is the part of a partition a hand-made table test checks.
type want struct {
	number      int
	start, size int64 // bytes
}

func checkParts(t *testing.T, tab *Table, ws ...want) {
	t.Helper()
	if len(tab.Partitions) != len(ws) {
		t.Fatalf("got %d partitions %+v, want %d (note %q)", len(tab.Partitions), tab.Partitions, len(ws), tab.Note)
	}
	for i, w := range ws {
		p := tab.Partitions[i]
		if p.Number != w.number || p.Start != w.start || p.Size != w.size {
			t.Errorf("partition %d: got p%d at %d+%d, want p%d at %d+%d", i, p.Number, p.Start, p.Size, w.number, w.start, w.size)
		}
	}
}

func checkNote(t *testing.T, tab *Table, fragments ...string) {
	t.Helper()
	for _, f := range fragments {
		if !strings.Contains(tab.Note, f) {
			t.Errorf("note %q does not say %q", tab.Note, f)
		}
	}
}

func TestNoTable(t *testing.T) {
	for _, tc := range []struct {
		name  string
		build func(image)
		note  string
	}{
		{"blank", func(image) {}, "no boot signature"},
		{"boot sector of a file system", func(im image) {
			im.entry(0, 0, 0xeb, 0x83, 2048, 2048) // 0xeb: a jump instruction, not a boot flag
		}, "boot flag 0xeb"},
		{"empty DOS table", func(im image) { im[510], im[511] = 0x55, 0xaa }, "DOS partition table is empty"},
		{"protective MBR without a GPT", func(im image) {
			im.entry(0, 0, 0, 0xee, 1, uint32(len(im)/512-1))
		}, "protective MBR (type ee) without a valid GPT: no GPT header"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := newImage(4 * MiB)
			tc.build(im)
			tab := readImage(t, im)
			if len(tab.Partitions) != 0 {
				t.Fatalf("got partitions %+v", tab.Partitions)
			}
			checkNote(t, tab, tc.note)
		})
	}
	tab, err := Read(&recordingReader{size: 100}, 100)
	if err != nil || tab.Scheme != None || !strings.Contains(tab.Note, "smaller than one sector") {
		t.Fatalf("100-byte disk: %+v, %v", tab, err)
	}
}

func TestDOSPrimaries(t *testing.T) {
	im := newImage(8 * MiB)
	im.entry(0, 0, 0x80, 0x83, 2048, 2048)
	im.entry(0, 2, 0, 0x07, 6144, 4096) // slot 3: numbered 3 although slot 2 is empty
	binaryID := []byte{0xef, 0xbe, 0xad, 0xde}
	copy(im[440:], binaryID)
	tab := readImage(t, im)
	if tab.Scheme != DOS || tab.SectorSize != 512 || tab.ID != "0xdeadbeef" || tab.Note != "" {
		t.Fatalf("table %+v", tab)
	}
	checkParts(t, tab, want{1, 1 * MiB, 1 * MiB}, want{3, 3 * MiB, 2 * MiB})
	if p := tab.Partitions[0]; !p.Bootable || p.Type != "83" || p.Description() != "Linux" {
		t.Errorf("p1 is %+v (%q)", p, p.Description())
	}
	if p := tab.Partitions[1]; p.Bootable || p.Type != "7" {
		t.Errorf("p3 is %+v", p)
	}
}

func TestDOSPastTheEnd(t *testing.T) {
	im := newImage(4 * MiB)
	im.entry(0, 0, 0, 0x83, 2048, 4096) // sectors 2048-6143 of 8192
	im.entry(0, 1, 0, 0x83, 6144, 4096) // ends at 10240 > 8192
	tab := readImage(t, im)
	checkParts(t, tab, want{1, 1 * MiB, 2 * MiB})
	checkNote(t, tab, "skipped p2 ends past the end of the disk (sector 10240 of 8192)")

	// Alone, the bad entry leaves no partition: the whole disk alone.
	im.entry(0, 0, 0, 0, 0, 0)
	checkParts(t, readImage(t, im))
}

func TestDOSOverlapping(t *testing.T) {
	im := newImage(8 * MiB)
	im.entry(0, 0, 0, 0x83, 2048, 4096)
	im.entry(0, 1, 0, 0x83, 4096, 4096) // inside p1's second half
	im.entry(0, 3, 0, 0x83, 12288, 2048)
	tab := readImage(t, im)
	checkParts(t, tab, want{4, 6 * MiB, 1 * MiB})
	checkNote(t, tab, "p1 overlaps another partition", "p2 overlaps another partition")
}

// extended writes an MBR with p1 (data) and p2 (extended, sectors
// 8192-16383 of a 16 MiB disk... or as given).
func extendedDisk(size int, extStart, extSize uint32) image {
	im := newImage(size)
	im.entry(0, 0, 0, 0x83, 2048, 2048)
	im.entry(0, 1, 0, 0x05, extStart, extSize)
	return im
}

func TestDOSLogicals(t *testing.T) {
	im := extendedDisk(16*MiB, 8192, 16384)
	im.ebr(8192, 2048, 2048, 4096, 8192) // p5 at 10240, next EBR at 12288
	im.ebr(12288, 0, 0, 6144, 4096)      // an empty link: numbered by nobody
	im.ebr(14336, 2048, 4096, 0, 0)      // p6 at 16384
	tab := readImage(t, im)
	if tab.Note != "" {
		t.Errorf("note %q", tab.Note)
	}
	checkParts(t, tab,
		want{1, 1 * MiB, 1 * MiB},
		want{2, 4 * MiB, 8 * MiB},
		want{5, 5 * MiB, 1 * MiB},
		want{6, 8 * MiB, 2 * MiB})
	if !tab.Partitions[1].Extended || tab.Partitions[2].Extended {
		t.Errorf("Extended flags wrong: %+v", tab.Partitions)
	}
}

func TestDOSHostileChains(t *testing.T) {
	t.Run("loop", func(t *testing.T) {
		im := extendedDisk(16*MiB, 8192, 16384)
		im.ebr(8192, 2048, 2048, 4096, 8192)
		im.ebr(12288, 2048, 2048, 4096, 8192) // links to itself
		tab := readImage(t, im)
		checkParts(t, tab, want{1, 1 * MiB, 1 * MiB}, want{2, 4 * MiB, 8 * MiB}, want{5, 5 * MiB, 1 * MiB}, want{6, 7 * MiB, 1 * MiB})
		checkNote(t, tab, "loops back to sector 12288")
	})
	t.Run("loop of empty links", func(t *testing.T) {
		im := extendedDisk(16*MiB, 8192, 16384)
		im.ebr(8192, 0, 0, 0, 0)
		im.entry(8192*512, 1, 0, 0x05, 0, 1) // links to itself (start 0 from the extended start)
		tab := readImage(t, im)
		checkParts(t, tab, want{1, 1 * MiB, 1 * MiB}, want{2, 4 * MiB, 8 * MiB})
		checkNote(t, tab, "loops back to sector 8192")
	})
	t.Run("thousands deep", func(t *testing.T) {
		// 5000 EBRs in a row, each with a one-sector logical partition
		// after it: the chain is cut at MaxEBRs links.
		const links = 5000
		im := extendedDisk(16*MiB, 8192, 2*links+2)
		for i := range int64(links) {
			im.ebr(8192+2*i, 1, 1, uint32(2*(i+1)), 2)
		}
		r := &recordingReader{data: im, size: int64(len(im))}
		tab, err := Read(r, r.size)
		if err != nil {
			t.Fatal(err)
		}
		checkInvariants(t, tab, r.size)
		if got := len(tab.Partitions); got != 2+MaxEBRs {
			t.Errorf("got %d partitions, want 2 primaries and %d logicals", got, MaxEBRs)
		}
		if r.reads > MaxEBRs+1 || r.largest > 512 {
			t.Errorf("%d reads, the largest %d bytes: not bounded by the chain limit", r.reads, r.largest)
		}
		checkNote(t, tab, "longer than 256 links")
	})
	t.Run("link outside the extended partition", func(t *testing.T) {
		im := extendedDisk(16*MiB, 8192, 8192)
		im.ebr(8192, 2048, 2048, 10000, 8)
		tab := readImage(t, im)
		checkParts(t, tab, want{1, 1 * MiB, 1 * MiB}, want{2, 4 * MiB, 4 * MiB}, want{5, 5 * MiB, 1 * MiB})
		checkNote(t, tab, "points to sector 18192, outside the extended partition p2")
	})
	t.Run("logical past the extended partition", func(t *testing.T) {
		im := extendedDisk(16*MiB, 8192, 8192)
		im.ebr(8192, 2048, 8192, 0, 0)
		tab := readImage(t, im)
		checkParts(t, tab, want{1, 1 * MiB, 1 * MiB}, want{2, 4 * MiB, 4 * MiB})
		checkNote(t, tab, "p5 ends past the end of the extended partition p2")
	})
	t.Run("EBR without signature", func(t *testing.T) {
		im := extendedDisk(16*MiB, 8192, 8192)
		tab := readImage(t, im)
		checkParts(t, tab, want{1, 1 * MiB, 1 * MiB}, want{2, 4 * MiB, 4 * MiB})
		checkNote(t, tab, "EBR at sector 8192 has no boot signature")
	})
	t.Run("overlapping logicals", func(t *testing.T) {
		im := extendedDisk(16*MiB, 8192, 16384)
		im.ebr(8192, 1, 4200, 4096, 8192) // p5: 8193-12392, over the next EBR and p6
		im.ebr(12288, 1, 2048, 0, 0)      // p6: 12289-14336
		tab := readImage(t, im)
		checkParts(t, tab, want{1, 1 * MiB, 1 * MiB}, want{2, 4 * MiB, 8 * MiB})
		checkNote(t, tab, "p5 overlaps another partition", "p6 overlaps another partition")
	})
}

func TestGPT(t *testing.T) {
	for _, ss := range []int{512, 4096} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			im := newImage(32 * MiB)
			s := uint64(MiB / ss) // sectors per MiB
			im.gpt(gptLayout{ss: ss},
				gptPart{index: 0, first: s, last: 3*s - 1, typ: linuxFS, name: "root"},
				gptPart{index: 2, first: 4 * s, last: 5*s - 1, typ: linuxFS, name: "ünï\x07"})
			tab := readImage(t, im)
			if tab.Scheme != GPT || tab.SectorSize != ss || tab.Note != "" {
				t.Fatalf("table %+v", tab)
			}
			checkParts(t, tab, want{1, 1 * MiB, 2 * MiB}, want{3, 4 * MiB, 1 * MiB})
			p := tab.Partitions[0]
			if p.Type != "0FC63DAF-8483-4772-8E79-3D69D8477DE4" || p.Name != "root" || p.Description() != "Linux filesystem" {
				t.Errorf("p1 is %+v", p)
			}
			if got := tab.Partitions[1].Name; got != "ünï\uFFFD" {
				t.Errorf("p3's name is %q; the control character should be U+FFFD", got)
			}
		})
	}
}

// gptDisk is a 16 MiB disk with a 512-byte-sector GPT holding p1 (1-3 MiB)
// and p2 (4-5 MiB).
func gptDisk() image {
	im := newImage(16 * MiB)
	im.gpt(gptLayout{ss: 512},
		gptPart{index: 0, first: 2048, last: 6143, typ: linuxFS},
		gptPart{index: 1, first: 8192, last: 10239, typ: linuxFS})
	return im
}

func TestGPTHostile(t *testing.T) {
	const last = 16*MiB/512 - 1
	zeroBackup := func(im image) { clear(im[last*512:]) }
	for _, tc := range []struct {
		name   string
		damage func(im image)
		parts  []want // nil: no table
		note   []string
	}{
		{"header CRC wrong, backup used", func(im image) { im[512+16]++ },
			[]want{{1, 1 * MiB, 2 * MiB}, {2, 4 * MiB, 1 * MiB}},
			[]string{"used the backup GPT", "primary GPT header (512-byte sectors): CRC"}},
		{"primary header missing, backup used", func(im image) { clear(im[512:1024]) },
			[]want{{1, 1 * MiB, 2 * MiB}, {2, 4 * MiB, 1 * MiB}},
			[]string{"used the backup GPT at the end of the disk: no primary GPT header at LBA 1"}},
		{"header CRC wrong, no backup", func(im image) { im[512+16]++; zeroBackup(im) },
			nil, []string{"without a valid GPT: primary GPT header (512-byte sectors): CRC"}},
		{"entry array CRC wrong", func(im image) { im[1024+20]++; zeroBackup(im) },
			nil, []string{"GPT entry array at LBA 2 (512-byte sectors): CRC"}},
		{"entry size wrong", func(im image) {
			im[512+84] = 100
			partitiontest.ResealGPTHeader(im[512:])
			zeroBackup(im)
		}, nil, []string{"entry size 100 is not 128 times a power of 2"}},
		{"absurd entry count", func(im image) {
			copy(im[512+80:], []byte{0xff, 0xff, 0xff, 0xff})
			partitiontest.ResealGPTHeader(im[512:])
			zeroBackup(im)
		}, nil, []string{"4294967295 entries of 128 bytes exceed the 1048576 bytes read at most"}},
		{"entry array past the end", func(im image) {
			copy(im[512+72:], []byte{0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})
			partitiontest.ResealGPTHeader(im[512:])
			zeroBackup(im)
		}, nil, []string{"entry array (LBA 18446744073709551600, 32 sectors) is not inside the disk"}},
		{"header says it is elsewhere", func(im image) {
			im[512+24] = 7
			partitiontest.ResealGPTHeader(im[512:])
			zeroBackup(im)
		}, nil, []string{"says it is at LBA 7"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := gptDisk()
			tc.damage(im)
			tab := readImage(t, im)
			checkParts(t, tab, tc.parts...)
			if tc.parts == nil && tab.Scheme != None {
				t.Errorf("scheme %q, want none", tab.Scheme)
			}
			checkNote(t, tab, tc.note...)
		})
	}
}

// TestGPTWithoutMBR reads hand-made GPTs whose sector 0 holds no boot
// record: each header and entry array is checked as behind a protective
// MBR, and the note says which header was used, or is today's note on a
// disk without a table when none checks out.
func TestGPTWithoutMBR(t *testing.T) {
	const last = 16*MiB/512 - 1
	parts := []want{{1, 1 * MiB, 2 * MiB}, {2, 4 * MiB, 1 * MiB}}
	for _, tc := range []struct {
		name   string
		damage func(im image)
		parts  []want
		note   []string // nil: no table
	}{
		{"primary used", func(image) {}, parts,
			[]string{"no protective MBR (no boot signature 55 AA at byte 510); using the GPT header at LBA 1 (512-byte sectors)"}},
		{"primary header CRC wrong, backup used", func(im image) { im[512+16]++ }, parts,
			[]string{"no protective MBR (no boot signature 55 AA at byte 510) and primary GPT header (512-byte sectors): CRC ",
				"; using the backup GPT header at LBA 32767 (512-byte sectors)"}},
		{"primary entry array CRC wrong, backup used", func(im image) { im[1024+20]++ }, parts,
			[]string{"and primary GPT entry array at LBA 2 (512-byte sectors): CRC ", "; using the backup GPT header at LBA 32767"}},
		{"both entry arrays CRC wrong", func(im image) { im[1024+20]++; im[(last-32)*512+20]++ }, nil, nil},
		{"absurd entry count in both headers", func(im image) {
			for _, lba := range []int{1, last} {
				copy(im[lba*512+80:], []byte{0xff, 0xff, 0xff, 0xff})
				partitiontest.ResealGPTHeader(im[lba*512:])
			}
		}, nil, nil},
		{"backup says it is elsewhere", func(im image) {
			clear(im[512:1024])
			im[last*512+24] = 7
			partitiontest.ResealGPTHeader(im[last*512:])
		}, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := gptDisk()
			clear(im[:512])
			tc.damage(im)
			tab := readImage(t, im)
			checkParts(t, tab, tc.parts...)
			if tc.note == nil {
				if tab.Scheme != None || tab.Note != "no partition table (no boot signature 55 AA at byte 510)" {
					t.Errorf("scheme %q, note %q; want none, with today's note on a sector 0 without a boot signature", tab.Scheme, tab.Note)
				}
				return
			}
			if tab.Scheme != GPT {
				t.Errorf("scheme %q, want gpt", tab.Scheme)
			}
			checkNote(t, tab, tc.note...)
		})
	}
	t.Run("hostile entries", func(t *testing.T) {
		im := gptEntryDisk(
			gptPart{index: 0, first: 2048, last: 6143, typ: linuxFS},
			gptPart{index: 1, first: 8192, last: 1 << 40, typ: linuxFS})
		clear(im[:512])
		tab := readImage(t, im)
		checkParts(t, tab, want{1, 1 * MiB, 2 * MiB})
		if want := "no protective MBR (no boot signature 55 AA at byte 510); using the GPT header at LBA 1 (512-byte sectors); skipped p2 ends past the end of the disk (LBA 1099511627776 of 32768)"; tab.Note != want {
			t.Errorf("note %q, want %q", tab.Note, want)
		}
	})
}

// gptEntryDisk is gptDisk with entry i rewritten to first-last (LBAs) and
// both arrays' CRCs fixed: the table is consistent, its contents hostile.
func gptEntryDisk(entries ...gptPart) image {
	im := newImage(16 * MiB)
	im.gpt(gptLayout{ss: 512}, entries...)
	return im
}

func TestGPTHostileEntries(t *testing.T) {
	for _, tc := range []struct {
		name    string
		entries []gptPart
		parts   []want
		note    string
	}{
		{"past the end", []gptPart{
			{index: 0, first: 2048, last: 6143, typ: linuxFS},
			{index: 1, first: 8192, last: 1 << 40, typ: linuxFS},
		}, []want{{1, 1 * MiB, 2 * MiB}}, "skipped p2 ends past the end of the disk (LBA 1099511627776 of 32768)"},
		{"outside the usable area", []gptPart{{index: 0, first: 1, last: 6143, typ: linuxFS}},
			nil, "skipped p1 lies outside the GPT's usable LBAs 34-32734"},
		{"ends before it starts", []gptPart{{index: 3, first: 6143, last: 2048, typ: linuxFS}},
			nil, "skipped p4 ends (LBA 2048) before it starts (LBA 6143)"},
		{"overlapping", []gptPart{
			{index: 0, first: 2048, last: 6143, typ: linuxFS},
			{index: 1, first: 6143, last: 8191, typ: linuxFS},
			{index: 2, first: 8192, last: 9000, typ: linuxFS},
		}, []want{{3, 4 * MiB, 809 * 512}}, "skipped p1 overlaps another partition, p2 overlaps another partition"},
		{"many bad", []gptPart{
			{index: 0, first: 1, last: 2, typ: linuxFS}, {index: 1, first: 1, last: 2, typ: linuxFS},
			{index: 2, first: 1, last: 2, typ: linuxFS}, {index: 3, first: 1, last: 2, typ: linuxFS},
			{index: 4, first: 1, last: 2, typ: linuxFS},
		}, nil, "p3 lies outside the GPT's usable LBAs 34-32734 and 2 more"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tab := readImage(t, gptEntryDisk(tc.entries...))
			checkParts(t, tab, tc.parts...)
			checkNote(t, tab, tc.note)
		})
	}
}

// TestGPTHugeDisk claims a disk of 1 PiB (zeros past a hand-made table)
// and a GPT with the largest entry array allowed: reading it stays within
// its bounds, whatever the disk claims.
func TestGPTHugeDisk(t *testing.T) {
	im := newImage(4 * MiB)
	im.gpt(gptLayout{ss: 512, numEntries: MaxEntryArray / 128},
		gptPart{index: 8191, first: 4096, last: 6000, typ: linuxFS})
	// The backup went to the image's end; the claimed disk is far larger,
	// so only the primary counts.
	r := &recordingReader{data: im, size: 1 << 50}
	tab, err := Read(r, r.size)
	if err != nil {
		t.Fatal(err)
	}
	checkInvariants(t, tab, r.size)
	if len(tab.Partitions) != 1 || tab.Partitions[0].Number != 8192 {
		t.Fatalf("table %+v", tab)
	}
	if r.largest > MaxEntryArray || r.reads > 4 {
		t.Errorf("%d reads, the largest %d bytes", r.reads, r.largest)
	}
}

type failingReader struct{}

func (failingReader) ReadAt(p []byte, off int64) (int, error) { return 0, syscall.EIO }

func TestReadError(t *testing.T) {
	_, err := Read(failingReader{}, 1<<30)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("got %v, want an error wrapping EIO", err)
	}
	// A disk that ends before its size is an error too, not "no table".
	im := extendedDisk(16*MiB, 8192, 8192)
	_, err = Read(&recordingReader{data: im, size: 4 * MiB}, 16*MiB)
	if err == nil || !strings.Contains(err.Error(), "ends before its size") {
		t.Fatalf("got %v", err)
	}
}
