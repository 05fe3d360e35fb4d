package main

import (
	"runtime"
	"runtime/debug"
	"testing"
)

// The mount process collects at mountGCPercent and runs with one Go
// processor more than the default, unless GOGC or GOMAXPROCS say
// otherwise.
func TestTuneMountRuntime(t *testing.T) {
	prevGC := debug.SetGCPercent(100)
	prevProcs := runtime.GOMAXPROCS(0)
	t.Cleanup(func() {
		debug.SetGCPercent(prevGC)
		runtime.GOMAXPROCS(prevProcs)
	})

	got := tuneMountRuntime(func(string) string { return "" })
	if gc := debug.SetGCPercent(100); gc != mountGCPercent {
		t.Errorf("without GOGC: GC percent %d, want %d", gc, mountGCPercent)
	}
	if got != prevProcs+1 || runtime.GOMAXPROCS(0) != prevProcs+1 {
		t.Errorf("without GOMAXPROCS: %d processors (returned %d), want %d", runtime.GOMAXPROCS(0), got, prevProcs+1)
	}

	runtime.GOMAXPROCS(prevProcs)
	got = tuneMountRuntime(func(k string) string {
		switch k {
		case "GOGC":
			return "50"
		case "GOMAXPROCS":
			return "1"
		}
		return ""
	})
	if gc := debug.SetGCPercent(100); gc != 100 {
		t.Errorf("with GOGC set: GC percent changed to %d", gc)
	}
	if got != prevProcs || runtime.GOMAXPROCS(0) != prevProcs {
		t.Errorf("with GOMAXPROCS set: %d processors (returned %d), want %d unchanged", runtime.GOMAXPROCS(0), got, prevProcs)
	}
}
