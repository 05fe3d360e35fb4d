package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// snapmountBin is the binary built once for the whole suite.
var snapmountBin string

// defaultProcs is a Go program's GOMAXPROCS on this machine, taken before
// testing's -cpu flag can change this process's.
var defaultProcs = runtime.GOMAXPROCS(0)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "snapmount-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "test: mkdtemp:", err)
		os.Exit(1)
	}
	snapmountBin = filepath.Join(dir, "snapmount")
	args := []string{"build", "-o", snapmountBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	build := exec.Command("go", append(args, "../cmd/snapmount")...)
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "test: building snapmount:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	// A race-built child sleeps a second at exit so that goroutines still
	// running can report; the suite's children end hundreds of times.
	os.Setenv("GORACE", strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
