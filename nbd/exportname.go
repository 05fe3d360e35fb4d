package nbd

// The export-name grammar of snapmount's server: NAME, NAME@snapshot,
// NAME@sN and NAME@live. The server parses what clients ask for with it,
// and a client reads from the canonical name the server answers whether
// it got a frozen snapshot.

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
)

// View is what an export name asks for.
type View int

const (
	ViewDefault      View = iota // NAME: a writer, or for a promised reader a snapshot (or live)
	ViewNewSnapshot              // NAME@snapshot
	ViewJoinSnapshot             // NAME@sN
	ViewLive                     // NAME@live
)

// ExportName is a parsed export name.
type ExportName struct {
	Base     string // the export's own name, without '@'
	View     View
	Snapshot uint64 // the N of NAME@sN (ViewJoinSnapshot), from 1
}

// ParseExportName splits "disk", "disk@snapshot", "disk@s7" or
// "disk@live". It does not look the export up.
func ParseExportName(name string) (ExportName, error) {
	base, suffix, ok := strings.Cut(name, "@")
	ref := ExportName{Base: base}
	if !ok {
		return ref, nil
	}
	switch {
	case suffix == "snapshot":
		ref.View = ViewNewSnapshot
	case suffix == "live":
		ref.View = ViewLive
	case len(suffix) > 1 && suffix[0] == 's' && suffix[1] >= '1' && suffix[1] <= '9':
		id, err := strconv.ParseUint(suffix[1:], 10, 64)
		if err != nil {
			return ref, fmt.Errorf("snapshot number in %q: %w", name, err)
		}
		ref.View, ref.Snapshot = ViewJoinSnapshot, id
	default:
		return ref, fmt.Errorf("unknown view %q in %q (want NAME, NAME@snapshot, NAME@sN or NAME@live)", suffix, name)
	}
	return ref, nil
}

// CheckExportName reports whether name can be an export name: not empty,
// a valid NBD string, and without '@' (which introduces the view suffix).
func CheckExportName(name string) error {
	if name == "" {
		return errors.New("nbd: empty export name")
	}
	if strings.Contains(name, "@") {
		return fmt.Errorf("nbd: export name %q contains '@', which is reserved for views such as NAME@snapshot (rename it with NAME=IMAGE)", name)
	}
	if err := CheckString("export name", []byte(name)); err != nil {
		return fmt.Errorf("nbd: export name %q: %w", name, err)
	}
	return nil
}
