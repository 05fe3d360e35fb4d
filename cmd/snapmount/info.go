package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"time"

	flag "github.com/spf13/pflag"

	"snapmount/nbd"
)

func init() {
	register(&command{
		name:  "info",
		args:  "URI",
		short: "print what a server says about an export (like nbdinfo), its export list, allocation map or partitions",
		long: `Connects, negotiates as the mount would (TLS, structured replies, the
read-only promise, base:allocation) and prints the export's size, flags,
block sizes and contexts, whether the server accepted the read-only
promise, and the canonical export name. Only --map and --partitions enter
the transmission phase; the rest uses NBD_OPT_INFO, so asking about a
snapmount server's export creates no snapshot.

--partitions reads the export's MBR or GPT partition table and prints
each partition's number (as 'mount --partitions' names its files, and
fdisk -l numbers them), start and size in bytes, type (the MBR type, or
the GPT type GUID) and GPT name; a damaged or hostile table is used as
far as it can be trusted, and one line says what was skipped.`,
		setup: func(fs *flag.FlagSet) func(context.Context, stdio, []string) error {
			var cf clientFlags
			var list, showMap, parts, asJSON bool
			fs.BoolVar(&list, "list", false, "list every export the server offers")
			fs.BoolVar(&showMap, "map", false, "print the allocation map (base:allocation extents)")
			fs.BoolVar(&parts, "partitions", false, "print the export's partition table")
			fs.BoolVar(&asJSON, "json", false, "print JSON instead of text")
			cf.bind(fs)
			return func(ctx context.Context, std stdio, args []string) error {
				if err := wantArgs(args, 1, "URI"); err != nil {
					return err
				}
				u, opt, err := cf.parse(args[0])
				if err != nil {
					return err
				}
				if btoi(list)+btoi(showMap)+btoi(parts) > 1 {
					return usagef("--list, --map and --partitions cannot be combined")
				}
				switch {
				case parts:
					return runPartitions(ctx, std.out, u, opt, cf.timeout, asJSON)
				case showMap:
					return runMap(ctx, std.out, u, opt, cf.timeout, asJSON)
				default:
					return runInfo(ctx, std.out, u, opt, list, asJSON)
				}
			}
		},
	})
}

// exportReport is what info prints about one export (also as JSON).
type exportReport struct {
	Name          string   `json:"export-name"`
	CanonicalName string   `json:"canonical-name"`
	Description   string   `json:"description,omitempty"`
	URI           string   `json:"uri"`
	Size          uint64   `json:"export-size"`
	SizeStr       string   `json:"export-size-str"`
	Promise       string   `json:"read-only-promise"`
	Contexts      []string `json:"contexts"`
	Rotational    bool     `json:"is_rotational"`
	ReadOnly      bool     `json:"is_read_only"`
	CanCache      bool     `json:"can_cache"`
	CanDF         bool     `json:"can_df"`
	CanFastZero   bool     `json:"can_fast_zero"`
	CanFlush      bool     `json:"can_flush"`
	CanFUA        bool     `json:"can_fua"`
	CanMultiConn  bool     `json:"can_multi_conn"`
	CanTrim       bool     `json:"can_trim"`
	CanZero       bool     `json:"can_zero"`
	Flags         string   `json:"transmission-flags"`
	BlockMin      uint32   `json:"block_size_minimum,omitempty"`
	BlockPref     uint32   `json:"block_size_preferred,omitempty"`
	BlockMax      uint32   `json:"block_size_maximum,omitempty"`
	ExportNameOpt bool     `json:"negotiated-with-export-name,omitempty"`
}

type serverReport struct {
	Protocol   string         `json:"protocol"`
	TLS        bool           `json:"TLS"`
	Structured bool           `json:"structured"`
	Exports    []exportReport `json:"exports"`
}

func promiseText(info *nbd.ExportInfo) string {
	switch {
	case info.Promise:
		return "accepted"
	case info.PromiseReply == 0:
		return "not sent"
	case info.PromiseReply == nbd.RepErrUnsup:
		return "not supported by the server (" + info.PromiseReply.String() + ")"
	}
	return "refused (" + info.PromiseReply.String() + ")"
}

func reportExport(u *nbd.URI, info *nbd.ExportInfo) exportReport {
	f := info.Flags
	r := exportReport{
		Name:          info.Name,
		CanonicalName: info.CanonicalName,
		Description:   info.Description,
		URI:           u.WithExport(info.Name).String(),
		Size:          info.Size,
		SizeStr:       humanSize(info.Size),
		Promise:       promiseText(info),
		Rotational:    f&nbd.FlagRotational != 0,
		ReadOnly:      f&nbd.FlagReadOnly != 0,
		CanCache:      f&nbd.FlagSendCache != 0,
		CanDF:         f&nbd.FlagSendDF != 0,
		CanFastZero:   f&nbd.FlagSendFastZero != 0,
		CanFlush:      f&nbd.FlagSendFlush != 0,
		CanFUA:        f&nbd.FlagSendFUA != 0,
		CanMultiConn:  f&nbd.FlagCanMultiConn != 0,
		CanTrim:       f&nbd.FlagSendTrim != 0,
		CanZero:       f&nbd.FlagSendWriteZeroes != 0,
		Flags:         f.String(),
		ExportNameOpt: info.ExportName,
		Contexts:      []string{},
	}
	if info.HasBlockSize {
		r.BlockMin, r.BlockPref, r.BlockMax = info.BlockSize.Min, info.BlockSize.Preferred, info.BlockSize.Max
	}
	for _, name := range info.Contexts {
		r.Contexts = append(r.Contexts, name)
	}
	sort.Strings(r.Contexts)
	return r
}

// inquire asks about one export. On a server that took the read-only
// promise (a snapmount server) it uses SET_META_CONTEXT and INFO, which
// stay in the handshake and create no snapshot. Everywhere else it uses
// GO (or EXPORT_NAME) like nbdinfo, because stock servers are not all
// reliable about INFO: nbd-server 3.24 reports size 0 there. GO ends the
// connection's handshake: done reports that.
func inquire(n *nbd.Negotiator, export string, promised bool) (info *nbd.ExportInfo, done bool, err error) {
	if n.FixedNewstyle() {
		if _, err := n.SetMetaContext(export, nbd.ContextBaseAllocation); err != nil {
			var oe *nbd.OptionError
			if !errors.As(err, &oe) {
				return nil, false, err
			}
		}
		if promised {
			info, err = n.Info(export)
			var oe *nbd.OptionError
			if err == nil || !errors.As(err, &oe) || oe.Reply != nbd.RepErrUnsup {
				return info, false, err
			}
		}
	}
	info, err = n.Go(export)
	return info, true, err
}

func runInfo(ctx context.Context, w io.Writer, u *nbd.URI, opt nbd.DialOptions, list, asJSON bool) error {
	n, err := nbd.Negotiate(ctx, u, opt)
	if err != nil {
		return withCode(exitConnect, err)
	}
	defer func() { n.Conn().Close() }() // n changes below
	rep := serverReport{Protocol: "newstyle", TLS: u.TLS}
	if n.FixedNewstyle() {
		rep.Protocol = "newstyle-fixed"
	}
	names := []string{u.Export}
	descs := map[string]string{}
	if list {
		entries, err := n.List()
		if err != nil {
			return withCode(exitConnect, fmt.Errorf("listing exports: %w", err))
		}
		names = names[:0]
		for _, e := range entries {
			names = append(names, e.Name)
			descs[e.Name] = e.Description
		}
	}
	ended := false
	for _, name := range names {
		if ended {
			// EXPORT_NAME/GO ended the handshake: a fresh connection
			// for each further export.
			n.Conn().Close()
			if n, err = nbd.Negotiate(ctx, u.WithExport(name), opt); err != nil {
				return withCode(exitConnect, err)
			}
		}
		info, done, err := inquire(n, name, n.Promised())
		if err != nil {
			return withCode(exitConnect, nbd.ExplainOptionError(err, u.WithExport(name)))
		}
		ended = done
		rep.Structured = info.Structured
		r := reportExport(u, info)
		if r.Description == "" {
			r.Description = descs[name]
		}
		rep.Exports = append(rep.Exports, r)
	}
	if !ended {
		n.Abort()
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "\t")
		return enc.Encode(rep)
	}
	tlsText, packets := "without TLS", "simple packets"
	if rep.TLS {
		tlsText = "with TLS"
	}
	if rep.Structured {
		packets = "structured packets"
	}
	fmt.Fprintf(w, "protocol: %s %s, using %s\n", rep.Protocol, tlsText, packets)
	for _, r := range rep.Exports {
		printExport(w, r)
	}
	return nil
}

func printExport(w io.Writer, r exportReport) {
	fmt.Fprintf(w, "export=%q:\n", r.Name)
	if r.Description != "" {
		fmt.Fprintf(w, "\tdescription: %s\n", r.Description)
	}
	fmt.Fprintf(w, "\texport-size: %d (%s)\n", r.Size, r.SizeStr)
	fmt.Fprintf(w, "\tcanonical-name: %q\n", r.CanonicalName)
	fmt.Fprintf(w, "\turi: %s\n", r.URI)
	fmt.Fprintf(w, "\tread-only-promise: %s\n", r.Promise)
	if len(r.Contexts) > 0 {
		fmt.Fprintf(w, "\tcontexts:\n")
		for _, c := range r.Contexts {
			fmt.Fprintf(w, "\t\t%s\n", c)
		}
	}
	for _, b := range []struct {
		name string
		v    bool
	}{
		{"is_rotational", r.Rotational}, {"is_read_only", r.ReadOnly},
		{"can_cache", r.CanCache}, {"can_df", r.CanDF}, {"can_fast_zero", r.CanFastZero},
		{"can_flush", r.CanFlush}, {"can_fua", r.CanFUA}, {"can_multi_conn", r.CanMultiConn},
		{"can_trim", r.CanTrim}, {"can_zero", r.CanZero},
	} {
		fmt.Fprintf(w, "\t%s: %v\n", b.name, b.v)
	}
	if r.BlockMax != 0 {
		fmt.Fprintf(w, "\tblock_size_minimum: %d\n\tblock_size_preferred: %d\n\tblock_size_maximum: %d\n", r.BlockMin, r.BlockPref, r.BlockMax)
	}
}

// mapEntry is one line of the allocation map.
type mapEntry struct {
	Offset      int64  `json:"offset"`
	Length      int64  `json:"length"`
	Type        uint32 `json:"type"`
	Description string `json:"description"`
}

func extentDescription(flags uint32) string {
	switch flags & (nbd.StateHole | nbd.StateZero) {
	case 0:
		return "data"
	case nbd.StateHole:
		return "hole"
	case nbd.StateZero:
		return "zero"
	}
	return "hole,zero"
}

// runMap prints the allocation map through a client of one connection,
// so that a server that stops answering fails it within the timeout.
func runMap(ctx context.Context, w io.Writer, u *nbd.URI, opt nbd.DialOptions, timeout time.Duration, asJSON bool) error {
	client, err := nbd.Open(ctx, u, nbd.ClientOptions{Dial: opt, Conns: 1, Timeout: timeout})
	if err != nil {
		return withCode(exitConnect, err)
	}
	defer client.Close()
	size := client.Size()
	var entries []mapEntry
	add := func(off, n int64, flags uint32) {
		if k := len(entries); k > 0 && entries[k-1].Type == flags && entries[k-1].Offset+entries[k-1].Length == off {
			entries[k-1].Length += n
			return
		}
		entries = append(entries, mapEntry{off, n, flags, extentDescription(flags)})
	}
	for off := int64(0); off < size; {
		ext, err := client.BlockStatus(ctx, off, size-off)
		if errors.Is(err, nbd.ErrNoAllocation) {
			// Without the context everything counts as data, as the
			// spec says status 0 is always a safe answer.
			add(off, size-off, 0)
			break
		}
		if err != nil {
			return fmt.Errorf("block status at offset %d: %w", off, err)
		}
		for _, e := range ext {
			if e.Offset != off {
				return fmt.Errorf("server returned extent at %d, expected %d", e.Offset, off)
			}
			add(e.Offset, e.Length, e.Flags)
			off += e.Length
		}
	}
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "\t")
		return enc.Encode(entries)
	}
	for _, e := range entries {
		fmt.Fprintf(w, "%10d  %10d  %3d  %s\n", e.Offset, e.Length, e.Type, e.Description)
	}
	return nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}
