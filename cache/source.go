package cache

import (
	"context"
	"fmt"
	"io"
)

// ContextReaderAt lets a FUSE interrupt cancel the source read. A source
// that has it is called with a context; one that does not is called with
// ReadAt and cannot be interrupted.
type ContextReaderAt interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

// VectorReader reads len(bufs[0])+...+len(bufs[n-1]) bytes starting at off
// into bufs in order, so merged misses land straight in block buffers with
// no extra copy. The cache never asks for bytes past the end of the source.
type VectorReader interface {
	ReadVecContext(ctx context.Context, bufs [][]byte, off int64) error
}

// Allocator reports which ranges read as zeros and which take no storage
// on the source (from NBD BLOCK_STATUS base:allocation). It returns extents in order, starting at off and
// covering at least one byte; it may cover less or more than length.
//
// An error wrapping errors.ErrUnsupported (or syscall.ENOTSUP) tells the
// cache the source has no allocation information after all; it then stops
// asking.
type Allocator interface {
	Allocation(ctx context.Context, off, length int64) ([]Extent, error)
}

// Extent is one range of an allocation map.
type Extent struct {
	Offset, Length int64
	Zero           bool // the range reads as zeros
	Hole           bool // the range takes no storage on the source
}

// End returns the offset just past the extent.
func (e Extent) End() int64 { return e.Offset + e.Length }

// readSource fills buf from the source at off, in requests of at most
// maxRequest bytes, and counts them. A source that returns fewer bytes
// than asked without an error, or io.EOF before the end of buf, broke the
// io.ReaderAt contract for a range inside the source: that is
// io.ErrUnexpectedEOF.
func (c *Cache) readSource(ctx context.Context, buf []byte, off int64) error {
	for len(buf) > 0 {
		chunk := buf[:min(len(buf), c.maxRequest)]
		c.stats.sourceReads.Add(1)
		var n int
		var err error
		if c.ctxSrc != nil {
			n, err = c.ctxSrc.ReadAtContext(ctx, chunk, off)
		} else {
			n, err = c.src.ReadAt(chunk, off)
		}
		if n == len(chunk) && (err == nil || err == io.EOF) {
			err = nil
		} else if err == nil || err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return c.sourceError(ctx, err, off, len(chunk))
		}
		c.stats.bytesFetched.Add(int64(n))
		buf = buf[n:]
		off += int64(n)
	}
	return nil
}

// readSourceVec fills bufs from the source at off through VectorReader,
// in requests of at most maxRequest bytes.
func (c *Cache) readSourceVec(ctx context.Context, bufs [][]byte, off, length int64) error {
	for pos := int64(0); pos < length; {
		n := min(length-pos, int64(c.maxRequest))
		vec := bufs
		if n != length {
			vec = sliceVec(bufs, pos, n)
		}
		c.stats.sourceReads.Add(1)
		if err := c.vecSrc.ReadVecContext(ctx, vec, off+pos); err != nil {
			return c.sourceError(ctx, err, off+pos, int(n))
		}
		c.stats.bytesFetched.Add(n)
		pos += n
	}
	return nil
}

// sourceError counts a failed source request and wraps its error with the
// range, keeping errors.Is and errors.As working on the original. A read
// cut short because the cache is closing is not a source failure.
func (c *Cache) sourceError(ctx context.Context, err error, off int64, n int) error {
	if c.ctx.Err() != nil && ctx == c.ctx {
		return fmt.Errorf("cache: read of %d bytes at offset %d: %w", n, off, ErrClosed)
	}
	if ctx.Err() == nil {
		c.stats.errors.Add(1)
	}
	return fmt.Errorf("cache: read of %d bytes at offset %d: %w", n, off, err)
}
