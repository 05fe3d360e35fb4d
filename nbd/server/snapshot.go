package server

// Point-in-time snapshots by copy-before-write.
//
// A snapshot is frozen at the instant it is created: export.newSnapshot
// holds snapMu exclusively, and every change of the image holds it shared,
// so no write is half done at that instant. From then on, before a writer
// changes a block of G bytes (the granularity, 64 KiB by default) that the
// snapshot has not preserved, export.preserve reads the block's old data
// from the image, writes it into the snapshot's store (a sparse file of
// the image's size, the block at its own offset) and sets the block's bit
// in the preserved bitmap. Reads of the snapshot come from the store where
// the bit is set and from the image elsewhere.
//
// Blocks are locked through a striped table of RWMutexes: a snapshot read
// holds its blocks' stripes shared across "preserved?" and the read; a
// writer that must copy holds them exclusively across the copy and its
// write. So a snapshot read never sees half of a write. A writer whose
// blocks every live snapshot has already preserved takes no block lock: no
// snapshot reads those blocks from the image any more.
//
// Several snapshots of one export may be alive; each has its own store and
// bitmap. The copy runs inside the kernel (copy_file_range: one page-cache
// copy, none for blocks in holes of the image) where the file systems
// allow, else one read of the old data serves every snapshot lacking it;
// stores are written behind (see WriteBehind). When a copy fails or the
// stores reach --snapshot-max, the snapshot breaks (its readers get EIO,
// never newer data) and the writer goes on, or with FailWriter the write
// fails and the snapshot stays whole.

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"snapmount/nbd"
)

// snapshot is one frozen view of an export.
type snapshot struct {
	exp     *export
	id      uint64
	name    string // canonical export name, "disk@s7"
	created time.Time
	nblocks int64
	// preserved has one bit per block: set once the block's data at the
	// snapshot's instant is in the store (or known to be zeros, which the
	// sparse store already reads as). Bits are only ever set.
	preserved []atomic.Uint64

	broken atomic.Pointer[string] // why the snapshot broke; nil while whole
	gone   atomic.Bool            // dropped: its store is deleted

	// copyMu lets one copy into the store run at a time. Concurrent
	// writes to one file serialise on its inode lock in the kernel
	// anyway, where waiters spin on the lock (rwsem_spin_on_owner) and
	// burn the server's CPU; Go parks them instead.
	copyMu sync.Mutex
	behind *nbd.WriteBehind // of the store; its waits happen outside copyMu

	storeMu sync.RWMutex // protects following; store I/O holds it shared
	store   *os.File     // nil once released; it has no name on disk
	used    atomic.Int64 // bytes written to the store, counted in Server.storeUsed

	// Guarded by exp.mu.
	refs      int // connections using the snapshot
	lingerGen int // invalidates an older linger timer's callback
	linger    *time.Timer
}

// newSnapshot freezes the export's current data as a new snapshot with
// one reference (the connection that asked).
func (e *export) newSnapshot() (*snapshot, error) {
	f, how, err := createStore(e.server.snapDir)
	if err != nil {
		return nil, fmt.Errorf("creating a snapshot store in %s: %w", e.server.snapDir, err)
	}
	// A sparse file of the image's size reads as zeros wherever nothing
	// was copied, which is what a preserved all-zero block needs.
	if err := f.Truncate(e.size); err != nil {
		f.Close()
		return nil, fmt.Errorf("sizing the snapshot store: %w", err)
	}
	nblocks := (e.size + 1<<e.blockShift - 1) >> e.blockShift
	s := &snapshot{
		exp:       e,
		nblocks:   nblocks,
		preserved: make([]atomic.Uint64, (nblocks+63)/64),
		store:     f,
		refs:      1,
	}
	// The store is written once and read seldom (readers of a snapshot
	// cache what they read): write-behind keeps it from taking a fresh
	// page of the page cache for every byte preserved, which slowed a
	// writer's first touch under a snapshot most.
	s.behind = nbd.NewWriteBehind(int(f.Fd()))

	e.snapMu.Lock() // no change of the image is in flight: the instant is now
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		e.snapMu.Unlock()
		s.releaseStore()
		return nil, fmt.Errorf("server is shutting down: %w", nbd.ESHUTDOWN)
	}
	e.lastSnap++
	s.id = e.lastSnap
	s.name = fmt.Sprintf("%s@s%d", e.name, s.id)
	s.created = time.Now()
	e.snapshots[s.id] = s
	e.publishLiveLocked()
	e.mu.Unlock()
	e.snapMu.Unlock()

	e.server.log.Info("snapshot created", "snapshot", s.name, "store", e.server.snapDir, "store_kind", how, "block", 1<<e.blockShift)
	return s, nil
}

// publishLiveLocked replaces the list of snapshots writers must preserve
// blocks for. e.mu must be held.
func (e *export) publishLiveLocked() {
	live := make([]*snapshot, 0, len(e.snapshots))
	for _, s := range e.snapshots {
		if s.broken.Load() == nil && !s.gone.Load() {
			live = append(live, s)
		}
	}
	e.live.Store(&live)
}

// joinSnapshot finds snapshot id; with ref set it takes a reference and
// cancels a pending linger timeout.
func (e *export) joinSnapshot(id uint64, ref bool) (*snapshot, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.snapshots[id]
	if s == nil {
		return nil, fmt.Errorf("snapshot %s@s%d does not exist (it was dropped after its last connection and the linger time, or never made); open %s@snapshot for a new one", e.name, id, e.name)
	}
	if r := s.broken.Load(); r != nil {
		return nil, &nbd.SnapshotBrokenError{Snapshot: s.name, Reason: *r}
	}
	if ref {
		s.refs++
		if s.linger != nil {
			s.linger.Stop()
			s.linger = nil
		}
	}
	return s, nil
}

// unref gives back a connection's reference. The last one starts the
// linger time, after which the snapshot is dropped unless joined again.
func (s *snapshot) unref() {
	e := s.exp
	e.mu.Lock()
	s.refs--
	if s.refs > 0 || s.gone.Load() {
		e.mu.Unlock()
		return
	}
	linger := e.server.cfg.SnapshotLinger
	if linger < 0 || s.broken.Load() != nil {
		e.mu.Unlock()
		s.drop("no connection uses it")
		return
	}
	s.lingerGen++
	gen := s.lingerGen
	s.linger = time.AfterFunc(linger, func() {
		e.mu.Lock()
		expired := s.refs == 0 && s.lingerGen == gen
		e.mu.Unlock()
		if expired {
			s.drop(fmt.Sprintf("unused for %v", linger))
		}
	})
	e.mu.Unlock()
}

// drop forgets the snapshot and deletes its store. Idempotent.
func (s *snapshot) drop(reason string) {
	e := s.exp
	e.mu.Lock()
	if s.gone.Swap(true) {
		e.mu.Unlock()
		return
	}
	delete(e.snapshots, s.id)
	if s.linger != nil {
		s.linger.Stop()
		s.linger = nil
	}
	e.publishLiveLocked()
	e.mu.Unlock()
	used := s.releaseStore()
	e.server.log.Info("snapshot dropped", "snapshot", s.name, "reason", reason, "store_bytes", used)
}

// breakSnapshot marks the snapshot unusable: its readers get EIO from now
// on, writers stop preserving blocks for it and its store is deleted.
func (s *snapshot) breakSnapshot(reason string) {
	if !s.broken.CompareAndSwap(nil, &reason) {
		return
	}
	e := s.exp
	e.mu.Lock()
	e.publishLiveLocked()
	e.mu.Unlock()
	s.releaseStore()
	e.server.log.Warn("snapshot broken: its readers now get EIO", "snapshot", s.name, "reason", reason)
}

// releaseStore closes and deletes the store and returns its bytes to the
// server's budget. It reports how many bytes the store held.
func (s *snapshot) releaseStore() int64 {
	s.storeMu.Lock()
	defer s.storeMu.Unlock()
	if s.store == nil {
		return s.used.Load()
	}
	s.store.Close() // the store has no name: this frees it
	s.store = nil
	used := s.used.Load()
	s.exp.server.storeUsed.Add(-used)
	return used
}

// check returns EIO for a broken or dropped snapshot.
func (s *snapshot) check() error {
	if r := s.broken.Load(); r != nil {
		return &nbd.SnapshotBrokenError{Snapshot: s.name, Reason: *r}
	}
	if s.gone.Load() {
		return fmt.Errorf("snapshot %s was dropped: %w", s.name, nbd.EIO)
	}
	return nil
}

func (s *snapshot) isPreserved(b int64) bool {
	return s.preserved[b>>6].Load()&(1<<(b&63)) != 0
}

func (s *snapshot) setPreserved(b int64) {
	s.preserved[b>>6].Or(1 << (b & 63))
}

// read is exportView.read for a snapshot.
func (s *snapshot) read(p []byte, off int64, holes bool) ([]extent, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	e := s.exp
	end := off + int64(len(p))
	b0, b1 := off>>e.blockShift, (end-1)>>e.blockShift
	e.locks.rlock(b0, b1)
	defer e.locks.runlock(b0, b1)
	s.storeMu.RLock()
	defer s.storeMu.RUnlock()

	var ext []extent
	err := s.walk(off, end, func(from, to int64, preserved bool) error {
		buf := p[from-off : to-off]
		switch {
		case preserved:
			if s.store == nil {
				return s.check()
			}
			if err := readFull(s.store, buf, from); err != nil {
				return fmt.Errorf("reading snapshot %s store: %w", s.name, err)
			}
			if holes {
				ext = appendExtent(ext, from, to-from, false)
			}
		case holes:
			for _, x := range imageExtents(e.file, from, to, nil, maxReadExtents) {
				if !x.hole {
					if err := e.readImage(p[x.off-off:x.off-off+x.length], x.off); err != nil {
						return err
					}
				}
				ext = appendExtent(ext, x.off, x.length, x.hole)
			}
		default:
			return e.readImage(buf, from)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	// A snapshot that broke during the read may have lost blocks that a
	// writer then changed without waiting for this read's locks.
	if err := s.check(); err != nil {
		return nil, err
	}
	return ext, nil
}

// blockStatus is exportView.blockStatus for a snapshot: preserved blocks
// are data, the rest is the image's allocation (unchanged since the
// snapshot's instant, under the block locks).
func (s *snapshot) blockStatus(off, length int64, maxExtents int) ([]extent, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	e := s.exp
	end := off + length
	b0, b1 := off>>e.blockShift, (end-1)>>e.blockShift
	e.locks.rlock(b0, b1)
	defer e.locks.runlock(b0, b1)
	var ext []extent
	s.walk(off, end, func(from, to int64, preserved bool) error {
		if len(ext) >= maxExtents {
			return errStopWalk
		}
		if preserved {
			ext = appendExtent(ext, from, to-from, false)
			return nil
		}
		for _, x := range imageExtents(e.file, from, to, nil, maxExtents-len(ext)) {
			ext = appendExtent(ext, x.off, x.length, x.hole)
		}
		return nil
	})
	if err := s.check(); err != nil {
		return nil, err
	}
	return ext, nil
}

var errStopWalk = errors.New("stop walking")

// walk calls fn for the runs of [off, end) that are all preserved or all
// not, in order. It stops at fn's first error; errStopWalk is not one.
func (s *snapshot) walk(off, end int64, fn func(from, to int64, preserved bool) error) error {
	shift := s.exp.blockShift
	for pos := off; pos < end; {
		pres := s.isPreserved(pos >> shift)
		to := min((pos>>shift+1)<<shift, end)
		for to < end && s.isPreserved(to>>shift) == pres {
			to = min(to+1<<shift, end)
		}
		if err := fn(pos, to, pres); err != nil {
			if errors.Is(err, errStopWalk) {
				return nil
			}
			return err
		}
		pos = to
	}
	return nil
}

// readFull reads len(p) bytes at off, zeros past the end of the file.
func readFull(f *os.File, p []byte, off int64) error {
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		return nil
	}
	return err
}

// ---- copy-before-write ----

// allPreserved reports whether every snapshot in snaps has preserved every
// block of [b0, b1].
func allPreserved(snaps []*snapshot, b0, b1 int64) bool {
	for _, s := range snaps {
		if s.broken.Load() != nil {
			continue
		}
		for b := b0; b <= b1; b++ {
			if !s.isPreserved(b) {
				return false
			}
		}
	}
	return true
}

func needsCopy(snaps []*snapshot, b int64) bool {
	for _, s := range snaps {
		if s.broken.Load() == nil && !s.isPreserved(b) {
			return true
		}
	}
	return false
}

// cbwRunBytes bounds how much old data one copy reads at a time.
const cbwRunBytes = 1 << 20

// preserve copies the old data of blocks [b0, b1] into every snapshot of
// snaps that lacks them. The caller holds the blocks' stripes exclusively
// and snapMu shared. It fails only under FailWriter; otherwise a snapshot
// whose copy fails breaks and preserve goes on.
func (e *export) preserve(snaps []*snapshot, b0, b1 int64) error {
	maxRun := max(int64(cbwRunBytes)>>e.blockShift, 1)
	for b := b0; b <= b1; {
		if !needsCopy(snaps, b) {
			b++
			continue
		}
		first := b
		for b <= b1 && b-first < maxRun && needsCopy(snaps, b) {
			b++
		}
		if err := e.copyRun(snaps, first, b-1); err != nil {
			return err
		}
	}
	return nil
}

// copyRun saves blocks [first, last] in every snapshot that lacks them:
// inside the kernel with copy_file_range where the file systems allow,
// else through memory.
func (e *export) copyRun(snaps []*snapshot, first, last int64) error {
	if !e.noCopyRange.Load() {
		err := e.copyRunInKernel(snaps, first, last)
		if !errors.Is(err, errNoCopyRange) {
			return err
		}
		e.noCopyRange.Store(true)
		e.server.log.Info("copy-before-write copies through memory: copy_file_range cannot copy from the image to the snapshot store", "export", e.name)
	}
	return e.copyRunBuffered(snaps, first, last)
}

// copyRunInKernel copies with copy_file_range, one page-cache copy
// instead of a read and a write through the process; blocks that lie in
// a hole of the image need no copy at all (the sparse store reads as
// zeros there too).
func (e *export) copyRunInKernel(snaps []*snapshot, first, last int64) error {
	shift := e.blockShift
	off, end := first<<shift, min((last+1)<<shift, e.size)
	ext := imageExtents(e.file, off, end, nil, 64)
	hole := make([]bool, last-first+1)
	for i := range hole {
		bs, be := (first+int64(i))<<shift, min((first+int64(i)+1)<<shift, e.size)
		for _, x := range ext {
			if x.hole && x.off <= bs && be <= x.off+x.length {
				hole[i] = true
			}
		}
	}
	for _, s := range snaps {
		if s.broken.Load() != nil {
			continue
		}
		if err := s.saveInKernel(first, last, hole); err != nil {
			if errors.Is(err, errNoCopyRange) {
				return err
			}
			if err := e.cbwFailed(s, err); err != nil {
				return err
			}
		}
	}
	return nil
}

// saveInKernel is save for copyRunInKernel.
func (s *snapshot) saveInKernel(first, last int64, hole []bool) error {
	s.storeMu.RLock()
	defer s.storeMu.RUnlock()
	if s.store == nil {
		return nil // dropped or broken meanwhile
	}
	shift, size := s.exp.blockShift, s.exp.size
	runStart := int64(-1)
	flush := func(to int64) error { // copy blocks [runStart, to)
		if runStart < 0 {
			return nil
		}
		from := runStart << shift
		n := min(to<<shift, size) - from
		runStart = -1
		if err := s.reserve(n); err != nil {
			return err
		}
		s.copyMu.Lock()
		_, err := exportCopyRange(s.exp.file, s.store, from, n)
		s.copyMu.Unlock()
		if err != nil {
			s.unreserve(n)
			if errors.Is(err, errNoCopyRange) {
				return err
			}
			return fmt.Errorf("copying old data to the snapshot store: %w", err)
		}
		s.behind.Written(from, n)
		// A short copy means another process shortened the image: the
		// rest of the range reads as zeros in the store, as in the image.
		for b := from >> shift; b < to; b++ {
			s.setPreserved(b)
		}
		return nil
	}
	for b := first; b <= last; b++ {
		if s.isPreserved(b) || hole[b-first] {
			if err := flush(b); err != nil {
				return err
			}
			if hole[b-first] {
				s.setPreserved(b)
			}
			continue
		}
		if runStart < 0 {
			runStart = b
		}
	}
	return flush(last + 1)
}

// copyRunBuffered reads blocks [first, last] from the image once and
// saves them in every snapshot that lacks them.
func (e *export) copyRunBuffered(snaps []*snapshot, first, last int64) error {
	off := first << e.blockShift
	end := min((last+1)<<e.blockShift, e.size)
	buf := getBuf(int(end - off))
	defer putBuf(buf)
	if err := e.readImage(buf, off); err != nil {
		err = fmt.Errorf("reading old data at offset %d: %w", off, err)
		for _, s := range snaps {
			if err := e.cbwFailed(s, err); err != nil {
				return err
			}
		}
		return nil
	}
	G := int64(1) << e.blockShift
	zero := make([]bool, last-first+1)
	for i := range zero {
		blk := buf[int64(i)*G : min(int64(i+1)*G, end-off)]
		zero[i] = nbd.AllZero(blk)
	}
	for _, s := range snaps {
		if s.broken.Load() != nil {
			continue
		}
		if err := s.save(buf, off, first, last, zero); err != nil {
			if err := e.cbwFailed(s, err); err != nil {
				return err
			}
		}
	}
	return nil
}

// cbwFailed applies the policy to a failed copy: break the snapshot and
// let the write go on (nil), or fail the write.
func (e *export) cbwFailed(s *snapshot, err error) error {
	if s.gone.Load() || s.broken.Load() != nil {
		return nil // nobody will read it again
	}
	if e.server.cfg.OnSnapshotFull == FailWriter {
		e.server.log.Warn("write refused to keep a snapshot whole", "snapshot", s.name, "err", err)
		return fmt.Errorf("snapshot %s cannot preserve old data: %w", s.name, err)
	}
	s.breakSnapshot(err.Error())
	return nil
}

// save writes the blocks of buf (which holds blocks [first, last] from
// offset off) that s has not preserved into its store.
func (s *snapshot) save(buf []byte, off, first, last int64, zero []bool) error {
	s.storeMu.RLock()
	defer s.storeMu.RUnlock()
	if s.store == nil {
		return nil // dropped or broken meanwhile
	}
	shift := s.exp.blockShift
	runStart := int64(-1)
	flush := func(to int64) error { // save blocks [runStart, to)
		if runStart < 0 {
			return nil
		}
		from := runStart<<shift - off
		n := min(to<<shift-off, int64(len(buf))) - from
		runStart = -1
		if err := s.reserve(n); err != nil {
			return err
		}
		s.copyMu.Lock()
		_, err := s.store.WriteAt(buf[from:from+n], off+from)
		s.copyMu.Unlock()
		if err != nil {
			return fmt.Errorf("writing the snapshot store: %w", err)
		}
		s.behind.Written(off+from, n)
		for b := (off + from) >> shift; b < to; b++ {
			s.setPreserved(b)
		}
		return nil
	}
	for b := first; b <= last; b++ {
		if s.isPreserved(b) || zero[b-first] {
			if err := flush(b); err != nil {
				return err
			}
			if zero[b-first] {
				s.setPreserved(b) // the sparse store already reads as zeros here
			}
			continue
		}
		if runStart < 0 {
			runStart = b
		}
	}
	return flush(last + 1)
}

// reserve counts n more bytes against --snapshot-max. storeMu is held.
func (s *snapshot) reserve(n int64) error {
	server := s.exp.server
	if max := server.cfg.SnapshotMax; max > 0 {
		if server.storeUsed.Add(n) > max {
			server.storeUsed.Add(-n)
			return fmt.Errorf("snapshot stores are full (--snapshot-max %d bytes): %w", max, nbd.ENOSPC)
		}
	} else {
		server.storeUsed.Add(n)
	}
	s.used.Add(n)
	return nil
}

// unreserve gives back a reservation whose copy failed.
func (s *snapshot) unreserve(n int64) {
	s.exp.server.storeUsed.Add(-n)
	s.used.Add(-n)
}

// ---- block locks ----

// lockStripes is the size of the block lock table. Blocks share a stripe
// when their numbers are equal modulo it; a false share only costs a wait.
const lockStripes = 1024

// blockLocks is a striped table of locks keyed by block number. Ranges are
// always locked in ascending stripe order, so two ranges cannot deadlock.
type blockLocks struct {
	m [lockStripes]sync.RWMutex
}

func (l *blockLocks) each(b0, b1 int64, fn func(*sync.RWMutex)) {
	if b1-b0+1 >= lockStripes {
		for i := range l.m {
			fn(&l.m[i])
		}
		return
	}
	s, e := b0%lockStripes, b1%lockStripes
	if s <= e {
		for i := s; i <= e; i++ {
			fn(&l.m[i])
		}
		return
	}
	for i := int64(0); i <= e; i++ {
		fn(&l.m[i])
	}
	for i := s; i < lockStripes; i++ {
		fn(&l.m[i])
	}
}

func (l *blockLocks) lock(b0, b1 int64)    { l.each(b0, b1, (*sync.RWMutex).Lock) }
func (l *blockLocks) unlock(b0, b1 int64)  { l.each(b0, b1, (*sync.RWMutex).Unlock) }
func (l *blockLocks) rlock(b0, b1 int64)   { l.each(b0, b1, (*sync.RWMutex).RLock) }
func (l *blockLocks) runlock(b0, b1 int64) { l.each(b0, b1, (*sync.RWMutex).RUnlock) }
