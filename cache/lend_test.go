package cache

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"testing"
)

func joined(slices [][]byte) []byte {
	var all []byte
	for _, s := range slices {
		all = append(all, s...)
	}
	return all
}

// ReadSlices lends exactly the bytes ReadAt copies, cold and warm, for
// every source kind, holes included.
func TestReadSlicesMatchesReadAt(t *testing.T) {
	const bs = 4096
	const size = 9*bs + 321
	data := pattern(size)
	copy(data[3*bs:5*bs], make([]byte, 2*bs)) // a hole the allocator reports
	kinds := []struct {
		name string
		src  func(m *memSource) io.ReaderAt
	}{
		{"plain", asPlain},
		{"vec", asVec},
		{"alloc", asAlloc},
	}
	r := rand.New(rand.NewPCG(3, 4))
	for _, k := range kinds {
		t.Run(k.name, func(t *testing.T) {
			m := newMemSource(data)
			m.zeros = []Extent{{Offset: 3 * bs, Length: 2 * bs, Zero: true}}
			c := newTestCache(t, k.src(m), size, Options{BlockSize: bs})
			for i := 0; i < 300; i++ {
				off := r.Int64N(size)
				n := r.IntN(4 * bs)
				slices, release, err := c.ReadSlices(context.Background(), off, make([]byte, n))
				if err != nil {
					t.Fatalf("ReadSlices(%d, %d): %v", off, n, err)
				}
				want := data[off:min(int64(size), off+int64(n))]
				if got := joined(slices); !bytes.Equal(got, want) {
					t.Fatalf("ReadSlices(%d, %d) lent %d bytes differing from the source", off, n, len(got))
				}
				release()
			}
		})
	}
}

// Lent blocks are pinned: eviction and buffer reuse cannot touch them
// until release, after which memory is bounded again.
func TestReadSlicesPinsUntilRelease(t *testing.T) {
	const bs = 4096
	data := pattern(64 * bs)
	c := newTestCache(t, asVec(newMemSource(data)), int64(len(data)), Options{BlockSize: bs, MaxBytes: 8 * bs, MaxReadahead: -1})
	slices, release, err := c.ReadSlices(context.Background(), 0, make([]byte, 4*bs))
	if err != nil {
		t.Fatal(err)
	}
	// Stream far more than the budget through the cache meanwhile.
	for off := int64(8 * bs); off < int64(len(data)); off += bs {
		readOK(t, c, data, off, bs)
	}
	if got := joined(slices); !bytes.Equal(got, data[:4*bs]) {
		t.Fatal("lent blocks changed while lent: evicted or reused")
	}
	release()
	for off := int64(0); off < int64(len(data)); off += bs {
		readOK(t, c, data, off, bs)
	}
	if st := c.Stats(); st.CachedBytes > 8*bs {
		t.Fatalf("after release the cache holds %d bytes, budget %d", st.CachedBytes, 8*bs)
	}
	if live := c.bufs.live(); live > 8 {
		t.Fatalf("%d buffers exist for a budget of 8 blocks", live)
	}
}

// A disabled cache declines to lend; the caller reads into its buffer.
func TestReadSlicesDisabled(t *testing.T) {
	c := newTestCache(t, asVec(newMemSource(pattern(8192))), 8192, Options{Disabled: true})
	s, rel, err := c.ReadSlices(context.Background(), 0, make([]byte, 100))
	if s != nil || rel != nil || err != nil {
		t.Fatalf("disabled ReadSlices = %v, %v, %v; want all nil", s, rel != nil, err)
	}
}
