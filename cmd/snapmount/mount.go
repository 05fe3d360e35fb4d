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
		short: "mount an export read-only as one file (and its partitions), ideally a frozen snapshot",
		long: `Connects and negotiates before mounting (the other connections of the
pool join while the mount is set up; errors fail fast and nothing is
left mounted), sends the read-only promise, and shows the export as one
read-only file (mode 0444) in MOUNTPOINT, which must be an empty
directory. Against snapmount serve the export name NAME (or NAME@snapshot)
gives a new frozen snapshot that all connections of the mount share.
Other servers do not say whether an export changes: the mount treats it
as live, and says so once, unless --frozen. The command returns once the
file is readable, unless -f/--foreground. SIGINT or SIGTERM, or
'snapmount umount MOUNTPOINT', unmount it. At SIGINT or SIGTERM, files
still open are detached and served while the server answers, for 10 s at
most, so that reads in progress finish; reads waiting for a server that
does not answer fail with EIO. A second signal ends the process at once.
Cache counters: 'snapmount stats MOUNTPOINT'.

--frozen is your word that the export does not change, e.g. qemu's
snapshot-access export while its backup job runs or an image no one
writes: the mount treats it as a frozen snapshot, keeps the kernel's page
cache across opens and gives no warning. If the export does change, reads
may then show old data.

--partitions also shows each partition of the disk's MBR or GPT table as
a file NAME-pN, numbered as fdisk -l numbers them (MBR 1-4, logical
partitions from 5, GPT entry + 1), read through the same cache. A table
that is damaged or hostile is used as far as it can be trusted; what was
skipped is said in one line, and without a usable table the mount shows
the whole disk alone.

--overlay makes the files writable, e.g. for 'e2fsck -E journal_only' to
replay a file system's journal: writes go to a private overlay file in
--overlay-dir that has no name on disk, bounded by --overlay-max. THE
OVERLAY IS DISCARDED AT UNMOUNT (or when the process ends, however it
ends): nothing is ever written to the export, which is still opened with
the read-only promise.

Works as an ordinary user through fusermount3.`,
		setup: func(fs *flag.FlagSet) func(context.Context, stdio, []string) error {
			// 64 KiB blocks cost no more CPU per byte read sequentially
			// than 128 KiB, and less per random 4 KiB read, which fetches
			// a whole block. The 32 MiB readahead window in 1 MiB requests
			// is for mounts without root, where the kernel's window stays
			// at 128 KiB: many requests in flight beat few large ones.
			// test/bench/README.md has the measurements.
			o := &mountOptions{cacheSize: 256 << 20, blockSize: 64 << 10, readahead: 32 << 20, requestSize: 1 << 20, conns: 4}
			fs.StringVar(&o.name, "name", "", "name of the file in the mount (default: the export name)")
			fs.IntVar(&o.conns, "conns", o.conns, "connections when the server allows multi-conn")
			fs.Var(sizeFlag{&o.cacheSize}, "cache-size", "memory for cached blocks")
			fs.Var(sizeFlag{&o.blockSize}, "block-size", "cache block size (rounded to the server's preferred size)")
			fs.Var(sizeFlag{&o.readahead}, "readahead", "largest readahead window for sequential reads (0: off)")
			fs.Var(sizeFlag{&o.requestSize}, "request-size", fmt.Sprintf("largest NBD read the cache sends (a read's misses go in %s pieces until %s were fetched)",
				humanSize(missRequestSize), humanSize(missWarmup)))
			fs.BoolVar(&o.frozen, "frozen", false, "the export does not change: treat it as a frozen snapshot (keep the page cache, no warning)")
			fs.BoolVar(&o.noCache, "no-cache", false, "read through without caching (a live view then never shows stale data from this process)")
			fs.BoolVar(&o.allowOther, "allow-other", false, "let other users read the mount (needs user_allow_other in /etc/fuse.conf unless root)")
			fs.BoolVarP(&o.foreground, "foreground", "f", false, "stay in the foreground; unmount on SIGINT/SIGTERM")
			fs.StringVar(&o.pidfile, "pidfile", "", "write the PID of the mount process here once it is ready")
			fs.StringVar(&o.logFile, "log", "", "append the mount process's log here (default: stderr in the foreground, nowhere in the background)")
			fs.BoolVarP(&o.verbose, "verbose", "v", false, "log the counters at unmount")
			fs.BoolVar(&o.allowWritable, "allow-writable", false, "mount even if the server may count this client as a writer (writable export, read-only promise not understood)")
			fs.BoolVar(&o.debugFuse, "debug-fuse", false, "trace every FUSE request")
			o.disk.bind(fs)
			o.cf.bind(fs)
			return func(ctx context.Context, std stdio, args []string) error {
				if err := wantArgs(args, 2, "URI and MOUNTPOINT"); err != nil {
					return err
				}
				if err := o.check(); err != nil {
					return err
				}
				if err := o.disk.check(fs); err != nil {
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
	disk                     diskOptions
	name                     string
	conns                    int
	cacheSize, blockSize     int64
	readahead, requestSize   int64
	noCache, allowOther      bool
	frozen                   bool
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
