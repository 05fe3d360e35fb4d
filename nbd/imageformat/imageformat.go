// Package imageformat recognizes disk image containers (qcow2, QED,
// VMDK, VDI, VHDX, VHD, LUKS, ...) by their headers, so that a program
// that serves or reads raw disks can tell a container from a disk before
// it shows anyone the container's bytes as if they were one.
//
// It looks only at fixed places in the first HeadSize bytes and the last
// TailSize bytes of an image, and trusts nothing it finds there: every
// field is hostile input, bounds-checked before use.
package imageformat

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// HeadSize is how much of an image's start Detect looks at: the magic
// numbers of every format, and a whole VMDK descriptor as tools write it.
const HeadSize = 8 << 10

// TailSize is how much of an image's end Detect looks at: a VHD footer.
const TailSize = 512

// Format is a recognized container.
type Format struct {
	// Name is what to call the container in a message, e.g. "qcow2",
	// "VMDK (monolithicSparse)", "LUKS1".
	Name string
	// Driver is qemu's name for the format, as qemu-img -f and qemu-nbd -f
	// take it: qcow2, qcow, qed, vmdk, vdi, vhdx, vpc, luks or parallels.
	Driver string
	// RawExtent is set for a VMDK descriptor whose data is one flat
	// extent: the extent's file name as the descriptor gives it, relative
	// to the descriptor's directory. That file is a raw disk. The name
	// comes from the image as it is: quote it to print it.
	RawExtent string
}

// Probe reads the start and the end of an image of size bytes and
// returns its container format, or nil if it is none Detect knows (a raw
// disk, as far as the headers tell).
func Probe(r io.ReaderAt, size int64) (*Format, error) {
	if size <= 0 {
		return nil, nil
	}
	head := make([]byte, min(size, HeadSize))
	n, err := r.ReadAt(head, 0)
	if err != nil && !(errors.Is(err, io.EOF) && n > 0) {
		return nil, fmt.Errorf("reading the image's first %d bytes: %w", len(head), err)
	}
	head = head[:n]
	var tail []byte
	if size >= 2*TailSize {
		tail = make([]byte, TailSize)
		if _, err := r.ReadAt(tail, size-TailSize); err != nil {
			return nil, fmt.Errorf("reading the image's last %d bytes: %w", TailSize, err)
		}
	}
	return Detect(head, tail, int64(len(head)) == size), nil
}

// Detect recognizes a container from head, the first bytes of an image
// (HeadSize or fewer), and tail, its last TailSize bytes (nil if the image
// is shorter than two of those). whole says head is the whole image, so a
// VMDK descriptor in it is complete. It returns nil for anything else.
func Detect(head, tail []byte, whole bool) *Format {
	switch {
	case hasAt(head, 0, "QFI\xfb"):
		if binary.BigEndian.Uint32(field(head, 4, 4)) == 1 {
			return &Format{Name: "qcow (version 1)", Driver: "qcow"}
		}
		return &Format{Name: "qcow2", Driver: "qcow2"}
	case hasAt(head, 0, "QED\x00"):
		return &Format{Name: "QED", Driver: "qed"}
	case hasAt(head, 0, "KDMV"):
		return &Format{Name: "VMDK (" + hostedSparseType(head) + ")", Driver: "vmdk"}
	case hasAt(head, 0, "COWD"):
		return &Format{Name: "VMDK (ESX sparse)", Driver: "vmdk"}
	case hasAt(head, 0, "vhdxfile"):
		return &Format{Name: "VHDX", Driver: "vhdx"}
	case hasAt(head, 0, "conectix"):
		return &Format{Name: "VHD (" + vhdType(head) + ")", Driver: "vpc"}
	case hasAt(head, 0, "LUKS\xba\xbe"):
		if v := binary.BigEndian.Uint16(field(head, 6, 2)); v == 1 || v == 2 {
			return &Format{Name: "LUKS" + strconv.Itoa(int(v)), Driver: "luks"}
		}
		return &Format{Name: "LUKS", Driver: "luks"}
	case hasAt(head, 0, "WithoutFreeSpace"), hasAt(head, 0, "WithouFreSpacExt"):
		return &Format{Name: "Parallels", Driver: "parallels"}
	}
	// VDI: a text banner, then the signature at 0x40.
	if binary.LittleEndian.Uint32(field(head, 0x40, 4)) == 0xbeda107f {
		return &Format{Name: "VDI", Driver: "vdi"}
	}
	if f := vmdkDescriptor(head, whole); f != nil {
		return f
	}
	// A fixed VHD is a raw disk with a footer in its last sector only.
	if len(tail) == TailSize && hasAt(tail, 0, "conectix") {
		return &Format{Name: "VHD (" + vhdType(tail) + ")", Driver: "vpc"}
	}
	return nil
}

// vhdType names a VHD footer's disk type (a big-endian field at 60).
func vhdType(footer []byte) string {
	v := binary.BigEndian.Uint32(field(footer, 60, 4))
	switch v {
	case 2:
		return "fixed"
	case 3:
		return "dynamic"
	case 4:
		return "differencing"
	}
	return "unknown type " + strconv.FormatUint(uint64(v), 10)
}

// hostedSparseType names a hosted sparse VMDK extent by the createType of
// the descriptor embedded in it (its sector and length, little-endian, at
// 28 and 36), when the descriptor lies within head.
func hostedSparseType(head []byte) string {
	sector := binary.LittleEndian.Uint64(field(head, 28, 8))
	count := binary.LittleEndian.Uint64(field(head, 36, 8))
	if sector > 0 && sector < uint64(len(head))/512 {
		start := sector * 512
		end := min(uint64(len(head)), start+min(count, uint64(len(head)))*512)
		if _, ct, ok := parseDescriptor(head[start:end]); ok && ct != "" {
			return ct
		}
	}
	return "sparse"
}

// vmdkDescriptor recognizes a VMDK text descriptor (monolithicFlat and
// split images keep one in a file of its own).
func vmdkDescriptor(head []byte, whole bool) *Format {
	extents, createType, ok := parseDescriptor(head)
	if !ok {
		return nil
	}
	f := &Format{Name: "VMDK descriptor", Driver: "vmdk"}
	if createType != "" {
		f.Name += " (" + createType + ")"
	}
	if whole && len(extents) == 1 && extents[0].raw() {
		f.RawExtent = extents[0].file
	}
	return f
}

type vmdkExtent struct {
	kind, file string
	offset     string
}

// raw reports whether the extent's file is a raw disk from its start.
func (e vmdkExtent) raw() bool {
	return (e.kind == "FLAT" || e.kind == "VMFS") && (e.offset == "" || e.offset == "0") && e.file != ""
}

// parseDescriptor parses VMDK descriptor text as qemu recognizes it (a
// little more leniently with blank lines): after comments and blank lines
// the first line is version=1, 2 or 3. It returns
// the extent lines and the createType it saw.
func parseDescriptor(text []byte) (extents []vmdkExtent, createType string, ok bool) {
	if i := bytes.IndexByte(text, 0); i >= 0 {
		text = text[:i] // an embedded descriptor is padded with zeros
	}
	lines := strings.Split(string(text), "\n")
	first := true
	for i, line := range lines {
		line = strings.TrimSuffix(line, "\r")
		if first {
			// As for qemu, the version line ends with a newline.
			terminated := i < len(lines)-1
			switch {
			case strings.HasPrefix(line, "#"), strings.Trim(line, " ") == "":
				continue
			case terminated && (line == "version=1" || line == "version=2" || line == "version=3"):
				first = false
				continue
			}
			return nil, "", false
		}
		if v, found := strings.CutPrefix(line, "createType="); found {
			createType = safeText(strings.Trim(v, "\""))
			continue
		}
		if e, found := parseExtent(line); found {
			extents = append(extents, e)
		}
	}
	return extents, createType, !first
}

// parseExtent parses an extent line: ACCESS SECTORS TYPE ["FILE" [OFFSET]].
func parseExtent(line string) (vmdkExtent, bool) {
	access, rest := nextField(line)
	if access != "RW" && access != "RDONLY" && access != "NOACCESS" {
		return vmdkExtent{}, false
	}
	sectors, rest := nextField(rest)
	if _, err := strconv.ParseUint(sectors, 10, 64); err != nil {
		return vmdkExtent{}, false
	}
	e := vmdkExtent{}
	if e.kind, rest = nextField(rest); e.kind == "" {
		return vmdkExtent{}, false
	}
	// The file name is quoted and may hold spaces.
	if q, found := strings.CutPrefix(strings.TrimLeft(rest, " \t"), "\""); found {
		if name, after, found := strings.Cut(q, "\""); found {
			e.file = name
			e.offset, _ = nextField(after)
		}
	}
	return e, true
}

// nextField splits off the first space-separated field of s.
func nextField(s string) (field, rest string) {
	s = strings.TrimLeft(s, " \t")
	if i := strings.IndexAny(s, " \t"); i >= 0 {
		return s[:i], s[i:]
	}
	return s, ""
}

// safeText keeps a name read from an image fit to print: printable ASCII,
// at most 64 bytes.
func safeText(s string) string {
	if len(s) > 64 {
		s = s[:64]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '?'
		}
		return r
	}, s)
}

func hasAt(b []byte, off int, magic string) bool {
	return len(b) >= off+len(magic) && string(b[off:off+len(magic)]) == magic
}

// field returns the n bytes of b at off, or n zero bytes if b is shorter
// (no field Detect checks means anything when zero).
func field(b []byte, off, n int) []byte {
	if len(b) < off+n {
		return make([]byte, n)
	}
	return b[off : off+n]
}
