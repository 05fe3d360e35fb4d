package server

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"snapmount/nbd"
	"snapmount/test/testenv"
)

// newTestExport makes a server (not listening) over one image and returns
// it with the export.
func newTestExport(t testing.TB, cfg Config, size int64) (*Server, *export, string) {
	t.Helper()
	img := testImage(t, size, 42)
	cfg.Exports = []ExportConfig{{Name: "disk", Path: img}}
	if cfg.SnapshotDir == "" {
		cfg.SnapshotDir = t.TempDir()
	}
	cfg.Logger = testLogger(t)
	srv, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv, srv.exports[0], img
}

// copyModes runs a test with copy-before-write inside the kernel
// (copy_file_range) and through memory.
func copyModes(t *testing.T, test func(t *testing.T, buffered bool)) {
	for _, buffered := range []bool{false, true} {
		name := "copy_file_range"
		if buffered {
			name = "buffered"
		}
		t.Run(name, func(t *testing.T) { test(t, buffered) })
	}
}

func mustView(t testing.TB, srv *Server, name string, promised bool) *exportView {
	t.Helper()
	v, _, err := srv.openView(name, promised, true)
	if err != nil {
		t.Fatalf("opening %q: %v", name, err)
	}
	return v
}

func readView(t testing.TB, v *exportView, off, n int64, holes bool) []byte {
	t.Helper()
	p := make([]byte, n)
	ext, err := v.read(p, off, holes)
	if err != nil {
		t.Fatalf("reading %s %d@%d: %v", v.name, n, off, err)
	}
	for _, x := range ext {
		if x.hole {
			clear(p[x.off-off : x.off-off+x.length])
		}
	}
	return p
}

func TestSnapshotFrozenAtItsInstant(t *testing.T) {
	copyModes(t, func(t *testing.T, buffered bool) {
		const size = 1<<20 + 1000 // not a multiple of the block size
		srv, e, img := newTestExport(t, Config{SnapshotBlock: 4096, SnapshotLinger: time.Hour}, size)
		e.noCopyRange.Store(buffered)
		orig, _ := os.ReadFile(img)
		w := mustView(t, srv, "disk", false)
		s1 := mustView(t, srv, "disk@snapshot", false)
		if s1.name != "disk@s1" || s1.writable {
			t.Fatalf("first snapshot: %+v", s1)
		}
		// Change: a write crossing blocks, one at the unaligned tail, a trim
		// and a zeroing.
		p := bytes.Repeat([]byte{0xab}, 10000)
		if err := w.write(p, 3000, false); err != nil {
			t.Fatal(err)
		}
		if err := w.write([]byte{1, 2, 3}, size-3, true); err != nil {
			t.Fatal(err)
		}
		if err := w.trim(64<<10, 64<<10, false); err != nil {
			t.Fatal(err)
		}
		if err := w.writeZeroes(256<<10, 8192, true, false, false); err != nil {
			t.Fatal(err)
		}
		mid, _ := os.ReadFile(img)
		s2 := mustView(t, srv, "disk@snapshot", true)
		if s2.name != "disk@s2" {
			t.Fatalf("second snapshot named %q", s2.name)
		}
		if err := w.write(bytes.Repeat([]byte{0xcd}, size), 0, false); err != nil {
			t.Fatal(err)
		}
		for _, holes := range []bool{false, true} {
			if got := readView(t, s1, 0, size, holes); !bytes.Equal(got, orig) {
				t.Errorf("snapshot 1 (holes %v) is not the image at its instant", holes)
			}
			if got := readView(t, s2, 0, size, holes); !bytes.Equal(got, mid) {
				t.Errorf("snapshot 2 (holes %v) is not the image at its instant", holes)
			}
			// Unaligned pieces.
			if got := readView(t, s1, 4095, 5000, holes); !bytes.Equal(got, orig[4095:9095]) {
				t.Errorf("unaligned read of snapshot 1 (holes %v) differs", holes)
			}
		}
		// A join sees the same instant; a third snapshot sees the present.
		j := mustView(t, srv, "disk@s1", false)
		if got := readView(t, j, 0, size, true); !bytes.Equal(got, orig) {
			t.Error("joined snapshot differs")
		}
		now, _ := os.ReadFile(img)
		s3 := mustView(t, srv, "disk@snapshot", false)
		if got := readView(t, s3, 0, size, true); !bytes.Equal(got, now) {
			t.Error("newest snapshot is not the current image")
		}
		// Snapshot block status: everything the writer touched is data.
		ext, err := s1.blockStatus(0, size, 1000)
		if err != nil {
			t.Fatal(err)
		}
		var total int64
		for _, x := range ext {
			total += x.length
			if x.hole {
				t.Errorf("snapshot 1 reports a hole at %d+%d; the image was all data at its instant", x.off, x.length)
			}
		}
		if total != size {
			t.Errorf("block status covers %d bytes, want %d", total, size)
		}
		if e.server.storeUsed.Load() == 0 {
			t.Error("no bytes counted in the snapshot stores")
		}
		if !buffered && e.noCopyRange.Load() {
			t.Log("copy_file_range cannot copy here; the buffered path ran instead")
		}
		for _, v := range []*exportView{w, s1, s2, s3, j} {
			v.release()
		}
	})
}

func TestSnapshotZeroBlocksTakeNoSpace(t *testing.T) {
	copyModes(t, func(t *testing.T, buffered bool) {
		srv, e, img := newTestExport(t, Config{SnapshotLinger: -1}, 1<<20)
		e.noCopyRange.Store(buffered)
		f, _ := os.OpenFile(img, os.O_RDWR, 0)
		if err := exportFallocate(f, fallocPunchHole|fallocKeepSize, 0, 512<<10); err != nil {
			t.Skipf("cannot punch holes: %v", err)
		}
		f.Close()
		s := mustView(t, srv, "disk@snapshot", false)
		w := mustView(t, srv, "disk", false)
		if err := w.write(bytes.Repeat([]byte{1}, 1<<20), 0, false); err != nil {
			t.Fatal(err)
		}
		if got, want := srv.storeUsed.Load(), int64(512<<10); got != want {
			t.Errorf("store holds %d bytes, want %d (zero blocks need no copy)", got, want)
		}
		if got := readView(t, s, 0, 512<<10, true); !bytes.Equal(got, make([]byte, 512<<10)) {
			t.Error("a preserved hole does not read as zeros")
		}
		s.release()
		w.release()
		if _, err := e.joinSnapshot(1, false); err == nil {
			t.Error("snapshot with linger < 0 survived its last connection")
		}
		if got := srv.storeUsed.Load(); got != 0 {
			t.Errorf("dropped snapshot still counts %d bytes", got)
		}
	})
}

// TestSnapshotNoTornReads runs writers that fill ranges with one byte
// value per write against readers of a snapshot taken before: every
// snapshot read must be exactly the original data. Run it with -race.
func TestSnapshotNoTornReads(t *testing.T) {
	copyModes(t, func(t *testing.T, buffered bool) {
		const size = 2 << 20
		srv, _, img := newTestExport(t, Config{SnapshotBlock: 4096, SnapshotLinger: time.Hour}, size)
		srv.exports[0].noCopyRange.Store(buffered)
		orig, _ := os.ReadFile(img)
		w := mustView(t, srv, "disk", false)
		s := mustView(t, srv, "disk@snapshot", false)
		var wg sync.WaitGroup
		stop := make(chan struct{})
		for i := 0; i < 4; i++ {
			wg.Add(1)
			go func(seed int64) {
				defer wg.Done()
				r := rand.New(rand.NewSource(seed))
				for n := 0; n < 200; n++ {
					off := r.Int63n(size - 64<<10)
					p := bytes.Repeat([]byte{byte(n)}, 1+r.Intn(64<<10))
					if err := w.write(p, off, false); err != nil {
						t.Error(err)
						return
					}
				}
			}(int64(i))
		}
		errs := make(chan error, 4)
		for i := 0; i < 4; i++ {
			go func(seed int64) {
				r := rand.New(rand.NewSource(seed))
				for {
					select {
					case <-stop:
						errs <- nil
						return
					default:
					}
					off := r.Int63n(size - 128<<10)
					n := 1 + r.Int63n(128<<10)
					p := make([]byte, n)
					ext, err := s.read(p, off, r.Intn(2) == 0)
					if err != nil {
						errs <- err
						return
					}
					for _, x := range ext {
						if x.hole {
							clear(p[x.off-off : x.off-off+x.length])
						}
					}
					if !bytes.Equal(p, orig[off:off+n]) {
						errs <- fmt.Errorf("snapshot read %d@%d saw data written after the snapshot", n, off)
						return
					}
				}
			}(int64(100 + i))
		}
		testenv.Wait(t, &wg, "the writers and readers to finish")
		close(stop)
		for i := 0; i < 4; i++ {
			if err := testenv.Receive(t, errs, "a reader's result"); err != nil {
				t.Error(err)
			}
		}
		if got := readView(t, s, 0, size, true); !bytes.Equal(got, orig) {
			t.Error("snapshot differs from the original after the writes")
		}
	})
}

func TestSnapshotStoreFullBreaksSnapshot(t *testing.T) {
	copyModes(t, func(t *testing.T, buffered bool) {
		srv, _, img := newTestExport(t, Config{SnapshotMax: 256 << 10, SnapshotLinger: time.Hour}, 1<<20)
		srv.exports[0].noCopyRange.Store(buffered)
		w := mustView(t, srv, "disk", false)
		s := mustView(t, srv, "disk@snapshot", false)
		p := bytes.Repeat([]byte{0x5a}, 1<<20)
		if err := w.write(p, 0, false); err != nil {
			t.Fatalf("the writer failed although the policy is break-snapshot: %v", err)
		}
		now, _ := os.ReadFile(img)
		if !bytes.Equal(now, p) {
			t.Error("the write did not reach the image")
		}
		// The text of each error is what a client is sent, and it must
		// read as a broken snapshot (mount's stats say so).
		_, err := s.read(make([]byte, 4096), 0, true)
		if nbd.ErrnoOf(err) != nbd.EIO || err == nil || !nbd.IsSnapshotBroken(err.Error()) {
			t.Errorf("reading a broken snapshot: %v, want EIO worded as nbd.SnapshotBrokenError", err)
		}
		if err := s.flush(); nbd.ErrnoOf(err) != nbd.EIO || err == nil || !nbd.IsSnapshotBroken(err.Error()) {
			t.Errorf("FLUSH of a broken snapshot: %v, want EIO worded as nbd.SnapshotBrokenError", err)
		}
		if _, _, err := srv.openView("disk@s1", false, true); err == nil || !nbd.IsSnapshotBroken(err.Error()) {
			t.Errorf("joining a broken snapshot: %v, want a refusal worded as nbd.SnapshotBrokenError", err)
		}
		if got := srv.storeUsed.Load(); got != 0 {
			t.Errorf("a broken snapshot's store still counts %d bytes", got)
		}
		// The next snapshot works again.
		s2 := mustView(t, srv, "disk@snapshot", false)
		if err := w.write(bytes.Repeat([]byte{1}, 4096), 0, false); err != nil {
			t.Fatal(err)
		}
		if got := readView(t, s2, 0, 4096, true); !bytes.Equal(got, p[:4096]) {
			t.Error("the snapshot after a broken one does not hold its instant")
		}
	})
}

func TestSnapshotStoreFullFailsWriter(t *testing.T) {
	copyModes(t, func(t *testing.T, buffered bool) {
		srv, _, img := newTestExport(t, Config{SnapshotMax: 256 << 10, OnSnapshotFull: FailWriter, SnapshotLinger: time.Hour}, 1<<20)
		srv.exports[0].noCopyRange.Store(buffered)
		orig, _ := os.ReadFile(img)
		w := mustView(t, srv, "disk", false)
		s := mustView(t, srv, "disk@snapshot", false)
		if err := w.write(bytes.Repeat([]byte{1}, 128<<10), 0, false); err != nil {
			t.Fatalf("a write within the budget failed: %v", err)
		}
		err := w.write(bytes.Repeat([]byte{2}, 512<<10), 512<<10, false)
		if nbd.ErrnoOf(err) != nbd.ENOSPC {
			t.Fatalf("write beyond the budget: %v, want ENOSPC", err)
		}
		now, _ := os.ReadFile(img)
		if !bytes.Equal(now[512<<10:], orig[512<<10:]) {
			t.Error("the refused write changed the image")
		}
		if got := readView(t, s, 0, 1<<20, true); !bytes.Equal(got, orig) {
			t.Error("the snapshot did not stay whole under fail-writer")
		}
		// Rewriting blocks the snapshot already holds costs nothing.
		if err := w.write(bytes.Repeat([]byte{3}, 128<<10), 0, false); err != nil {
			t.Errorf("rewriting preserved blocks failed: %v", err)
		}
	})
}

func TestSnapshotLingerThenDrop(t *testing.T) {
	srv, e, _ := newTestExport(t, Config{SnapshotLinger: 20 * time.Millisecond}, 1<<20)
	s := mustView(t, srv, "disk@snapshot", false)
	j := mustView(t, srv, "disk@s1", false)
	if n := len(openStores(t, srv.snapDir)); n != 1 {
		t.Fatalf("%d stores open for one snapshot", n)
	}
	s.release()
	j.release()
	// Dropped after the linger time: poll until it is gone.
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, _, err := srv.openView("disk@s1", false, false)
		if err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("snapshot never dropped after its linger time")
		}
		time.Sleep(time.Millisecond)
	}
	if _, code, err := srv.openView("disk@s1", false, true); code != nbd.RepErrUnknown || err == nil {
		t.Errorf("joining a dropped snapshot: %s %v, want ERR_UNKNOWN", code, err)
	}
	if open := openStores(t, srv.snapDir); len(open) != 0 {
		t.Errorf("stores still open after the drop: %v", open)
	}
	e.mu.Lock()
	n := len(e.snapshots)
	e.mu.Unlock()
	if n != 0 {
		t.Errorf("%d snapshots still registered", n)
	}
}

func TestSnapshotJoinDuringLingerKeepsIt(t *testing.T) {
	srv, _, _ := newTestExport(t, Config{SnapshotLinger: time.Hour}, 1<<20)
	s := mustView(t, srv, "disk@snapshot", false)
	s.release()
	j := mustView(t, srv, "disk@s1", false)
	if j.snap == nil || j.snap.gone.Load() {
		t.Fatal("join during the linger time failed")
	}
	j.release()
	if n := len(openStores(t, srv.snapDir)); n != 1 {
		t.Fatalf("%d stores open for a lingering snapshot, want 1", n)
	}
	if err := srv.Close(); err != nil {
		t.Fatal(err)
	}
	if !j.snap.gone.Load() {
		t.Error("Close left a lingering snapshot")
	}
	if open := openStores(t, srv.snapDir); len(open) != 0 {
		t.Errorf("Close left stores open: %v", open)
	}
}

// openStores lists this process's descriptors of files in dir: a store
// has no name there, but its descriptor's link in /proc/self/fd still
// names the directory ("dir/#1234 (deleted)" for O_TMPFILE), and holds
// its space until closed.
func openStores(t *testing.T, dir string) []string {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var open []string
	for _, fd := range fds {
		link, err := os.Readlink("/proc/self/fd/" + fd.Name())
		if err == nil && strings.HasPrefix(link, dir+"/") {
			open = append(open, link)
		}
	}
	return open
}

func TestBlockLocksNoDeadlock(t *testing.T) {
	var l blockLocks
	const goroutines = 8
	var wg sync.WaitGroup
	var counter [lockStripes + 10]int // guarded by the stripes of each block
	var added [goroutines][lockStripes + 10]int
	torn := make(chan string, goroutines)
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			r := rand.New(rand.NewSource(int64(g)))
			for i := 0; i < 2000; i++ {
				b0 := r.Int63n(int64(len(counter)))
				b1 := min(b0+r.Int63n(lockStripes+5), int64(len(counter)-1))
				if r.Intn(2) == 0 {
					l.lock(b0, b1)
					for b := b0; b <= b1; b++ {
						counter[b]++
						added[g][b]++
					}
					l.unlock(b0, b1)
				} else {
					// Under the read locks no writer may change the range.
					l.rlock(b0, b1)
					sum := 0
					for b := b0; b <= b1; b++ {
						sum += counter[b]
					}
					runtime.Gosched()
					for b := b0; b <= b1; b++ {
						sum -= counter[b]
					}
					l.runlock(b0, b1)
					if sum != 0 {
						select {
						case torn <- fmt.Sprintf("blocks %d-%d changed by %d under the read locks", b0, b1, -sum):
						default:
						}
					}
				}
			}
		}(g)
	}
	done := make(chan struct{})
	go func() {
		testenv.Wait(t, &wg, "the writers and readers to finish")
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("lockers still running after 2 minutes: deadlock")
	}
	close(torn)
	for msg := range torn {
		t.Error(msg)
	}
	for b := range counter {
		want := 0
		for g := range added {
			want += added[g][b]
		}
		if counter[b] != want {
			t.Errorf("block %d: counter %d after %d locked increments", b, counter[b], want)
		}
	}
}

func TestImageExtents(t *testing.T) {
	p := testImage(t, 4<<20, 1)
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := exportFallocate(f, fallocPunchHole|fallocKeepSize, 1<<20, 1<<20); err != nil {
		t.Skipf("cannot punch holes: %v", err)
	}
	got := imageExtents(f, 512<<10, 3<<20, nil, 10)
	want := []extent{{512 << 10, 512 << 10, false}, {1 << 20, 1 << 20, true}, {2 << 20, 1 << 20, false}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("imageExtents = %v, want %v", got, want)
	}
	// Capped after the first extent: the rest is reported as data.
	got = imageExtents(f, 0, 4<<20, nil, 1)
	if len(got) != 1 || got[0].hole || got[0].length != 4<<20 {
		t.Errorf("capped imageExtents = %v", got)
	}
}

func TestConfigErrors(t *testing.T) {
	img := testImage(t, 1<<20, 1)
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"no exports", Config{}},
		{"bad block", Config{Exports: []ExportConfig{{Name: "d", Path: img}}, SnapshotBlock: 5000}},
		{"at in name", Config{Exports: []ExportConfig{{Name: "d@x", Path: img}}}},
		{"duplicate", Config{Exports: []ExportConfig{{Name: "d", Path: img}, {Name: "d", Path: img}}}},
		{"missing image", Config{Exports: []ExportConfig{{Name: "d", Path: img + ".nope"}}}},
		{"tls without cert", Config{Exports: []ExportConfig{{Name: "d", Path: img}}, TLSMode: TLSOn}},
	} {
		if _, err := New(tc.cfg); err == nil {
			t.Errorf("%s: New succeeded", tc.name)
		} else if !errors.Is(err, os.ErrNotExist) && tc.name == "missing image" {
			t.Errorf("%s: %v, want a not-exist error", tc.name, err)
		}
	}
}

// A snapshot store has no name on disk, whether the file system makes it
// with O_TMPFILE or it is unlinked at once: nothing is left in the
// directory, whatever becomes of the process.
func TestStoresHaveNoName(t *testing.T) {
	for _, c := range []struct {
		name   string
		create func(dir string) (*os.File, string, error)
	}{{"O_TMPFILE", createStore}, {"unlinked", createUnlinkedStore}} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			f, how, err := c.create(dir)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if how != c.name {
				t.Errorf("made by %s, want %s", how, c.name)
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 0 {
				t.Errorf("the store has a name: %v", entries)
			}
			st, err := f.Stat()
			if err != nil {
				t.Fatal(err)
			}
			if n := st.Sys().(*syscall.Stat_t).Nlink; n != 0 {
				t.Errorf("the store has %d links", n)
			}
			if _, err := f.WriteAt([]byte("kept"), 1<<20); err != nil {
				t.Fatal(err)
			}
			b := make([]byte, 4)
			if _, err := f.ReadAt(b, 1<<20); err != nil || string(b) != "kept" {
				t.Errorf("read back %q, %v", b, err)
			}
		})
	}
}
