// Command bench measures snapmount against its anchors (nbdfuse,
// nbdcopy, nbdkit) on this machine, in one run, alternating the
// contenders so drift hits both alike, and prints a table of medians with
// the ratio snapmount / anchor for each figure (also written as JSON).
//
//	go run ./test/bench [--quick] [--runs N] [--only GROUP,...] [--as user,root] [--json FILE]
//
// Mounts are measured twice where the benchmark runs as root: as an
// ordinary user it creates for the run (the kernel's 128 KiB readahead,
// fusermount3, /dev/fuse mode 0666 as desktops ship it) and as root.
//
// It expects bin/snapmount (make bench builds it) and the peers
// (nbdkit, libnbd-bin, fio, sleuthkit, e2fsprogs). Speed is only ever
// judged here, never by timed assertions in tests.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"
)

type config struct {
	quick   bool
	runs    int
	size    int64 // bytes of each image
	dir     string
	bin     string
	only    map[string]bool
	as      map[string]bool // identities that run the mounts: "user", "root"
	jsonOut string
	verbose bool
}

// row is one figure of the table.
type row struct {
	Group    string    `json:"group"`
	Figure   string    `json:"figure"`
	Unit     string    `json:"unit"` // "MB/s", "IOPS", "s", "MiB"
	Higher   bool      `json:"higher_is_better"`
	Ours     []float64 `json:"snapmount"`
	Anchor   []float64 `json:"anchor"`
	AnchorIs string    `json:"anchor_name"`
	Target   string    `json:"target"`
	Note     string    `json:"note,omitempty"`
	// Alt is a third contender, another build or mode of snapmount
	// (snapmount mount --no-cache), measured in the same alternation.
	Alt       []float64 `json:"alt,omitempty"`
	AltIs     string    `json:"alt_name,omitempty"`
	AltTarget string    `json:"alt_target,omitempty"`
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// ratio is snapmount / anchor for higher-is-better figures, and anchor /
// snapmount for lower-is-better ones, so > 1 always means snapmount wins.
func (r *row) ratio() float64 { return r.ratioTo(r.Anchor) }

// ratioTo is ratio against another contender's values.
func (r *row) ratioTo(other []float64) float64 {
	o, a := median(r.Ours), median(other)
	if o == 0 || a == 0 {
		return 0
	}
	if r.Higher {
		return o / a
	}
	return a / o
}

type bench struct {
	cfg  config
	rows []*row
	log  io.Writer
	// ids are who the mount groups run as, the ordinary user first.
	ids []*identity
}

func main() {
	var cfg config
	var only string
	flag.BoolVar(&cfg.quick, "quick", false, "one run on 256 MiB images")
	flag.IntVar(&cfg.runs, "runs", 3, "repetitions of each figure (median reported)")
	flag.StringVar(&cfg.dir, "dir", "", "work directory for images and sockets (default: a new temp dir)")
	flag.StringVar(&cfg.bin, "bin", "bin/snapmount", "the snapmount binary")
	flag.StringVar(&only, "only", "", "comma-separated groups to run: copy, serve, mount, remote (default all)")
	var as string
	flag.StringVar(&as, "as", "user,root", "who runs the mounts: user (an ordinary user made for the run), root, or both")
	flag.StringVar(&cfg.jsonOut, "json", "bench.json", "write the results as JSON here ('' to skip)")
	flag.BoolVar(&cfg.verbose, "v", false, "print every measurement")
	flag.Parse()
	cfg.size = 1 << 30
	if cfg.quick {
		cfg.runs, cfg.size = 1, 256<<20
	}
	cfg.only, cfg.as = commaSet(only), commaSet(as)
	var err error
	if cfg.bin, err = filepath.Abs(cfg.bin); err != nil {
		fatalf("%v", err)
	}
	if _, err := os.Stat(cfg.bin); err != nil {
		fatalf("%s not found: run 'make build' first", cfg.bin)
	}
	for _, tool := range []string{"nbdkit", "nbdcopy", "nbdfuse", "fio", "fls", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			fatalf("%s is not installed; run: sudo apt-get install -y nbdkit libnbd-bin fio sleuthkit e2fsprogs", tool)
		}
	}
	if cfg.dir == "" {
		// Images go next to the repository's disk, not into a tmpfs.
		if cfg.dir, err = os.MkdirTemp("", "snapmount-bench-"); err != nil {
			fatalf("%v", err)
		}
		defer os.RemoveAll(cfg.dir)
	}
	b := &bench{cfg: cfg, log: os.Stderr}
	b.describeMachine()
	groups := []struct {
		name   string
		run    func()
		mounts bool // runs once per identity
	}{
		{"copy", b.copyGroup, false},
		{"serve", b.serveGroup, false},
		{"mount", b.mountGroup, true},
		{"remote", b.remoteGroup, true},
	}
	wanted := func(name string) bool { return len(cfg.only) == 0 || cfg.only[name] }
	for _, g := range groups {
		if g.mounts && wanted(g.name) && b.ids == nil {
			cleanup := b.setupIdentities()
			defer cleanup()
		}
	}
	for _, g := range groups {
		if wanted(g.name) {
			g.run()
		}
	}
	b.printTable(os.Stdout)
	if cfg.jsonOut != "" {
		out, _ := json.MarshalIndent(b.rows, "", "  ")
		if err := os.WriteFile(cfg.jsonOut, out, 0o644); err != nil {
			fatalf("writing %s: %v", cfg.jsonOut, err)
		}
		fmt.Fprintf(os.Stderr, "results written to %s\n", cfg.jsonOut)
	}
}

// commaSet splits a comma-separated list into a set.
func commaSet(list string) map[string]bool {
	set := map[string]bool{}
	for _, v := range strings.Split(list, ",") {
		if v = strings.TrimSpace(v); v != "" {
			set[v] = true
		}
	}
	return set
}

// atExit holds what must be undone however the benchmark ends (the
// user it made, /dev/fuse's mode); fatalf and a signal run it too.
var atExit []func()

func runAtExit() {
	for i := len(atExit) - 1; i >= 0; i-- {
		atExit[i]()
	}
	atExit = nil
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench: "+format+"\n", args...)
	runAtExit()
	os.Exit(1)
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.log, format+"\n", args...)
}

func (b *bench) describeMachine() {
	cpu := "?"
	if data, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(data), "\n") {
			if strings.HasPrefix(l, "model name") {
				cpu = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	var u syscall.Utsname
	_ = syscall.Uname(&u)
	rel := utsString(u.Release[:])
	b.logf("machine: %s, %d CPUs, kernel %s; images of %d MiB, %d run(s) per figure", cpu, numCPU(), rel, b.cfg.size>>20, b.cfg.runs)
	if !canDropCaches() {
		b.logf("note: cannot drop the page cache here (not root): cold figures are measured warm on the server side")
	}
}

func utsString(c []int8) string {
	var s []byte
	for _, x := range c {
		if x == 0 {
			break
		}
		s = append(s, byte(x))
	}
	return string(s)
}

func numCPU() int {
	data, _ := os.ReadFile("/proc/cpuinfo")
	return strings.Count(string(data), "processor\t:")
}

func canDropCaches() bool {
	f, err := os.OpenFile("/proc/sys/vm/drop_caches", os.O_WRONLY, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}

// dropCaches empties the page cache (root only): a cold read then really
// comes from the server's disk.
func dropCaches() {
	syscall.Sync()
	_ = os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0)
}

// measure runs each contender cfg.runs times, alternating, and records
// the values: measureSet for a single row.
func (b *bench) measure(r *row, sides ...func() (float64, error)) {
	fns := make([]func() ([]float64, error), len(sides))
	for i, fn := range sides {
		if fn == nil {
			continue
		}
		fns[i] = func() ([]float64, error) {
			v, err := fn()
			return []float64{v}, err
		}
	}
	b.measureSet([]*row{r}, fns...)
}

// measureSet runs a trial per contender, alternating, cfg.runs times; a
// trial returns one value per row (negative: none). The contenders are
// snapmount, the rows' anchor and, if given, the rows' Alt; the order
// within a round rotates, so that no contender always comes first after
// a pause or last before one.
func (b *bench) measureSet(rows []*row, sides ...func() ([]float64, error)) {
	for i := 0; i < b.cfg.runs; i++ {
		for k := range sides {
			side := (i + k) % len(sides)
			fn := sides[side]
			if fn == nil {
				continue
			}
			vals, err := fn()
			if err != nil {
				b.logf("%s / %s (%s): %v", rows[0].Figure, rows[0].contender(side), rows[0].Group, err)
				continue
			}
			for k, r := range rows {
				if k >= len(vals) || vals[k] < 0 {
					continue
				}
				switch side {
				case 0:
					r.Ours = append(r.Ours, vals[k])
				case 1:
					r.Anchor = append(r.Anchor, vals[k])
				default:
					r.Alt = append(r.Alt, vals[k])
				}
				if b.cfg.verbose {
					b.logf("  %-52s %-20s %10.1f %s", r.Figure, r.contender(side), vals[k], r.Unit)
				}
			}
		}
	}
	b.rows = append(b.rows, rows...)
}

// contender names side 0 (snapmount) or 1 (the row's anchor).
func (r *row) contender(side int) string {
	switch side {
	case 0:
		return "snapmount"
	case 1:
		return r.AnchorIs
	}
	return r.AltIs
}

func (b *bench) printTable(w io.Writer) {
	const line = "%-19s %-52s %10s %10s %-12s %7s  %s\n"
	fmt.Fprintf(w, "\n"+line, "group", "figure", "snapmount", "anchor", "(anchor)", "ratio", "target")
	for _, r := range b.rows {
		fmt.Fprintf(w, line, r.Group, r.Figure+" ("+r.Unit+")",
			fmtVal(r.Ours), fmtVal(r.Anchor), r.AnchorIs, fmtRatio(r.ratio()), r.Target)
		if r.AltIs != "" {
			fmt.Fprintf(w, line, "", "  the same, against "+r.AltIs, "", fmtVal(r.Alt), r.AltIs, fmtRatio(r.ratioTo(r.Alt)), r.AltTarget)
		}
		if r.Note != "" {
			fmt.Fprintf(w, "%-19s   note: %s\n", "", r.Note)
		}
	}
	fmt.Fprintln(w, "\nratio > 1 means snapmount is better (faster, or smaller for time and memory); medians of alternated runs.")
}

func fmtVal(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	m := median(v)
	if m >= 100 {
		return fmt.Sprintf("%.0f", m)
	}
	return fmt.Sprintf("%.3g", m)
}

func fmtRatio(x float64) string {
	if x == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", x)
}

// ---- images and servers ----

// randomImage writes size bytes of pseudo-random (incompressible) data.
func (b *bench) randomImage(name string) string {
	return b.image(name, func(f *os.File) error {
		buf := make([]byte, 4<<20)
		r := rand.New(rand.NewSource(42))
		for off := int64(0); off < b.cfg.size; off += int64(len(buf)) {
			r.Read(buf)
			if _, err := f.Write(buf[:min(int64(len(buf)), b.cfg.size-off)]); err != nil {
				return err
			}
		}
		return nil
	})
}

// image returns the path of image name in the work directory, made by
// fill unless a file of the right size is there from an earlier group.
func (b *bench) image(name string, fill func(f *os.File) error) string {
	path := filepath.Join(b.cfg.dir, name)
	if st, err := os.Stat(path); err == nil && st.Size() == b.cfg.size {
		return path
	}
	f, err := os.Create(path)
	if err != nil {
		fatalf("%v", err)
	}
	defer f.Close()
	if err := fill(f); err != nil {
		fatalf("writing %s: %v", path, err)
	}
	return path
}

// daemon is a server started for the benchmark, ended by its PID.
type daemon struct {
	cmd  *exec.Cmd
	out  bytes.Buffer
	sock string
}

func (b *bench) start(sock string, name string, args ...string) *daemon {
	d := &daemon{sock: sock}
	d.cmd = exec.Command(name, args...)
	d.cmd.Stdout, d.cmd.Stderr = &d.out, &d.out
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := d.cmd.Start(); err != nil {
		fatalf("starting %s: %v", name, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			// The ordinary user's mounts connect too.
			if err := os.Chmod(sock, 0o666); err != nil {
				fatalf("%v", err)
			}
			return d
		}
		if time.Now().After(deadline) {
			fatalf("%s never listened on %s: %s", name, sock, d.out.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func (d *daemon) stop() {
	_ = d.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = d.cmd.Process.Kill()
		<-done
	}
	os.Remove(d.sock)
}

func (b *bench) nbdkit(image string, extra ...string) *daemon {
	return b.nbdkitWith(image, extra, nil)
}

// nbdkitWith starts nbdkit's file plugin on image with options (before the
// plugin: -r, --filter=...) and parameters (after it: filters' settings).
func (b *bench) nbdkitWith(image string, options, params []string) *daemon {
	sock := filepath.Join(b.cfg.dir, fmt.Sprintf("nbdkit-%d.sock", time.Now().UnixNano()))
	args := append([]string{"-f", "-U", sock}, options...)
	args = append(args, "file", image)
	return b.start(sock, "nbdkit", append(args, params...)...)
}

func unixURI(export, sock string) string { return "nbd+unix:///" + export + "?socket=" + sock }

// timed runs a command and returns its wall time in seconds.
func timed(name string, args ...string) (float64, error) {
	cmd := exec.Command(name, args...)
	var errb bytes.Buffer
	cmd.Stderr = &errb
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return time.Since(start).Seconds(), nil
}

// throughput converts a run over n bytes into MB/s.
func throughput(n int64, secs float64, err error) (float64, error) {
	if err != nil {
		return 0, err
	}
	if secs <= 0 {
		return 0, errors.New("no time measured")
	}
	return float64(n) / secs / 1e6, nil
}
