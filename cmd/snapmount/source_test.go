package main

import (
	"testing"

	"snapmount/nbd"
)

// Only a snapmount server's snapshot (the promise taken, NAME@sN) is
// frozen; live views and other servers' names are not.
func TestIsFrozen(t *testing.T) {
	for _, tc := range []struct {
		canonical string
		promise   bool
		want      bool
	}{
		{"disk@s7", true, true},
		{"disk@s7", false, false},
		{"disk@live", true, false},
		{"disk", true, false},
		{"disk@snapshot", true, false},
		{"disk@s0", true, false},
		{"", true, false},
	} {
		info := &nbd.ExportInfo{CanonicalName: tc.canonical, Promise: tc.promise}
		if got := isFrozen(info); got != tc.want {
			t.Errorf("isFrozen(%q, promise %v) = %v, want %v", tc.canonical, tc.promise, got, tc.want)
		}
	}
}

func TestFileName(t *testing.T) {
	for export, want := range map[string]string{
		"disk":          "disk",
		"disk@snapshot": "disk",
		"disk@s12":      "disk",
		"disk@live":     "disk",
		"":              "nbd",
		"@snapshot":     "nbd",
		"/images/vm1/":  "vm1",
		"a@b":           "a@b", // not snapmount's grammar: kept whole
	} {
		if got := fileName(export); got != want {
			t.Errorf("fileName(%q) = %q, want %q", export, got, want)
		}
	}
}
