package partition

import (
	"encoding/binary"
	"fmt"
)

// sector512 is the MBR's sector: the boot record is always its first 512
// bytes, and a DOS table without a GPT counts in 512-byte sectors.
const sector512 = 512

// MBR partition types with a meaning here.
const (
	typeProtective = 0xee // the protective MBR of a GPT disk
)

// isExtended reports the types fdisk and the kernel follow as extended
// partitions: DOS extended (CHS), W95 extended (LBA) and Linux extended.
func isExtended(typ byte) bool {
	return typ == 0x05 || typ == 0x0f || typ == 0x85
}

// mbrEntry is one of the four 16-byte entries of an MBR or EBR.
type mbrEntry struct {
	boot  byte
	typ   byte
	start uint32 // in sectors, relative to something that depends on where the entry is
	size  uint32 // in sectors
}

func (e mbrEntry) used() bool { return e.typ != 0 && e.size != 0 }

func hasBootSignature(sec []byte) bool {
	return sec[510] == 0x55 && sec[511] == 0xaa
}

// mbrEntries decodes the four entries at byte 446 of a boot record.
func mbrEntries(sec []byte) [4]mbrEntry {
	var es [4]mbrEntry
	for i := range es {
		b := sec[446+16*i:]
		es[i] = mbrEntry{
			boot:  b[0],
			typ:   b[4],
			start: binary.LittleEndian.Uint32(b[8:]),
			size:  binary.LittleEndian.Uint32(b[12:]),
		}
	}
	return es
}

// readDOS reads an MBR table: the primaries, then the logical partitions
// of the first extended partition.
func (d *disk) readDOS(mbr []byte, entries [4]mbrEntry) (*Table, error) {
	t := &Table{
		Scheme:     DOS,
		SectorSize: sector512,
		ID:         fmt.Sprintf("0x%08x", binary.LittleEndian.Uint32(mbr[440:])),
	}
	var n notes
	var primaries []Partition
	for i, e := range entries {
		if !e.used() {
			continue
		}
		p := Partition{
			Number:   i + 1,
			Start:    int64(e.start) * sector512,
			Size:     int64(e.size) * sector512,
			Type:     fmt.Sprintf("%x", e.typ),
			Extended: isExtended(e.typ),
			Bootable: e.boot == 0x80,
		}
		if p.Start+p.Size > d.size {
			n.skip(p.Number, "ends past the end of the disk (sector %d of %d)", int64(e.start)+int64(e.size), d.size/sector512)
			continue
		}
		primaries = append(primaries, p)
	}
	primaries = dropOverlapping(primaries, &n)
	t.Partitions = primaries

	var ext *Partition
	for i := range primaries {
		if !primaries[i].Extended {
			continue
		}
		if ext != nil {
			n.add("p%d is a second extended partition; only p%d's logical partitions are read", primaries[i].Number, ext.Number)
			continue
		}
		ext = &primaries[i]
	}
	if ext != nil {
		logicals, err := d.readEBRChain(*ext, &n)
		if err != nil {
			return nil, err
		}
		t.Partitions = append(t.Partitions, dropOverlapping(logicals, &n)...)
	}
	if len(t.Partitions) == 0 && len(n.table)+len(n.skipped) == 0 {
		n.add("the DOS partition table is empty")
	}
	return finish(t, &n), nil
}

// readEBRChain follows the extended boot records inside ext and returns
// the logical partitions they describe, numbered from 5. Each EBR holds a
// data entry, whose start counts from the EBR itself, and a link to the
// next EBR, whose start counts from the extended partition's start. Every
// EBR and every logical partition must lie inside ext; a loop, a link
// outside ext or an EBR without a boot signature ends the chain.
func (d *disk) readEBRChain(ext Partition, n *notes) ([]Partition, error) {
	extFirst := ext.Start / sector512
	extEnd := (ext.Start + ext.Size) / sector512 // exclusive
	var logicals []Partition
	visited := make(map[int64]bool)
	number := 5
	ebr := extFirst
	for links := 0; ; links++ {
		if links == MaxEBRs {
			n.add("the chain of logical partitions is longer than %d links; read no further", MaxEBRs)
			break
		}
		if ebr < extFirst || ebr >= extEnd {
			n.add("an EBR link points to sector %d, outside the extended partition p%d; read no further", ebr, ext.Number)
			break
		}
		if visited[ebr] {
			n.add("the chain of logical partitions loops back to sector %d; read no further", ebr)
			break
		}
		visited[ebr] = true
		sec, err := d.read(ebr*sector512, sector512)
		if err != nil {
			return nil, err
		}
		if !hasBootSignature(sec) {
			n.add("the EBR at sector %d has no boot signature; read no further", ebr)
			break
		}
		var data, link *mbrEntry
		entries := mbrEntries(sec)
		for i := range entries {
			e := &entries[i]
			switch {
			case !e.used():
			case isExtended(e.typ) && link == nil:
				link = e
			case !isExtended(e.typ) && data == nil:
				data = e
			}
		}
		if data != nil {
			start := ebr + int64(data.start)
			end := start + int64(data.size)
			switch {
			case data.start == 0:
				n.skip(number, "starts at its own EBR (sector %d)", ebr)
			case end > extEnd:
				n.skip(number, "ends past the end of the extended partition p%d (sector %d of %d)", ext.Number, end, extEnd)
			default:
				logicals = append(logicals, Partition{
					Number:   number,
					Start:    start * sector512,
					Size:     int64(data.size) * sector512,
					Type:     fmt.Sprintf("%x", data.typ),
					Bootable: data.boot == 0x80,
				})
			}
			number++
		}
		if link == nil {
			break
		}
		ebr = extFirst + int64(link.start)
	}
	return logicals, nil
}
