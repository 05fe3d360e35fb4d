package main

// Exit codes, one per class of failure, so scripts can tell them apart.
// 2 is also what Go uses for an unrecovered panic; a usage error shares it
// because both mean "the program did not do its job as asked".
const (
	exitOK      = 0
	exitFailure = 1 // the operation failed (I/O, server error, ...)
	exitUsage   = 2 // bad command line: unknown flag, bad URI, missing argument
	exitConnect = 3 // could not connect to or negotiate with the NBD server
	exitMount   = 4 // the FUSE mount could not be made or the mountpoint is unusable
	exitSignal  = 5 // stopped by SIGINT/SIGTERM before finishing (copy)
)
