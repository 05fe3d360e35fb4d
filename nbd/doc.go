// Package nbd owns the NBD protocol for snapmount: the wire format (one
// codec, exported, that the client here and the server in nbd/server
// share), NBD URIs, errors, the export-name grammar of snapmount's server,
// and a read-only client with a pool of connections and a sparse copier.
// The server, which serves images read-write to writers and as frozen
// point-in-time snapshots to readers, is package nbd/server; nothing here
// refers to it.
//
// # Wire format
//
// proto.go holds every constant of the NBD protocol specification, the
// upstream doc/proto.md of NetworkBlockDevice/nbd, which the comments here
// cite as proto.md; wire.go encodes and decodes every message by hand.
// Decoders check each length before they allocate, so hostile bytes cannot
// make either side allocate more than a bounded amount.
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
// snapmount's server answers NAME (a writer, or a new snapshot for a
// client that promised to read only), NAME@snapshot (a new snapshot),
// NAME@sN (join snapshot N) and NAME@live (read-only, live);
// ParseExportName is that grammar, for the server and for clients. The GO
// reply names the snapshot it created in NBD_INFO_NAME, so further
// connections of one mount join the same instant, and a client tells a
// frozen snapshot by that canonical name.
//
// # Client
//
// Client (client.go) keeps a pool of connections (conn.go: pipelined
// requests, a leader reading replies for the others, a guard that fails
// requests the server leaves unanswered) and reconnects to the canonical
// name. Client.Copy (copy.go) reads a whole export in parallel, aligned
// requests and writes it out sparse, in order, or both.
package nbd
