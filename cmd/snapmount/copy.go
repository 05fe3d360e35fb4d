package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"sync"
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
sha256sum prints it. A progress line is shown when stderr is a terminal.`,
		setup: func(fs *flag.FlagSet) func(context.Context, stdio, []string) error {
			var cf clientFlags
			var o copyOptions
			fs.BoolVar(&o.sha, "sha256", false, "print the SHA-256 of the data copied")
			fs.IntVar(&o.conns, "conns", 4, "connections to use when the server allows multi-conn")
			o.chunk = 512 << 10
			fs.Var(sizeFlag{&o.chunk}, "request-size", "bytes per read request")
			fs.IntVar(&o.inflight, "requests", 0, "reads in flight at once (0: 4 per connection)")
			fs.BoolVar(&o.fsync, "fsync", false, "fsync DEST before exiting")
			fs.BoolVar(&o.progress, "progress", false, "show progress even when stderr is not a terminal")
			cf.bind(fs)
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
	timeout  time.Duration
}

// chunk is one piece of the export in the copy pipeline.
type chunk struct {
	off, n int64
	zero   bool   // known to read as zeros: nothing is read or written
	buf    []byte // data, for non-zero chunks
	err    error
	done   chan struct{}
}

func runCopy(ctx context.Context, std stdio, o *copyOptions) error {
	client, err := nbd.Open(ctx, o.uri, nbd.ClientOptions{Dial: o.dial, Conns: o.conns, Timeout: o.timeout})
	if err != nil {
		return withCode(exitConnect, err)
	}
	defer client.Close()
	if err := client.WaitConns(ctx); err != nil {
		return withCode(exitConnect, err)
	}
	size := client.Size()

	// Destination: a regular file is truncated to the export's size so
	// skipped ranges are holes; anything else (stdout, a pipe, a device)
	// gets every byte in order.
	var out *os.File
	sparse := false
	if o.dest == "-" {
		out = os.Stdout
	} else {
		out, err = os.OpenFile(o.dest, os.O_WRONLY|os.O_CREATE, 0o644)
		if err != nil {
			return fmt.Errorf("opening destination: %w", err)
		}
		defer out.Close()
		if st, err := out.Stat(); err == nil && st.Mode().IsRegular() {
			sparse = true
			if err := out.Truncate(0); err != nil {
				return fmt.Errorf("truncating %s: %w", o.dest, err)
			}
			if err := out.Truncate(size); err != nil {
				return fmt.Errorf("sizing %s to %d bytes: %w", o.dest, size, err)
			}
		}
	}
	var sum hash.Hash
	if o.sha {
		sum = sha256.New()
	}

	ctx, cancel := context.WithCancel(ctx)
	inflight := o.inflight
	if inflight <= 0 {
		// 4 requests per connection keep a local server busy (copying
		// 1 GiB: 2Mx16 0.45 s, 2Mx64 0.48 s, 256Kx64 0.51 s; nbdcopy
		// 0.45-0.52 s). Of 512 KiB each (8 MiB of buffers), not 2 MiB:
		// nbdkit allocates each request's buffer, and for 2 MiB ones it
		// faulted in 21,000 fresh pages per 1 GiB copy (1.0 s of its
		// CPU) against 1,900 (0.57 s). From a freshly started nbdkit a
		// copy ran at 1013-1072 MB/s against 766-924 with 2 MiB and
		// 924-983 with 1 MiB; nbdcopy 764-838 (alternated, 4 rounds).
		inflight = 4 * client.Stats().Slots
	}
	chunks := make(chan *chunk, inflight)
	buffers := make(chan []byte, inflight)
	for i := 0; i < inflight; i++ {
		buffers <- nil // allocated on first use
	}
	// One goroutine writes a sparse destination, in the order reads
	// complete: pwrite from many threads at once contends on the file's
	// lock (its spinning tripled the system time of a copy).
	var toWrite chan *chunk
	writerDone := make(chan struct{})
	if sparse {
		toWrite = make(chan *chunk, inflight)
		go func() {
			defer close(writerDone)
			// Write-behind: the destination would otherwise fill the
			// page cache with fresh pages (see nbd.WriteBehind).
			wb := nbd.NewWriteBehind(int(out.Fd()))
			for c := range toWrite {
				if ctx.Err() == nil {
					if err := writeSparse(out, c.buf, c.off); err != nil {
						c.err = fmt.Errorf("writing: %w", err)
					} else {
						wb.Written(c.off, c.n)
					}
				}
				close(c.done)
			}
		}()
	} else {
		close(writerDone)
	}
	// The producer walks the allocation map and starts reads; the
	// consumer below takes chunks in order to hash and stream them.
	var readers sync.WaitGroup
	go func() {
		produceChunks(ctx, client, o.chunk, chunks, buffers, &readers, toWrite)
		readers.Wait()
		if toWrite != nil {
			close(toWrite)
		}
	}()
	defer func() {
		// No read or write may outlive the client and the destination.
		cancel()
		readers.Wait()
		<-writerDone
	}()

	var prog *progress
	if o.progress {
		prog = newProgress(std.err, size)
		defer prog.finish()
	}
	var zeros []byte
	for c := range chunks {
		<-c.done
		if c.err != nil {
			cancel()
			return fmt.Errorf("reading %d bytes at offset %d: %w", c.n, c.off, c.err)
		}
		data := c.buf
		if c.zero {
			if zeros == nil {
				zeros = make([]byte, o.chunk)
			}
			data = zeros[:c.n]
		}
		if sum != nil {
			sum.Write(data)
		}
		if !sparse {
			if _, err := out.Write(data); err != nil {
				cancel()
				return fmt.Errorf("writing %s: %w", o.dest, err)
			}
		}
		if c.buf != nil {
			buffers <- c.buf
		}
		if prog != nil {
			prog.add(c.n)
		}
	}
	if ctx.Err() != nil {
		return withCode(exitSignal, fmt.Errorf("interrupted; %s is incomplete", o.dest))
	}
	if o.fsync && sparse {
		if err := out.Sync(); err != nil {
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

// produceChunks sends the export's chunks, in order, to chunks, starting
// the read of each data chunk as it goes. It stops early when ctx ends.
func produceChunks(ctx context.Context, client *nbd.Client, chunkSize int64, chunks chan<- *chunk, buffers chan []byte, readers *sync.WaitGroup, toWrite chan<- *chunk) {
	defer close(chunks)
	size := client.Size()
	send := func(c *chunk) bool {
		select {
		case chunks <- c:
			return true
		case <-ctx.Done():
			return false
		}
	}
	for off := int64(0); off < size; {
		ext, err := client.BlockStatus(ctx, off, min(size-off, 1<<30))
		if errors.Is(err, nbd.ErrNoAllocation) {
			ext = []nbd.Extent{{Offset: off, Length: size - off}}
		} else if err != nil {
			c := &chunk{off: off, n: 0, err: err, done: make(chan struct{})}
			close(c.done)
			send(c)
			return
		}
		for _, e := range ext {
			end := e.Offset + e.Length
			for pos := e.Offset; pos < end; {
				n := min(chunkSize-pos%chunkSize, end-pos) // keep chunks aligned
				c := &chunk{off: pos, n: n, zero: e.Zero(), done: make(chan struct{})}
				if c.zero {
					close(c.done)
				} else {
					var buf []byte
					select {
					case buf = <-buffers:
					case <-ctx.Done():
						return
					}
					if buf == nil {
						buf = make([]byte, chunkSize)
					}
					c.buf = buf[:n]
					readers.Add(1)
					go func() {
						defer readers.Done()
						readChunk(ctx, client, c, toWrite)
					}()
				}
				if !send(c) {
					return
				}
				pos += n
			}
			off = end
		}
	}
}

// readChunk reads one chunk and hands it to the writer, if there is one;
// the chunk is done once read (and written).
func readChunk(ctx context.Context, client *nbd.Client, c *chunk, toWrite chan<- *chunk) {
	if err := client.ReadVecContext(ctx, [][]byte{c.buf}, c.off); err != nil {
		c.err = err
		close(c.done)
		return
	}
	if toWrite == nil {
		close(c.done)
		return
	}
	toWrite <- c
}

// zeroBlock is the granularity of zero detection: runs of all-zero
// 64 KiB blocks are left as holes in a sparse destination.
var zeroBlock [64 << 10]byte

// writeSparse writes buf at off, skipping all-zero blocks so a file
// truncated to size beforehand keeps them as holes.
func writeSparse(f *os.File, buf []byte, off int64) error {
	start := -1 // start of the current run of non-zero blocks
	flush := func(end int) error {
		if start < 0 {
			return nil
		}
		_, err := f.WriteAt(buf[start:end], off+int64(start))
		start = -1
		return err
	}
	for pos := 0; pos < len(buf); pos += len(zeroBlock) {
		end := min(pos+len(zeroBlock), len(buf))
		if bytes.Equal(buf[pos:end], zeroBlock[:end-pos]) {
			if err := flush(pos); err != nil {
				return err
			}
		} else if start < 0 {
			start = pos
		}
	}
	return flush(len(buf))
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
