package nbd

import (
	"sync"

	"golang.org/x/sys/unix"
)

// WriteBehind keeps a file that is written once and read seldom (a copy's
// destination, a snapshot store) from filling the page cache: it starts
// writeback of each range as soon as it is written and, once a range is
// writeBehindWindow behind, waits for it and drops its pages. The writer
// then reuses a small, warm set of pages instead of allocating new ones
// for every byte (which on VMs that back guest memory lazily costs more
// than the copy itself), and evicts nothing hotter from the cache;
// nbdcopy does the same. It is safe for concurrent use.
type WriteBehind struct {
	fd     int
	window int64 // writeBehindWindow; smaller in tests

	mu      sync.Mutex    // guards the following
	pending []writtenSpan // writeback started, pages still cached
	bytes   int64
}

type writtenSpan struct{ off, n int64 }

// writeBehindWindow is how many written bytes stay cached.
const writeBehindWindow = 64 << 20

// NewWriteBehind tracks the file with descriptor fd, which must stay open
// while Written is called.
func NewWriteBehind(fd int) *WriteBehind { return &WriteBehind{fd: fd, window: writeBehindWindow} }

// Written records that [off, off+n) was just written.
func (w *WriteBehind) Written(off, n int64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	// Hints: a failure only costs cache, never data.
	_ = unix.SyncFileRange(w.fd, off, n, unix.SYNC_FILE_RANGE_WRITE)
	w.pending = append(w.pending, writtenSpan{off, n})
	w.bytes += n
	for w.bytes > w.window {
		old := w.pending[0]
		w.pending = w.pending[1:]
		w.bytes -= old.n
		_ = unix.SyncFileRange(w.fd, old.off, old.n, unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
		_ = unix.Fadvise(w.fd, old.off, old.n, unix.FADV_DONTNEED)
	}
}
