// Package nbd owns the NBD protocol for snapmount: the wire format (one
// codec shared by both sides), NBD URIs, a read-only client and a server
// that serves images read-write to writers and as frozen point-in-time
// snapshots to readers.
//
// # Wire format
//
// proto.go holds every constant of doc/proto.md; wire.go encodes and
// decodes every message by hand. Decoders check each length before they
// allocate, so hostile bytes cannot make either side allocate more than a
// bounded amount.
//
// # The read-only promise
//
// OptXReadOnly is snapmount's private option (0x534E5001). A client sends
// it with no data after STARTTLS and STRUCTURED_REPLY and before INFO/GO; a
// server that knows it answers ACK and from then on treats the connection
// as a reader: every export it opens is READ_ONLY, it never takes a writer
// slot, and write-type commands fail with EPERM. Stock servers answer
// NBD_REP_ERR_UNSUP and the client goes on with a normal GO. Whatever the
// server says, the client in this package has no method that sends WRITE,
// TRIM, WRITE_ZEROES or RESIZE.
//
// # Export names
//
// The server answers NAME (a writer, or a new snapshot for a client that
// promised to read only), NAME@snapshot (a new snapshot), NAME@sN (join
// snapshot N) and NAME@live (read-only, live). The GO reply names the
// snapshot it created in NBD_INFO_NAME, so further connections of one
// mount join the same instant.
package nbd

// # Server
//
// NewServer opens the images, Serve accepts on a listener (TCP gets
// TCP_NODELAY), Shutdown stops accepting, lets requests in flight finish,
// flushes the images and deletes snapshot stores (server.go). One
// connection has one reader goroutine (handshake in server_handshake.go,
// request headers and WRITE payloads in server_transmission.go), at most
// ServerConfig.Workers handlers and one writer at a time: a reply is
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
// with FailWriter, fails the write instead.
//
// Every byte from the network is hostile: option data is capped (64 KiB
// read, 16 MiB drained, more ends the connection), options before GO are
// counted, the handshake has a deadline, WRITE payloads above 32 MiB end
// the connection, out-of-range requests get EINVAL or ENOSPC, and each
// connection's payload buffers are bounded. FuzzServerHandshake and
// FuzzServerRequests drive a connection with arbitrary bytes.
