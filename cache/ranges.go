package cache

import "math/bits"

// geometry is the pure block arithmetic of one cache: which blocks cover a
// byte range, how long each block is, and which part of a block a caller's
// buffer wants. Nothing here locks or allocates.
type geometry struct {
	blockSize int64 // a power of two
	shift     uint  // log2(blockSize)
	size      int64 // bytes in the source
}

func newGeometry(blockSize int, size int64) geometry {
	return geometry{
		blockSize: int64(blockSize),
		shift:     uint(bits.TrailingZeros64(uint64(blockSize))),
		size:      size,
	}
}

// blockOf returns the index of the block holding byte off.
func (g geometry) blockOf(off int64) int64 { return off >> g.shift }

// blockStart returns the offset of block idx's first byte.
func (g geometry) blockStart(idx int64) int64 { return idx << g.shift }

// blockLen returns the length of block idx: blockSize, except for the last
// block of a source whose size is not a multiple of it.
func (g geometry) blockLen(idx int64) int {
	return int(min(g.blockSize, g.size-g.blockStart(idx)))
}

// alignUp rounds off up to a block boundary, never past the end of the
// source.
func (g geometry) alignUp(off int64) int64 {
	return min((off+g.blockSize-1)&^(g.blockSize-1), g.size)
}

// clip limits a read of n bytes at off to the source. It returns how many
// bytes can be read and whether the read reaches past the end (io.EOF).
// off must be in [0, size).
func (g geometry) clip(off int64, n int) (int, bool) {
	if rest := g.size - off; int64(n) > rest {
		return int(rest), true
	}
	return n, false
}

// part returns where block idx and the byte range [off, end) overlap: the
// overlap starts at p[pOff] and at block[bOff] and is n bytes long. n is 0
// when they do not overlap.
func (g geometry) part(idx, off, end int64) (pOff, bOff, n int) {
	start := g.blockStart(idx)
	lo := max(start, off)
	hi := min(start+int64(g.blockLen(idx)), end)
	if hi <= lo {
		return 0, 0, 0
	}
	return int(lo - off), int(lo - start), int(hi - lo)
}

// normalBlockSize turns a requested block size into a usable one: the
// default for 0, else the next power of two that is at least
// minBlockSize.
func normalBlockSize(n int) int {
	if n <= 0 {
		return DefaultBlockSize
	}
	if n < minBlockSize {
		return minBlockSize
	}
	if n&(n-1) != 0 {
		return 1 << bits.Len(uint(n))
	}
	return n
}

// alignDown and alignUp round off to a multiple of unit, a power of two.
func alignDown(off, unit int64) int64 { return off &^ (unit - 1) }
func alignUp(off, unit int64) int64   { return (off + unit - 1) &^ (unit - 1) }

// sliceVec returns the part [pos, pos+n) of a vector of buffers, sharing
// their memory.
func sliceVec(bufs [][]byte, pos, n int64) [][]byte {
	var out [][]byte
	for _, b := range bufs {
		if n == 0 {
			break
		}
		if pos >= int64(len(b)) {
			pos -= int64(len(b))
			continue
		}
		take := min(int64(len(b))-pos, n)
		out = append(out, b[pos:pos+take])
		n -= take
		pos = 0
	}
	return out
}
