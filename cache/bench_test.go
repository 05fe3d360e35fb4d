package cache

import (
	"context"
	"io"
	"math/rand/v2"
	"testing"
)

// benchSource is a large virtual source whose reads are a memcpy from a
// 1 MiB pattern: the cost of a very fast NBD server, nothing more.
type benchSource struct {
	size int64
	pat  []byte
}

func newBenchSource(size int64) *benchSource {
	return &benchSource{size: size, pat: pattern(1 << 20)}
}

func (s *benchSource) fill(p []byte, off int64) {
	for len(p) > 0 {
		i := off % int64(len(s.pat))
		n := copy(p, s.pat[i:])
		p, off = p[n:], off+int64(n)
	}
}

func (s *benchSource) ReadAt(p []byte, off int64) (int, error) {
	if off >= s.size {
		return 0, io.EOF
	}
	n := min(int64(len(p)), s.size-off)
	s.fill(p[:n], off)
	if int(n) < len(p) {
		return int(n), io.EOF
	}
	return int(n), nil
}

func (s *benchSource) ReadAtContext(_ context.Context, p []byte, off int64) (int, error) {
	return s.ReadAt(p, off)
}

func (s *benchSource) ReadVecContext(_ context.Context, bufs [][]byte, off int64) error {
	for _, b := range bufs {
		s.fill(b, off)
		off += int64(len(b))
	}
	return nil
}

const benchWarm = 64 << 20 // resident working set for the hit benchmarks

func warmCache(b *testing.B, opt Options) *Cache {
	b.Helper()
	c := New(newBenchSource(1<<40), 1<<40, opt)
	b.Cleanup(func() { c.Close() })
	p := make([]byte, 1<<20)
	for off := int64(0); off < benchWarm; off += int64(len(p)) {
		if _, err := c.ReadAt(p, off); err != nil {
			b.Fatal(err)
		}
	}
	idle(c)
	return c
}

// BenchmarkCopy1MiB is the yardstick: one memcpy of 1 MiB out of a
// 64 MiB working set, what a hit cannot beat.
func BenchmarkCopy1MiB(b *testing.B) {
	src := make([]byte, benchWarm)
	p := make([]byte, 1<<20)
	b.SetBytes(int64(len(p)))
	off := 0
	for b.Loop() {
		copy(p, src[off:])
		off = (off + len(p)) % benchWarm
	}
}

// BenchmarkHitSequential: 1 MiB reads of resident data, in order.
func BenchmarkHitSequential(b *testing.B) {
	c := warmCache(b, Options{})
	p := make([]byte, 1<<20)
	b.SetBytes(int64(len(p)))
	b.ReportAllocs()
	var off int64
	for b.Loop() {
		if _, err := c.ReadAt(p, off); err != nil {
			b.Fatal(err)
		}
		off = (off + int64(len(p))) % benchWarm
	}
}

// BenchmarkHitParallel: 1 MiB reads of resident data at random offsets
// from GOMAXPROCS goroutines.
func BenchmarkHitParallel(b *testing.B) {
	c := warmCache(b, Options{})
	b.SetBytes(1 << 20)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		p := make([]byte, 1<<20)
		r := rand.New(rand.NewPCG(rand.Uint64(), 1))
		for pb.Next() {
			off := r.Int64N(benchWarm/(1<<20)) << 20
			if _, err := c.ReadAt(p, off); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkMissSequential: 1 MiB reads in order over a source far larger
// than the cache, so every block is fetched (through VectorReader, as
// from the NBD client) and old ones evicted.
func BenchmarkMissSequential(b *testing.B) {
	for _, bc := range []struct {
		name string
		src  func(*benchSource) io.ReaderAt
		ra   int64
	}{
		{"vec", func(s *benchSource) io.ReaderAt { return s }, -1},
		{"plain", func(s *benchSource) io.ReaderAt { return plainBench{s} }, -1},
		{"vec/readahead", func(s *benchSource) io.ReaderAt { return s }, 0},
	} {
		b.Run(bc.name, func(b *testing.B) {
			c := New(bc.src(newBenchSource(1<<40)), 1<<40, Options{MaxBytes: 64 << 20, MaxReadahead: bc.ra})
			defer c.Close()
			p := make([]byte, 1<<20)
			b.SetBytes(int64(len(p)))
			b.ReportAllocs()
			var off int64
			for b.Loop() {
				if _, err := c.ReadAt(p, off); err != nil {
					b.Fatal(err)
				}
				off += int64(len(p))
			}
		})
	}
}

// plainBench hides benchSource's optional interfaces.
type plainBench struct{ s *benchSource }

func (p plainBench) ReadAt(b []byte, off int64) (int, error) { return p.s.ReadAt(b, off) }

// BenchmarkRandom4K: 4 KiB reads at random offsets. Hit: resident data,
// one goroutine and GOMAXPROCS goroutines. Miss: a 4 KiB cache block size
// over a source far larger than the cache.
func BenchmarkRandom4K(b *testing.B) {
	offsets := make([]int64, 1<<16)
	r := rand.New(rand.NewPCG(3, 4))
	for i := range offsets {
		offsets[i] = r.Int64N(benchWarm/4096) * 4096
	}
	b.Run("hit", func(b *testing.B) {
		c := warmCache(b, Options{})
		p := make([]byte, 4096)
		b.SetBytes(4096)
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, err := c.ReadAt(p, offsets[i%len(offsets)]); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	b.Run("hit-parallel", func(b *testing.B) {
		c := warmCache(b, Options{})
		b.SetBytes(4096)
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			p := make([]byte, 4096)
			i := rand.IntN(len(offsets))
			for pb.Next() {
				if _, err := c.ReadAt(p, offsets[i%len(offsets)]); err != nil {
					b.Fatal(err)
				}
				i++
			}
		})
	})
	b.Run("miss", func(b *testing.B) {
		c := New(newBenchSource(1<<40), 1<<40, Options{BlockSize: 4096, MaxBytes: 16 << 20})
		defer c.Close()
		p := make([]byte, 4096)
		r := rand.New(rand.NewPCG(5, 6))
		b.SetBytes(4096)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := c.ReadAt(p, r.Int64N(1<<28)*4096); err != nil {
				b.Fatal(err)
			}
		}
	})
}
