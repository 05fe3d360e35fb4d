// Package partitiontest holds what the tests of snapmount's partition
// reader (fusefs/partition) and of its end-to-end suite (test) share about
// real partition tables: sfdisk's reading of a disk image, the reference
// both compare with, in the form both write their own readings in, and
// the fix-up of a GPT header a test changed on purpose. Only tests import
// it.
package partitiontest

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"os/exec"
	"strings"
	"testing"

	"snapmount/test/testenv"
)

// Table is a partition table as `sfdisk --json` prints it.
type Table struct {
	Label      string      `json:"label"` // gpt or dos
	ID         string      `json:"id"`
	SectorSize int64       `json:"sectorsize"`
	Partitions []Partition `json:"partitions"`
}

// Partition is one entry of a Table. Start and Size count sectors.
type Partition struct {
	Node  string `json:"node"` // the image's path, then the partition's number
	Start int64  `json:"start"`
	Size  int64  `json:"size"`
	Type  string `json:"type"`
	UUID  string `json:"uuid"`
	Name  string `json:"name"`
}

// Sfdisk returns sfdisk's reading of the table in image.
func Sfdisk(t testing.TB, image string) Table {
	t.Helper()
	testenv.RequireCmd(t, "sfdisk")
	cmd := exec.Command("sfdisk", "--json", image)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("sfdisk --json %s: %v: %s", image, err, stderr.String())
	}
	var doc struct {
		Table Table `json:"partitiontable"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatalf("sfdisk --json %s: %v\n%s", image, err, out)
	}
	return doc.Table
}

// Lines is the table in the form the tests compare tables in: HeaderLine,
// then a PartitionLine per partition, in bytes.
func (tab Table) Lines(image string) []string {
	lines := []string{HeaderLine(tab.Label, tab.ID, tab.SectorSize)}
	for _, p := range tab.Partitions {
		number := strings.TrimPrefix(p.Node, image)
		lines = append(lines, "p"+number+" "+partitionFields(p.Start*tab.SectorSize, p.Size*tab.SectorSize, p.Type, p.UUID, p.Name))
	}
	return lines
}

// HeaderLine describes a table: its scheme (gpt or dos), its ID (in
// lower case: tools differ) and its sector size.
func HeaderLine(scheme, id string, sectorSize int64) string {
	return fmt.Sprintf("%s %s %d", scheme, strings.ToLower(id), sectorSize)
}

// PartitionLine describes partition number, start and size in bytes.
func PartitionLine(number int, start, size int64, typ, uuid, name string) string {
	return fmt.Sprintf("p%d %s", number, partitionFields(start, size, typ, uuid, name))
}

func partitionFields(start, size int64, typ, uuid, name string) string {
	return fmt.Sprintf("%d+%d %s %s %q", start, size, typ, uuid, name)
}

// ResealGPTHeader recomputes the CRC of the GPT header at the start of h
// (92 bytes, as every tool writes it) after a test changed one of its
// fields, so that a reader sees the changed field, not a bad CRC.
func ResealGPTHeader(h []byte) {
	h = h[:92]
	clear(h[16:20])
	binary.LittleEndian.PutUint32(h[16:], crc32.ChecksumIEEE(h))
}
