// Package cache is snapmount's block cache: a block-aligned, byte-bounded,
// read-through cache over an io.ReaderAt (in snapmount, the NBD client),
// itself an io.ReaderAt (read by the FUSE file node).
//
// It owns: splitting reads into fixed-size blocks, keeping recently read
// blocks in memory within a byte budget, fetching each missing block once
// however many readers want it, merging adjacent misses into one source
// request, prefetching ahead of sequential readers, optionally reading
// first random misses around the cache (Options.AdmitOnSecondMiss),
// serving holes as zeros without a transfer, and answering
// SEEK_DATA/SEEK_HOLE. It knows
// nothing of NBD or FUSE; what it needs of its source beyond io.ReaderAt
// it detects through the optional interfaces ContextReaderAt,
// VectorReader and Allocator.
//
// # The io.ReaderAt contract
//
// ReadAt behaves like os.File.ReadAt: it reads len(p) bytes at off; when
// fewer are read, the error says why; a read reaching past the end returns
// the bytes before the end and io.EOF, a read at or past the end returns
// 0, io.EOF. The Cache does not keep p after returning. The source is
// assumed never to change: the cache is for a point-in-time snapshot (or
// for a live view the user was warned about).
//
// # Concurrency
//
// Every method is safe for concurrent use; FUSE calls ReadAt from many
// goroutines. The block index is split into 64 shards, each with its own
// mutex; a cache hit takes one shard lock per block just long enough to
// find the block and pin it (an atomic reference count), then copies
// outside any lock. Eviction is CLOCK (second chance): a hit only sets
// the block's referenced bit, and the ring, the hand and the memory
// accounting sit under one more mutex that only misses take, so hits
// never touch shared state besides the block itself.
//
// # Memory
//
// MaxBytes bounds the block data held: blocks resident and in flight.
// Memory is reserved before a fetch starts; when nothing can be evicted
// (everything in flight or being copied out), the read goes straight from
// the source into the caller's buffer instead of growing the cache. A
// pinned block is never evicted, so a buffer is only reused once nobody
// reads it. Buffers are recycled through a free list, so the steady state
// allocates nothing per hit. All-zero blocks keep no buffer; they, like
// data blocks, count against a bound on the number of blocks. Beyond the
// budget the cache holds fixed overhead only: block headers, the extent
// map (bounded), and, for sources without VectorReader, up to four
// MaxRequest-sized scratch buffers for merged reads.
//
// # Fetches and cancellation
//
// A read that finds blocks missing claims them (an in-flight entry in the
// index) and makes one fetch per run of adjacent claimed blocks, at most
// MaxRequest long (MaxMissRequest during a warm-up). The reader runs its
// last fetch itself and starts the others in goroutines, so a plain miss
// costs no hand-off between goroutines, which is dear for cold sequential
// reads on few CPUs. Later readers of those blocks pin them and wait for
// the fetch's done channel; no re-lookup is needed, since the pin keeps
// the block.
//
// Fetches run under the cache's own context, cancelled only by Close,
// never under the context of the reader that started them. A reader whose
// context ends while it waits for a fetch returns ctx.Err() (wrapped) at
// once; the fetch goes on and its blocks are cached. A reader cancelled
// while it runs a fetch itself returns when the fetch ends, with the data
// it got (the source bounds the wait). We chose this over cancelling
// when the last waiter leaves because an NBD read cannot be withdrawn
// from the wire anyway, so cancelling saves nothing on the server or the
// socket; an interrupted FUSE read is usually retried at once and then
// finds the data; and a merged fetch also carries blocks other readers
// and readahead want. Each fetch is still bounded in time: by the
// source's own deadlines (the NBD client fails a request after its
// timeout) and by Close.
//
// Errors are never cached: a failed fetch leaves the index, its waiters
// get the error (wrapped with the offset; errors.Is and errors.As see the
// source's error), and the next read tries again.
//
// # Readahead
//
// A small table (8 entries) remembers where recent sequential streams
// ended; a read starting there, give or take reordering, continues its
// stream, any other read starts a new one in the least recently used
// entry. A stream's second read opens a two-block window of prefetch
// ahead of it; each time the reader has consumed half of what was
// prefetched the window doubles, up to MaxReadahead (and a quarter of
// MaxBytes). Random reads never match a stream, so they prefetch nothing.
// Prefetches run in the background, at most two requests per stream and
// four in all, each at most MaxRequest (during the warm-up, as many bytes
// in requests of MaxMissRequest); beyond that they are skipped, not
// queued. Their memory is reserved like any other, may not evict blocks
// readahead fetched that nobody has read yet, and unread readahead data
// never exceeds half of MaxBytes.
//
// # Holes
//
// When the source is an Allocator, the first miss in a 64 MiB window asks
// for that window's allocation map (one query at a time per window,
// whatever the number of readers; in the background when the miss is a
// small random read that goes around the cache, which does not wait for
// it); blocks entirely inside ranges that read as zeros are then served
// as zeros without a transfer, and readahead skips them. The map is bounded (64 Ki extents) and starts over when
// full. A fetched block that turns out all zeros is kept as a zero block,
// with no buffer. SeekData and SeekHole walk the same map, and
// AllocatedBytes counts its holes, after LearnAllocation has walked it
// from start to end.
//
// BUG(cache): More than 8 interleaved sequential streams displace each
// other from the stream table and lose their readahead.
//
// BUG(cache): Memory is reserved before the data shows a block is all
// zeros, so a single read larger than MaxBytes of a source without
// allocation information goes partly straight to the caller even if it
// is all zeros.
//
// BUG(cache): A source without ContextReaderAt or VectorReader cannot be
// interrupted: Close waits for its reads in flight to return.
package cache
