// Package server is snapmount's NBD server: it serves images read-write to
// writers and as frozen point-in-time snapshots to readers, speaking the
// protocol through the codec of package nbd.
//
// New opens the images, Serve accepts on a listener (TCP gets
// TCP_NODELAY), Shutdown stops accepting, lets requests in flight finish,
// flushes the images and frees the snapshot stores (server.go). One
// connection has one reader goroutine (handshake in handshake.go,
// request headers and WRITE payloads in transmission.go), at most
// Config.Workers handlers and one writer at a time: a reply is
// queued only when complete, and whoever finds the write lock free sends
// everything queued with one writev. Cached live reads go out with
// sendfile straight from the page cache; cheap requests run in the reader
// itself, uncached reads, FUA writes and snapshot I/O on the handlers.
//
// Exports and their views are in export.go: a writer (read-write, live),
// a live read-only view, or a snapshot. Snapshots (snapshot.go) are kept
// by copy-before-write into a sparse store per snapshot, under a striped
// table of block locks so that no snapshot read sees half a write; a full
// store or a failed copy breaks the snapshot (its readers get EIO) or,
// with FailWriter, fails the write instead. A store is a file with no
// name on disk (O_TMPFILE, else unlinked at once), so the kernel frees it
// when the server ends however it ends.
//
// Every byte from the network is hostile: option data is capped (64 KiB
// read, 16 MiB drained, more ends the connection), options before GO are
// counted, the handshake has a deadline, WRITE payloads above 32 MiB end
// the connection, out-of-range requests get EINVAL or ENOSPC, and each
// connection's payload buffers are bounded. FuzzServerHandshake and
// FuzzServerRequests drive a connection with arbitrary bytes.
package server
