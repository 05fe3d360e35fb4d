package main

// The mount process: it connects, wires the NBD client, the cache and the
// FUSE file system together, and serves until it is unmounted.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"snapmount/cache"
	"snapmount/cache/overlay"
	"snapmount/fusefs"
	"snapmount/nbd"
)

// A read's misses go to the server in pieces of at most missRequestSize
// until the mount has fetched missWarmup bytes (cache.Options
// MaxMissRequest, MissWarmup): a server that allocates each request's
// buffer on a new connection, as nbdkit does, makes a short read at the
// start of a disk pay for large requests it never earns back, while long
// reads are cheaper per byte in large requests.
const missRequestSize, missWarmup = 256 << 10, 256 << 20

// The cache, or the overlay over it, is the mount's reader: if one
// stopped answering fusefs's optional interfaces, reads would silently
// take a slower path.
var (
	_ fusefs.SliceReader     = (*cache.Cache)(nil)
	_ fusefs.ContextReaderAt = (*cache.Cache)(nil)
	_ fusefs.Seeker          = (*cache.Cache)(nil)
	_ fusefs.SliceReader     = (*overlay.Overlay)(nil)
	_ fusefs.ContextReaderAt = (*overlay.Overlay)(nil)
)

// fileName is the name of the file in the mount: the export's name
// without its view (NAME@snapshot is NAME), as nbdfuse's "nbd" when the
// name is empty. A name outside snapmount's grammar is kept whole.
func fileName(export string) string {
	name := export
	if ref, err := nbd.ParseExportName(export); err == nil {
		name = ref.Base
	}
	name = filepath.Base(strings.Trim(name, "/"))
	if name == "" || name == "." || name == "/" {
		return "nbd"
	}
	return name
}

// mountStats is what 'snapmount stats' shows, read from the file's xattr.
type mountStats struct {
	mountState
	PID       int             `json:"pid"`
	URI       string          `json:"uri"`
	Export    string          `json:"export"`
	Frozen    bool            `json:"frozen_snapshot"`
	Size      int64           `json:"size"`
	MountedAt time.Time       `json:"mounted_at"`
	Procs     int             `json:"go_procs"` // Go processors while reads overlap
	Client    nbd.ClientStats `json:"nbd"`
	Cache     cache.Stats     `json:"cache"`
	// Partitions and Overlay are there with --partitions and --overlay.
	Partitions *partitionStats `json:"partitions,omitempty"`
	Overlay    *overlayStats   `json:"overlay,omitempty"`

	// FrozenByUser says that Frozen is the user's word (--frozen), not
	// the server's.
	FrozenByUser bool `json:"frozen_by_user,omitempty"`
}

// frozenView says whether the mount treats the export as frozen (its data
// never change, so the page cache may outlive an open) and, if not, the
// warning to give once. snapmount serve says which of its views are
// snapshots; other servers say nothing, and --frozen is the user's word.
func frozenView(info *nbd.ExportInfo, export string, o *mountOptions) (frozen bool, warning string, err error) {
	switch {
	case info.SnapmountSnapshot():
		return true, "", nil
	case o.frozen && info.Promise:
		return false, "", usagef("--frozen: %q is a live view of snapmount serve, which changes under the mount (mount NAME or NAME@snapshot for a frozen snapshot)", export)
	case o.frozen:
		return true, "", nil
	case info.Promise:
		warning = fmt.Sprintf("the view of %q is live and may change under the mount (this export name is not a snapshot)", export)
	default:
		what := fmt.Sprintf("export %q", export)
		if export == "" {
			what = "its default export"
		}
		warning = fmt.Sprintf("this server does not say whether %s changes; snapmount treats it as live (--frozen if you know it does not)", what)
	}
	if !o.noCache {
		warning += "; caching anyway (--no-cache to bypass)"
	}
	return false, warning, nil
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
	// The mount process does nothing but serve the mount: it may size
	// the scheduler to the reads in flight.
	procs := newProcGovernor(tuneMountRuntime(os.Getenv), serialInterval, func(n int) { runtime.GOMAXPROCS(n) })
	if mem := totalMemory(); mem > 0 && o.cacheSize > mem && !o.noCache {
		rep.warn(fmt.Sprintf("--cache-size %s is more than this machine's memory (%.1fG): a long read may run it out of memory", humanSize(uint64(o.cacheSize)), float64(mem)/(1<<30)))
	}

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
		why := "does not know the read-only promise"
		if dopt.NoPromise || u.NoPromise {
			why = "was not sent the read-only promise (--no-promise or x-ro-promise=0)"
		}
		return withCode(exitConnect, fmt.Errorf("server %s exports %q writable and %s, so it may count this mount as a writer: use a read-only export (e.g. qemu-nbd -r, nbdkit -r, NAME@snapshot on snapmount serve) or pass --allow-writable", u.Address, u.Export, why))
	}
	frozen, warning, err := frozenView(info, u.Export, o)
	if err != nil {
		return err
	}
	if warning != "" {
		rep.warn(warning)
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
		// Random 4 KiB reads then fetch 4 KiB, not a 64 KiB block into
		// fresh cache memory, and leave the cache to what is read twice.
		AdmitOnSecondMiss: true,
	})
	defer c.Close()
	// The file's st_blocks comes from the whole allocation map: learn it
	// while FUSE mounts, so that the first stat need not wait.
	c.LearnAllocation()
	warnContainer(c, client.Size(), rep.warn)

	name := o.name
	if name == "" {
		name = fileName(u.Export)
	}
	dk, err := openDisk(c, client.Size(), name, o.disk)
	if err != nil {
		return err
	}
	defer dk.close()
	if dk.table != nil && (len(dk.windows) == 0 || dk.table.Note != "") {
		rep.warn("partitions: " + dk.tableLine())
	}
	mounted := time.Now()
	statsOf := func() mountStats {
		cs := client.Stats()
		st := mountStats{
			mountState: stateOf(frozen, o.cf.timeout, cs),
			PID:        os.Getpid(), URI: u.String(), Export: info.CanonicalName, Frozen: frozen, FrozenByUser: o.frozen,
			Size: client.Size(), MountedAt: mounted, Procs: procs.full, Client: cs, Cache: c.Stats(),
		}
		st.Partitions, st.Overlay = dk.stats()
		return st
	}
	// fusermount3 says why it refuses a mount on standard error, which a
	// background mount process sends nowhere: catch it for the error.
	var srv *fuse.Server
	said, err := captureStderr(func() (err error) {
		srv, err = fusefs.Mount(dir, dk.reader, fusefs.Options{
			Name:       name,
			Size:       client.Size(),
			Windows:    dk.windows,
			Writer:     dk.writer(),
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
			Reads:         procs,
		})
		return err
	})
	if err != nil {
		return withCode(exitMount, mountFailure(dir, err, said))
	}
	os.Stderr.WriteString(said)
	// The pool's other connections joined while FUSE was set up; one
	// that found the export changed or gone fails the mount as it would
	// have before mounting.
	if err := client.WaitConns(ctx); err != nil {
		unmount(srv, dir, logger)
		return withCode(exitConnect, err)
	}
	// When the kernel reads ahead far enough itself (the mount could
	// raise its window: root), the cache's own readahead only makes
	// kernel requests wait for larger prefetches, and is slower.
	// Without root the kernel's window stays 128 KiB and ours helps.
	kra, err := fusefs.KernelReadahead(dir)
	if err == nil && kra >= 1<<20 && readahead > 0 {
		c.SetMaxReadahead(0)
		logger.Printf("kernel readahead is %d KiB: the cache does not read ahead itself", kra>>10)
	}
	stopProcs := make(chan struct{})
	defer close(stopProcs)
	governProcs(procs, kra, stopProcs)
	if o.pidfile != "" {
		if err := os.WriteFile(o.pidfile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			unmount(srv, dir, logger)
			return withCode(exitMount, fmt.Errorf("writing --pidfile: %w", err))
		}
		defer os.Remove(o.pidfile)
	}
	logger.Printf("mounted %s (%s, %d bytes) on %s as %s", u.Display(), info.CanonicalName, client.Size(), dir, name)
	if dk.table != nil {
		logger.Printf("partitions: %s", dk.tableLine())
	}
	if dk.overlay != nil {
		logger.Printf("overlay: writable, at most %s, in a file with no name in %s, discarded at unmount", humanSize(uint64(o.disk.overlayMax)), dk.dir)
	}
	rep.ready()

	unmounted := make(chan struct{})
	go func() {
		srv.Wait()
		close(unmounted)
	}()
	select {
	case <-unmounted:
	case <-ctx.Done():
		endMount(srv, client, dir, logger, unmounted, func() bool {
			st := statsOf()
			return st.waitsForServer()
		})
	}
	logger.Printf("unmounted %s", dir)
	if dk.overlay != nil {
		st := dk.overlay.Stats()
		logger.Printf("overlay: discarded %s in %d blocks (%d writes, %d refused)", humanSize(uint64(st.Bytes)), st.Blocks, st.Writes, st.Refused)
	}
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
