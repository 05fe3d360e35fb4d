package main

import (
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
