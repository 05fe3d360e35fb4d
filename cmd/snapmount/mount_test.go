package main

import (
	"runtime"
	"runtime/debug"
	"testing"
)

// The mount process collects at mountGCPercent unless GOGC says otherwise.
func TestSetMountGC(t *testing.T) {
	prev := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(prev) })

	setMountGC(func(string) string { return "" })
	if got := debug.SetGCPercent(100); got != mountGCPercent {
		t.Errorf("without GOGC: GC percent %d, want %d", got, mountGCPercent)
	}
	setMountGC(func(k string) string {
		if k == "GOGC" {
			return "50"
		}
		return ""
	})
	if got := debug.SetGCPercent(100); got != 100 {
		t.Errorf("with GOGC set: GC percent changed to %d", got)
	}
}

// The mount process runs with one Go processor more than the default
// unless GOMAXPROCS says otherwise.
func TestSetMountProcs(t *testing.T) {
	prev := runtime.GOMAXPROCS(0)
	t.Cleanup(func() { runtime.GOMAXPROCS(prev) })

	if got := setMountProcs(func(string) string { return "" }); got != prev+1 || runtime.GOMAXPROCS(0) != prev+1 {
		t.Errorf("without GOMAXPROCS: %d processors (returned %d), want %d", runtime.GOMAXPROCS(0), got, prev+1)
	}
	runtime.GOMAXPROCS(prev)
	if got := setMountProcs(func(k string) string {
		if k == "GOMAXPROCS" {
			return "1"
		}
		return ""
	}); got != prev || runtime.GOMAXPROCS(0) != prev {
		t.Errorf("with GOMAXPROCS set: %d processors (returned %d), want %d unchanged", runtime.GOMAXPROCS(0), got, prev)
	}
}
