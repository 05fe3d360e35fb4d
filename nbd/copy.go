package nbd

// The copier: a whole export read in parallel, in aligned chunks, and
// written out sparse, in order, or both.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
)

// CopyOptions say where Client.Copy writes the export and how it reads.
type CopyOptions struct {
	// Sparse, if set, receives the data at its offsets, in the order the
	// reads complete, from one goroutine (pwrite from many at once
	// contends on the file's lock). Ranges the server reports as holes
	// or zeros, and sparseBlock-sized blocks that read as zeros, are not
	// written, so a file truncated to the export's size beforehand keeps
	// them as holes. An *os.File is written behind (see WriteBehind).
	Sparse io.WriterAt
	// Stream, if set, receives every byte of the export in order, zeros
	// included: stdout, a pipe, a hash.
	Stream io.Writer
	// RequestSize is the bytes of one read, a power of two to which the
	// reads are aligned (default 512 KiB: a server that allocates each
	// request's buffer, as nbdkit does, faults in far fewer fresh pages
	// than for larger ones).
	RequestSize int64
	// Requests is how many reads are in flight at once (default 4 per
	// connection of the pool, which keeps a local server busy).
	Requests int
	// Progress, if set, is called with the bytes of each chunk once the
	// chunk is done (read, and written to Sparse), in order.
	Progress func(n int64)
}

// DefaultCopyRequestSize is CopyOptions.RequestSize's default.
const DefaultCopyRequestSize = 512 << 10

// sparseBlock is the granularity of zero detection: all-zero blocks of
// this size are left as holes in a sparse destination.
const sparseBlock = 64 << 10

// copySource is what the copier reads: a Client.
type copySource interface {
	Size() int64
	BlockStatus(ctx context.Context, off, length int64) ([]Extent, error)
	ReadVecContext(ctx context.Context, bufs [][]byte, off int64) error
}

// Copy reads the whole export with the options' reads in flight and
// writes it to opt.Sparse and opt.Stream. It returns ctx.Err() if ctx
// ends first; either way no read or write is left running.
func (c *Client) Copy(ctx context.Context, opt CopyOptions) error {
	if opt.Requests <= 0 {
		opt.Requests = 4 * c.Stats().Slots
	}
	return copyExport(ctx, c, opt)
}

// chunk is one piece of the export in the copy pipeline.
type chunk struct {
	off, n int64
	zero   bool   // known to read as zeros: nothing is read or written
	buf    []byte // data, for non-zero chunks
	err    error
	done   chan struct{}
}

func copyExport(ctx context.Context, src copySource, opt CopyOptions) error {
	if opt.RequestSize <= 0 {
		opt.RequestSize = DefaultCopyRequestSize
	}
	if opt.RequestSize&(opt.RequestSize-1) != 0 {
		return fmt.Errorf("nbd: copy request size %d is not a power of two", opt.RequestSize)
	}
	inflight := max(opt.Requests, 1)
	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	chunks := make(chan *chunk, inflight)
	buffers := make(chan []byte, inflight)
	for i := 0; i < inflight; i++ {
		buffers <- nil // allocated on first use
	}
	// One goroutine writes a sparse destination, in the order reads
	// complete.
	var toWrite chan *chunk
	writerDone := make(chan struct{})
	if opt.Sparse != nil {
		toWrite = make(chan *chunk, inflight)
		go func() {
			defer close(writerDone)
			var wb *WriteBehind
			if f, ok := opt.Sparse.(*os.File); ok {
				// The destination would otherwise fill the page cache
				// with fresh pages.
				wb = NewWriteBehind(int(f.Fd()))
			}
			for c := range toWrite {
				if ctx.Err() == nil {
					if err := writeSparse(opt.Sparse, c.buf, c.off); err != nil {
						c.err = fmt.Errorf("writing %d bytes at offset %d: %w", c.n, c.off, err)
					} else if wb != nil {
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
	// consumer below takes chunks in order to stream them.
	producerDone := make(chan struct{})
	go func() {
		defer close(producerDone)
		var readers sync.WaitGroup
		produceChunks(ctx, src, opt.RequestSize, chunks, buffers, &readers, toWrite)
		readers.Wait()
		if toWrite != nil {
			close(toWrite)
		}
	}()
	defer func() {
		// No read or write may outlive the copy: the producer may still
		// be starting one when the copy fails.
		cancel()
		<-producerDone
		<-writerDone
	}()

	var zeros []byte
	for c := range chunks {
		<-c.done
		if err := parent.Err(); err != nil {
			return err
		}
		if c.err != nil {
			return c.err
		}
		if opt.Stream != nil {
			data := c.buf
			if c.zero {
				if zeros == nil {
					zeros = make([]byte, opt.RequestSize)
				}
				data = zeros[:c.n]
			}
			if _, err := opt.Stream.Write(data); err != nil {
				return fmt.Errorf("writing: %w", err)
			}
		}
		if c.buf != nil {
			buffers <- c.buf
		}
		if opt.Progress != nil {
			opt.Progress(c.n)
		}
	}
	return parent.Err()
}

// produceChunks sends the export's chunks, in order, to chunks, starting
// the read of each data chunk as it goes. It stops early when ctx ends.
func produceChunks(ctx context.Context, src copySource, chunkSize int64, chunks chan<- *chunk, buffers chan []byte, readers *sync.WaitGroup, toWrite chan<- *chunk) {
	defer close(chunks)
	size := src.Size()
	send := func(c *chunk) bool {
		select {
		case chunks <- c:
			return true
		case <-ctx.Done():
			return false
		}
	}
	for off := int64(0); off < size; {
		ext, err := src.BlockStatus(ctx, off, min(size-off, 1<<30))
		if errors.Is(err, ErrNoAllocation) {
			ext = []Extent{{Offset: off, Length: size - off}}
		} else if err != nil {
			c := &chunk{off: off, err: fmt.Errorf("reading the allocation at offset %d: %w", off, err), done: make(chan struct{})}
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
						readChunk(ctx, src, c, toWrite)
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
func readChunk(ctx context.Context, src copySource, c *chunk, toWrite chan<- *chunk) {
	if err := src.ReadVecContext(ctx, [][]byte{c.buf}, c.off); err != nil {
		c.err = fmt.Errorf("reading %d bytes at offset %d: %w", c.n, c.off, err)
		close(c.done)
		return
	}
	if toWrite == nil {
		close(c.done)
		return
	}
	toWrite <- c
}

// writeSparse writes buf at off, skipping all-zero blocks so a file
// truncated to size beforehand keeps them as holes.
func writeSparse(w io.WriterAt, buf []byte, off int64) error {
	start := -1 // start of the current run of non-zero blocks
	flush := func(end int) error {
		if start < 0 {
			return nil
		}
		_, err := w.WriteAt(buf[start:end], off+int64(start))
		start = -1
		return err
	}
	for pos := 0; pos < len(buf); pos += sparseBlock {
		end := min(pos+sparseBlock, len(buf))
		if AllZero(buf[pos:end]) {
			if err := flush(pos); err != nil {
				return err
			}
		} else if start < 0 {
			start = pos
		}
	}
	return flush(len(buf))
}

// AllZero reports whether b holds only zero bytes: its first byte is zero
// and every byte equals the one before it. Real data almost always has a
// non-zero first or last byte, so the full comparison is rare.
func AllZero(b []byte) bool {
	return len(b) == 0 || b[0] == 0 && b[len(b)-1] == 0 && bytes.Equal(b[1:], b[:len(b)-1])
}
