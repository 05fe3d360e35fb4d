// Package overlay is a private write layer over a read-only disk: writes
// land in blocks of a file of its own, reads take the blocks written there
// and everything else from the disk below, which is never written. The
// layer lives as long as the process: its file has no name on disk (it is
// opened with O_TMPFILE, or unlinked the moment it is created where the
// file system lacks O_TMPFILE), so nothing of it is left once the process
// ends, however it ends, and nothing of it can be opened by anyone else.
//
// It owns the block map (which blocks were written), the read-modify-write
// of blocks written in part, and the bound on its size ([Options.MaxBytes]):
// a write that needs more blocks than the bound allows fails as a whole
// with ENOSPC and changes nothing, so no write is ever dropped silently.
//
// # Layout
//
// The private file mirrors the disk: block b of the disk is at offset
// b*BlockSize of the file, which stays sparse where nothing was written,
// so a run of written blocks is read with one pread. Which blocks were
// written is kept in memory, one bit per block, in words allocated only
// for the regions written.
//
// # Concurrency
//
// Every method is safe for concurrent use. Writes are serialised (the
// read-modify-write of a partial block must not interleave with another
// write of that block); reads run concurrently with each other and with a
// write, and see each block either before or after it. A block's data is in
// the file before its bit is set, so a read never takes a block from the
// file before it is there.
package overlay
