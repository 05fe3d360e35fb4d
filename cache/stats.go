package cache

import "sync/atomic"

// Stats is a snapshot of a cache's counters. All counters are cumulative.
//
// Every block a caller's read touches is counted exactly once, as one of
// Hits, ZeroHits, InflightJoins or Misses. Readahead's own lookups are not
// counted there; its work shows in ReadaheadBlocks, SourceReads and
// BytesFetched.
type Stats struct {
	Hits            int64 `json:"hits"`             // blocks served from memory
	Misses          int64 `json:"misses"`           // blocks a read fetched (or read through: Disabled, or no memory)
	ZeroHits        int64 `json:"zero_hits"`        // blocks served as zeros with no transfer (known holes, all-zero blocks)
	InflightJoins   int64 `json:"inflight_joins"`   // blocks that waited on a fetch already in flight
	SourceReads     int64 `json:"source_reads"`     // read requests issued to the source
	BytesFetched    int64 `json:"bytes_fetched"`    // bytes the source delivered
	ReadaheadBlocks int64 `json:"readahead_blocks"` // blocks fetched by readahead
	ReadaheadUsed   int64 `json:"readahead_used"`   // readahead blocks later read by a caller
	ReadaheadWasted int64 `json:"readahead_wasted"` // readahead blocks evicted unread
	Evictions       int64 `json:"evictions"`        // blocks dropped to make room
	Uncached        int64 `json:"uncached"`         // misses read around the cache, not kept (Options.AdmitOnSecondMiss); also in Misses
	CachedBytes     int64 `json:"cached_bytes"`     // block data held now, in flight included
	MaxBytes        int64 `json:"max_bytes"`        // the budget for CachedBytes
	BlockSize       int   `json:"block_size"`
	Errors          int64 `json:"errors"`        // failed source reads
	AllocQueries    int64 `json:"alloc_queries"` // allocation map requests to the source
}

// globalStats are the counters not kept per shard. They change on misses,
// not on the hit path, so one shared cache line is fine.
type globalStats struct {
	zeroHits        atomic.Int64 // from the allocation map; shards count the rest
	misses          atomic.Int64 // pass-through reads when Disabled, uncached misses; shards count the rest
	uncached        atomic.Int64
	sourceReads     atomic.Int64
	bytesFetched    atomic.Int64
	readaheadBlocks atomic.Int64
	readaheadUsed   atomic.Int64
	readaheadWasted atomic.Int64
	errors          atomic.Int64
}

// Stats returns the counters. It is cheap enough to call often and safe
// to call concurrently with reads and after Close.
func (c *Cache) Stats() Stats {
	s := Stats{
		MaxBytes:        c.maxBytes,
		BlockSize:       int(c.geo.blockSize),
		ZeroHits:        c.stats.zeroHits.Load(),
		Misses:          c.stats.misses.Load(),
		SourceReads:     c.stats.sourceReads.Load(),
		BytesFetched:    c.stats.bytesFetched.Load(),
		ReadaheadBlocks: c.stats.readaheadBlocks.Load(),
		ReadaheadUsed:   c.stats.readaheadUsed.Load(),
		ReadaheadWasted: c.stats.readaheadWasted.Load(),
		Errors:          c.stats.errors.Load(),
		Uncached:        c.stats.uncached.Load(),
	}
	for i := range c.shards {
		sh := &c.shards[i]
		sh.mu.Lock()
		s.Hits += sh.hits
		s.ZeroHits += sh.zeroHits
		s.Misses += sh.misses
		s.InflightJoins += sh.joins
		sh.mu.Unlock()
	}
	c.evictMu.Lock()
	s.CachedBytes = c.used
	s.Evictions = c.evictions
	c.evictMu.Unlock()
	if c.alloc != nil {
		s.AllocQueries = c.alloc.queries.Load()
	}
	return s
}
