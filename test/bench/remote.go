package main

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"time"
)

// remoteDelay is what nbdkit's delay filter adds to every read in the
// remote group: a server across a network, not on the same machine.
const remoteDelay = "2ms"

// Walk image: an ext4 file system of walkFiles small files in
// walkDirs*walkSubdirs directories, as a file system walk meets them.
const (
	walkDirs    = 50
	walkSubdirs = 4
	walkFiles   = 4000
	walkSize    = "128M"
)

// remoteGroup: the mounts against nbdkit with every read delayed by
// remoteDelay, as each identity: where round trips cost more than CPU,
// a cache and parallel requests should show.
func (b *bench) remoteGroup() {
	random := b.randomImage("random.img")
	walk := b.walkImage("walk.img")
	images := map[string]string{"random": random, "walk": walk}
	delayed := func(image string) *daemon {
		return b.nbdkitWith(image, []string{"-r", "--filter=delay"}, []string{"rdelay=" + remoteDelay})
	}
	t := nbdkitTarget("nbdkit --filter=delay rdelay="+remoteDelay, "remote", map[string]*daemon{
		"random": delayed(random), "walk": delayed(walk),
	})
	defer t.stop()
	for _, id := range b.ids {
		b.newMountRun(t, id, "remote", images).remoteRows()
	}
}

func (r *mountRun) remoteRows() {
	// A cold sequential read of the first 256 MiB (each read of it
	// waits remoteDelay: a whole image would take long).
	seq := r.row("sequential 1 MiB reads of 256 MiB, cold", "MB/s", true, ">= 3x")
	r.measure([]*row{seq}, "random", func(mt *mounted) ([]float64, error) {
		res, err := r.fio(mt, fioJob{rw: "read", bs: "1M", engine: "psync", size: "256M"})
		if err != nil {
			return nil, err
		}
		return []float64{res.MBps}, nil
	}, r.snap, r.nbdfuse)

	r.forensic(1024, "(faster)", "<= 0.5x nbdfuse's time")
	r.coldRandom([]bool{true}, map[int]coldSpec{
		1:  {1000, "~1.0x (one round trip each)", "~1.0x", ""},
		16: {coldReads, "(faster)", ">= 1.0x", ""},
	})

	walk := withNoCache(r.row(fmt.Sprintf("file system walk: fls -r, ext4 of %d files", walkFiles), "s", false, "<= 0.5x nbdfuse's time"), "")
	r.measure([]*row{walk}, "walk", func(mt *mounted) ([]float64, error) {
		secs, lines, err := r.fls(mt.file)
		if err != nil {
			return nil, err
		}
		if lines < walkFiles {
			return nil, fmt.Errorf("fls -r listed %d entries, the file system has %d files", lines, walkFiles)
		}
		return []float64{secs}, nil
	}, r.snap, r.nbdfuse, r.noCache)
}

// fls lists every file of the file system in file (fls -r, sleuthkit) as
// the run's identity, and returns its wall time and how many entries it
// listed.
func (r *mountRun) fls(file string) (secs float64, lines int, err error) {
	cmd := r.id.command("fls", "-r", file)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, 0, fmt.Errorf("fls -r %s: %v: %s", file, err, errb.String())
	}
	return time.Since(start).Seconds(), bytes.Count(out.Bytes(), []byte("\n")), nil
}

// walkImage returns the path of an ext4 image in the work directory made
// by mkfs.ext4 -d from a tree of walkFiles small files of random bytes
// (512 B to 16 KiB), made once per run.
func (b *bench) walkImage(name string) string {
	path := filepath.Join(b.cfg.dir, name)
	if _, err := os.Stat(path); err == nil {
		return path
	}
	tree, err := os.MkdirTemp(b.cfg.dir, "walk-tree-")
	if err != nil {
		fatalf("%v", err)
	}
	defer os.RemoveAll(tree)
	rnd := rand.New(rand.NewSource(7))
	buf := make([]byte, 16<<10)
	perDir := walkFiles / (walkDirs * walkSubdirs)
	for d := range walkDirs {
		for s := range walkSubdirs {
			dir := filepath.Join(tree, fmt.Sprintf("d%02d", d), fmt.Sprintf("s%d", s))
			if err := os.MkdirAll(dir, 0o755); err != nil {
				fatalf("%v", err)
			}
			for f := range perDir {
				data := buf[:512+rnd.Intn(len(buf)-512)]
				rnd.Read(data)
				if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%03d", f)), data, 0o644); err != nil {
					fatalf("%v", err)
				}
			}
		}
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-d", tree, path, walkSize).CombinedOutput(); err != nil {
		os.Remove(path)
		fatalf("mkfs.ext4 -d: %v: %s", err, out)
	}
	return path
}
