package fusefs

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"snapmount/test/testenv"
)

// Environment of the helper processes the tests start from their own binary
// (see TestMain).
const (
	helperEnv      = "SNAPMOUNT_FUSEFS_HELPER" // "mount" or "pread"
	helperDirEnv   = "SNAPMOUNT_FUSEFS_DIR"    // mount: the mountpoint
	helperSizeEnv  = "SNAPMOUNT_FUSEFS_SIZE"   // mount: file size, default 1 MiB
	helperDataEnv  = "SNAPMOUNT_FUSEFS_DATA"   // mount: "pattern" (default) or "const"
	helperImmEnv   = "SNAPMOUNT_FUSEFS_IMMUTABLE"
	helperDelayEnv = "SNAPMOUNT_FUSEFS_DELAY" // mount: latency added to every read, e.g. 200us
	helperFileEnv  = "SNAPMOUNT_FUSEFS_FILE"  // pread: the file to read
)

// TestMain lets the test binary double as the helper processes the tests
// need: a mount served by another user, and a reader that can be signalled.
//
// The "mount" helper also serves for manual measurements:
//
//	go test -c -o /tmp/fusefs.test ./fusefs
//	SNAPMOUNT_FUSEFS_HELPER=mount SNAPMOUNT_FUSEFS_DIR=/tmp/mnt \
//	  SNAPMOUNT_FUSEFS_SIZE=$((16<<30)) SNAPMOUNT_FUSEFS_DATA=const /tmp/fusefs.test &
//	dd if=/tmp/mnt/file of=/dev/null bs=1M count=1024
//	kill %1   # SIGTERM unmounts
func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "mount":
		os.Exit(helperMount())
	case "pread":
		os.Exit(helperPread())
	default:
		fmt.Fprintf(os.Stderr, "unknown %s=%q\n", helperEnv, os.Getenv(helperEnv))
		os.Exit(2)
	}
}

// helperMount mounts a file named "file" at $SNAPMOUNT_FUSEFS_DIR, prints
// "ready" once it is readable, and serves until unmounted (fusermount3 -u,
// or SIGTERM/SIGINT, which unmount).
func helperMount() int {
	dir := os.Getenv(helperDirEnv)
	size := int64(1 << 20)
	if s := os.Getenv(helperSizeEnv); s != "" {
		var err error
		if size, err = strconv.ParseInt(s, 0, 64); err != nil {
			fmt.Fprintln(os.Stderr, "bad size:", err)
			return 2
		}
	}
	var r io.ReaderAt = patternReader{}
	switch os.Getenv(helperDataEnv) {
	case "const":
		r = constReader{}
	case "copy":
		r = copyReader{}
	}
	if d := os.Getenv(helperDelayEnv); d != "" {
		delay, err := time.ParseDuration(d)
		if err != nil {
			fmt.Fprintln(os.Stderr, "bad delay:", err)
			return 2
		}
		r = slowReader{r, delay}
	}
	server, err := Mount(dir, r, Options{
		Name:      "file",
		Size:      size,
		Immutable: os.Getenv(helperImmEnv) == "1",
		FsName:    "fusefs-test-helper",
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "mount:", err)
		return 1
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sig
		if err := server.Unmount(); err != nil {
			fmt.Fprintln(os.Stderr, "unmount:", err)
		}
	}()
	fmt.Println("ready")
	server.Wait()
	return 0
}

// helperPread opens $SNAPMOUNT_FUSEFS_FILE with O_DIRECT (so the read is a
// synchronous FUSE request the kernel can interrupt), prints "tid N" (the
// thread that will block, for tgkill), then reads 4 KiB at offset 0 and
// prints "result OK n", "result EINTR" or "result ERR e". SIGUSR1 is caught,
// so it interrupts the read without killing the process.
func helperPread() int {
	runtime.LockOSThread()
	signal.Notify(make(chan os.Signal, 1), syscall.SIGUSR1)
	fd, err := unix.Open(os.Getenv(helperFileEnv), unix.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		fmt.Println("open:", err)
		return 1
	}
	buf := testenv.AlignedBuf(4096)
	fmt.Printf("tid %d\n", unix.Gettid())
	n, err := unix.Pread(fd, buf, 0)
	switch {
	case err == nil:
		fmt.Printf("result OK %d\n", n)
	case err == unix.EINTR:
		fmt.Println("result EINTR")
	default:
		fmt.Printf("result ERR %v\n", err)
	}
	return 0
}

// helperCmd returns a command running this test binary (or the copy at bin)
// as the named helper.
func helperCmd(bin, helper string, env ...string) *exec.Cmd {
	cmd := exec.Command(bin)
	// A race-enabled binary sleeps a second before exiting, unless told not to.
	gorace := strings.TrimSpace(os.Getenv("GORACE") + " atexit_sleep_ms=0")
	cmd.Env = append(os.Environ(), helperEnv+"="+helper, "GORACE="+gorace)
	cmd.Env = append(cmd.Env, env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd
}

// lineWriter collects a helper's stdout line by line. Set it as cmd.Stdout
// (not StdoutPipe: Wait closes that pipe as soon as the process exits, and
// a last line not yet read is lost) and call done once Wait has returned.
type lineWriter struct {
	lines chan string

	mu      sync.Mutex // protects following
	partial []byte
}

func newLineWriter() *lineWriter {
	return &lineWriter{lines: make(chan string, 64)}
}

func (w *lineWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.partial = append(w.partial, p...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			return len(p), nil
		}
		select {
		case w.lines <- string(w.partial[:i]):
		default: // nobody reads that much; drop
		}
		w.partial = w.partial[i+1:]
	}
}

// done says the process has exited and all its output was written.
func (w *lineWriter) done() { close(w.lines) }

// next returns the next line; ok is false if the process ended first. It
// fails the test after timeout.
func (w *lineWriter) next(t testing.TB, timeout time.Duration) (line string, ok bool) {
	t.Helper()
	select {
	case line, ok = <-w.lines:
		return line, ok
	case <-time.After(timeout):
		t.Fatalf("no output from helper within %v", timeout)
	}
	return "", false
}

// patternByte is the content of the test files at offset off: it changes
// with every byte and does not repeat with any small period, so a byte read
// from the wrong offset shows.
func patternByte(off int64) byte {
	x := uint64(off)
	x ^= x >> 29
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 32
	return byte(x)
}

func patternBytes(off int64, n int) []byte {
	p := make([]byte, n)
	fillPattern(p, off)
	return p
}

func fillPattern(p []byte, off int64) {
	for i := range p {
		p[i] = patternByte(off + int64(i))
	}
}

// patternReader is an endless file of patternByte.
type patternReader struct{}

func (patternReader) ReadAt(p []byte, off int64) (int, error) {
	fillPattern(p, off)
	return len(p), nil
}

// constReader returns whatever is in the buffer: a reader with no cost, to
// measure the FUSE layer alone.
type constReader struct{}

func (constReader) ReadAt(p []byte, off int64) (int, error) { return len(p), nil }

// copyReader copies from a 1 MiB buffer of pattern bytes, so a read costs
// what a cache hit costs: one memmove.
type copyReader struct{}

var copySource = patternBytes(0, 1<<20)

func (copyReader) ReadAt(p []byte, off int64) (int, error) {
	for n := 0; n < len(p); {
		n += copy(p[n:], copySource[(off+int64(n))%int64(len(copySource)):])
	}
	return len(p), nil
}

// slowReader adds a fixed latency to every read, like a network round trip.
type slowReader struct {
	r     io.ReaderAt
	delay time.Duration
}

func (s slowReader) ReadAt(p []byte, off int64) (int, error) {
	time.Sleep(s.delay)
	return s.r.ReadAt(p, off)
}

// countingReader records every request made to the reader it wraps.
type countingReader struct {
	r io.ReaderAt

	mu    sync.Mutex // protects following
	sizes []int      // length of each request, in order of arrival
	bytes int64
}

func (c *countingReader) ReadAt(p []byte, off int64) (int, error) {
	c.mu.Lock()
	c.sizes = append(c.sizes, len(p))
	c.bytes += int64(len(p))
	c.mu.Unlock()
	return c.r.ReadAt(p, off)
}

// stats returns the number of requests, the bytes asked for and the largest
// request so far.
func (c *countingReader) stats() (requests int, bytes int64, largest int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.sizes), c.bytes, slices.Max(append([]int{0}, c.sizes...))
}

// extent is a range of data in a sparseReader.
type extent struct{ off, len int64 }

// sparseReader is a file of the given size whose data (patternByte) lies in
// sorted extents; everything else is a hole of zeros. It answers SEEK_DATA
// and SEEK_HOLE like an NBD allocation map would.
type sparseReader struct {
	size int64
	data []extent
}

func (s *sparseReader) ReadAt(p []byte, off int64) (int, error) {
	for i := range p {
		o := off + int64(i)
		p[i] = 0
		for _, e := range s.data {
			if o >= e.off && o < e.off+e.len {
				p[i] = patternByte(o)
			}
		}
	}
	return len(p), nil
}

func (s *sparseReader) SeekData(ctx context.Context, off int64) (int64, error) {
	for _, e := range s.data {
		if off < e.off+e.len {
			return max(off, e.off), nil
		}
	}
	return 0, fmt.Errorf("sparse: no data after %d: %w", off, syscall.ENXIO)
}

func (s *sparseReader) SeekHole(ctx context.Context, off int64) (int64, error) {
	for _, e := range s.data {
		if off < e.off {
			return off, nil
		}
		if off < e.off+e.len {
			off = e.off + e.len
		}
	}
	return min(off, s.size), nil
}

// mountEntry is a line of /proc/self/mounts.
type mountEntry struct {
	source, dir, fstype string
	options             []string
}

// findMount returns the /proc/self/mounts entry for dir, if any.
func findMount(t testing.TB, dir string) (mountEntry, bool) {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(data)) {
		f := strings.Fields(line)
		if len(f) < 4 || unescapeOctal(f[1]) != dir {
			continue
		}
		return mountEntry{unescapeOctal(f[0]), unescapeOctal(f[1]), f[2], strings.Split(f[3], ",")}, true
	}
	return mountEntry{}, false
}
