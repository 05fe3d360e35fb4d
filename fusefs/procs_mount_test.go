package fusefs

import (
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"snapmount/test/testenv"
)

// gateReader holds every read until gate is closed, and says on entered
// when one has arrived.
type gateReader struct {
	entered chan struct{}
	gate    chan struct{}
}

func (g gateReader) ReadAt(p []byte, off int64) (int, error) {
	g.entered <- struct{}{}
	<-g.gate
	return patternReader{}.ReadAt(p, off)
}

// waitProcs polls until GOMAXPROCS is want.
func waitProcs(t *testing.T, want int, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.GOMAXPROCS(0) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s: GOMAXPROCS is %d, want %d", what, runtime.GOMAXPROCS(0), want)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// A mount with SerialProcs runs the process with one Go processor while
// reads come one at a time, with all of them while two overlap, and gives
// them back when it is unmounted.
func TestSerialProcsOnMount(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("SerialProcs applies only where the mount can raise the kernel's readahead window: root")
	}
	before := runtime.GOMAXPROCS(0)
	full := max(before, 2)
	runtime.GOMAXPROCS(full)
	// Registered first, so it runs after the unmount below.
	t.Cleanup(func() {
		waitProcs(t, full, "after unmount")
		runtime.GOMAXPROCS(before)
	})
	r := gateReader{entered: make(chan struct{}, 2), gate: make(chan struct{})}
	dir := testMount(t, r, Options{Name: "disk", Size: 1 << 20, SerialProcs: true})
	waitProcs(t, 1, "with no reads")

	f, err := os.OpenFile(filepath.Join(dir, "disk"), os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	errs := make(chan error, 2)
	for i := range 2 {
		go func() {
			_, err := f.ReadAt(testenv.AlignedBuf(4096), int64(i)*65536)
			errs <- err
		}()
	}
	<-r.entered
	<-r.entered
	waitProcs(t, full, "with two reads in flight")
	close(r.gate)
	for range 2 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	waitProcs(t, 1, "after the reads")
}
