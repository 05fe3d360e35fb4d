package partition

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"strings"
	"unicode"
	"unicode/utf16"
)

// The GPT header's fields (UEFI 2.10, 5.3.2) used here, by byte offset.
const (
	gptSignature    = "EFI PART"
	gptMinHeader    = 92 // the header's size in every revision so far
	gptEntryMinSize = 128
)

// sectorSizes are the logical sector sizes a GPT is looked for with.
var sectorSizes = [...]int{512, 4096}

// gptHeader is a decoded GPT header that passed its own checks.
type gptHeader struct {
	which       string // "primary" or "backup"
	ss          int64  // sector size
	lba         int64  // where the header is
	firstUsable int64  // LBAs
	lastUsable  int64
	diskGUID    string
	entryLBA    int64
	numEntries  int64
	entrySize   int64
	entryCRC    uint32
}

// readGPT reads the GPT of a disk whose sector 0 holds a protective MBR
// (protective) or no boot record at all (a wiped or damaged first sector,
// from which gdisk recovers a GPT disk too): the primary at LBA 1 (512- or
// 4096-byte sectors), else the backup at the disk's last LBA. Without a
// usable GPT there is no table: a protective MBR's note says what was wrong
// with the GPT, a missing boot record's only that there is no table.
func (d *disk) readGPT(protective bool) (*Table, error) {
	h, entries, why, err := d.findGPT()
	if err != nil {
		return nil, err
	}
	var n notes
	switch {
	case h == nil && !protective:
		return noTable(noBootRecord), nil
	case h == nil:
		if len(why) == 0 {
			why = []string{"no GPT header (\"EFI PART\") at LBA 1 or at the last LBA, for 512- or 4096-byte sectors"}
		}
		return noTable("protective MBR (type ee) without a valid GPT: " + strings.Join(why, ", ")), nil
	case protective && h.which == "backup":
		n.add("used the backup GPT at the end of the disk: %s", primaryNotUsed(why))
	case !protective && h.which == "primary":
		n.add("no protective MBR (%s); using the GPT header at LBA 1 (%d-byte sectors)", noBootSignature, h.ss)
	case !protective:
		n.add("no protective MBR (%s) and %s; using the backup GPT header at LBA %d (%d-byte sectors)", noBootSignature, primaryNotUsed(why), h.lba, h.ss)
	}
	return d.gptTable(h, entries, &n), nil
}

// findGPT returns the first GPT header, with its entry array, that checks
// out: the primary at LBA 1 for 512-, then 4096-byte sectors, then the
// backup at the last LBA likewise. h is nil when none does; why says why
// each one found was not used.
func (d *disk) findGPT() (h *gptHeader, entries []byte, why []string, err error) {
	for _, backup := range []bool{false, true} {
		for _, ss := range sectorSizes {
			h, reason, err := d.gptHeader(int64(ss), backup)
			if err != nil {
				return nil, nil, nil, err
			}
			if reason == "" {
				entries, reason, err = d.gptEntries(h)
				if err != nil {
					return nil, nil, nil, err
				}
			}
			if reason == "" {
				return &h, entries, why, nil
			}
			if reason != errNoHeader {
				why = append(why, reason)
			}
		}
	}
	return nil, nil, why, nil
}

// primaryNotUsed says why the backup GPT was used, given why the headers
// looked at before it were not.
func primaryNotUsed(why []string) string {
	if len(why) == 0 {
		return "no primary GPT header at LBA 1"
	}
	return strings.Join(why, ", ")
}

// errNoHeader is the reason for a sector without a GPT signature: the
// normal outcome of looking with the wrong sector size, not worth a note.
const errNoHeader = "no GPT signature"

// gptHeader reads and checks the primary (LBA 1) or backup (last LBA)
// header for sector size ss. A non-empty reason says why it is not usable.
func (d *disk) gptHeader(ss int64, backup bool) (h gptHeader, reason string, err error) {
	sectors := d.size / ss
	if sectors < 3 {
		return h, errNoHeader, nil
	}
	lba, which := int64(1), "primary"
	if backup {
		lba, which = sectors-1, "backup"
	}
	sec, err := d.read(lba*ss, int(ss))
	if err != nil {
		return h, "", err
	}
	if string(sec[:8]) != gptSignature {
		return h, errNoHeader, nil
	}
	bad := func(format string, args ...any) (gptHeader, string, error) {
		return h, fmt.Sprintf("%s GPT header (%d-byte sectors): ", which, ss) + fmt.Sprintf(format, args...), nil
	}
	le := binary.LittleEndian
	hsize := le.Uint32(sec[12:])
	if hsize < gptMinHeader || int64(hsize) > ss {
		return bad("header size %d is not between %d and %d", hsize, gptMinHeader, ss)
	}
	want := le.Uint32(sec[16:])
	hdr := bytes.Clone(sec[:hsize])
	clear(hdr[16:20])
	if got := crc32.ChecksumIEEE(hdr); got != want {
		return bad("CRC %08x, but the header's bytes give %08x", want, got)
	}
	if my := le.Uint64(sec[24:]); my != uint64(lba) {
		return bad("says it is at LBA %d, but it is at LBA %d", my, lba)
	}
	first, last := le.Uint64(sec[40:]), le.Uint64(sec[48:])
	// A usable area that runs past the end is tolerated (a truncated
	// image): each entry is checked against the disk's end anyway.
	if first > last || first >= uint64(sectors) {
		return bad("usable LBAs %d-%d do not fit a disk of %d sectors", first, last, sectors)
	}
	entryLBA := le.Uint64(sec[72:])
	num, esize := le.Uint32(sec[80:]), le.Uint32(sec[84:])
	if esize < gptEntryMinSize || esize%gptEntryMinSize != 0 || esize&(esize-1) != 0 {
		return bad("entry size %d is not 128 times a power of 2", esize)
	}
	arrayBytes := uint64(num) * uint64(esize)
	if arrayBytes > MaxEntryArray {
		return bad("%d entries of %d bytes exceed the %d bytes read at most", num, esize, MaxEntryArray)
	}
	arraySectors := (arrayBytes + uint64(ss) - 1) / uint64(ss)
	if entryLBA < 1 || entryLBA >= uint64(sectors) || arraySectors > uint64(sectors)-entryLBA {
		return bad("its entry array (LBA %d, %d sectors) is not inside the disk", entryLBA, arraySectors)
	}
	return gptHeader{
		which:       which,
		ss:          ss,
		lba:         lba,
		firstUsable: int64(first),
		lastUsable:  int64(min(last, uint64(sectors-1))),
		diskGUID:    guid(sec[56:72]),
		entryLBA:    int64(entryLBA),
		numEntries:  int64(num),
		entrySize:   int64(esize),
		entryCRC:    le.Uint32(sec[88:]),
	}, "", nil
}

// gptEntries reads the entry array h points to and checks its CRC.
func (d *disk) gptEntries(h gptHeader) (entries []byte, reason string, err error) {
	entries, err = d.read(h.entryLBA*h.ss, int(h.numEntries*h.entrySize))
	if err != nil {
		return nil, "", err
	}
	if got := crc32.ChecksumIEEE(entries); got != h.entryCRC {
		return nil, fmt.Sprintf("%s GPT entry array at LBA %d (%d-byte sectors): CRC %08x, but its bytes give %08x", h.which, h.entryLBA, h.ss, h.entryCRC, got), nil
	}
	return entries, "", nil
}

// gptTable turns a checked entry array into the table.
func (d *disk) gptTable(h *gptHeader, entries []byte, n *notes) *Table {
	t := &Table{Scheme: GPT, SectorSize: int(h.ss), ID: h.diskGUID}
	le := binary.LittleEndian
	diskSectors := d.size / h.ss
	for i := range h.numEntries {
		e := entries[i*h.entrySize : (i+1)*h.entrySize]
		if allZero(e[:16]) {
			continue // unused entry
		}
		number := int(i) + 1
		first, last := le.Uint64(e[32:]), le.Uint64(e[40:])
		switch {
		case first > last:
			n.skip(number, "ends (LBA %d) before it starts (LBA %d)", last, first)
			continue
		case last >= uint64(diskSectors):
			n.skip(number, "ends past the end of the disk (LBA %d of %d)", last, diskSectors)
			continue
		case first < uint64(h.firstUsable) || last > uint64(h.lastUsable):
			n.skip(number, "lies outside the GPT's usable LBAs %d-%d", h.firstUsable, h.lastUsable)
			continue
		}
		t.Partitions = append(t.Partitions, Partition{
			Number: number,
			Start:  int64(first) * h.ss,
			Size:   int64(last-first+1) * h.ss,
			Type:   guid(e[0:16]),
			UUID:   guid(e[16:32]),
			Name:   gptName(e[56:128]),
		})
	}
	t.Partitions = dropOverlapping(t.Partitions, n)
	if len(t.Partitions) == 0 && len(n.table)+len(n.skipped) == 0 {
		n.add("the GPT has no partitions")
	}
	return finish(t, n)
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// guid formats a GUID stored as GPT stores it (the first three fields
// little-endian) as sfdisk prints it.
func guid(b []byte) string {
	le := binary.LittleEndian
	return fmt.Sprintf("%08X-%04X-%04X-%X-%X", le.Uint32(b[0:]), le.Uint16(b[4:]), le.Uint16(b[6:]), b[8:10], b[10:16])
}

// gptName decodes the 36 UTF-16LE code units of an entry's name, up to the
// first NUL, with control characters (and invalid UTF-16) as U+FFFD.
func gptName(b []byte) string {
	units := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		u := binary.LittleEndian.Uint16(b[i:])
		if u == 0 {
			break
		}
		units = append(units, u)
	}
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) {
			return unicode.ReplacementChar
		}
		return r
	}, string(utf16.Decode(units)))
}
