package partition

import (
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// Scheme is the kind of partition table, named as sfdisk names its labels.
type Scheme string

const (
	None Scheme = "none" // no usable table: Table.Note says why
	DOS  Scheme = "dos"  // MBR, with logical partitions in an extended one
	GPT  Scheme = "gpt"
)

// Table is what a disk's partition table says, minus what could not be
// trusted.
type Table struct {
	Scheme Scheme
	// SectorSize is the logical sector size the table counts in (512 or
	// 4096). It is 0 when Scheme is None.
	SectorSize int
	// ID is the disk identifier as sfdisk prints it: "0x1234abcd" for DOS,
	// the disk GUID for GPT.
	ID string
	// Partitions are in order of Number.
	Partitions []Partition
	// Note is one line saying what was skipped and why, or why there is no
	// table; empty when the whole table was used.
	Note string
}

// Partition is one entry of the table.
type Partition struct {
	// Number is the number fdisk -l and mmls give the partition (see the
	// package doc).
	Number int
	// Start and Size are in bytes; Start+Size never exceeds the disk.
	Start, Size int64
	// Type is the MBR type as sfdisk prints it (hex, "83", "5"), or the GPT
	// partition type GUID (upper case, "0FC63DAF-8483-4772-8E79-3D69D8477DE4").
	Type string
	// Extended marks an MBR extended partition: the container of the
	// logical partitions, not a partition with data of its own.
	Extended bool
	// Bootable is the MBR boot flag (0x80).
	Bootable bool
	// UUID and Name are the GPT unique partition GUID and name. Control
	// characters in the name are replaced by U+FFFD, so it prints on one
	// line.
	UUID, Name string
}

// Description names the partition's type for people ("Linux filesystem",
// "EFI System"), or returns "" for a type it does not know.
func (p Partition) Description() string {
	return typeNames[p.Type]
}

// Bounds on what a table may make us read.
const (
	// MaxEBRs is how many extended boot records the chain of logical
	// partitions is followed through (the kernel's partition limit, 256).
	MaxEBRs = 256
	// MaxEntryArray is the largest GPT entry array read: 8192 entries of
	// 128 bytes, 64 times the usual 128 entries.
	MaxEntryArray = 1 << 20
	// maxReasons is how many skipped partitions the note names one by one.
	maxReasons = 3
)

// Read reads the partition table of the disk r, size bytes long. It
// returns an error only when r fails; a missing, damaged or hostile table
// gives a Table (Scheme None, or what could be used) and a Note.
func Read(r io.ReaderAt, size int64) (*Table, error) {
	d := &disk{r: r, size: size}
	if size < sector512 {
		return noTable("the disk is smaller than one sector"), nil
	}
	mbr, err := d.read(0, sector512)
	if err != nil {
		return nil, err
	}
	if !hasBootSignature(mbr) {
		return d.readGPT(false)
	}
	entries := mbrEntries(mbr)
	for i, e := range entries {
		if e.boot != 0 && e.boot != 0x80 {
			return noTable(fmt.Sprintf("no partition table: sector 0 ends in 55 AA but entry %d has boot flag %#02x, not 0x00 or 0x80 (a file system's boot sector?)", i+1, e.boot)), nil
		}
	}
	for _, e := range entries {
		if e.typ == typeProtective {
			return d.readGPT(true)
		}
	}
	return d.readDOS(mbr, entries)
}

// noBootSignature is why sector 0 holds no MBR; noBootRecord is the note
// of a disk without one and without a GPT.
const (
	noBootSignature = "no boot signature 55 AA at byte 510"
	noBootRecord    = "no partition table (" + noBootSignature + ")"
)

func noTable(reason string) *Table {
	return &Table{Scheme: None, Note: reason}
}

// disk reads a disk that must be size bytes long.
type disk struct {
	r    io.ReaderAt
	size int64
}

// errShort is a disk that ends before its size says.
var errShort = errors.New("the disk ends before its size")

// read returns n bytes at off, which the caller has checked lie inside the
// disk.
func (d *disk) read(off int64, n int) ([]byte, error) {
	buf := make([]byte, n)
	got, err := d.r.ReadAt(buf, off)
	if got == n {
		return buf, nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		err = errShort
	}
	return nil, fmt.Errorf("partition: reading %d bytes at offset %d: %w", n, off, err)
}

// span is a partition's place on the disk, for the overlap check.
type span struct {
	start, end int64 // bytes, end exclusive
}

// overlapping reports, for each span, whether it overlaps any other. After
// sorting by start, a span overlaps an earlier one exactly when the
// furthest end before it lies past its start, and a later one exactly when
// the next span starts before its end.
func overlapping(spans []span) []bool {
	order := make([]int, len(spans))
	for i := range order {
		order[i] = i
	}
	slices.SortFunc(order, func(a, b int) int {
		switch {
		case spans[a].start < spans[b].start:
			return -1
		case spans[a].start > spans[b].start:
			return 1
		}
		return 0
	})
	out := make([]bool, len(spans))
	var furthest int64
	for k, i := range order {
		s := spans[i]
		if k > 0 && furthest > s.start {
			out[i] = true
		}
		if k+1 < len(order) && spans[order[k+1]].start < s.end {
			out[i] = true
		}
		furthest = max(furthest, s.end)
	}
	return out
}

// notes gathers what a table's reading skipped into the one-line Note.
type notes struct {
	table   []string // about the table as a whole
	skipped []string // "p3 ends past the end of the disk", the first maxReasons
	more    int      // skipped partitions not named
}

func (n *notes) add(format string, args ...any) {
	n.table = append(n.table, fmt.Sprintf(format, args...))
}

func (n *notes) skip(number int, format string, args ...any) {
	if len(n.skipped) == maxReasons {
		n.more++
		return
	}
	n.skipped = append(n.skipped, fmt.Sprintf("p%d ", number)+fmt.Sprintf(format, args...))
}

func (n *notes) String() string {
	parts := slices.Clone(n.table)
	if len(n.skipped) > 0 {
		s := "skipped " + strings.Join(n.skipped, ", ")
		if n.more > 0 {
			s += fmt.Sprintf(" and %d more", n.more)
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, "; ")
}

// dropOverlapping removes the partitions of ps whose spans overlap another
// one's, noting each.
func dropOverlapping(ps []Partition, n *notes) []Partition {
	spans := make([]span, len(ps))
	for i, p := range ps {
		spans[i] = span{p.Start, p.Start + p.Size}
	}
	over := overlapping(spans)
	kept := ps[:0:0]
	for i, p := range ps {
		if over[i] {
			n.skip(p.Number, "overlaps another partition")
			continue
		}
		kept = append(kept, p)
	}
	return kept
}

// finish sorts the partitions by number and sets the note.
func finish(t *Table, n *notes) *Table {
	slices.SortFunc(t.Partitions, func(a, b Partition) int { return a.Number - b.Number })
	t.Note = n.String()
	return t
}
