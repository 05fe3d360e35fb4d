package cache

import (
	"reflect"
	"testing"
)

func TestGeometry(t *testing.T) {
	g := newGeometry(4096, 3*4096+100) // last block is 100 bytes
	if g.shift != 12 {
		t.Fatalf("shift = %d, want 12", g.shift)
	}
	for _, tc := range []struct {
		off      int64
		block    int64
		blockLen int
		alignUp  int64
	}{
		{0, 0, 4096, 0},
		{1, 0, 4096, 4096},
		{4095, 0, 4096, 4096},
		{4096, 1, 4096, 4096},
		{3 * 4096, 3, 100, 3 * 4096},
		{3*4096 + 1, 3, 100, 3*4096 + 100}, // clipped to the size
		{3*4096 + 99, 3, 100, 3*4096 + 100},
	} {
		if got := g.blockOf(tc.off); got != tc.block {
			t.Errorf("blockOf(%d) = %d, want %d", tc.off, got, tc.block)
		}
		if got := g.blockLen(tc.block); got != tc.blockLen {
			t.Errorf("blockLen(%d) = %d, want %d", tc.block, got, tc.blockLen)
		}
		if got := g.alignUp(tc.off); got != tc.alignUp {
			t.Errorf("alignUp(%d) = %d, want %d", tc.off, got, tc.alignUp)
		}
	}
}

func TestGeometryClip(t *testing.T) {
	g := newGeometry(4096, 10000)
	for _, tc := range []struct {
		off    int64
		n      int
		want   int
		wantEO bool
	}{
		{0, 10000, 10000, false},
		{0, 10001, 10000, true},
		{9999, 1, 1, false},
		{9999, 2, 1, true},
		{5000, 100, 100, false},
	} {
		got, eof := g.clip(tc.off, tc.n)
		if got != tc.want || eof != tc.wantEO {
			t.Errorf("clip(%d, %d) = %d, %v; want %d, %v", tc.off, tc.n, got, eof, tc.want, tc.wantEO)
		}
	}
}

func TestGeometryPart(t *testing.T) {
	g := newGeometry(4096, 3*4096+100)
	for _, tc := range []struct {
		name          string
		idx, off, end int64
		pOff, bOff, n int
	}{
		{"whole block", 1, 4096, 8192, 0, 0, 4096},
		{"read inside block", 1, 5000, 6000, 0, 904, 1000},
		{"read starts before block", 1, 4000, 8192, 96, 0, 4096},
		{"read ends inside block", 1, 0, 5000, 4096, 0, 904},
		{"read spans block", 1, 100, 20000, 3996, 0, 4096},
		{"short last block", 3, 12000, 13000, 288, 0, 100},
		{"no overlap", 2, 0, 4096, 0, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pOff, bOff, n := g.part(tc.idx, tc.off, tc.end)
			if pOff != tc.pOff || bOff != tc.bOff || n != tc.n {
				t.Errorf("part(%d, %d, %d) = %d, %d, %d; want %d, %d, %d",
					tc.idx, tc.off, tc.end, pOff, bOff, n, tc.pOff, tc.bOff, tc.n)
			}
		})
	}
}

// Every byte of every read is covered by exactly one block part, in
// order, for every alignment.
func TestGeometryPartsTile(t *testing.T) {
	const size = 5*4096 + 7
	g := newGeometry(4096, size)
	for off := int64(0); off < size; off += 509 {
		for _, n := range []int64{1, 100, 4095, 4096, 4097, 3 * 4096, size} {
			end := min(off+n, size)
			next := 0
			for idx := g.blockOf(off); g.blockStart(idx) < end; idx++ {
				pOff, bOff, m := g.part(idx, off, end)
				if pOff != next || m <= 0 || g.blockStart(idx)+int64(bOff) != off+int64(pOff) {
					t.Fatalf("off %d n %d block %d: part = %d, %d, %d; want p offset %d", off, n, idx, pOff, bOff, m, next)
				}
				next += m
			}
			if int64(next) != end-off {
				t.Fatalf("off %d n %d: parts cover %d bytes, want %d", off, n, next, end-off)
			}
		}
	}
}

func TestNormalBlockSize(t *testing.T) {
	for in, want := range map[int]int{
		0: DefaultBlockSize, -1: DefaultBlockSize, 1: 4096, 4096: 4096,
		4097: 8192, 65536: 65536, 100000: 131072, 1 << 20: 1 << 20,
	} {
		if got := normalBlockSize(in); got != want {
			t.Errorf("normalBlockSize(%d) = %d, want %d", in, got, want)
		}
	}
}

func TestSliceVec(t *testing.T) {
	a, b, c := make([]byte, 4), make([]byte, 4), make([]byte, 4)
	bufs := [][]byte{a, b, c}
	for _, tc := range []struct {
		pos, n int64
		want   []int // lengths
	}{
		{0, 12, []int{4, 4, 4}},
		{0, 4, []int{4}},
		{2, 4, []int{2, 2}},
		{4, 8, []int{4, 4}},
		{5, 6, []int{3, 3}},
		{11, 1, []int{1}},
	} {
		got := sliceVec(bufs, tc.pos, tc.n)
		var lens []int
		for _, g := range got {
			lens = append(lens, len(g))
		}
		if !reflect.DeepEqual(lens, tc.want) {
			t.Errorf("sliceVec(%d, %d) lengths = %v, want %v", tc.pos, tc.n, lens, tc.want)
		}
	}
	// The pieces share memory with the originals.
	got := sliceVec(bufs, 5, 1)
	got[0][0] = 9
	if b[1] != 9 {
		t.Error("sliceVec copied instead of slicing")
	}
}

func TestIsZero(t *testing.T) {
	for _, n := range []int{1, 4095, 4096, 4097, 128 * kib} {
		b := make([]byte, n)
		if !isZero(b) {
			t.Errorf("isZero(%d zeros) = false", n)
		}
		for _, i := range []int{0, n / 2, n - 1} {
			b[i] = 1
			if isZero(b) {
				t.Errorf("isZero(%d bytes, byte %d set) = true", n, i)
			}
			b[i] = 0
		}
	}
}

func TestUsableExtents(t *testing.T) {
	d := func(off, n int64) Extent { return Extent{Offset: off, Length: n} }
	z := func(off, n int64) Extent { return Extent{Offset: off, Length: n, Zero: true} }
	for _, tc := range []struct {
		name string
		in   []Extent
		q    int64
		want []Extent
	}{
		{"as is", []Extent{d(0, 10), z(10, 10)}, 0, []Extent{d(0, 10), z(10, 10)}},
		{"starts before q", []Extent{d(0, 10), z(10, 10)}, 5, []Extent{d(5, 5), z(10, 10)}},
		{"clipped to size", []Extent{d(0, 10), z(10, 1000)}, 0, []Extent{d(0, 10), z(10, 90)}},
		{"alike merged", []Extent{z(0, 10), z(10, 10)}, 0, []Extent{z(0, 20)}},
		{"gap stops", []Extent{d(0, 10), z(15, 10)}, 0, []Extent{d(0, 10)}},
		{"starts after q", []Extent{d(5, 10)}, 0, []Extent{}},
		{"overlap stops", []Extent{d(0, 10), z(5, 10)}, 0, []Extent{d(0, 10)}},
		{"empty skipped", []Extent{d(0, 0), d(0, 10)}, 0, []Extent{d(0, 10)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := usableExtents(tc.in, tc.q, 100)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestMergeExtents(t *testing.T) {
	d := func(off, n int64) Extent { return Extent{Offset: off, Length: n} }
	z := func(off, n int64) Extent { return Extent{Offset: off, Length: n, Zero: true} }
	for _, tc := range []struct {
		name     string
		old, ext []Extent
		want     []Extent
	}{
		{"into empty", nil, []Extent{d(10, 10)}, []Extent{d(10, 10)}},
		{"after, gap", []Extent{d(0, 10)}, []Extent{z(20, 10)}, []Extent{d(0, 10), z(20, 10)}},
		{"before, gap", []Extent{d(20, 10)}, []Extent{z(0, 10)}, []Extent{z(0, 10), d(20, 10)}},
		{"adjacent alike merge", []Extent{z(0, 10)}, []Extent{z(10, 10)}, []Extent{z(0, 20)}},
		{"adjacent different", []Extent{z(0, 10)}, []Extent{d(10, 10)}, []Extent{z(0, 10), d(10, 10)}},
		{"overlay splits", []Extent{d(0, 30)}, []Extent{z(10, 10)}, []Extent{d(0, 10), z(10, 10), d(20, 10)}},
		{"overlay replaces several", []Extent{d(0, 10), z(10, 10), d(20, 10), z(40, 10)}, []Extent{z(5, 20)},
			[]Extent{d(0, 5), z(5, 20), d(25, 5), z(40, 10)}},
		{"fills gap and merges", []Extent{z(0, 10), z(20, 10)}, []Extent{z(10, 10)}, []Extent{z(0, 30)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := mergeExtents(tc.old, tc.ext)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestFirstUnknown(t *testing.T) {
	ext := []Extent{{Offset: 10, Length: 10}, {Offset: 20, Length: 10, Zero: true}, {Offset: 40, Length: 10}}
	for _, tc := range []struct{ start, end, want int64 }{
		{0, 5, 0},
		{10, 30, 30},
		{10, 35, 30},
		{15, 25, 25},
		{30, 50, 30},
		{40, 50, 50},
		{45, 60, 50},
	} {
		if got := firstUnknown(ext, tc.start, tc.end); got != tc.want {
			t.Errorf("firstUnknown(%d, %d) = %d, want %d", tc.start, tc.end, got, tc.want)
		}
	}
}
