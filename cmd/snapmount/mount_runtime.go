package main

// The mount process's Go runtime: garbage collection and processors.

import (
	"runtime"
	"runtime/debug"
)

// mountGCPercent is the mount process's GOGC unless its environment sets
// one. Its Go heap is go-fuse's request and reply buffers and the
// client's (cached blocks live outside it, in slabs): 4-5 MiB by the time
// the file is readable, just over the 4 MiB at which GOGC=100 collects
// first, so every mount ran a collection while it started. At 200 the
// first one waits for 8 MiB: alternated by hand (15 rounds), foreground
// mounts were readable in a median 31 ms against 36 from snapmount serve
// (nbdfuse 25) and 45 against 53 from nbdkit (nbdfuse 38), and the peak
// RSS of a cold 1 GiB read stayed at 41-44 MiB.
const mountGCPercent = 200

// tuneMountRuntime sets the mount process's garbage collection to
// mountGCPercent unless getenv("GOGC") is set, and its Go processors to
// one more than the runtime's default unless getenv("GOMAXPROCS") is set;
// it returns the processor count.
//
// Why one more processor: go-fuse keeps a reader blocked in read(2) on
// /dev/fuse whenever it can, and a goroutine in a system call holds its
// processor until the runtime's monitor takes it back, 20 µs to 10 ms
// later: with as many processors as CPUs, overlapping reads wait for that.
// With one more (alternated by hand on the 2-CPU benchmark VM), 4 KiB
// random reads from 4 jobs ran 10-15% faster (20.7-22.0k IOPS against
// 18.5-19.5k from nbdkit, nbdfuse 17.5-18.9k; 18.9k against 16.5k medians
// from snapmount serve), and one read at a time and cold sequential reads
// the same. (While reads come one at a time, a root mount runs on one
// processor: fusefs.Options.SerialProcs.)
func tuneMountRuntime(getenv func(string) string) (procs int) {
	if getenv("GOGC") == "" {
		debug.SetGCPercent(mountGCPercent)
	}
	if getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 1)
	}
	return runtime.GOMAXPROCS(0)
}
