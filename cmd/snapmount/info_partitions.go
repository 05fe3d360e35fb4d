package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"time"

	"snapmount/fusefs/partition"
	"snapmount/nbd"
)

// partitionReport is what info --partitions prints (also as JSON).
type partitionReport struct {
	Scheme     partition.Scheme `json:"scheme"`
	SectorSize int              `json:"sector_size,omitempty"`
	ID         string           `json:"id,omitempty"`
	Size       int64            `json:"disk_size"`
	Partitions []partitionEntry `json:"partitions"`
	Note       string           `json:"note,omitempty"`
}

// partitionEntry is one partition of a partitionReport.
type partitionEntry struct {
	Number      int    `json:"number"`
	Start       int64  `json:"start"`
	Size        int64  `json:"size"`
	Type        string `json:"type"`
	Description string `json:"description,omitempty"`
	Extended    bool   `json:"extended,omitempty"`
	Bootable    bool   `json:"bootable,omitempty"`
	UUID        string `json:"uuid,omitempty"`
	Name        string `json:"name,omitempty"`
}

// runPartitions reads the export's partition table and prints it. Reading
// data needs the transmission phase: against snapmount serve, an export
// name without @ makes a snapshot for the time it takes.
func runPartitions(ctx context.Context, w io.Writer, u *nbd.URI, opt nbd.DialOptions, timeout time.Duration, asJSON bool) error {
	client, err := nbd.Open(ctx, u, nbd.ClientOptions{Dial: opt, Conns: 1, Timeout: timeout})
	if err != nil {
		return withCode(exitConnect, err)
	}
	defer client.Close()
	t, err := partition.Read(client, client.Size())
	if err != nil {
		// Connected: the read failed (exitFailure), as in mount.
		return fmt.Errorf("reading the partition table: %w", err)
	}
	rep := partitionReport{Scheme: t.Scheme, SectorSize: t.SectorSize, ID: t.ID, Size: client.Size(), Note: t.Note, Partitions: []partitionEntry{}}
	for _, p := range t.Partitions {
		rep.Partitions = append(rep.Partitions, partitionEntry{
			Number: p.Number, Start: p.Start, Size: p.Size, Type: p.Type, Description: p.Description(),
			Extended: p.Extended, Bootable: p.Bootable, UUID: p.UUID, Name: p.Name,
		})
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "\t")
		return enc.Encode(rep)
	}
	printPartitions(w, &rep)
	return nil
}

// printPartitions prints a table as fdisk -l would, in bytes: the numbers
// are those of the mount's NAME-pN files.
func printPartitions(w io.Writer, rep *partitionReport) {
	if rep.Scheme == partition.None {
		fmt.Fprintf(w, "%s\n", rep.Note)
		return
	}
	fmt.Fprintf(w, "%s partition table, %d-byte sectors, disk identifier %s, disk size %d (%s)\n",
		rep.Scheme, rep.SectorSize, rep.ID, rep.Size, humanSize(uint64(rep.Size)))
	if rep.Note != "" {
		fmt.Fprintf(w, "note: %s\n", rep.Note)
	}
	fmt.Fprintf(w, "%3s  %14s  %14s  %6s  %s\n", "#", "start", "size", "", "type, name")
	for _, p := range rep.Partitions {
		typ := p.Type
		if p.Description != "" {
			typ += " (" + p.Description + ")"
		}
		if p.Bootable {
			typ += ", bootable"
		}
		if p.Name != "" {
			typ += fmt.Sprintf(", %q", p.Name)
		}
		fmt.Fprintf(w, "%3d  %14d  %14d  %6s  %s\n", p.Number, p.Start, p.Size, humanSize(uint64(p.Size)), typ)
	}
}
