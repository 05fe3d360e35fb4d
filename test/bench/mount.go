package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
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

// mounter mounts an export with one of the contenders.
type mounter struct {
	name  string
	mount func(uri, dir string) (*mounted, error)
}

func (b *bench) newMountDir() string {
	dir, err := os.MkdirTemp(b.cfg.dir, "mnt-")
	if err != nil {
		fatalf("%v", err)
	}
	return dir
}

// waitReadable waits until the mount shows one file that can be read.
// Both contenders are timed by this same check.
func waitReadable(dir string, deadline time.Time, exited <-chan struct{}) (string, error) {
	buf := make([]byte, 4096)
	for {
		if entries, err := os.ReadDir(dir); err == nil && len(entries) == 1 {
			path := filepath.Join(dir, entries[0].Name())
			if f, err := os.Open(path); err == nil {
				_, err := f.ReadAt(buf, 0)
				f.Close()
				if err == nil {
					return path, nil
				}
			}
		}
		select {
		case <-exited:
			return "", errors.New("the mount process exited")
		default:
		}
		if time.Now().After(deadline) {
			return "", errors.New("not readable after 30 s")
		}
		time.Sleep(time.Millisecond)
	}
}

func (b *bench) snapmountMounter(extra ...string) mounter {
	return mounter{name: "snapmount", mount: func(uri, dir string) (*mounted, error) {
		pidfile := filepath.Join(b.cfg.dir, "mount.pid")
		args := append([]string{"mount", "--pidfile", pidfile}, extra...)
		start := time.Now()
		cmd := exec.Command(b.cfg.bin, append(args, uri, dir)...)
		var errb bytes.Buffer
		cmd.Stderr = &errb
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("snapmount mount: %v: %s", err, errb.String())
		}
		file, err := waitReadable(dir, time.Now().Add(30*time.Second), nil)
		if err != nil {
			return nil, err
		}
		ready := time.Since(start).Seconds()
		raw, _ := os.ReadFile(pidfile)
		pid, _ := strconv.Atoi(strings.TrimSpace(string(raw)))
		return &mounted{file: file, pid: pid, ready: ready, unmount: func() {
			if out, err := exec.Command(b.cfg.bin, "umount", dir).CombinedOutput(); err != nil {
				b.logf("snapmount umount %s: %v: %s", dir, err, out)
				exec.Command("fusermount3", "-u", "-z", dir).Run()
			}
			os.Remove(dir)
		}}, nil
	}}
}

func (b *bench) nbdfuseMounter() mounter {
	return foregroundMounter("nbdfuse", func(uri, dir string) []string {
		return []string{"nbdfuse", "--readonly", dir, uri}
	}, func(dir string) error {
		return exec.Command("fusermount3", "-u", dir).Run()
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
	}, func(dir string) error {
		return exec.Command(b.cfg.bin, "umount", dir).Run()
	})
}

// foregroundMounter mounts with a command that stays in the foreground
// until unmounted, and polls for the file to become readable.
func foregroundMounter(name string, argv func(uri, dir string) []string, unmount func(dir string) error) mounter {
	return mounter{name: name, mount: func(uri, dir string) (*mounted, error) {
		start := time.Now()
		args := argv(uri, dir)
		cmd := exec.Command(args[0], args[1:]...)
		var errb bytes.Buffer
		cmd.Stderr = &errb
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		file, err := waitReadable(dir, time.Now().Add(30*time.Second), exited)
		if err != nil {
			cmd.Process.Kill()
			return nil, fmt.Errorf("%s: %v: %s", name, err, errb.String())
		}
		ready := time.Since(start).Seconds()
		return &mounted{file: file, pid: cmd.Process.Pid, ready: ready, unmount: func() {
			unmount(dir)
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
	uriFor    func(contender, image string) string // image: "random" or "sparse"
	stop      func()
	serverPID int
}

func (b *bench) mountTargets(random, sparse string) []func() *mountTarget {
	return []func() *mountTarget{
		func() *mountTarget {
			// nbdkit serves each image read-only; both contenders get
			// the same live view.
			kr := b.nbdkit(random, "-r")
			ks := b.nbdkit(sparse, "-r")
			return &mountTarget{
				name: "nbdkit",
				uriFor: func(_, image string) string {
					if image == "sparse" {
						return unixURI("", ks.sock)
					}
					return unixURI("", kr.sock)
				},
				stop: func() { kr.stop(); ks.stop() },
			}
		},
		func() *mountTarget {
			// snapmount serve: snapmount mounts NAME (the read-only
			// promise gets it a snapshot), nbdfuse opens NAME@snapshot
			// (a stock client's way to the same kind of view).
			sock := filepath.Join(b.cfg.dir, fmt.Sprintf("serve-%d.sock", time.Now().UnixNano()))
			d := b.start(sock, b.cfg.bin, "serve", "--no-tcp", "--socket", sock, "--snapshot-linger", "0s", "random="+random, "sparse="+sparse)
			return &mountTarget{
				name: "snapmount serve",
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

// mountGroup: snapmount mount against nbdfuse --readonly over the same
// server, for nbdkit and for snapmount serve.
func (b *bench) mountGroup() {
	random := b.randomImage("random.img")
	sparse := b.sparseImage("sparse.img")
	fioRuntime := 8
	if b.cfg.quick {
		fioRuntime = 3
	}
	sizeStr := fmt.Sprint(b.cfg.size)
	for _, newTarget := range b.mountTargets(random, sparse) {
		t := newTarget()
		group := "mount/" + strings.Fields(t.name)[len(strings.Fields(t.name))-1]
		contenders := []mounter{b.snapmountMounter(), b.nbdfuseMounter()}
		trial := func(m mounter, image string, body func(mt *mounted) ([]float64, error)) func() ([]float64, error) {
			return func() ([]float64, error) {
				if canDropCaches() {
					dropCaches()
					warmImage(map[string]string{"random": random, "sparse": sparse}[image])
				}
				dir := b.newMountDir()
				mt, err := m.mount(t.uriFor(m.name, image), dir)
				if err != nil {
					os.Remove(dir)
					return nil, err
				}
				defer mt.unmount()
				return body(mt)
			}
		}
		both := func(rows []*row, image string, body func(mt *mounted) ([]float64, error)) {
			b.measureSet(rows, trial(contenders[0], image, body), trial(contenders[1], image, body))
		}

		// Sequential: cold pass on a fresh mount, second pass, ready
		// time and memory of the same mount.
		seqCold := &row{Group: group, Figure: "sequential 1 MiB reads, cold", Unit: "MB/s", Higher: true, AnchorIs: "nbdfuse", Target: ">= 1.5x"}
		seqWarm := &row{Group: group, Figure: "sequential 1 MiB reads, second pass", Unit: "MB/s", Higher: true, AnchorIs: "nbdfuse", Target: ">= 5x"}
		ready := &row{Group: group, Figure: "mount ready, background (launch to readable file)", Unit: "s", Higher: false, AnchorIs: "nbdfuse", Target: "<= 1.5x nbdfuse's time"}
		rss := &row{Group: group, Figure: "peak RSS of the mount process", Unit: "MiB", Higher: false, AnchorIs: "nbdfuse", Target: "<= 256 MiB cache + 40 MiB"}
		seq := fioJob{rw: "read", bs: "1M", engine: "psync", size: sizeStr}
		both([]*row{seqCold, seqWarm, ready, rss}, "random", func(mt *mounted) ([]float64, error) {
			r1, err := runFio(mt.file, seq)
			if err != nil {
				return nil, err
			}
			r2, err := runFio(mt.file, seq)
			if err != nil {
				return nil, err
			}
			mem, _ := mt.peakRSS()
			return []float64{r1.MBps, r2.MBps, mt.ready, mem}, nil
		})

		// Ready time as nbdfuse runs, in the foreground (the row above
		// starts a background process, which returns once the file is
		// readable and costs a second process start). Each figure is
		// the median of readySamples mounts: one mount takes tens of ms
		// and the machine's jitter is several. Unlike the row above,
		// whose mounts follow a dropped page cache (binaries and
		// libraries read from disk), these run with it warm.
		readyFg := &row{Group: group, Figure: "mount ready, foreground (-f, as nbdfuse runs)", Unit: "s", Higher: false, AnchorIs: "nbdfuse", Target: "<= 1.5x nbdfuse's time"}
		readyOf := func(m mounter) func() (float64, error) {
			return func() (float64, error) {
				var times []float64
				for range readySamples {
					dir := b.newMountDir()
					mt, err := m.mount(t.uriFor(m.name, "random"), dir)
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
		b.measure(readyFg, readyOf(b.snapmountForegroundMounter()), readyOf(contenders[1]))

		// The same cold and second-pass figures against the physical
		// references: nbdcopy from the same server, the raw image in
		// the page cache.
		vsCopy := &row{Group: group, Figure: "sequential cold, vs nbdcopy from the server", Unit: "MB/s", Higher: true, AnchorIs: "nbdcopy", Target: ">= 0.9x", Ours: seqCold.Ours}
		vsRaw := &row{Group: group, Figure: "second pass, vs raw image in the page cache", Unit: "MB/s", Higher: true, AnchorIs: "raw file", Target: ">= 0.5x", Ours: seqWarm.Ours}
		for i := 0; i < b.cfg.runs; i++ {
			uri := t.uriFor("nbdfuse", "random") // a read-only view for any client
			secs, err := timed("nbdcopy", "-C", "4", uri, "null:")
			if v, err := throughput(b.cfg.size, secs, err); err == nil {
				vsCopy.Anchor = append(vsCopy.Anchor, v)
			} else {
				b.logf("nbdcopy: %v", err)
			}
			warmImage(random)
			if r, err := runFio(random, seq); err == nil {
				vsRaw.Anchor = append(vsRaw.Anchor, r.MBps)
			}
		}
		b.rows = append(b.rows, vsCopy, vsRaw)

		// Random 4 KiB reads: O_DIRECT, so the kernel page cache does not
		// answer for either contender.
		rand1 := &row{Group: group, Figure: "4 KiB random reads, iodepth 1 (psync)", Unit: "IOPS", Higher: true, AnchorIs: "nbdfuse", Target: ">= 1.2x"}
		rand16 := &row{Group: group, Figure: "4 KiB random reads, iodepth 16 (libaio)", Unit: "IOPS", Higher: true, AnchorIs: "nbdfuse", Target: ">= 1.5x"}
		rand4j := &row{Group: group, Figure: "4 KiB random reads, 4 jobs (psync)", Unit: "IOPS", Higher: true, AnchorIs: "nbdfuse", Target: ">= 1.5x"}
		both([]*row{rand1, rand16, rand4j}, "random", func(mt *mounted) ([]float64, error) {
			var out []float64
			for _, j := range []fioJob{
				{rw: "randread", bs: "4k", engine: "psync", direct: true, runtime: fioRuntime},
				{rw: "randread", bs: "4k", engine: "libaio", depth: 16, direct: true, runtime: fioRuntime},
				{rw: "randread", bs: "4k", engine: "psync", jobs: 4, direct: true, runtime: fioRuntime},
			} {
				r, err := runFio(mt.file, j)
				if err != nil {
					return nil, err
				}
				out = append(out, r.IOPS)
			}
			return out, nil
		})

		// The forensic pattern: the first 64 MiB (partition tables,
		// file system headers) in 64 KiB reads, then 4096 random 4 KiB
		// reads over the whole image, as a file system walk does.
		forensic := &row{Group: group, Figure: "forensic: 64 MiB in 64 KiB, then 4096 random 4 KiB", Unit: "s", Higher: false, AnchorIs: "nbdfuse", Target: "(faster)"}
		both([]*row{forensic}, "random", func(mt *mounted) ([]float64, error) {
			r1, err := runFio(mt.file, fioJob{rw: "read", bs: "64k", engine: "psync", size: "64M"})
			if err != nil {
				return nil, err
			}
			r2, err := runFio(mt.file, fioJob{rw: "randread", bs: "4k", engine: "psync", ioSize: "16M", size: sizeStr})
			if err != nil {
				return nil, err
			}
			return []float64{r1.Secs + r2.Secs}, nil
		})

		sparseRow := &row{Group: group, Figure: "sparse image end to end (1 MiB reads)", Unit: "MB/s", Higher: true, AnchorIs: "nbdfuse", Target: ">= 10x"}
		both([]*row{sparseRow}, "sparse", func(mt *mounted) ([]float64, error) {
			r, err := runFio(mt.file, seq)
			if err != nil {
				return nil, err
			}
			return []float64{r.MBps}, nil
		})
		t.stop()
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
