package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	flag "github.com/spf13/pflag"

	"snapmount/cache/overlay"
	"snapmount/fusefs"
	"snapmount/fusefs/partition"
)

// diskOptions are the mount's flags about what is inside the disk: its
// partitions as files, and the private overlay that makes them writable.
type diskOptions struct {
	partitions bool
	overlay    bool
	overlayDir string
	overlayMax int64
}

// defaultOverlayMax bounds the overlay unless --overlay-max says otherwise:
// room for replaying a large ext4 journal (1 GiB at most) and some.
const defaultOverlayMax = 1 << 30

func (d *diskOptions) bind(fs *flag.FlagSet) {
	d.overlayMax = defaultOverlayMax
	fs.BoolVar(&d.partitions, "partitions", false, "also show each partition of the disk as NAME-pN, numbered as fdisk -l numbers them")
	fs.BoolVar(&d.overlay, "overlay", false, "make the files writable: writes go to a private overlay, DISCARDED AT UNMOUNT; the export is never written")
	fs.StringVar(&d.overlayDir, "overlay-dir", "", "directory for the overlay's file, which has no name there (default: $XDG_RUNTIME_DIR, else $TMPDIR, else /tmp)")
	fs.Var(sizeFlag{&d.overlayMax}, "overlay-max", "largest overlay; a write that needs more fails with ENOSPC")
}

func (d *diskOptions) check(fs *flag.FlagSet) error {
	if !d.overlay {
		for _, name := range []string{"overlay-dir", "overlay-max"} {
			if fs.Changed(name) {
				return usagef("--%s needs --overlay", name)
			}
		}
		return nil
	}
	if d.overlayMax < 4096 {
		return usagef("--overlay-max must be at least 4K")
	}
	if d.overlayDir == "" {
		d.overlayDir = defaultOverlayDir(os.Getenv)
	}
	if fi, err := os.Stat(d.overlayDir); err != nil || !fi.IsDir() {
		return usagef("--overlay-dir %s is not a directory", d.overlayDir)
	}
	return nil
}

// defaultOverlayDir is where the overlay's file goes unless --overlay-dir
// says: the user's runtime directory (tmpfs, private to the user), else
// the temporary directory.
func defaultOverlayDir(getenv func(string) string) string {
	for _, env := range []string{"XDG_RUNTIME_DIR", "TMPDIR"} {
		if dir := getenv(env); dir != "" {
			return dir
		}
	}
	return "/tmp"
}

// disk is what the mount shows of the disk beyond the whole file: the
// partitions found and the overlay, if asked for.
type disk struct {
	reader  io.ReaderAt      // what the files read: the overlay, else the cache
	table   *partition.Table // nil without --partitions
	windows []fusefs.Window
	overlay *overlay.Overlay // nil without --overlay
	dir     string           // the overlay's directory
}

// openDisk reads the partition table of r (the cache, so the table's
// blocks are fetched once for all views) and opens the overlay over it,
// as d asks. The file of the whole disk is name; partition N is name-pN.
func openDisk(r io.ReaderAt, size int64, name string, d diskOptions) (*disk, error) {
	dk := &disk{reader: r}
	if d.partitions {
		t, err := partition.Read(r, size)
		if err != nil {
			return nil, fmt.Errorf("reading the partition table: %w", err)
		}
		dk.table = t
		for _, p := range t.Partitions {
			if p.Extended {
				continue // a container of logical partitions, not a file system
			}
			dk.windows = append(dk.windows, fusefs.Window{Name: fmt.Sprintf("%s-p%d", name, p.Number), Offset: p.Start, Size: p.Size})
		}
	}
	if d.overlay {
		o, err := overlay.New(r, size, overlay.Options{Dir: d.overlayDir, MaxBytes: d.overlayMax})
		if err != nil {
			return nil, withCode(exitMount, err)
		}
		dk.overlay, dk.dir, dk.reader = o, d.overlayDir, o
	}
	return dk, nil
}

// writer is the fusefs Writer: the overlay, or nil (read-only).
func (dk *disk) writer() io.WriterAt {
	if dk.overlay == nil {
		return nil
	}
	return dk.overlay
}

func (dk *disk) close() {
	if dk.overlay != nil {
		dk.overlay.Close()
	}
}

// tableLine says in one line which table was found and what the mount
// shows of it ("gpt, 512-byte sectors: disk-p1, disk-p2"), or why it shows
// the whole disk alone, with what was skipped and why.
func (dk *disk) tableLine() string {
	t := dk.table
	if len(dk.windows) == 0 {
		return "no partitions shown, only the whole disk: " + t.Note
	}
	names := make([]string, len(dk.windows))
	for i, w := range dk.windows {
		names[i] = w.Name
	}
	line := fmt.Sprintf("%s, %d-byte sectors: %s", t.Scheme, t.SectorSize, strings.Join(names, ", "))
	if t.Note != "" {
		line += "; " + t.Note
	}
	return line
}

// partitionStats is the stats' part on the partition table.
type partitionStats struct {
	Scheme     partition.Scheme `json:"scheme"`
	SectorSize int              `json:"sector_size,omitempty"`
	Files      []partitionFile  `json:"files"`
	Note       string           `json:"note,omitempty"`
}

// partitionFile is a partition's file in the stats.
type partitionFile struct {
	Name   string `json:"name"`
	Offset int64  `json:"offset"`
	Size   int64  `json:"size"`
}

// overlayStats is the stats' part on the overlay.
type overlayStats struct {
	Dir string `json:"dir"`
	overlay.Stats
}

func (dk *disk) stats() (*partitionStats, *overlayStats) {
	var ps *partitionStats
	if t := dk.table; t != nil {
		ps = &partitionStats{Scheme: t.Scheme, SectorSize: t.SectorSize, Files: []partitionFile{}, Note: t.Note}
		for _, w := range dk.windows {
			ps.Files = append(ps.Files, partitionFile{w.Name, w.Offset, w.Size})
		}
	}
	var ov *overlayStats
	if dk.overlay != nil {
		ov = &overlayStats{Dir: dk.dir, Stats: dk.overlay.Stats()}
	}
	return ps, ov
}

// printDiskStats prints the lines of 'snapmount stats' on the partitions and
// the overlay, for the mounts that have them.
func printDiskStats(w io.Writer, ps *partitionStats, ov *overlayStats) {
	if ps != nil {
		line := string(ps.Scheme)
		if ps.Scheme != partition.None {
			line = fmt.Sprintf("%s (%d-byte sectors), %d shown", ps.Scheme, ps.SectorSize, len(ps.Files))
		}
		if ps.Note != "" {
			line += "; " + ps.Note
		}
		fmt.Fprintf(w, "partitions:     %s\n", line)
		for _, f := range ps.Files {
			fmt.Fprintf(w, "                %s: %s at offset %d\n", f.Name, humanSize(uint64(f.Size)), f.Offset)
		}
	}
	if ov != nil {
		fmt.Fprintf(w, "overlay:        %s of %s written in %s blocks (%d writes, %d refused for lack of room), in %s, discarded at unmount\n",
			humanSize(uint64(ov.Bytes)), humanSize(uint64(ov.MaxBytes)), humanSize(uint64(ov.BlockSize)), ov.Writes, ov.Refused, ov.Dir)
	}
}
