package cache

import (
	"bytes"
	"errors"
	"sync"
	"testing"

	"snapmount/test/testenv"
)

func TestGhostsAdmitOnSecondSight(t *testing.T) {
	g := newGhosts(100)
	if len(g.slots) != 1024 {
		t.Fatalf("%d slots for 100 blocks, want the minimum 1024", len(g.slots))
	}
	if g.admit(7) {
		t.Fatal("block 7 admitted on its first miss")
	}
	if !g.admit(7) {
		t.Fatal("block 7 not admitted on its second miss")
	}
	if g.admit(7) {
		t.Fatal("block 7 admitted again without a new first miss: admit must forget it")
	}
	if g.admit(0) || !g.admit(0) {
		t.Fatal("block 0 (stored as 1, never as the empty 0) not remembered")
	}
}

// aroundCache is a cache of 16 KiB blocks that reads first small random
// misses around itself.
func aroundCache(t *testing.T) (*Cache, *memSource, []byte) {
	const bs = 16 << 10
	data := pattern(64 * bs)
	src := newMemSource(data)
	c := newTestCache(t, asVec(src), int64(len(data)), Options{BlockSize: bs, AdmitOnSecondMiss: true})
	return c, src, data
}

// A first small miss reads only its bytes and keeps nothing; a second
// miss on the block fetches and keeps it; the third read hits.
func TestAroundTheCacheThenAdmitted(t *testing.T) {
	const bs = 16 << 10
	c, src, data := aroundCache(t)
	readOK(t, c, data, 5*bs+4096, 4096)
	if calls := src.Calls(); len(calls) != 1 || calls[0].off != 5*bs+4096 || calls[0].n != 4096 {
		t.Fatalf("first miss: source calls %+v, want one of 4096 bytes at %d", calls, 5*bs+4096)
	}
	checkStats(t, c.Stats(), map[string]int64{"CachedBytes": 0, "Uncached": 1, "Misses": 1})

	// Random reads elsewhere, so that the next read of block 5 is no
	// longer near the end of a recent read (a stream's continuation).
	others := []int64{30, 12, 50, 21, 60, 40, 2, 45}
	for _, b := range others {
		readOK(t, c, data, b*bs, 4096)
	}
	n := int64(len(others))
	readOK(t, c, data, 5*bs+8192, 4096)
	if calls := src.Calls(); len(calls) != int(n)+2 || calls[n+1].off != 5*bs || calls[n+1].n != bs {
		t.Fatalf("second miss: source calls %+v, want the whole block 5 last", calls)
	}
	checkStats(t, c.Stats(), map[string]int64{"CachedBytes": bs, "Uncached": n + 1, "Misses": n + 2})

	readOK(t, c, data, 5*bs+12288, 4096)
	idle(c)
	checkStats(t, c.Stats(), map[string]int64{"Misses": n + 2, "Hits": 1})
}

// Whole blocks, reads spanning blocks and sequential streams are cached
// as always.
func TestAroundTheCacheOnlyForSmallRandomReads(t *testing.T) {
	const bs = 16 << 10
	c, src, data := aroundCache(t)
	readOK(t, c, data, 10*bs, bs)         // a whole block
	readOK(t, c, data, 20*bs+bs/2, bs)    // across two blocks
	readOK(t, c, data, 40*bs, 4096)       // starts a stream: read around
	readOK(t, c, data, 40*bs+4096, 4096)  // continues it: fetched whole
	readOK(t, c, data, 40*bs+8192, 4096)  // a hit
	readOK(t, c, data, 40*bs+12288, 4096) // a hit
	idle(c)
	checkStats(t, c.Stats(), map[string]int64{"Uncached": 1, "Hits": 2})
	if n := len(src.Calls()); n < 4 {
		t.Fatalf("%d source reads, want at least 4", n)
	}
	if st := c.Stats(); st.CachedBytes < 4*bs {
		t.Fatalf("cached %d bytes, want the 4 blocks the whole-block, spanning and stream reads fetched", st.CachedBytes)
	}
}

// A lent read (the FUSE path) of a block read around the cache gets the
// right bytes, read into the buffer the caller passed (the FUSE reply's),
// not into one the cache allocates.
func TestAroundTheCacheLent(t *testing.T) {
	const bs = 16 << 10
	c, _, data := aroundCache(t)
	buf := make([]byte, 3000)
	slices, release, err := c.ReadSlices(t.Context(), 7*bs+100, buf)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if got := joined(slices); !bytes.Equal(got, data[7*bs+100:7*bs+3100]) {
		t.Fatal("wrong data lent for a read around the cache")
	}
	if len(slices) != 1 || &slices[0][0] != &buf[0] {
		t.Fatal("a read around the cache was not lent from the caller's buffer")
	}
	checkStats(t, c.Stats(), map[string]int64{"Uncached": 1, "CachedBytes": 0})
}

// A small random miss does not wait for the allocation map: the query is
// held at the source here, and the reads around the cache still return
// with their bytes. Once released the map is known, and a read of a hole
// it reports is served as zeros without a transfer.
func TestAroundTheCacheDoesNotWaitForTheMap(t *testing.T) {
	const bs = 16 << 10
	data := pattern(64 * bs)
	clear(data[40*bs : 41*bs])
	src := newMemSource(data)
	src.zeros = []Extent{{Offset: 40 * bs, Length: bs, Zero: true}}
	src.allocEnter = make(chan struct{}, 16)
	src.allocGate = make(chan struct{})
	c := newTestCache(t, asAlloc(src), int64(len(data)), Options{BlockSize: bs, AdmitOnSecondMiss: true})
	var release sync.Once
	open := func() { release.Do(func() { close(src.allocGate) }) }
	t.Cleanup(open) // before Close, which waits for the held query

	read := func(off int64) { // fails the test unless the read returns, right
		t.Helper()
		done := make(chan error, 1)
		go func() {
			p := make([]byte, 4096)
			_, err := c.ReadAt(p, off)
			if err == nil && !bytes.Equal(p, data[off:off+4096]) {
				err = errors.New("wrong data")
			}
			done <- err
		}()
		if err := testenv.Receive(t, done, "a small random read while the allocation query is held"); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
	}
	read(5*bs + 4096)
	testenv.Receive(t, src.allocEnter, "the allocation query to reach the source")
	read(30*bs + 4096)
	open()
	idle(c)
	reads := len(src.Calls())
	read(40*bs + 4096) // in the hole the map now knows
	if n := len(src.Calls()); n != reads {
		t.Fatalf("a read of a known hole went to the source (%d reads, want %d)", n, reads)
	}
	checkStats(t, c.Stats(), map[string]int64{"AllocQueries": 1, "ZeroHits": 1, "Uncached": 2})
}
