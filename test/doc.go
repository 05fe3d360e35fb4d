// Package test holds snapmount's end-to-end suite: it builds the binary,
// starts real peers (nbdkit, qemu-nbd, nbd-server, qemu-storage-daemon,
// libnbd's tools) on Unix sockets and 127.0.0.1, mounts for real through
// FUSE and checks data byte for byte.
//
// A test whose peer or /dev/fuse is missing skips with the reason; with
// SNAPMOUNT_REQUIRE_PEERS=1 (CI sets it) such a skip is a failure instead
// (test/testenv, which the other packages' tests use too).
// Daemons are started as children of the test, ended by PID in t.Cleanup,
// and waited for by readiness (a socket that accepts, a line on stdout),
// never by sleeping.
package test
