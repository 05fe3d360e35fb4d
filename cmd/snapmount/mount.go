package main

// The mount command: its flags and their checks. The mount process is in
// mount_run.go, starting it in the background in mount_daemon.go.

import (
	"context"
	"fmt"
	"os"
	"strings"

	flag "github.com/spf13/pflag"
)

func init() {
	register(&command{
		name:  "mount",
		args:  "URI MOUNTPOINT",
		short: "mount an export read-only as one file, ideally a frozen snapshot",
		long: `Connects and negotiates before mounting (the other connections of the
pool join while the mount is set up; errors fail fast and nothing is
left mounted), sends the read-only promise, and shows the export as one
read-only file (mode 0444) in MOUNTPOINT, which must be an empty
directory. Against snapmount serve the export name NAME (or NAME@snapshot)
gives a new frozen snapshot that all connections of the mount share; any
other server gives a live view that may change under the mount, which is
said once. The command returns once the file is readable, unless
-f/--foreground. SIGINT or SIGTERM, or 'snapmount umount MOUNTPOINT',
unmount it. Cache counters: 'snapmount stats MOUNTPOINT'.

Works as an ordinary user through fusermount3.`,
		setup: func(fs *flag.FlagSet) func(context.Context, stdio, []string) error {
			// 64 KiB blocks: the daemon's CPU per GiB read sequentially is
			// the same as with 128 KiB (290-300 ms), and random 4 KiB
			// reads, which fetch a whole block, cost less (40,000 reads:
			// 1.6 s against 1.8-2.5 s).
			//
			// The cache reads ahead only where the kernel's window stays
			// at 128 KiB (no root to raise it). There many 1 MiB requests
			// in flight beat few of 4 MiB: a cold 1 GiB read as an
			// ordinary user ran at a median 874 MB/s (603-1038, 11 runs)
			// with a 32 MiB window of 1 MiB requests, 728 (644-875) with
			// 8 MiB of 4 MiB, and nbdfuse at 845 (747-1013), alternated.
			// Root's reads, at most 1 MiB, are not affected.
			//
			// Until the mount has fetched 256 MiB, a read's own misses go
			// in pieces of at most 256 KiB, in parallel (missRequestSize,
			// missWarmup). As root the kernel reads ahead in 1 MiB reads,
			// which all miss; a server that allocates each request's
			// buffer (nbdkit does, per thread) faults in fresh memory for
			// large requests on new connections, which a short read, such
			// as the partition tables and file system headers at the start
			// of a disk, never earns back. Reading the first 64 MiB of a
			// fresh mount in 64 KiB reads from a freshly started nbdkit
			// took 190-286 ms with 1 MiB pieces and 121-185 ms with
			// 256 KiB (nbdkit faulted 11,500 pages and used 378 ms of
			// CPU, against 1,200 and 87 ms); nbdfuse 92-122. On a long
			// read large pieces cost less CPU per byte: with 256 KiB
			// pieces throughout, the second pass of 1 GiB through a live
			// view fell from 1541 to 1131 MB/s in a full benchmark run.
			// With the warm-up, 8 alternated rounds: first 64 MiB
			// 126-305 ms against 216-370 (1 MiB from the start), cold
			// 1 GiB 663-875 MB/s against 717-991, second pass 1000-1494
			// against 770-1499; a 64 MiB warm-up measured the same.
			// Readahead pieces of 256 KiB would cost: as an ordinary user
			// the cold 1 GiB read ran at 654-692 MB/s against 756-899.
			o := &mountOptions{cacheSize: 256 << 20, blockSize: 64 << 10, readahead: 32 << 20, requestSize: 1 << 20, conns: 4}
			fs.StringVar(&o.name, "name", "", "name of the file in the mount (default: the export name)")
			fs.IntVar(&o.conns, "conns", o.conns, "connections when the server allows multi-conn")
			fs.Var(sizeFlag{&o.cacheSize}, "cache-size", "memory for cached blocks")
			fs.Var(sizeFlag{&o.blockSize}, "block-size", "cache block size (rounded to the server's preferred size)")
			fs.Var(sizeFlag{&o.readahead}, "readahead", "largest readahead window for sequential reads (0: off)")
			fs.Var(sizeFlag{&o.requestSize}, "request-size", fmt.Sprintf("largest NBD read the cache sends (a read's misses go in %s pieces until %s were fetched)",
				humanSize(missRequestSize), humanSize(missWarmup)))
			fs.BoolVar(&o.noCache, "no-cache", false, "read through without caching (a live view then never shows stale data from this process)")
			fs.BoolVar(&o.allowOther, "allow-other", false, "let other users read the mount (needs user_allow_other in /etc/fuse.conf unless root)")
			fs.BoolVarP(&o.foreground, "foreground", "f", false, "stay in the foreground; unmount on SIGINT/SIGTERM")
			fs.StringVar(&o.pidfile, "pidfile", "", "write the PID of the mount process here once it is ready")
			fs.StringVar(&o.logFile, "log", "", "append the mount process's log here (default: stderr in the foreground, nowhere in the background)")
			fs.BoolVarP(&o.verbose, "verbose", "v", false, "log the counters at unmount")
			fs.BoolVar(&o.allowWritable, "allow-writable", false, "mount even if the server may count this client as a writer (writable export, read-only promise not understood)")
			fs.BoolVar(&o.debugFuse, "debug-fuse", false, "trace every FUSE request")
			o.cf.bind(fs)
			return func(ctx context.Context, std stdio, args []string) error {
				if err := wantArgs(args, 2, "URI and MOUNTPOINT"); err != nil {
					return err
				}
				if err := o.check(); err != nil {
					return err
				}
				u, dopt, err := o.cf.parse(args[0])
				if err != nil {
					return err
				}
				fd := os.Getenv(readyFDEnv)
				if !o.foreground && fd == "" {
					return spawnMount(ctx, std)
				}
				rep, err := newReporter(fd, std.err)
				if err != nil {
					return err
				}
				err = runMount(ctx, rep, u, dopt, args[1], o)
				rep.done(err)
				return err
			}
		},
	})
}

type mountOptions struct {
	cf                       clientFlags
	name                     string
	conns                    int
	cacheSize, blockSize     int64
	readahead, requestSize   int64
	noCache, allowOther      bool
	foreground, verbose      bool
	allowWritable, debugFuse bool
	pidfile, logFile         string
}

func (o *mountOptions) check() error {
	switch {
	case o.conns < 1 || o.conns > 64:
		return usagef("--conns must be from 1 to 64")
	case o.blockSize < 4096 || o.blockSize > 16<<20 || o.blockSize&(o.blockSize-1) != 0:
		return usagef("--block-size must be a power of two from 4K to 16M")
	case o.cacheSize < o.blockSize*4 && !o.noCache:
		return usagef("--cache-size must hold at least 4 blocks")
	case o.readahead < 0:
		return usagef("--readahead cannot be negative")
	case o.requestSize < 4096 || o.requestSize > 32<<20:
		return usagef("--request-size must be from 4K to 32M")
	case strings.ContainsAny(o.name, "/\x00") || o.name == "." || o.name == "..":
		return usagef("--name must be a plain file name")
	}
	return nil
}
