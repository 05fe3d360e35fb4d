package main

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// mounted is one mount made for a measurement.
type mounted struct {
	file    string
	pid     int
	ready   float64 // seconds from launching the mount to a readable file
	unmount func()
}

// peakRSS is the mount process's peak resident memory in MiB (VmHWM).
func (m *mounted) peakRSS() (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", m.pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, err := strconv.ParseFloat(f[1], 64)
			return kb / 1024, err
		}
	}
	return 0, errors.New("no VmHWM")
}

// mounter mounts an export with one of the contenders, as an identity.
type mounter struct {
	name  string
	mount func(id *identity, uri, dir string) (*mounted, error)
}

// newMountDir makes an empty mount point that id owns.
func (b *bench) newMountDir(id *identity) string {
	dir, err := os.MkdirTemp(id.dir, "mnt-")
	if err != nil {
		fatalf("%v", err)
	}
	if id.cred != nil {
		if err := os.Chown(dir, int(id.cred.Uid), int(id.cred.Gid)); err != nil {
			fatalf("%v", err)
		}
	}
	return dir
}

// waitReadable waits until the mount shows one file that can be read by
// id. Both contenders are timed by this same check.
func waitReadable(id *identity, dir string, deadline time.Time, exited <-chan struct{}) (string, error) {
	var path string
	err := id.do(func() error {
		buf := make([]byte, 4096)
		for {
			if entries, err := os.ReadDir(dir); err == nil && len(entries) == 1 {
				path = filepath.Join(dir, entries[0].Name())
				if f, err := os.Open(path); err == nil {
					_, err := f.ReadAt(buf, 0)
					f.Close()
					if err == nil {
						return nil
					}
				}
			}
			select {
			case <-exited:
				return errors.New("the mount process exited")
			default:
			}
			if time.Now().After(deadline) {
				return errors.New("not readable after 30 s")
			}
			time.Sleep(time.Millisecond)
		}
	})
	return path, err
}

// snapmountMounter mounts with 'snapmount mount' in the background, the
// way users run it, with extra options (--no-cache) named in name.
func (b *bench) snapmountMounter(name string, extra ...string) mounter {
	return mounter{name: name, mount: func(id *identity, uri, dir string) (*mounted, error) {
		pidfile := filepath.Join(id.dir, "mount.pid")
		args := append([]string{"mount", "--pidfile", pidfile}, extra...)
		start := time.Now()
		cmd := id.command(b.cfg.bin, append(args, uri, dir)...)
		var errb bytes.Buffer
		cmd.Stderr = &errb
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("snapmount mount: %v: %s", err, errb.String())
		}
		file, err := waitReadable(id, dir, time.Now().Add(30*time.Second), nil)
		if err != nil {
			return nil, err
		}
		ready := time.Since(start).Seconds()
		raw, _ := os.ReadFile(pidfile)
		pid, _ := strconv.Atoi(strings.TrimSpace(string(raw)))
		return &mounted{file: file, pid: pid, ready: ready, unmount: func() {
			if out, err := id.command(b.cfg.bin, "umount", dir).CombinedOutput(); err != nil {
				b.logf("snapmount umount %s: %v: %s", dir, err, out)
				id.command("fusermount3", "-u", "-z", dir).Run()
			}
			os.Remove(dir)
		}}, nil
	}}
}

func (b *bench) nbdfuseMounter() mounter {
	return foregroundMounter("nbdfuse", func(uri, dir string) []string {
		return []string{"nbdfuse", "--readonly", dir, uri}
	}, func(id *identity, dir string) error {
		return id.command("fusermount3", "-u", dir).Run()
	})
}

// readySamples is how many mounts one foreground ready-time figure is
// the median of.
const readySamples = 7

// snapmountForegroundMounter runs 'snapmount mount -f' as nbdfuse runs:
// in the foreground, polled until the file is readable.
func (b *bench) snapmountForegroundMounter() mounter {
	return foregroundMounter("snapmount", func(uri, dir string) []string {
		return []string{b.cfg.bin, "mount", "-f", uri, dir}
	}, func(id *identity, dir string) error {
		return id.command(b.cfg.bin, "umount", dir).Run()
	})
}

// foregroundMounter mounts with a command that stays in the foreground
// until unmounted, and polls for the file to become readable.
func foregroundMounter(name string, argv func(uri, dir string) []string, unmount func(id *identity, dir string) error) mounter {
	return mounter{name: name, mount: func(id *identity, uri, dir string) (*mounted, error) {
		start := time.Now()
		args := argv(uri, dir)
		cmd := id.command(args[0], args[1:]...)
		var errb bytes.Buffer
		cmd.Stderr = &errb
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		file, err := waitReadable(id, dir, time.Now().Add(30*time.Second), exited)
		if err != nil {
			cmd.Process.Kill()
			return nil, fmt.Errorf("%s: %v: %s", name, err, errb.String())
		}
		ready := time.Since(start).Seconds()
		return &mounted{file: file, pid: cmd.Process.Pid, ready: ready, unmount: func() {
			unmount(id, dir)
			select {
			case <-exited:
			case <-time.After(10 * time.Second):
				cmd.Process.Kill()
				<-exited
			}
			os.Remove(dir)
		}}, nil
	}}
}

// warmImage makes the server's image resident in the page cache after
// the caches were dropped: cold figures are about the mount being cold,
// not about the disk under the server.
func warmImage(path string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	buf := make([]byte, 4<<20)
	for {
		if _, err := f.Read(buf); err != nil {
			return
		}
	}
}

// mountTarget is an NBD server serving the benchmark's images, with the
// URIs each contender opens.
type mountTarget struct {
	name      string
	short     string                               // in group names
	uriFor    func(contender, image string) string // image: "random" or "sparse"
	stop      func()
	serverPID int
}

// nbdkitTarget is a mount target of one nbdkit per image, servers[image]:
// every contender mounts the same live view.
func nbdkitTarget(name, short string, servers map[string]*daemon) *mountTarget {
	return &mountTarget{
		name:   name,
		short:  short,
		uriFor: func(_, image string) string { return unixURI("", servers[image].sock) },
		stop: func() {
			for _, d := range servers {
				d.stop()
			}
		},
	}
}

func (b *bench) mountTargets(random, sparse string) []func() *mountTarget {
	return []func() *mountTarget{
		func() *mountTarget {
			// nbdkit serves each image read-only; both contenders get
			// the same live view.
			return nbdkitTarget("nbdkit", "nbdkit", map[string]*daemon{
				"random": b.nbdkit(random, "-r"), "sparse": b.nbdkit(sparse, "-r"),
			})
		},
		func() *mountTarget {
			// snapmount serve: snapmount mounts NAME (the read-only
			// promise gets it a snapshot), nbdfuse opens NAME@snapshot
			// (a stock client's way to the same kind of view).
			sock := filepath.Join(b.cfg.dir, fmt.Sprintf("serve-%d.sock", time.Now().UnixNano()))
			d := b.start(sock, b.cfg.bin, "serve", "--no-tcp", "--socket", sock, "--snapshot-linger", "0s", "random="+random, "sparse="+sparse)
			return &mountTarget{
				name:  "snapmount serve",
				short: "serve",
				uriFor: func(contender, image string) string {
					if contender == "nbdfuse" {
						return unixURI(image+"@snapshot", sock)
					}
					return unixURI(image, sock)
				},
				stop:      d.stop,
				serverPID: d.cmd.Process.Pid,
			}
		},
	}
}

// mountRun measures one identity's mounts of one target: a group of the
// table.
type mountRun struct {
	b      *bench
	t      *mountTarget
	id     *identity
	group  string
	images map[string]string // "random", "sparse", ...: the server's image files

	snap, nbdfuse, noCache mounter
}

func (b *bench) newMountRun(t *mountTarget, id *identity, group string, images map[string]string) *mountRun {
	return &mountRun{
		b: b, t: t, id: id, group: group + ", " + id.name, images: images,
		snap:    b.snapmountMounter("snapmount"),
		nbdfuse: b.nbdfuseMounter(),
		noCache: b.snapmountMounter(noCacheName, "--no-cache"),
	}
}

// noCacheName names the contender 'snapmount mount --no-cache'.
const noCacheName = "--no-cache"

// trial returns a trial of body on a fresh mount of image by m, with the
// page cache dropped first (the server's image then read back, so that
// cold means the mount is cold, not the server's disk).
func (r *mountRun) trial(m mounter, image string, body func(mt *mounted) ([]float64, error)) func() ([]float64, error) {
	return func() ([]float64, error) {
		if canDropCaches() {
			dropCaches()
			warmImage(r.images[image])
		}
		dir := r.b.newMountDir(r.id)
		mt, err := m.mount(r.id, r.t.uriFor(m.name, image), dir)
		if err != nil {
			os.Remove(dir)
			return nil, err
		}
		defer mt.unmount()
		return body(mt)
	}
}

// measure alternates trials of body by the contenders, snapmount first
// in the first round, then the rows' anchor (nbdfuse), then their Alt.
func (r *mountRun) measure(rows []*row, image string, body func(mt *mounted) ([]float64, error), contenders ...mounter) {
	trials := make([]func() ([]float64, error), len(contenders))
	for i, m := range contenders {
		trials[i] = r.trial(m, image, body)
	}
	r.b.measureSet(rows, trials...)
}

// row makes a row of the run's group against nbdfuse.
func (r *mountRun) row(figure, unit string, higher bool, target string) *row {
	return &row{Group: r.group, Figure: figure, Unit: unit, Higher: higher, AnchorIs: "nbdfuse", Target: target}
}

// withNoCache makes r's third contender 'snapmount mount --no-cache'.
func withNoCache(r *row, target string) *row {
	r.AltIs, r.AltTarget = noCacheName, target
	return r
}

// fioJob runs j on the mount as the run's identity.
func (r *mountRun) fio(mt *mounted, j fioJob) (fioResult, error) {
	return runFio(r.id, mt.file, j)
}

// mountGroup: snapmount mount against nbdfuse --readonly over the same
// server, for nbdkit and for snapmount serve, as each identity (the
// ordinary user first).
func (b *bench) mountGroup() {
	random := b.randomImage("random.img")
	sparse := b.sparseImage("sparse.img")
	images := map[string]string{"random": random, "sparse": sparse}
	for _, newTarget := range b.mountTargets(random, sparse) {
		t := newTarget()
		for _, id := range b.ids {
			b.newMountRun(t, id, "mount/"+t.short, images).rows()
		}
		t.stop()
	}
}

// coldReads is how many 4 KiB reads a cold random figure makes on a
// fresh mount: a fixed number, not a time, so a cache that admits
// what is read twice gains only what the pattern gives it.
const coldReads = 4000

func (r *mountRun) rows() {
	b := r.b
	fioRuntime := 8
	if b.cfg.quick {
		fioRuntime = 3
	}
	sizeStr := fmt.Sprint(b.cfg.size)

	// One mount's whole run: a cold pass, a second pass, then random
	// reads (O_DIRECT, so the kernel page cache does not answer for
	// either contender) at depth 1, 16 and from 4 jobs; the peak RSS of
	// the mount process over all of it, and the mount's ready time.
	seqCold := r.row("sequential 1 MiB reads, cold", "MB/s", true, ">= 1.3x")
	seqWarm := r.row("sequential 1 MiB reads, second pass", "MB/s", true, ">= 1.5x")
	ready := r.row("mount ready, background (launch to readable file)", "s", false, "<= 1.5x nbdfuse's time")
	rand1 := r.row("4 KiB random reads, iodepth 1 (psync)", "IOPS", true, ">= 1.2x")
	rand1p99 := r.row("  the same, p99 latency", "µs", false, "<= 1.2x nbdfuse's")
	rand16 := r.row("4 KiB random reads, iodepth 16 (libaio)", "IOPS", true, ">= 1.5x")
	rand4j := r.row("4 KiB random reads, 4 jobs (psync)", "IOPS", true, ">= 1.5x")
	rss := r.row("peak RSS of the mount process, whole run", "MiB", false, "<= 256 MiB cache + 40 MiB")
	seq := fioJob{rw: "read", bs: "1M", engine: "psync", size: sizeStr}
	r.measure([]*row{seqCold, seqWarm, ready, rand1, rand1p99, rand16, rand4j, rss}, "random", func(mt *mounted) ([]float64, error) {
		var out []float64
		for range 2 {
			res, err := r.fio(mt, seq)
			if err != nil {
				return nil, err
			}
			out = append(out, res.MBps)
		}
		out = append(out, mt.ready)
		for i, j := range []fioJob{
			{rw: "randread", bs: "4k", engine: "psync", direct: true, runtime: fioRuntime},
			{rw: "randread", bs: "4k", engine: "libaio", depth: 16, direct: true, runtime: fioRuntime},
			{rw: "randread", bs: "4k", engine: "psync", jobs: 4, direct: true, runtime: fioRuntime},
		} {
			res, err := r.fio(mt, j)
			if err != nil {
				return nil, err
			}
			out = append(out, res.IOPS)
			if i == 0 {
				out = append(out, res.P99us)
			}
		}
		mem, err := mt.peakRSS()
		if err != nil {
			return nil, err
		}
		return append(out, mem), nil
	}, r.snap, r.nbdfuse)

	// Ready time as nbdfuse runs, in the foreground (the row above
	// starts a background process, which returns once the file is
	// readable and costs a second process start). Each figure is
	// the median of readySamples mounts: one mount takes tens of ms
	// and the machine's jitter is several. Unlike the row above,
	// whose mounts follow a dropped page cache (binaries and
	// libraries read from disk), these run with it warm.
	readyFg := r.row("mount ready, foreground (-f, as nbdfuse runs)", "s", false, "<= 1.5x nbdfuse's time")
	readyOf := func(m mounter) func() (float64, error) {
		return func() (float64, error) {
			var times []float64
			for range readySamples {
				dir := b.newMountDir(r.id)
				mt, err := m.mount(r.id, r.t.uriFor(m.name, "random"), dir)
				if err != nil {
					os.Remove(dir)
					return 0, err
				}
				mt.unmount()
				times = append(times, mt.ready)
			}
			return median(times), nil
		}
	}
	b.measure(readyFg, readyOf(b.snapmountForegroundMounter()), readyOf(r.nbdfuse))

	// The same cold and second-pass figures against the physical
	// references: nbdcopy from the same server, the raw image in
	// the page cache.
	vsCopy := &row{Group: r.group, Figure: "sequential cold, vs nbdcopy from the server", Unit: "MB/s", Higher: true, AnchorIs: "nbdcopy", Target: ">= 0.9x", Ours: seqCold.Ours}
	vsRaw := &row{Group: r.group, Figure: "second pass, vs raw image in the page cache", Unit: "MB/s", Higher: true, AnchorIs: "raw file", Target: ">= 0.5x", Ours: seqWarm.Ours}
	for i := 0; i < b.cfg.runs; i++ {
		uri := r.t.uriFor("nbdfuse", "random") // a read-only view for any client
		secs, err := timed("nbdcopy", "-C", "4", uri, "null:")
		if v, err := throughput(b.cfg.size, secs, err); err == nil {
			vsCopy.Anchor = append(vsCopy.Anchor, v)
		} else {
			b.logf("nbdcopy: %v", err)
		}
		warmImage(r.images["random"])
		if res, err := runFio(b.self(), r.images["random"], seq); err == nil {
			vsRaw.Anchor = append(vsRaw.Anchor, res.MBps)
		}
	}
	b.rows = append(b.rows, vsCopy, vsRaw)

	// What a forensic tool or a file manager does first on a fresh
	// mount: the first 64 MiB (partition tables, file system headers)
	// in 64 KiB buffered reads (the scan), then 4096 random 4 KiB reads
	// over the whole image, as a file system walk does.
	r.forensic(4096, "<= 0.8x nbdfuse's time", "<= 0.8x nbdfuse's time")

	// Random 4 KiB reads on a fresh mount (page cache dropped): a
	// fixed number of reads, O_DIRECT and buffered, at depth 1 and 16,
	// with the p99 latency of a read.
	r.coldRandom([]bool{true, false}, map[int]coldSpec{
		1:  {coldReads, ">= 1.1x", ">= 1.0x", "<= 1.2x nbdfuse's"},
		16: {coldReads, ">= 1.5x", "", ""},
	})

	sparseRow := r.row("sparse image end to end (1 MiB reads)", "MB/s", true, ">= 10x")
	r.measure([]*row{sparseRow}, "sparse", func(mt *mounted) ([]float64, error) {
		res, err := r.fio(mt, seq)
		if err != nil {
			return nil, err
		}
		return []float64{res.MBps}, nil
	}, r.snap, r.nbdfuse)
}

// forensic measures the forensic pattern on a fresh mount, with
// 'snapmount mount --no-cache' as a third contender: the first 64 MiB in
// 64 KiB buffered reads (the scan, a row of its own), then randomReads
// buffered 4 KiB reads over the whole image.
func (r *mountRun) forensic(randomReads int, scanTarget, target string) {
	scan := withNoCache(r.row("scan: first 64 MiB in 64 KiB reads, fresh mount", "ms", false, scanTarget), "")
	whole := withNoCache(r.row(fmt.Sprintf("forensic: the scan, then %d random 4 KiB", randomReads), "s", false, target), "")
	p99 := withNoCache(r.row("  its random reads, p99 latency", "µs", false, "<= 1.2x nbdfuse's"), "")
	r.measure([]*row{scan, whole, p99}, "random", func(mt *mounted) ([]float64, error) {
		r1, err := r.fio(mt, fioJob{rw: "read", bs: "64k", engine: "psync", size: "64M"})
		if err != nil {
			return nil, err
		}
		r2, err := r.fio(mt, fioJob{rw: "randread", bs: "4k", engine: "psync", ioSize: fmt.Sprint(randomReads * 4096), size: fmt.Sprint(r.b.cfg.size)})
		if err != nil {
			return nil, err
		}
		return []float64{r1.Secs * 1000, r1.Secs + r2.Secs, r2.P99us}, nil
	}, r.snap, r.nbdfuse, r.noCache)
}

// coldSpec is what the cold random rows at one depth measure: how many
// reads, and the targets of IOPS against nbdfuse and against --no-cache,
// and of the p99 latency.
type coldSpec struct {
	reads              int
	iops, noCache, p99 string
}

// coldRandom measures random 4 KiB reads on a fresh mount, for each
// depth in specs and each of O_DIRECT (true) and buffered (false): IOPS and
// the p99 latency of a read, with 'snapmount mount --no-cache' as a third
// contender (the cache must not cost a first touch anything).
func (r *mountRun) coldRandom(direct []bool, specs map[int]coldSpec) {
	for _, depth := range slices.Sorted(maps.Keys(specs)) {
		t := specs[depth]
		for _, d := range direct {
			mode, engine := "buffered", "psync"
			if d {
				mode = "O_DIRECT"
			}
			if depth > 1 {
				// libaio submits buffered reads synchronously; io_uring
				// keeps them in flight on its workers.
				engine = "io_uring"
			}
			iops := withNoCache(r.row(fmt.Sprintf("cold: %d random 4 KiB reads, %s, depth %d", t.reads, mode, depth), "IOPS", true, t.iops), t.noCache)
			p99 := withNoCache(r.row("  the same, p99 latency", "µs", false, t.p99), "")
			j := fioJob{rw: "randread", bs: "4k", engine: engine, depth: depth, direct: d,
				ioSize: fmt.Sprint(t.reads * 4096), size: fmt.Sprint(r.b.cfg.size)}
			r.measure([]*row{iops, p99}, "random", func(mt *mounted) ([]float64, error) {
				res, err := r.fio(mt, j)
				if err != nil {
					return nil, err
				}
				return []float64{res.IOPS, res.P99us}, nil
			}, r.snap, r.nbdfuse, r.noCache)
		}
	}
}

// sparseImage makes an image of cfg.size bytes that is mostly holes:
// four 8 MiB extents of random data spread over it.
func (b *bench) sparseImage(name string) string {
	return b.image(name, func(f *os.File) error {
		if err := f.Truncate(b.cfg.size); err != nil {
			return err
		}
		data := make([]byte, 8<<20)
		for i := range data {
			data[i] = byte(i*7 + i>>13)
		}
		for k := int64(0); k < 4; k++ {
			if _, err := f.WriteAt(data, b.cfg.size/4*k+b.cfg.size/16); err != nil {
				return err
			}
		}
		return nil
	})
}
