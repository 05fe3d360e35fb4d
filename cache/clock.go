package cache

// Eviction is CLOCK (second chance) over one ring of all resident blocks,
// rather than an LRU list: a hit only sets the block's referenced bit (an
// atomic store, and only when the bit is clear), so the hit path never
// takes a global lock or touches shared list links. The ring, the hand and
// the accounting are guarded by evictMu, which only misses take. New
// blocks go in just behind the hand, so they are looked at last, as the
// most recently used entry of an LRU list would be.

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

// evictOneLocked moves the hand until it finds a block that was not
// referenced since the last pass and nobody is reading, and evicts it. It
// gives up after two turns of the ring (everything pinned or protected).
func (c *Cache) evictOneLocked(forReadahead bool) bool {
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
		sh := c.shardOf(b.idx)
		sh.mu.Lock()
		if b.refs.Load() != 1 {
			sh.mu.Unlock() // a reader is copying out of it
			continue
		}
		delete(sh.blocks, b.idx)
		sh.mu.Unlock()
		c.ringRemoveLocked(b)
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
	return false
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
