package cache

// Eviction is CLOCK (second chance) over one ring of all resident blocks,
// rather than an LRU list: a hit only sets the block's referenced bit (an
// atomic store, and only when the bit is clear), so the hit path never
// takes a global lock or touches shared list links. The ring, the hand and
// the accounting are guarded by evictMu, which only misses take. New
// blocks go in just behind the hand, so they are looked at last, as the
// most recently used entry of an LRU list would be.
//
// In front of CLOCK sits scan resistance. Blocks a sequential stream
// fetched (by readahead or by the stream's own misses) go on scanList
// when first read, and eviction takes the most recent of them first. A
// long sequential read then recycles a few buffers that are still warm in
// the CPU caches instead of cycling through the whole budget, which is
// faster, and it no longer flushes what other reads cached: the start of
// a scan larger than the cache stays, so a second pass hits there. A scan
// block read again leaves the list, to CLOCK's care.
//
// That alone starts only once the budget is full. A scan of an export
// larger than the whole budget cannot stay cached whole, and keeping its
// start is all a second pass could gain; so once its blocks hold
// 1/scanShare of the budget it recycles them, instead of growing into
// fresh memory, which is what a first pass costs most where the
// hypervisor backs guest memory lazily. Random reads still fill the
// budget, and a scan of an export that fits in the budget is cached whole:
// fetched once, whoever reads it again (an O_DIRECT reader finds nothing
// in the kernel's page cache).

// reserve makes room for up to n more blocks of BlockSize bytes, evicting
// as needed, and returns how many it reserved. forReadahead reservations
// may not evict blocks readahead fetched and nobody has read yet (they
// are about to be read), and stop at readaheadCap.
func (c *Cache) reserve(n int, forReadahead bool) int {
	bs := c.geo.blockSize
	c.evictMu.Lock()
	defer c.evictMu.Unlock()
	got := 0
	for got < n {
		if forReadahead && c.readaheadBytes.Load()+int64(got+1)*bs > c.readaheadCap {
			break
		}
		if c.scanResident > c.scanMaxBlocks {
			c.evictScanLocked() // its memory is reused below, if it could go
		}
		if c.used+bs <= c.maxBytes && c.entries < c.maxEntries {
			c.used += bs
			c.entries++
			got++
			continue
		}
		if !c.evictOneLocked(forReadahead) {
			break
		}
	}
	return got
}

// unreserve gives back n reservations that were not used.
func (c *Cache) unreserve(n int) {
	if n == 0 {
		return
	}
	c.evictMu.Lock()
	c.used -= int64(n) * c.geo.blockSize
	c.entries -= int64(n)
	c.evictMu.Unlock()
}

// scanShare: scans of exports larger than the budget keep at most
// 1/scanShare of it (see above): 8 MiB
// of the mount's 256 MiB. A larger share keeps little a second pass of a
// large export would notice, and every first pass pays for it in fresh
// memory: with an eighth, zeroing new huge pages made a fresh mount's
// first reads markedly slower.
const scanShare = 32

// scanLookbackBytes bounds how much of the most recent scan data
// eviction looks through for a block to recycle: the newest blocks are
// pinned while their reads are answered, and the kernel keeps several
// 1 MiB FUSE reads in flight (16 blocks looked at, as before, found only
// pinned blocks of 64 KiB, so a scan never recycled through the mount).
// The pinned blocks come first, so the usual cost is their number.
const scanLookbackBytes = 16 << 20

// scannedOnce puts blocks of a stream that a read got for the first time
// on the scan list, under one lock for the whole read.
func (c *Cache) scannedOnce(blocks []*block) {
	if len(blocks) == 0 {
		return
	}
	c.evictMu.Lock()
	for _, b := range blocks {
		if !b.inScanList && b.prev != nil { // still resident
			b.inScanList = true
			c.scanResident++
			c.scanList = append(c.scanList, b)
		}
	}
	c.evictMu.Unlock()
}

// evictOneLocked evicts one block that nobody is reading: the most
// recent scan block that can go, else the first block the CLOCK hand
// finds not referenced since its last pass. It gives up after two turns
// of the ring (everything pinned or protected).
func (c *Cache) evictOneLocked(forReadahead bool) bool {
	if c.evictScanLocked() {
		return true
	}
	for steps := 2 * c.ringLen; c.hand != nil && steps > 0; steps-- {
		b := c.hand
		c.hand = b.next
		if b.referenced.Load() {
			b.referenced.Store(false)
			continue
		}
		if forReadahead && b.readahead.Load() {
			continue
		}
		if c.evictLocked(b) {
			return true
		}
	}
	return false
}

// evictScanLocked evicts the most recent block of the scan list that can
// go, dropping entries of blocks since evicted or read again.
func (c *Cache) evictScanLocked() bool {
	list := c.scanList
	for i, looked := len(list)-1, 0; i >= 0 && looked < c.scanLookback; i-- {
		b := list[i]
		if !b.inScanList || b.prev == nil || b.referenced.Load() {
			c.leaveScanListLocked(b)
			list = append(list[:i], list[i+1:]...)
			continue
		}
		looked++
		if c.evictLocked(b) {
			list = append(list[:i], list[i+1:]...)
			c.scanList = list
			return true
		}
	}
	c.scanList = list
	// Entries of evicted blocks can pile up below the lookback window.
	if len(c.scanList) > 2*int(c.entries)+c.scanLookback {
		kept := c.scanList[:0]
		for _, b := range c.scanList {
			if b.inScanList && b.prev != nil {
				kept = append(kept, b)
			} else {
				c.leaveScanListLocked(b)
			}
		}
		clear(c.scanList[len(kept):])
		c.scanList = kept
	}
	return false
}

// leaveScanListLocked marks b as off the scan list (its entry, if any, is
// dropped lazily).
func (c *Cache) leaveScanListLocked(b *block) {
	if b.inScanList {
		b.inScanList = false
		c.scanResident--
	}
}

// evictLocked evicts b unless a reader has it pinned.
func (c *Cache) evictLocked(b *block) bool {
	sh := c.shardOf(b.idx)
	sh.mu.Lock()
	if b.refs.Load() != 1 {
		sh.mu.Unlock() // a reader is copying out of it
		return false
	}
	delete(sh.blocks, b.idx)
	sh.mu.Unlock()
	c.ringRemoveLocked(b)
	c.leaveScanListLocked(b)
	c.used -= b.cost()
	c.entries--
	c.evictions++
	if b.readahead.CompareAndSwap(true, false) {
		c.stats.readaheadWasted.Add(1)
		c.readaheadBytes.Add(-b.cost())
	}
	c.unpin(b) // the index's reference: frees the buffer
	return true
}

// ringInsertLocked puts b just behind the hand.
func (c *Cache) ringInsertLocked(b *block) {
	c.ringLen++
	if c.hand == nil {
		b.prev, b.next = b, b
		c.hand = b
		return
	}
	b.next = c.hand
	b.prev = c.hand.prev
	b.prev.next = b
	c.hand.prev = b
}

// ringRemoveLocked takes b out of the ring.
func (c *Cache) ringRemoveLocked(b *block) {
	c.ringLen--
	if b.next == b {
		c.hand = nil
	} else {
		b.prev.next = b.next
		b.next.prev = b.prev
		if c.hand == b {
			c.hand = b.next
		}
	}
	b.prev, b.next = nil, nil
}
