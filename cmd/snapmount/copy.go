package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"
	"syscall"
	"time"

	flag "github.com/spf13/pflag"

	"snapmount/nbd"
)

func init() {
	register(&command{
		name:  "copy",
		args:  "URI DEST",
		short: "copy an export to a file (sparse) or to stdout ('-'), optionally printing its SHA-256",
		long: `The forensic acquisition path: reads the export read-only (the
read-only promise is sent; nothing that writes is ever sent) over several
connections at once and writes it to DEST. Ranges the server reports as
holes, and blocks that read as zeros, are not written, so DEST stays
sparse. With --sha256 the SHA-256 of the whole export is printed like
sha256sum prints it. A progress line is shown when stderr is a terminal.

copy never destroys data: it refuses a DEST that exists and is not empty
unless --force, and always refuses one that a snapmount serve on this
machine is serving. DEST appears only when the copy is complete (and on
disk, with --fsync): until then the data goes to a file with no name in
DEST's directory, which a failed, interrupted or killed copy leaves
nowhere (where the file system cannot make one, to .DEST.partial-N,
removed when the copy fails; only a copy killed with SIGKILL leaves it).
DEST's directory must therefore be writable. A DEST that existed is left
as it was unless the copy completes, and is then replaced by a file with
its mode; one that another program makes while the copy runs is never
replaced (the copy fails and is discarded). Stdout ('-'), pipes and
character devices get the data as it comes.`,
		setup: func(fs *flag.FlagSet) func(context.Context, stdio, []string) error {
			var cf clientFlags
			var o copyOptions
			fs.BoolVar(&o.sha, "sha256", false, "print the SHA-256 of the data copied")
			fs.IntVar(&o.conns, "conns", 4, "connections to use when the server allows multi-conn")
			o.chunk = nbd.DefaultCopyRequestSize
			fs.Var(sizeFlag{&o.chunk}, "request-size", "bytes per read request")
			fs.IntVar(&o.inflight, "requests", 0, "reads in flight at once (0: 4 per connection)")
			fs.BoolVar(&o.fsync, "fsync", false, "fsync DEST before exiting")
			fs.BoolVar(&o.progress, "progress", false, "show progress even when stderr is not a terminal")
			fs.BoolVar(&o.force, "force", false, "replace a DEST that exists and is not empty (once the copy is complete)")
			cf.bind(fs)
			fs.Lookup("timeout").Usage = "how long one outage of the server (no reply, or no connection) may last: copy reconnects and goes on after a shorter one, and fails after one this long"
			return func(ctx context.Context, std stdio, args []string) error {
				if err := wantArgs(args, 2, "URI and DEST"); err != nil {
					return err
				}
				u, opt, err := cf.parse(args[0])
				if err != nil {
					return err
				}
				if o.conns < 1 || o.conns > 64 {
					return usagef("--conns must be from 1 to 64")
				}
				if o.chunk < 4096 || o.chunk > nbd.MaxPayload || o.chunk&(o.chunk-1) != 0 {
					return usagef("--request-size must be a power of two from 4K to 32M")
				}
				if o.inflight < 0 {
					return usagef("--requests must be 0 (4 per connection) or more")
				}
				o.uri, o.dial, o.dest, o.timeout = u, opt, args[1], cf.timeout
				o.progress = o.progress || isTerminal(std.err)
				return runCopy(ctx, std, &o)
			}
		},
	})
}

type copyOptions struct {
	uri      *nbd.URI
	dial     nbd.DialOptions
	dest     string
	sha      bool
	conns    int
	chunk    int64
	inflight int
	fsync    bool
	progress bool
	force    bool
	timeout  time.Duration
}

func runCopy(ctx context.Context, std stdio, o *copyOptions) error {
	// DEST is checked before connecting: a refusal costs no connection.
	var out *os.File
	var dest *destFile
	if o.dest == "-" {
		out = os.Stdout
	} else {
		inPlace, err := checkDest(o.dest, o.force)
		if err != nil {
			return err
		}
		if inPlace {
			// A pipe or a device: written as the data comes.
			if out, err = openInPlace(ctx, o.dest); err != nil {
				return err
			}
			defer out.Close()
		} else {
			if dest, err = createBeside(o.dest, o.force); err != nil {
				return err
			}
			defer dest.discard() // unless committed
			out = dest.File
		}
	}
	client, err := nbd.Open(ctx, o.uri, nbd.ClientOptions{Dial: o.dial, Conns: o.conns, Timeout: o.timeout})
	if err != nil {
		return withCode(exitConnect, err)
	}
	defer client.Close()
	if err := client.WaitConns(ctx); err != nil {
		return withCode(exitConnect, err)
	}
	size := client.Size()
	warnContainer(client, size, func(msg string) { fmt.Fprintf(std.err, "snapmount copy: warning: %s\n", msg) })

	// A new regular file is sized to the export, so skipped ranges stay
	// holes; anything else gets every byte in order.
	sparse := dest != nil
	if sparse {
		if err := out.Truncate(size); err != nil {
			return fmt.Errorf("sizing %s to %d bytes: %w", o.dest, size, err)
		}
	}
	copt := nbd.CopyOptions{RequestSize: o.chunk, Requests: o.inflight}
	var sum hash.Hash
	if o.sha {
		sum = sha256.New()
	}
	switch {
	case sparse:
		copt.Sparse = out
		if sum != nil {
			copt.Stream = sum
		}
	case sum != nil:
		copt.Stream = io.MultiWriter(out, sum)
	default:
		copt.Stream = out
	}
	if o.progress {
		prog := newProgress(std.err, size)
		defer prog.finish()
		copt.Progress = prog.add
	}
	if err := client.Copy(ctx, copt); err != nil {
		if ctx.Err() != nil {
			return withCode(exitSignal, fmt.Errorf("interrupted; %s", unwritten(o.dest, dest)))
		}
		return fmt.Errorf("%w; %s", err, unwritten(o.dest, dest))
	}
	if dest != nil {
		if err := dest.commit(o.fsync); err != nil {
			return err
		}
	} else if o.fsync && o.dest != "-" {
		if err := out.Sync(); err != nil && !errors.Is(err, syscall.EINVAL) { // a pipe cannot
			return fmt.Errorf("fsync %s: %w", o.dest, err)
		}
	}
	if sum != nil {
		name := o.dest
		w := std.out
		if o.dest == "-" {
			name, w = o.uri.Display(), std.err
		}
		fmt.Fprintf(w, "%s  %s\n", hex.EncodeToString(sum.Sum(nil)), name)
	}
	return nil
}

// progress prints one updating line on a terminal.
type progress struct {
	w     io.Writer
	total int64
	start time.Time
	mu    sync.Mutex
	done  int64
	last  time.Time
}

func newProgress(w io.Writer, total int64) *progress {
	return &progress{w: w, total: total, start: time.Now()}
}

func (p *progress) add(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += n
	if now := time.Now(); now.Sub(p.last) >= 200*time.Millisecond || p.done == p.total {
		p.last = now
		p.printLocked()
	}
}

func (p *progress) printLocked() {
	pct := 100.0
	if p.total > 0 {
		pct = float64(p.done) * 100 / float64(p.total)
	}
	rate := float64(p.done) / time.Since(p.start).Seconds() / 1e6
	fmt.Fprintf(p.w, "\r%s / %s (%5.1f%%) %7.1f MB/s ", humanSize(uint64(p.done)), humanSize(uint64(p.total)), pct, rate)
}

func (p *progress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.printLocked()
	fmt.Fprintln(p.w)
}
