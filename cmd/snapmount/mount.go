package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	flag "github.com/spf13/pflag"

	"snapmount/cache"
	"snapmount/fusefs"
	"snapmount/nbd"
)

// A read's misses go to the server in pieces of at most missRequestSize
// until the mount has fetched missWarmup bytes (cache.Options
// MaxMissRequest, MissWarmup); see the comment on the mount command's
// defaults for why and the figures.
const missRequestSize, missWarmup = 256 << 10, 256 << 20

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

// readyFDEnv names the file descriptor on which a background mount
// process reports to the command that started it.
const readyFDEnv = "SNAPMOUNT_READY_FD"

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

// spawnMount starts this command again as a background process and waits
// until it reports that the mount is ready, or why it failed.
func spawnMount(ctx context.Context, std stdio) error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	self, err := os.Executable()
	if err != nil {
		self = "/proc/self/exe"
	}
	cmd := exec.Command(self, os.Args[1:]...)
	cmd.Env = append(os.Environ(), readyFDEnv+"=3")
	cmd.ExtraFiles = []*os.File{w}
	// A session of its own: the mount outlives the terminal and is not
	// hit by the shell's ^C meant for this command.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return withCode(exitMount, fmt.Errorf("starting the mount process: %w", err))
	}
	w.Close()
	go func() { _ = cmd.Wait() }() // reap it if it dies while we wait

	sc := bufio.NewScanner(r)
	for sc.Scan() {
		kind, msg, _ := strings.Cut(sc.Text(), " ")
		switch kind {
		case "warn":
			fmt.Fprintf(std.err, "snapmount mount: warning: %s\n", msg)
		case "ready":
			return nil
		case "error":
			codeStr, text, _ := strings.Cut(msg, " ")
			code, _ := strconv.Atoi(codeStr)
			if code == 0 {
				code = exitFailure
			}
			return withCode(code, errors.New(text))
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return withCode(exitMount, errors.New("the mount process ended without reporting; run with -f to see why"))
}

// reporter tells the starting command how the mount went: through the
// ready pipe for a background process, on stderr in the foreground.
type reporter struct {
	pipe   *os.File // nil in the foreground
	stderr io.Writer
}

func newReporter(fd string, stderr io.Writer) (*reporter, error) {
	if fd == "" {
		return &reporter{stderr: stderr}, nil
	}
	n, err := strconv.Atoi(fd)
	if err != nil || n < 3 {
		return nil, fmt.Errorf("bad %s=%q", readyFDEnv, fd)
	}
	return &reporter{pipe: os.NewFile(uintptr(n), "ready-pipe"), stderr: stderr}, nil
}

func (r *reporter) warn(msg string) {
	if r.pipe != nil {
		fmt.Fprintf(r.pipe, "warn %s\n", oneLine(msg))
		return
	}
	fmt.Fprintf(r.stderr, "snapmount mount: warning: %s\n", msg)
}

func (r *reporter) ready() {
	if r.pipe != nil {
		fmt.Fprintln(r.pipe, "ready")
		r.pipe.Close()
		r.pipe = nil
	}
}

// done reports a failure before the mount was ready (after that there is
// no one to tell but the log).
func (r *reporter) done(err error) {
	if r.pipe == nil {
		return
	}
	if err != nil {
		code := exitFailure
		var ee *exitError
		if errors.As(err, &ee) {
			code = ee.code
		}
		fmt.Fprintf(r.pipe, "error %d %s\n", code, oneLine(err.Error()))
	}
	r.pipe.Close()
	r.pipe = nil
}

func oneLine(s string) string { return strings.ReplaceAll(strings.TrimSpace(s), "\n", "; ") }

// fileName is the name of the file in the mount: the export's name
// without a snapshot suffix, as nbdfuse's "nbd" when the name is empty.
func fileName(export string) string {
	name := export
	if i := strings.LastIndexByte(name, '@'); i >= 0 {
		name = name[:i]
	}
	name = filepath.Base(strings.Trim(name, "/"))
	if name == "" || name == "." || name == "/" {
		return "nbd"
	}
	return name
}

// mountStats is what 'snapmount stats' shows, read from the file's xattr.
type mountStats struct {
	PID       int             `json:"pid"`
	URI       string          `json:"uri"`
	Export    string          `json:"export"`
	Frozen    bool            `json:"frozen_snapshot"`
	Size      int64           `json:"size"`
	MountedAt time.Time       `json:"mounted_at"`
	Procs     int             `json:"go_procs"` // Go processors while reads overlap
	Client    nbd.ClientStats `json:"nbd"`
	Cache     cache.Stats     `json:"cache"`
}

func runMount(ctx context.Context, rep *reporter, u *nbd.URI, dopt nbd.DialOptions, mountpoint string, o *mountOptions) error {
	logw := io.Writer(io.Discard)
	switch {
	case o.logFile != "":
		f, err := os.OpenFile(o.logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return withCode(exitUsage, fmt.Errorf("opening --log: %w", err))
		}
		defer f.Close()
		logw = f
	case rep.pipe == nil:
		logw = rep.stderr
	}
	logger := log.New(logw, "snapmount: ", log.LstdFlags)
	procs := tuneMountRuntime(os.Getenv)

	dir, err := prepareMountpoint(mountpoint)
	if err != nil {
		return withCode(exitMount, err)
	}
	client, err := nbd.Open(ctx, u, nbd.ClientOptions{Dial: dopt, Conns: o.conns, Timeout: o.cf.timeout, Logf: logger.Printf})
	if err != nil {
		return withCode(exitConnect, err)
	}
	defer client.Close()
	info := client.Info()
	if !info.Promise && !info.ReadOnly() && !o.allowWritable {
		return withCode(exitConnect, fmt.Errorf("server %s exports %q writable and does not know the read-only promise, so it may count this mount as a writer: use a read-only export (e.g. qemu-nbd -r, nbdkit -r, NAME@snapshot on snapmount serve) or pass --allow-writable", u.Address, u.Export))
	}
	frozen := isFrozen(info)
	if !frozen {
		why := "the server has no snapshots"
		if info.Promise {
			why = "this export name is not a snapshot"
		}
		if o.noCache {
			rep.warn(fmt.Sprintf("the view of %q is live and may change under the mount (%s)", u.Export, why))
		} else {
			rep.warn(fmt.Sprintf("the view of %q is live and may change under the mount (%s); caching anyway (--no-cache to bypass)", u.Export, why))
		}
	}

	blockSize := o.blockSize
	if pref := int64(info.BlockSize.Preferred); blockSize%pref != 0 {
		blockSize = (blockSize/pref + 1) * pref
	}
	readahead := o.readahead
	if readahead == 0 {
		readahead = -1 // the cache's way to say off
	}
	c := cache.New(cacheSource(client), client.Size(), cache.Options{
		BlockSize:      int(blockSize),
		MaxBytes:       o.cacheSize,
		MaxRequest:     int(min(int64(info.BlockSize.Max), o.requestSize)),
		MaxMissRequest: missRequestSize,
		MissWarmup:     missWarmup,
		MaxReadahead:   readahead,
		Disabled:       o.noCache,
		// Random 4 KiB reads then fetch 4 KiB, not a 64 KiB block, and
		// leave the cache to what is read twice: buffered random reads
		// had a p99 of 1.2-1.4 ms against 5.9-6.2 (fresh cache memory).
		AdmitOnSecondMiss: true,
		// A frozen snapshot's file keeps the kernel page cache across
		// opens (KEEP_CACHE): a second pass reads from there, so a
		// scan need not fill the cache with a second copy too.
		TransientScans: frozen,
	})
	defer c.Close()

	name := o.name
	if name == "" {
		name = fileName(u.Export)
	}
	mounted := time.Now()
	statsOf := func() mountStats {
		return mountStats{
			PID: os.Getpid(), URI: u.String(), Export: info.CanonicalName, Frozen: frozen,
			Size: client.Size(), MountedAt: mounted, Procs: procs, Client: client.Stats(), Cache: c.Stats(),
		}
	}
	srv, err := fusefs.Mount(dir, c, fusefs.Options{
		Name:       name,
		Size:       client.Size(),
		Immutable:  frozen,
		Mtime:      mounted,
		AllowOther: o.allowOther,
		FsName:     u.Display(),
		Debug:      o.debugFuse,
		Logger:     logger,
		Stats: func() []byte {
			b, _ := json.Marshal(statsOf())
			return b
		},
		OnWriteAttempt: func(op string, pid, uid uint32) {
			logger.Printf("refused %s by pid %d (uid %d): the mount is read-only", op, pid, uid)
		},
		// Every read is bounded by --timeout, so an O_DIRECT reader
		// that cannot be interrupted still never waits for ever.
		AsyncDirectIO: true,
		// The mount process does nothing but serve the mount.
		SerialProcs: true,
	})
	if err != nil {
		return withCode(exitMount, fmt.Errorf("mounting on %s: %w", dir, err))
	}
	// The pool's other connections joined while FUSE was set up; one
	// that found the export changed or gone fails the mount as it would
	// have before mounting.
	if err := client.WaitConns(ctx); err != nil {
		unmount(srv, dir, logger)
		return withCode(exitConnect, err)
	}
	// When the kernel reads ahead far enough itself (the mount could
	// raise its window: root), the cache's own readahead only makes
	// kernel requests wait for larger prefetches: a cold 1 GiB read ran
	// at 1.3-2.3 GB/s with both and 2.1-2.5 with the kernel's alone.
	// Without root the kernel's window stays 128 KiB and ours helps.
	if kra, err := fusefs.KernelReadahead(dir); err == nil && kra >= 1<<20 && readahead > 0 {
		c.SetMaxReadahead(0)
		logger.Printf("kernel readahead is %d KiB: the cache does not read ahead itself", kra>>10)
	}
	if o.pidfile != "" {
		if err := os.WriteFile(o.pidfile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			unmount(srv, dir, logger)
			return withCode(exitMount, fmt.Errorf("writing --pidfile: %w", err))
		}
		defer os.Remove(o.pidfile)
	}
	logger.Printf("mounted %s (%s, %d bytes) on %s as %s", u.Display(), info.CanonicalName, client.Size(), dir, name)
	rep.ready()

	unmounted := make(chan struct{})
	go func() {
		srv.Wait()
		close(unmounted)
	}()
	select {
	case <-unmounted:
	case <-ctx.Done():
		unmount(srv, dir, logger)
		<-unmounted
	}
	logger.Printf("unmounted %s", dir)
	if o.verbose {
		b, _ := json.MarshalIndent(statsOf(), "", "  ")
		logger.Printf("counters: %s", b)
	}
	return nil
}

// unmount unmounts the server's mount; if the file is still open
// somewhere, it detaches lazily so the process can still end.
func unmount(srv *fuse.Server, dir string, logger *log.Logger) {
	if err := srv.Unmount(); err != nil {
		logger.Printf("unmount %s: %v; detaching lazily", dir, err)
		if err := fusermount("-u", "-z", dir); err != nil {
			logger.Printf("lazy unmount %s: %v", dir, err)
		}
	}
}
