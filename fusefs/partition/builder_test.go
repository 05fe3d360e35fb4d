package partition

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"io"
	"sync"
	"testing"
	"unicode/utf16"
)

// disk images built byte by byte, for tables no tool would write.

// image is a disk held in memory.
type image []byte

func newImage(size int) image { return make(image, size) }

// entry writes MBR/EBR entry i of the boot record at byte off.
func (im image) entry(off int64, i int, boot, typ byte, start, size uint32) {
	b := im[off+446+16*int64(i):]
	b[0], b[4] = boot, typ
	binary.LittleEndian.PutUint32(b[8:], start)
	binary.LittleEndian.PutUint32(b[12:], size)
	im[off+510], im[off+511] = 0x55, 0xaa
}

// ebr writes an EBR at sector lba: a data entry (start relative to the
// EBR) and, if nextRel is not 0, a link (relative to the extended
// partition's start).
func (im image) ebr(lba int64, dataStart, dataSize uint32, nextRel, nextSize uint32) {
	off := lba * 512
	if dataSize != 0 {
		im.entry(off, 0, 0, 0x83, dataStart, dataSize)
	}
	if nextRel != 0 {
		im.entry(off, 1, 0, 0x05, nextRel, nextSize)
	}
	im[off+510], im[off+511] = 0x55, 0xaa
}

// gptPart is one entry of a hand-made GPT.
type gptPart struct {
	index       int // entry index; the partition's number is index+1
	first, last uint64
	typ         [16]byte
	name        string
}

var linuxFS = [16]byte{0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4}

// gptLayout is where a hand-made GPT's pieces go.
type gptLayout struct {
	ss         int
	numEntries uint32
	entrySize  uint32
}

func (l gptLayout) arraySectors() int64 {
	return (int64(l.numEntries)*int64(l.entrySize) + int64(l.ss) - 1) / int64(l.ss)
}

// gpt writes a protective MBR, the primary GPT at LBA 1 and the backup at
// the last LBA, both consistent, with the given entries.
func (im image) gpt(l gptLayout, parts ...gptPart) {
	if l.numEntries == 0 {
		l.numEntries = 128
	}
	if l.entrySize == 0 {
		l.entrySize = 128
	}
	ss := int64(l.ss)
	sectors := int64(len(im)) / ss
	im.entry(0, 0, 0, 0xee, 1, uint32(min(sectors-1, 0xffffffff)))
	arr := make([]byte, int64(l.numEntries)*int64(l.entrySize))
	for _, p := range parts {
		e := arr[p.index*int(l.entrySize):]
		copy(e[0:16], p.typ[:])
		e[16] = byte(p.index + 1) // a unique GUID of sorts
		binary.LittleEndian.PutUint64(e[32:], p.first)
		binary.LittleEndian.PutUint64(e[40:], p.last)
		for i, u := range utf16.Encode([]rune(p.name)) {
			binary.LittleEndian.PutUint16(e[56+2*i:], u)
		}
	}
	as := l.arraySectors()
	firstUsable, lastUsable := 2+as, sectors-2-as
	im.gptHeader(l, 1, sectors-1, 2, firstUsable, lastUsable, arr)
	im.gptHeader(l, sectors-1, 1, sectors-1-as, firstUsable, lastUsable, arr)
}

func (im image) gptHeader(l gptLayout, my, alt, entryLBA, firstUsable, lastUsable int64, arr []byte) {
	ss := int64(l.ss)
	copy(im[entryLBA*ss:], arr)
	h := im[my*ss : my*ss+92]
	clear(h)
	le := binary.LittleEndian
	copy(h, gptSignature)
	le.PutUint32(h[8:], 0x00010000)
	le.PutUint32(h[12:], 92)
	le.PutUint64(h[24:], uint64(my))
	le.PutUint64(h[32:], uint64(alt))
	le.PutUint64(h[40:], uint64(firstUsable))
	le.PutUint64(h[48:], uint64(lastUsable))
	h[56] = 0x42 // disk GUID
	le.PutUint64(h[72:], uint64(entryLBA))
	le.PutUint32(h[80:], l.numEntries)
	le.PutUint32(h[84:], l.entrySize)
	le.PutUint32(h[88:], crc32.ChecksumIEEE(arr))
	le.PutUint32(h[16:], crc32.ChecksumIEEE(h))
}

// recordingReader is an io.ReaderAt over an image that records how many
// reads it served and the largest, and reads zeros past the image up to
// size, so a test can claim a disk far larger than memory.
type recordingReader struct {
	data image
	size int64

	mu      sync.Mutex
	reads   int
	largest int
}

func (r *recordingReader) ReadAt(p []byte, off int64) (int, error) {
	r.mu.Lock()
	r.reads++
	r.largest = max(r.largest, len(p))
	r.mu.Unlock()
	if off < 0 {
		return 0, io.ErrUnexpectedEOF
	}
	if off >= r.size {
		return 0, io.EOF
	}
	n := len(p)
	if rest := r.size - off; int64(n) > rest {
		n = int(rest)
	}
	clear(p[:n])
	if off < int64(len(r.data)) {
		copy(p[:n], r.data[off:])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func readImage(t *testing.T, im image) *Table {
	t.Helper()
	tab, err := Read(bytes.NewReader(im), int64(len(im)))
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	checkInvariants(t, tab, int64(len(im)))
	return tab
}

// checkInvariants fails unless tab keeps the promises Read makes for any
// input: partitions inside the disk, in order of number, data partitions
// not overlapping, a one-line note, and a reason when there is no table.
func checkInvariants(t testing.TB, tab *Table, size int64) {
	t.Helper()
	if tab == nil {
		t.Fatal("Read returned a nil table and no error")
	}
	if bytes.ContainsAny([]byte(tab.Note), "\n\r") || len(tab.Note) > 1024 {
		t.Fatalf("note is not one short line: %q", tab.Note)
	}
	if tab.Scheme == None && (len(tab.Partitions) > 0 || tab.Note == "") {
		t.Fatalf("no table, but %d partitions and note %q", len(tab.Partitions), tab.Note)
	}
	var ext *Partition
	for i, p := range tab.Partitions {
		if p.Size <= 0 || p.Start < 0 || p.Start+p.Size > size || p.Start+p.Size < p.Start {
			t.Fatalf("partition %d (%d+%d) is not inside the disk of %d bytes", p.Number, p.Start, p.Size, size)
		}
		if i > 0 && p.Number <= tab.Partitions[i-1].Number {
			t.Fatalf("partition numbers out of order: %d after %d", p.Number, tab.Partitions[i-1].Number)
		}
		if p.Extended {
			ext = &tab.Partitions[i]
		}
		if p.Number > 4 && tab.Scheme == DOS && (ext == nil || p.Start < ext.Start || p.Start+p.Size > ext.Start+ext.Size) {
			t.Fatalf("logical partition %d lies outside its extended partition", p.Number)
		}
		for _, q := range tab.Partitions[:i] {
			if q.Extended && p.Number > 4 {
				continue // a logical partition lies inside its container
			}
			if p.Start < q.Start+q.Size && q.Start < p.Start+p.Size {
				t.Fatalf("partitions %d and %d overlap", q.Number, p.Number)
			}
		}
	}
}
