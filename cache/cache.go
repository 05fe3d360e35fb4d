package cache

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
)

// Defaults for the zero values of Options.
const (
	DefaultBlockSize    = 128 << 10
	DefaultMaxBytes     = 256 << 20
	DefaultMaxRequest   = 4 << 20
	DefaultMaxReadahead = 8 << 20

	minBlockSize = 4096
)

// ErrClosed is returned by reads and seeks on a closed Cache.
var ErrClosed = errors.New("cache: closed")

// Options configures a Cache. Zero values mean the defaults in brackets.
type Options struct {
	// BlockSize is the bytes per block, a power of two >= 4096 [128 KiB].
	// Other values are rounded up to the next power of two (at least
	// 4096); Stats reports the size in use.
	BlockSize int
	// MaxBytes is the memory budget for cached data in bytes [256 MiB].
	// The cache never holds more block data than this; beyond it only
	// fixed overhead: block headers, the allocation map, and a few
	// MaxRequest-sized scratch buffers when the source has no
	// VectorReader.
	MaxBytes int64
	// MaxRequest is the largest single read issued to the source, in
	// bytes [4 MiB]; adjacent missing blocks are merged up to this.
	MaxRequest int
	// MaxMissRequest caps the fetches of blocks a read is missing, and
	// readahead's, in bytes [MaxRequest], until the cache has fetched
	// MissWarmup bytes [0]: a larger miss goes in pieces, in parallel, and
	// readahead keeps as many bytes in flight in more requests. After the
	// warm-up adjacent blocks merge up to MaxRequest.
	// It is for servers that allocate each request's buffer per
	// connection or thread (nbdkit does): large requests on new
	// connections cost them fresh memory, which a short read never earns
	// back, while a long read costs less CPU per byte in large requests.
	MaxMissRequest int
	// MissWarmup: see MaxMissRequest.
	MissWarmup int64
	// MaxReadahead is the largest readahead window in bytes [8 MiB];
	// negative disables readahead. Windows are also capped at a quarter
	// of MaxBytes.
	MaxReadahead int64
	// AdmitOnSecondMiss reads a small miss (within one block) that
	// continues no sequential stream straight from the source, only its
	// own bytes, and keeps nothing; the block is fetched whole and cached
	// when such a read misses it again while it is remembered (about as
	// many blocks as the budget holds). Random reads then cost the server
	// and the cache no more than their bytes, while blocks read twice,
	// such as file system metadata, still end up cached. [off]
	AdmitOnSecondMiss bool
	// Disabled passes reads straight through to the source, split at
	// MaxRequest, with no storage and no readahead (--no-cache). Counters
	// are still kept.
	Disabled bool
}

// numShards splits the block index so that readers of different blocks
// rarely meet on one mutex. A power of two.
const numShards = 64

// shard is one part of the block index. Its counters live here, under the
// mutex the hit path holds anyway, so a hit costs no shared atomic.
type shard struct {
	mu     sync.Mutex
	blocks map[int64]*block // resident and in-flight blocks

	// Lookups by callers' reads, by outcome (see Stats).
	hits, zeroHits, misses, joins int64

	_ [64]byte // keep neighbouring shards off one cache line
}

// Cache is a block-aligned, byte-bounded, read-through cache over an
// io.ReaderAt. See the package documentation.
type Cache struct {
	// Set by New, read-only after.
	src           io.ReaderAt
	ctxSrc        ContextReaderAt // src, if it has ReadAtContext
	vecSrc        VectorReader    // src, if it has ReadVecContext
	geo           geometry
	maxBytes      int64
	maxEntries    int64 // bounds blocks of any kind, zero blocks included
	maxRequest    int   // bytes per source request
	maxRunBlocks  int   // blocks merged into one fetch
	maxMissBlocks int   // blocks merged into one fetch of a read's misses, until missWarmup
	missWarmup    int64 // bytes fetched before misses merge up to maxRunBlocks
	disabled      bool
	zeros         []byte     // BlockSize zero bytes, lent for holes; never written
	alloc         *allocMap  // nil when the source reports no allocation
	ra            *readahead // nil when readahead is off
	ghosts        *ghosts    // nil unless AdmitOnSecondMiss
	scratch       *scratchPool

	shards [numShards]shard
	bufs   bufferPool

	// evictMu guards the CLOCK ring and the memory accounting below. Lock
	// order: evictMu, then a shard's mu, then bufs.mu.
	evictMu   sync.Mutex
	hand      *block // next block the CLOCK hand looks at; nil when the ring is empty
	ringLen   int
	used      int64 // data bytes of resident and in-flight blocks
	entries   int64 // resident and in-flight blocks
	evictions int64
	// scanList holds blocks a sequential stream has read once, most
	// recent last: eviction takes them first (see clock.go). Entries of
	// blocks evicted or read again meanwhile are dropped lazily.
	scanList []*block
	// scanResident counts the resident blocks on scanList; past
	// scanMaxBlocks a scan recycles its own blocks (see clock.go).
	scanResident  int64
	scanMaxBlocks int64
	scanLookback  int // blocks: scanLookbackBytes, at least 16

	// readaheadBytes is the data of blocks fetched by readahead and not
	// yet read or evicted. Readahead stops at readaheadCap of it, so that
	// prefetching cannot push out everything else.
	readaheadBytes atomic.Int64
	readaheadCap   int64

	stats globalStats

	// ctx is what fetches run under: cancelled by Close only (see
	// "Fetches and cancellation" in the package documentation).
	ctx    context.Context
	cancel context.CancelFunc
	closed atomic.Bool

	// lifeMu orders the start of background work against Close.
	lifeMu  sync.Mutex
	closing bool
	wg      sync.WaitGroup // fetch and readahead goroutines

	// hookJoined, if set (by tests only, before any read), is called
	// when a read starts waiting on a fetch begun by someone else.
	hookJoined func(idx int64)
}

// New returns a Cache over the first size bytes of src. src's optional
// interfaces (ContextReaderAt, VectorReader, Allocator) are detected here.
func New(src io.ReaderAt, size int64, opt Options) *Cache {
	if size < 0 {
		size = 0
	}
	bs := normalBlockSize(opt.BlockSize)
	if opt.MaxBytes <= 0 {
		opt.MaxBytes = DefaultMaxBytes
	}
	if opt.MaxRequest <= 0 {
		opt.MaxRequest = DefaultMaxRequest
	}
	if opt.MaxMissRequest <= 0 {
		opt.MaxMissRequest = opt.MaxRequest
	}
	if opt.MaxReadahead == 0 {
		opt.MaxReadahead = DefaultMaxReadahead
	}
	c := &Cache{
		src:           src,
		geo:           newGeometry(bs, size),
		maxBytes:      opt.MaxBytes,
		maxRequest:    opt.MaxRequest,
		maxRunBlocks:  max(1, opt.MaxRequest/bs),
		maxMissBlocks: max(1, min(opt.MaxRequest, opt.MaxMissRequest)/bs),
		missWarmup:    opt.MissWarmup,
		disabled:      opt.Disabled,
		bufs:          bufferPool{size: bs},
		zeros:         make([]byte, bs),
	}
	c.ctxSrc, _ = src.(ContextReaderAt)
	c.vecSrc, _ = src.(VectorReader)
	c.ctx, c.cancel = context.WithCancel(context.Background())
	dataBlocks := opt.MaxBytes / int64(bs)
	// Zero blocks hold no data but still cost a header and a map slot;
	// bound them too, generously.
	c.maxEntries = 4*dataBlocks + 64
	c.readaheadCap = opt.MaxBytes / 2
	c.scanMaxBlocks = dataBlocks
	c.scanLookback = max(16, scanLookbackBytes/bs)
	if size > opt.MaxBytes {
		c.scanMaxBlocks = max(1, dataBlocks/scanShare)
	}
	for i := range c.shards {
		c.shards[i].blocks = make(map[int64]*block)
	}
	if c.vecSrc == nil && c.maxRunBlocks > 1 {
		c.scratch = newScratchPool(c.maxRunBlocks * bs)
	}
	if a, ok := src.(Allocator); ok && !c.disabled {
		c.alloc = newAllocMap(a, size)
	}
	if !c.disabled && opt.MaxReadahead > 0 {
		c.ra = newReadahead(c, opt.MaxReadahead)
	}
	if !c.disabled && opt.AdmitOnSecondMiss {
		c.ghosts = newGhosts(dataBlocks)
	}
	return c
}

// ReadAt reads len(p) bytes at off, like os.File.ReadAt: a read reaching
// past the end returns the bytes up to the end and io.EOF, a read at or
// past the end returns 0, io.EOF. It is safe for concurrent use and does
// not keep p.
func (c *Cache) ReadAt(p []byte, off int64) (int, error) {
	return c.ReadAtContext(context.Background(), p, off)
}

// ReadAtContext is ReadAt that gives up waiting when ctx is done, with an
// error wrapping ctx.Err(). Giving up does not cancel a source read other
// readers wait for; its data is still cached.
func (c *Cache) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	if c.closed.Load() {
		return 0, ErrClosed
	}
	if off < 0 {
		return 0, fmt.Errorf("cache: read at negative offset %d: %w", off, syscall.EINVAL)
	}
	if len(p) == 0 {
		return 0, nil
	}
	if off >= c.geo.size {
		return 0, io.EOF
	}
	n, eof := c.geo.clip(off, len(p))
	p = p[:n]
	var err error
	if c.disabled {
		n, err = c.readThrough(ctx, p, off)
	} else {
		n, err = c.read(ctx, &readOut{p: p}, off, int64(n))
	}
	if err == nil && eof {
		err = io.EOF
	}
	return n, err
}

// SetMaxReadahead changes the largest readahead window; 0 or less stops
// prefetching (sequential streams are still recognised, for scan
// resistance). It is for callers that learn only after New that someone
// else reads ahead far enough: the FUSE mount when the kernel's own
// window could be raised. A cache made with readahead disabled stays so.
func (c *Cache) SetMaxReadahead(n int64) {
	if c.ra != nil {
		c.ra.setMaxWindow(n)
	}
}

// ReadSlices lends the bytes [off, off+len(buf)) (clipped to the source)
// as slices of the cache's own memory instead of copying them: a FUSE
// reply can then be written from the blocks directly. What the cache reads
// from the source without keeping it (a small random miss, or no memory
// to cache it) goes into buf instead, and its slices point there; buf is
// the caller's, such as the FUSE request's reply buffer, so such a read
// allocates nothing. The slices stay valid, and the blocks stay in
// memory, until release is called; release must be called exactly once.
// Holes are lent as a shared zero block, which must not be written. In
// Disabled mode nothing is cached to lend: it returns nil slices, a nil
// release and a nil error, and the caller reads into its own buffer.
func (c *Cache) ReadSlices(ctx context.Context, off int64, buf []byte) (slices [][]byte, release func(), err error) {
	n := len(buf)
	if c.disabled {
		return nil, nil, nil
	}
	if c.closed.Load() {
		return nil, nil, ErrClosed
	}
	if off < 0 {
		return nil, nil, fmt.Errorf("cache: read of %d bytes at offset %d: %w", n, off, syscall.EINVAL)
	}
	if n == 0 || off >= c.geo.size {
		return [][]byte{}, func() {}, nil
	}
	n, _ = c.geo.clip(off, n)
	o := &readOut{p: buf[:n], lend: true}
	if _, err := c.read(ctx, o, off, int64(n)); err != nil {
		o.release(c)
		return nil, nil, err
	}
	return o.slices, func() { o.release(c) }, nil
}

// readOut is where a read's data goes: copied into p, or (lend) handed
// out as slices of pinned blocks that release unpins.
type readOut struct {
	p       []byte // the caller's buffer holding the read's range; in lend mode only for blocks read directly
	lend    bool
	slices  [][]byte
	pinned  []*block
	scanned []*block // stream blocks read for the first time, for the scan list
}

func (o *readOut) release(c *Cache) {
	for _, b := range o.pinned {
		c.unpin(b)
	}
	o.pinned, o.slices = nil, nil
}

// read serves p (inside the source) from the cache. The fast path serves
// resident blocks: per block one short critical section to find and pin
// the block, then one copy outside any lock. The first block that is not
// resident hands the rest to readSlow.
func (c *Cache) read(ctx context.Context, o *readOut, off, length int64) (int, error) {
	end := off + length
	for idx := c.geo.blockOf(off); ; idx++ {
		start := c.geo.blockStart(idx)
		if start >= end {
			break
		}
		sh := c.shardOf(idx)
		sh.mu.Lock()
		b := sh.blocks[idx]
		if b == nil || b.fetch != nil {
			sh.mu.Unlock()
			n, err := c.readSlow(ctx, o, off, end, max(start, off))
			c.scannedOnce(o.scanned)
			return n, err
		}
		b.refs.Add(1)
		if b.zero {
			sh.zeroHits++
		} else {
			sh.hits++
		}
		sh.mu.Unlock()
		c.deliver(o, b, off, end, true)
	}
	c.scannedOnce(o.scanned)
	c.ra.observe(off, int(length))
	return int(length), nil
}

// deliver hands the part of block b that [off, end) wants to o: copied
// into o.p (and b unpinned), or lent (b stays pinned until o is
// released). b must be pinned and no longer in flight. hit says the block
// was resident when looked up: that sets its CLOCK bit, unless this is the
// first read of a block readahead fetched. The read that fetched a block
// does not set the bit either, so a block read once is the first to go,
// as in an LRU list.
func (c *Cache) deliver(o *readOut, b *block, off, end int64, hit bool) {
	pOff, bOff, n := c.geo.part(b.idx, off, end)
	switch {
	case b.zero:
		c.deliverZero(o, b.idx, off, end)
	case o.lend:
		o.slices = append(o.slices, b.data[bOff:bOff+n])
	default:
		copy(o.p[pOff:pOff+n], b.data[bOff:])
	}
	if o.lend {
		o.pinned = append(o.pinned, b)
	} else {
		defer c.unpin(b)
	}
	if b.readahead.Load() && b.readahead.CompareAndSwap(true, false) {
		c.stats.readaheadUsed.Add(1)
		c.readaheadBytes.Add(-b.cost())
		hit = false // its first read
	}
	switch {
	case hit && !b.referenced.Load():
		b.referenced.Store(true)
	case !hit && b.scan.Load():
		o.scanned = append(o.scanned, b)
	}
}

// deliverZero hands o the part of a known hole (block idx) that
// [off, end) wants.
func (c *Cache) deliverZero(o *readOut, idx, off, end int64) {
	pOff, _, n := c.geo.part(idx, off, end)
	if o.lend {
		o.slices = append(o.slices, c.zeros[:n])
		return
	}
	clear(o.p[pOff : pOff+n])
}

// readThrough is the Disabled mode: straight to the source, in requests
// of at most MaxRequest, nothing kept.
func (c *Cache) readThrough(ctx context.Context, p []byte, off int64) (int, error) {
	end := off + int64(len(p))
	c.stats.misses.Add(c.geo.blockOf(end-1) - c.geo.blockOf(off) + 1)
	for done := 0; done < len(p); {
		if err := ctx.Err(); err != nil {
			return done, fmt.Errorf("cache: read at offset %d: %w", off+int64(done), err)
		}
		chunk := p[done:min(len(p), done+c.maxRequest)]
		if err := c.readSource(ctx, chunk, off+int64(done)); err != nil {
			return done, err
		}
		done += len(chunk)
	}
	return len(p), nil
}

// shardOf returns the index shard for block idx. Multiplying by a large
// odd constant spreads consecutive blocks over all shards.
func (c *Cache) shardOf(idx int64) *shard {
	return &c.shards[(uint64(idx)*0x9E3779B97F4A7C15)>>(64-6)]
}

// unpin drops one reference to b; the last one returns its buffer.
func (c *Cache) unpin(b *block) {
	if b.refs.Add(-1) == 0 {
		c.bufs.put(b.data)
	}
}

// goTracked runs fn in a goroutine that Close waits for. It returns false,
// without running fn, once Close has begun.
func (c *Cache) goTracked(fn func()) bool {
	return c.tracked(fn, true)
}

// runTracked runs fn in this goroutine as work Close waits for. It
// returns false, without running fn, once Close has begun.
func (c *Cache) runTracked(fn func()) bool {
	return c.tracked(fn, false)
}

func (c *Cache) tracked(fn func(), async bool) bool {
	c.lifeMu.Lock()
	if c.closing {
		c.lifeMu.Unlock()
		return false
	}
	c.wg.Add(1)
	c.lifeMu.Unlock()
	if !async {
		defer c.wg.Done()
		fn()
		return true
	}
	go func() {
		defer c.wg.Done()
		fn()
	}()
	return true
}

// Close stops readahead, cancels the source reads in flight (through
// ContextReaderAt or VectorReader), waits for them and releases the cached
// memory. Reads after Close fail with ErrClosed; Stats keeps working.
// Close is idempotent.
func (c *Cache) Close() error {
	c.lifeMu.Lock()
	if c.closing {
		c.lifeMu.Unlock()
		return nil
	}
	c.closing = true
	c.closed.Store(true)
	c.lifeMu.Unlock()
	c.cancel()
	c.wg.Wait()

	c.evictMu.Lock()
	for c.hand != nil {
		b := c.hand
		sh := c.shardOf(b.idx)
		sh.mu.Lock()
		delete(sh.blocks, b.idx)
		sh.mu.Unlock()
		c.ringRemoveLocked(b)
		c.used -= b.cost()
		c.entries--
		if b.readahead.CompareAndSwap(true, false) {
			c.readaheadBytes.Add(-b.cost())
		}
		c.unpin(b)
	}
	c.evictMu.Unlock()
	c.bufs.drain()
	return nil
}
