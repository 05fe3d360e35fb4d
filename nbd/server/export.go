package server

// Exports: one image file each, the views clients open on it (writer, live
// read-only, snapshot) and the image I/O. Every change to the image goes
// through export.change, which does copy-before-write for live snapshots.

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"snapmount/nbd"
)

// export is one served image.
type export struct {
	server      *Server
	name        string
	description string
	path        string
	file        *os.File
	size        int64
	readOnly    bool // opened read-only: no view is ever writable
	// mapping maps the image only to ask which pages are cached (see
	// exportResident); nil when the image cannot be mapped.
	mapping []byte

	blockShift  uint // log2 of the copy-before-write granularity
	locks       blockLocks
	noCopyRange atomic.Bool // copy_file_range failed once: copy through memory

	// snapMu orders changes of the image against snapshot creation: every
	// change holds it shared for its whole duration, creating a snapshot
	// holds it exclusively, so a snapshot's instant falls between writes,
	// never inside one.
	snapMu sync.RWMutex
	// live lists the snapshots writers must preserve blocks for: neither
	// broken nor dropped. Replaced as a whole (copy on write) under mu;
	// read without locks.
	live atomic.Pointer[[]*snapshot]

	mu        sync.Mutex // protects following
	writers   int
	snapshots map[uint64]*snapshot // every snapshot not yet dropped, broken ones included
	lastSnap  uint64
	closed    bool
}

func openExport(s *Server, ec ExportConfig) (*export, error) {
	flag := os.O_RDWR
	if s.cfg.ReadOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(ec.Path, flag, 0)
	if err != nil {
		if errors.Is(err, os.ErrPermission) && !s.cfg.ReadOnly {
			return nil, fmt.Errorf("nbd: opening image for export %q: %w (serve it with --readonly, or fix its permissions)", ec.Name, err)
		}
		return nil, fmt.Errorf("nbd: opening image for export %q: %w", ec.Name, err)
	}
	st, err := f.Stat()
	if err == nil && st.IsDir() {
		err = fmt.Errorf("%s is a directory", ec.Path)
	}
	if err == nil {
		err = lockImage(f, s.cfg.ReadOnly)
	}
	var size int64
	if err == nil {
		// Seek works for regular files and block devices alike.
		size, err = f.Seek(0, io.SeekEnd)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("nbd: image for export %q: %w", ec.Name, err)
	}
	e := &export{
		server:      s,
		name:        ec.Name,
		description: ec.Description,
		path:        ec.Path,
		file:        f,
		size:        size,
		readOnly:    s.cfg.ReadOnly,
		snapshots:   map[uint64]*snapshot{},
	}
	e.mapping = exportMap(f, size)
	for 1<<e.blockShift < s.cfg.SnapshotBlock {
		e.blockShift++
	}
	return e, nil
}

// close flushes the image, drops every snapshot and closes the file. The
// caller makes sure no request is still running, or accepts that late
// ones fail.
func (e *export) close() error {
	e.mu.Lock()
	if e.closed {
		e.mu.Unlock()
		return nil
	}
	e.closed = true
	snaps := make([]*snapshot, 0, len(e.snapshots))
	for _, s := range e.snapshots {
		snaps = append(snaps, s)
	}
	e.mu.Unlock()
	for _, s := range snaps {
		s.drop("server shutting down")
	}
	var err error
	if !e.readOnly {
		if err = exportFdatasync(e.file); err != nil {
			err = fmt.Errorf("nbd: flushing image %s: %w", e.path, err)
		}
	}
	if e.mapping != nil {
		syscall.Munmap(e.mapping)
	}
	if cerr := e.file.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("nbd: closing image %s: %w", e.path, cerr)
	}
	return err
}

// flags returns the transmission flags of a view of this export.
func exportFlags(writable, structured bool) nbd.TransmissionFlags {
	f := nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendCache | nbd.FlagCanMultiConn
	if writable {
		f |= nbd.FlagSendFUA | nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero
	} else {
		f |= nbd.FlagReadOnly
	}
	if structured {
		f |= nbd.FlagSendDF
	}
	return f
}

// ---- views ----

// exportView is what one connection opened: the live image (writable or
// not) or a snapshot. Its methods are safe for concurrent use.
type exportView struct {
	exp      *export
	snap     *snapshot // nil: live
	writable bool
	name     string // canonical export name, for NBD_INFO_NAME
	mode     string // for logs
	released atomic.Bool
}

// description is NBD_INFO_DESCRIPTION for the view: the export's, and
// for a snapshot the instant it was taken. A snapshot's number starts
// from 1 again when the server restarts, so the instant is what tells a
// client reconnecting to NAME@sN that it is still its snapshot.
func (v *exportView) description() string {
	if v.snap == nil {
		return v.exp.description
	}
	taken := "snapshot taken " + v.snap.created.UTC().Format(time.RFC3339Nano)
	if v.exp.description == "" {
		return taken
	}
	return v.exp.description + " (" + taken + ")"
}

// errBusy refuses a writer when every slot is taken and the policy says so.
var errBusy = errors.New("every writer slot of the export is taken")

// openView resolves an export name for a connection and, for GO and
// EXPORT_NAME (create set), takes a writer slot or creates or joins a
// snapshot. For NBD_OPT_INFO (create clear) nothing is taken or created;
// the view only describes what GO would get.
func (s *Server) openView(name string, promised, create bool) (*exportView, nbd.Reply, error) {
	ref, err := nbd.ParseExportName(name)
	if err != nil {
		return nil, nbd.RepErrUnknown, err
	}
	var e *export
	if ref.Base == "" && ref.View == nbd.ViewDefault {
		e = s.exports[0]
	} else if e = s.byName[ref.Base]; e == nil {
		return nil, nbd.RepErrUnknown, fmt.Errorf("no export named %q (NBD_OPT_LIST shows them)", ref.Base)
	}
	kind := ref.View
	if kind == nbd.ViewDefault && promised {
		kind = nbd.ViewNewSnapshot
		if s.cfg.ReaderView == ReaderViewLive {
			kind = nbd.ViewLive
		}
	}
	v := &exportView{exp: e, name: e.name}
	// Every read-only live view is canonically NAME@live: a client that
	// opens its canonical name again (more connections, a reconnect) must
	// get the same view, and plain NAME with the promise would make a new
	// snapshot instead.
	live := e.name + "@live"
	switch kind {
	case nbd.ViewDefault:
		if e.readOnly {
			v.name, v.mode = live, "reader (live; server is read-only)"
			return v, 0, nil
		}
		if create && e.takeWriter() || !create && !e.writersFull() {
			v.writable, v.mode = true, "writer"
			v.released.Store(!create) // INFO holds no slot to give back
			return v, 0, nil
		}
		if s.cfg.Busy == BusyRefuse {
			return nil, nbd.RepErrPolicy, fmt.Errorf("export %q: %w (--max-writers %d); open %s@snapshot or %s@live to read", e.name, errBusy, s.cfg.MaxWriters, e.name, e.name)
		}
		v.name, v.mode = live, "reader (live; writer slots busy)"
		return v, 0, nil
	case nbd.ViewLive:
		v.name, v.mode = live, "reader (live)"
		return v, 0, nil
	case nbd.ViewNewSnapshot:
		if !create {
			v.mode = "snapshot (not created by INFO)"
			return v, 0, nil
		}
		snap, err := e.newSnapshot()
		if errors.Is(err, nbd.ESHUTDOWN) {
			return nil, nbd.RepErrShutdown, err
		}
		if err != nil {
			return nil, nbd.RepErrPlatform, err
		}
		v.snap, v.name, v.mode = snap, snap.name, "snapshot "+snap.name+" (new)"
		return v, 0, nil
	case nbd.ViewJoinSnapshot:
		snap, err := e.joinSnapshot(ref.Snapshot, create)
		if err != nil {
			return nil, nbd.RepErrUnknown, err
		}
		v.snap, v.name, v.mode = snap, snap.name, "snapshot "+snap.name+" (joined)"
		if !create {
			v.snap = nil // INFO: describe it, hold no reference
			v.mode = "snapshot " + snap.name
		}
		return v, 0, nil
	}
	panic("nbd: unreachable view kind")
}

// release gives back what the view holds: a writer slot or a snapshot
// reference. It is idempotent.
func (v *exportView) release() {
	if v == nil || v.released.Swap(true) {
		return
	}
	if v.snap != nil {
		v.snap.unref()
	} else if v.writable {
		v.exp.releaseWriter()
	}
}

func (e *export) writersFull() bool {
	max := e.server.cfg.MaxWriters
	e.mu.Lock()
	defer e.mu.Unlock()
	return max > 0 && e.writers >= max
}

func (e *export) takeWriter() bool {
	max := e.server.cfg.MaxWriters
	e.mu.Lock()
	defer e.mu.Unlock()
	if max > 0 && e.writers >= max {
		return false
	}
	e.writers++
	return true
}

func (e *export) releaseWriter() {
	e.mu.Lock()
	e.writers--
	e.mu.Unlock()
}

// ---- reads ----

// extent is a run of bytes that is all data or all hole.
type extent struct {
	off, length int64
	hole        bool
}

func appendExtent(dst []extent, off, length int64, hole bool) []extent {
	if length <= 0 {
		return dst
	}
	if n := len(dst); n > 0 && dst[n-1].hole == hole && dst[n-1].off+dst[n-1].length == off {
		dst[n-1].length += length
		return dst
	}
	return append(dst, extent{off, length, hole})
}

// imageExtents appends the allocation of [off, end) of f, found with
// SEEK_DATA/SEEK_HOLE. After maxExtents entries the rest is reported as
// data, which is always a safe answer; so is everything on a file system
// that cannot tell.
func imageExtents(f *os.File, off, end int64, dst []extent, maxExtents int) []extent {
	pos, n := off, 0
	// Most ranges of most images are all data: one SEEK_HOLE tells.
	if hole, err := exportSeek(f, pos, seekHole); err == nil && hole > pos {
		hole = min(hole, end)
		dst = appendExtent(dst, pos, hole-pos, false)
		pos, n = hole, 1
	}
	for ; pos < end && n < maxExtents; n++ {
		data, err := exportSeek(f, pos, seekData)
		if errors.Is(err, syscall.ENXIO) {
			data = end // no data after pos: the rest is a hole (or past EOF)
		} else if err != nil {
			break
		}
		if data > pos {
			data = min(data, end)
			dst = appendExtent(dst, pos, data-pos, true)
			pos = data
			continue
		}
		hole, err := exportSeek(f, pos, seekHole)
		if err != nil || hole <= pos {
			break
		}
		hole = min(hole, end)
		dst = appendExtent(dst, pos, hole-pos, false)
		pos = hole
	}
	return appendExtent(dst, pos, end-pos, false)
}

// maxReadExtents bounds the chunks of one structured READ reply.
const maxReadExtents = 64

// readImage fills p from the image at off, zeroing what lies past the end
// of the file (which another process may have shortened).
func (e *export) readImage(p []byte, off int64) error {
	n, err := e.file.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

// read fills p with the view's data at off. With holes set it returns the
// allocation map of the range and leaves the holes in p untouched (the
// caller sends them as OFFSET_HOLE); otherwise holes are zeroed in p and
// the map is nil.
func (v *exportView) read(p []byte, off int64, holes bool) ([]extent, error) {
	if v.snap != nil {
		return v.snap.read(p, off, holes)
	}
	e := v.exp
	if !holes {
		return nil, e.readImage(p, off)
	}
	end := off + int64(len(p))
	ext := imageExtents(e.file, off, end, make([]extent, 0, 4), maxReadExtents)
	for _, x := range ext {
		if !x.hole {
			if err := e.readImage(p[x.off-off:x.off-off+x.length], x.off); err != nil {
				return nil, err
			}
		}
	}
	return ext, nil
}

// blockStatus returns base:allocation extents from off, covering at most
// length bytes and maxExtents entries.
func (v *exportView) blockStatus(off, length int64, maxExtents int) ([]extent, error) {
	if v.snap != nil {
		return v.snap.blockStatus(off, length, maxExtents)
	}
	return imageExtents(v.exp.file, off, off+length, nil, maxExtents), nil
}

// cache is NBD_CMD_CACHE: a read-ahead hint to the kernel.
func (v *exportView) cache(off, length int64) error {
	if v.snap != nil {
		if err := v.snap.check(); err != nil {
			return err
		}
	}
	exportFadviseWillNeed(v.exp.file, off, length)
	return nil
}

// flush makes every write the server has replied to durable. Read-only
// views have nothing to flush.
func (v *exportView) flush() error {
	if !v.writable {
		if v.snap != nil {
			return v.snap.check()
		}
		return nil
	}
	if err := exportFdatasync(v.exp.file); err != nil {
		return fmt.Errorf("nbd: flushing %s: %w", v.exp.path, err)
	}
	return nil
}

// ---- changes ----

// errNotFast answers FLAG_FAST_ZERO when zeroing would cost a write.
var errNotFast = fmt.Errorf("zeroing this range is not faster than writing: %w", nbd.ENOTSUP)

// write applies data at off; with fua set it is durable before return.
func (v *exportView) write(p []byte, off int64, fua bool) error {
	e := v.exp
	return e.change(off, int64(len(p)), fua, func() error {
		_, err := e.file.WriteAt(p, off)
		return err
	})
}

// trim punches a hole; on a file system that cannot, it does nothing
// (TRIM is a hint).
func (v *exportView) trim(off, length int64, fua bool) error {
	e := v.exp
	return e.change(off, length, fua, func() error {
		err := exportFallocate(e.file, fallocPunchHole|fallocKeepSize, off, length)
		if errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS) {
			return nil
		}
		return err
	})
}

// writeZeroes makes the range read as zeros: a punched hole unless noHole,
// else an allocated zero range; written zeros as the last resort, which
// FAST_ZERO refuses with ENOTSUP.
func (v *exportView) writeZeroes(off, length int64, noHole, fast, fua bool) error {
	e := v.exp
	return e.change(off, length, fua, func() error {
		if !noHole {
			err := exportFallocate(e.file, fallocPunchHole|fallocKeepSize, off, length)
			if err == nil || !isUnsupported(err) {
				return err
			}
		}
		err := exportFallocate(e.file, fallocZeroRange|fallocKeepSize, off, length)
		if err == nil || !isUnsupported(err) {
			return err
		}
		if fast {
			return errNotFast
		}
		return e.writeZeroBytes(off, length)
	})
}

func isUnsupported(err error) bool {
	return errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS) || errors.Is(err, syscall.EINVAL)
}

func (e *export) writeZeroBytes(off, length int64) error {
	const chunk = 1 << 20
	buf := getBuf(int(min(length, chunk)))
	defer putBuf(buf)
	clear(buf)
	for length > 0 {
		n := min(length, int64(len(buf)))
		if _, err := e.file.WriteAt(buf[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// change runs apply, which modifies [off, off+length) of the image, after
// copy-before-write has saved every block of the range that a live
// snapshot still needs. With fua set the change is durable before return.
func (e *export) change(off, length int64, fua bool, apply func() error) error {
	if length > 0 {
		e.snapMu.RLock()
		err := e.changeLocked(off, length, apply)
		e.snapMu.RUnlock()
		if err != nil {
			return err
		}
	}
	if fua {
		if err := exportFdatasync(e.file); err != nil {
			return fmt.Errorf("nbd: flushing %s: %w", e.path, err)
		}
	}
	return nil
}

// changeLocked is change with snapMu held shared.
func (e *export) changeLocked(off, length int64, apply func() error) error {
	live := e.live.Load()
	if live == nil || len(*live) == 0 {
		return apply()
	}
	snaps := *live
	b0, b1 := off>>e.blockShift, (off+length-1)>>e.blockShift
	if allPreserved(snaps, b0, b1) {
		// Every snapshot has its own copy of these blocks and never reads
		// them from the image again: no lock needed.
		return apply()
	}
	e.locks.lock(b0, b1)
	defer e.locks.unlock(b0, b1)
	if err := e.preserve(snaps, b0, b1); err != nil {
		return err
	}
	return apply()
}
