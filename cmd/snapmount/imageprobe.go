package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"snapmount/nbd/imageformat"
)

// checkImageFormat applies serve's --format: "" probes the images
// (refuseContainers), "raw" serves them as they are.
func checkImageFormat(format string, paths []string) error {
	switch format {
	case "":
		return refuseContainers(paths)
	case "raw":
		return nil
	}
	return usagef("--format %q: only raw images are served; serve %s images with qemu-storage-daemon or qemu-nbd -f %s", format, format, format)
}

// refuseContainers returns serve's one-line refusal, exit code 2, for the
// first image that holds a container (qcow2, VMDK, ...) rather than a raw
// disk: served as it is, a VM would see the container's bytes and, if it
// wrote, destroy it. Images that cannot be opened are left for the server
// to report.
func refuseContainers(paths []string) error {
	for _, path := range paths {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		format, err := probeFile(f)
		f.Close()
		if err != nil {
			return withCode(exitFailure, fmt.Errorf("%s: %w", path, err))
		}
		if format != nil {
			return withCode(exitUsage, fmt.Errorf("%s is %s, not a raw disk: %s", path, formatNoun(format), serveInstead(path, format)))
		}
	}
	return nil
}

// probeFile probes an image file or block device.
func probeFile(f *os.File) (*imageformat.Format, error) {
	size, err := f.Seek(0, io.SeekEnd) // block devices have no size in stat
	if err != nil {
		return nil, err
	}
	return imageformat.Probe(f, size)
}

// formatNoun names what a container is, e.g. "a qcow2 image".
func formatNoun(f *imageformat.Format) string {
	switch {
	case f.Driver == "luks":
		return "a " + f.Name + " encrypted volume"
	case strings.HasPrefix(f.Name, "VMDK descriptor"):
		return "a " + f.Name
	}
	return "a " + f.Name + " image"
}

// serveInstead says how to serve a container instead.
func serveInstead(path string, f *imageformat.Format) string {
	const asIs = "; --format raw serves its bytes as they are"
	switch {
	case f.RawExtent != "":
		extent := f.RawExtent
		if !filepath.IsAbs(extent) {
			extent = filepath.Join(filepath.Dir(path), extent)
		}
		return "its data is the raw file " + quoteOdd(extent) + ": serve that" + asIs
	case f.Driver == "luks":
		return "unlock it (cryptsetup open) and serve /dev/mapper/NAME, or serve it with qemu-storage-daemon (driver=luks) and snapmount mount its export" +
			asIs + ", for a guest that unlocks it itself"
	}
	return "serve it with qemu-storage-daemon or qemu-nbd -f " + f.Driver + " and snapmount mount their export" + asIs
}

// warnContainer warns once if the export's first bytes are a container's
// header. A read that fails here is left for the reads that follow.
func warnContainer(r io.ReaderAt, size int64, warn func(string)) {
	if f, err := imageformat.Probe(r, size); err == nil && f != nil {
		warn(containerWarning(f))
	}
}

// containerWarning is what mount and copy say of an export that holds a
// container: its bytes are not the disk.
func containerWarning(f *imageformat.Format) string {
	if f.Driver == "luks" {
		return "this export holds " + formatNoun(f) + ": unlock the mounted file with cryptsetup open --readonly to read the disk in it"
	}
	return "this export holds " + formatNoun(f) + ", not a disk: its bytes are the container's; serve the image with qemu-storage-daemon or qemu-nbd -f " +
		f.Driver + " and use that export"
}

// quoteOdd quotes a name read from an image if it holds anything but
// printable ASCII.
func quoteOdd(s string) string {
	if q := strconv.Quote(s); q[1:len(q)-1] != s || s == "" {
		return q
	}
	return s
}
