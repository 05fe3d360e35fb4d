package overlay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// Options configure an Overlay.
type Options struct {
	// Dir is the directory of the private file. It should be on a local
	// file system with room for the bound: tmpfs ($XDG_RUNTIME_DIR) keeps
	// it in memory, a disk directory on disk.
	Dir string
	// BlockSize is the unit of writes, a power of 2 from 512 to 1 MiB; 0
	// means 4096 (a page, and the block of most file systems). A write of
	// part of a block copies the rest of it from the disk first.
	BlockSize int
	// MaxBytes bounds the blocks written, in bytes (a multiple of
	// BlockSize, rounded down). 0 means no bound but the file system's.
	MaxBytes int64
}

// Stats is a snapshot of an Overlay's counters.
type Stats struct {
	BlockSize int   `json:"block_size"`
	Blocks    int64 `json:"blocks"`    // blocks written
	Bytes     int64 `json:"bytes"`     // Blocks * BlockSize
	MaxBytes  int64 `json:"max_bytes"` // the bound; 0 means none
	Writes    int64 `json:"writes"`    // writes done
	Refused   int64 `json:"refused"`   // writes refused with ENOSPC
}

// contextReaderAt and sliceReader are the optional methods of the disk
// below that reads pass on to (the block cache has them).
type contextReaderAt interface {
	ReadAtContext(ctx context.Context, p []byte, off int64) (int, error)
}

type sliceReader interface {
	ReadSlices(ctx context.Context, off int64, buf []byte) (slices [][]byte, release func(), err error)
}

// Overlay is the write layer over one disk. Make one with New.
type Overlay struct {
	lower  io.ReaderAt
	ctxr   contextReaderAt // lower, if it has ReadAtContext
	slicer sliceReader     // lower, if it has ReadSlices
	size   int64
	bs     int64
	shift  uint // log2(bs)
	max    int64
	f      *os.File

	writeMu sync.Mutex // held by the one write running

	mu      sync.RWMutex
	written map[int64]uint64 // bit i of word w: block 64*w+i was written

	blocks  atomic.Int64
	writes  atomic.Int64
	refused atomic.Int64
}

// New returns an overlay over lower, a disk of size bytes, with its private
// file in opt.Dir. Close it to free the file's space before the process
// ends.
func New(lower io.ReaderAt, size int64, opt Options) (*Overlay, error) {
	bs := opt.BlockSize
	if bs == 0 {
		bs = 4096
	}
	if bs < 512 || bs > 1<<20 || bs&(bs-1) != 0 {
		return nil, fmt.Errorf("overlay: block size %d is not a power of 2 from 512 to 1 MiB", bs)
	}
	if size < 0 || opt.MaxBytes < 0 {
		return nil, fmt.Errorf("overlay: negative size %d or bound %d", size, opt.MaxBytes)
	}
	f, err := openUnnamed(opt.Dir, true)
	if err != nil {
		return nil, err
	}
	o := &Overlay{
		lower:   lower,
		size:    size,
		bs:      int64(bs),
		shift:   uint(bits.TrailingZeros(uint(bs))),
		max:     opt.MaxBytes / int64(bs) * int64(bs),
		f:       f,
		written: make(map[int64]uint64),
	}
	o.ctxr, _ = lower.(contextReaderAt)
	o.slicer, _ = lower.(sliceReader)
	return o, nil
}

// openUnnamed opens a new read-write file in dir that has no name: with
// O_TMPFILE when tmpfile is set and the file system supports it, else
// created under a random name and unlinked at once.
func openUnnamed(dir string, tmpfile bool) (*os.File, error) {
	if dir == "" {
		return nil, errors.New("overlay: no directory for the overlay file")
	}
	if tmpfile {
		fd, err := unix.Open(dir, unix.O_RDWR|unix.O_CLOEXEC|unix.O_TMPFILE, 0o600)
		if err == nil {
			return os.NewFile(uintptr(fd), dir+"/(overlay, no name)"), nil
		}
		// EOPNOTSUPP: the file system has no O_TMPFILE; EISDIR, EINVAL:
		// the kernel has none. Anything else (ENOENT, EACCES) is the
		// directory's fault and would fail below too.
		if !errors.Is(err, syscall.EOPNOTSUPP) && !errors.Is(err, syscall.EISDIR) && !errors.Is(err, syscall.EINVAL) {
			return nil, fmt.Errorf("overlay: opening a file without a name in %s: %w", dir, err)
		}
	}
	f, err := os.CreateTemp(dir, ".snapmount-overlay-*")
	if err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}
	if err := os.Remove(f.Name()); err != nil {
		f.Close()
		return nil, fmt.Errorf("overlay: unlinking the new overlay file: %w", err)
	}
	return f, nil
}

// Size is the disk's size in bytes.
func (o *Overlay) Size() int64 { return o.size }

// Stats returns the counters.
func (o *Overlay) Stats() Stats {
	b := o.blocks.Load()
	return Stats{
		BlockSize: int(o.bs),
		Blocks:    b,
		Bytes:     b * o.bs,
		MaxBytes:  o.max,
		Writes:    o.writes.Load(),
		Refused:   o.refused.Load(),
	}
}

// Close closes the private file, which frees its space. Reads and writes
// after Close fail.
func (o *Overlay) Close() error {
	o.writeMu.Lock()
	defer o.writeMu.Unlock()
	return o.f.Close()
}

// isWritten reports whether block b is in the overlay. The caller holds mu.
func (o *Overlay) isWritten(b int64) bool {
	return o.written[b>>6]&(1<<(b&63)) != 0
}

// run returns whether block b is in the overlay and how many blocks from b
// on, at most limit, share that state.
func (o *Overlay) run(b, limit int64) (written bool, n int64) {
	o.mu.RLock()
	defer o.mu.RUnlock()
	written = o.isWritten(b)
	n = 1
	for n < limit && o.isWritten(b+n) == written {
		n++
	}
	return written, n
}

// ReadAt reads like os.File.ReadAt: blocks written come from the overlay,
// the rest from the disk below.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	return o.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt with a context passed to the disk below.
func (o *Overlay) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("overlay: read at negative offset %d", off)
	}
	if off >= o.size {
		return 0, io.EOF
	}
	var eof error
	if rest := o.size - off; int64(len(p)) > rest {
		p, eof = p[:rest], io.EOF
	}
	if o.blocks.Load() == 0 {
		n, err := o.readLower(ctx, p, off)
		return n, orEOF(err, eof)
	}
	last := (off + int64(len(p)) - 1) >> o.shift
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		b := pos >> o.shift
		written, n := o.run(b, last-b+1)
		end := min((b+n)<<o.shift, off+int64(len(p)))
		chunk := p[done : done+int(end-pos)]
		var got int
		var err error
		if written {
			got, err = o.f.ReadAt(chunk, pos)
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("overlay: the overlay file ends before block %d it holds", b)
			}
		} else {
			got, err = o.readLower(ctx, chunk, pos)
		}
		done += got
		if err != nil {
			return done, err
		}
	}
	return done, eof
}

func orEOF(err, eof error) error {
	if err != nil {
		return err
	}
	return eof
}

func (o *Overlay) readLower(ctx context.Context, p []byte, off int64) (int, error) {
	if o.ctxr != nil {
		return o.ctxr.ReadAtContext(ctx, p, off)
	}
	return o.lower.ReadAt(p, off)
}

// ReadSlices passes the read on to the disk below when no block of it is
// in the overlay (and the disk below lends slices); otherwise it declines,
// and the read goes through ReadAtContext.
func (o *Overlay) ReadSlices(ctx context.Context, off int64, buf []byte) ([][]byte, func(), error) {
	n := len(buf)
	if o.slicer == nil || n <= 0 || off < 0 || off >= o.size {
		return nil, nil, nil
	}
	if o.blocks.Load() != 0 {
		first, last := off>>o.shift, (min(off+int64(n), o.size)-1)>>o.shift
		if written, run := o.run(first, last-first+1); written || run <= last-first {
			return nil, nil, nil
		}
	}
	return o.slicer.ReadSlices(ctx, off, buf)
}

// WriteAt writes p at off into the overlay. A write reaching past the end
// of the disk writes what lies before the end and fails with ENOSPC, as a
// block device does; a write needing more blocks than MaxBytes leaves
// fails with ENOSPC and writes nothing.
func (o *Overlay) WriteAt(p []byte, off int64) (int, error) {
	return o.WriteAtContext(context.Background(), p, off)
}

// WriteAtContext is WriteAt with a context for the reads of the disk below
// that partial blocks need.
func (o *Overlay) WriteAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("overlay: write at negative offset %d", off)
	}
	var past error
	if rest := o.size - off; int64(len(p)) > rest {
		if rest <= 0 {
			o.refused.Add(1)
			return 0, fmt.Errorf("overlay: write at offset %d, at or past the end of the disk (%d bytes): %w", off, o.size, syscall.ENOSPC)
		}
		p = p[:rest]
		past = fmt.Errorf("overlay: write of %d bytes at offset %d ends past the end of the disk (%d bytes): %w", len(p), off, o.size, syscall.ENOSPC)
	}
	if len(p) == 0 {
		return 0, past
	}
	o.writeMu.Lock()
	defer o.writeMu.Unlock()

	first, last := off>>o.shift, (off+int64(len(p))-1)>>o.shift
	if o.max > 0 {
		fresh := o.fresh(first, last)
		if used := o.blocks.Load(); (used+fresh)*o.bs > o.max {
			o.refused.Add(1)
			return 0, fmt.Errorf("overlay: a write of %d bytes at offset %d needs %d more blocks of %d bytes; %d of the %d bytes allowed are used: %w",
				len(p), off, fresh, o.bs, used*o.bs, o.max, syscall.ENOSPC)
		}
	}
	// The partial first and last blocks are merged with what they hold
	// now; the full blocks between go straight from p in one write.
	end := off + int64(len(p))
	fullEnd := end &^ (o.bs - 1) // where the full blocks end
	if end == o.size {
		fullEnd = end // the disk's last block may be short, yet full
	}
	for pos := off; pos < end; {
		b := pos >> o.shift
		start := b << o.shift
		if pos > start || min(start+o.bs, o.size) > end {
			n, err := o.mergeBlock(ctx, b, p[pos-off:], pos-start)
			if err != nil {
				return int(pos - off), err
			}
			pos += int64(n)
			continue
		}
		if _, err := o.f.WriteAt(p[pos-off:fullEnd-off], pos); err != nil {
			return int(pos - off), fmt.Errorf("overlay: writing %d bytes at offset %d of the overlay file: %w", fullEnd-pos, pos, err)
		}
		o.mark(b, (fullEnd-1)>>o.shift)
		pos = fullEnd
	}
	o.writes.Add(1)
	return len(p), past
}

// mergeBlock writes the start of p at offset at of block b, whose other
// bytes keep what they hold now (from the overlay, else the disk below),
// and returns how many bytes of p it wrote.
func (o *Overlay) mergeBlock(ctx context.Context, b int64, p []byte, at int64) (int, error) {
	start := b << o.shift
	buf := make([]byte, min(o.bs, o.size-start))
	o.mu.RLock()
	had := o.isWritten(b)
	o.mu.RUnlock()
	var err error
	if had {
		_, err = o.f.ReadAt(buf, start)
	} else {
		_, err = o.readLower(ctx, buf, start)
	}
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, fmt.Errorf("overlay: reading block %d to write part of it: %w", b, err)
	}
	n := copy(buf[at:], p)
	if _, err := o.f.WriteAt(buf, start); err != nil {
		return 0, fmt.Errorf("overlay: writing block %d of the overlay file: %w", b, err)
	}
	o.mark(b, b)
	return n, nil
}

// fresh counts the blocks from first to last that are not in the overlay.
// The caller holds writeMu, so no block can be added meanwhile.
func (o *Overlay) fresh(first, last int64) int64 {
	o.mu.RLock()
	defer o.mu.RUnlock()
	var n int64
	for b := first; b <= last; b++ {
		if !o.isWritten(b) {
			n++
		}
	}
	return n
}

// mark records blocks first to last as written, once their data is in the
// file.
func (o *Overlay) mark(first, last int64) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for b := first; b <= last; b++ {
		w, bit := b>>6, uint64(1)<<(b&63)
		if o.written[w]&bit == 0 {
			o.written[w] |= bit
			o.blocks.Add(1)
		}
	}
}
