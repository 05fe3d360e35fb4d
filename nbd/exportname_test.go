package nbd

import (
	"bytes"
	"testing"
)

func TestParseExportName(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want ExportName
		bad  bool
	}{
		{"disk", ExportName{Base: "disk"}, false},
		{"", ExportName{}, false},
		{"disk@snapshot", ExportName{Base: "disk", View: ViewNewSnapshot}, false},
		{"disk@live", ExportName{Base: "disk", View: ViewLive}, false},
		{"disk@s7", ExportName{Base: "disk", View: ViewJoinSnapshot, Snapshot: 7}, false},
		{"disk@s123456789", ExportName{Base: "disk", View: ViewJoinSnapshot, Snapshot: 123456789}, false},
		{"disk@s0", ExportName{}, true},
		{"disk@s07", ExportName{}, true},
		{"disk@s", ExportName{}, true},
		{"disk@s-1", ExportName{}, true},
		{"disk@s99999999999999999999999", ExportName{}, true},
		{"disk@", ExportName{}, true},
		{"disk@snap", ExportName{}, true},
		{"disk@live@live", ExportName{}, true},
	} {
		got, err := ParseExportName(tc.in)
		if (err != nil) != tc.bad {
			t.Errorf("ParseExportName(%q) error %v, want error %v", tc.in, err, tc.bad)
			continue
		}
		if !tc.bad && got != tc.want {
			t.Errorf("ParseExportName(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

// Only a snapmount server's snapshot (the promise taken, NAME@sN) is one:
// not live views, not a stock server's export that happens to be called
// x@s1.
func TestSnapmountSnapshot(t *testing.T) {
	for _, tc := range []struct {
		canonical string
		promise   bool
		want      bool
	}{
		{"disk@s7", true, true},
		{"x@s1", false, false},
		{"disk@live", true, false},
		{"disk", true, false},
		{"disk@snapshot", true, false},
		{"disk@s0", true, false},
		{"", true, false},
	} {
		info := &ExportInfo{CanonicalName: tc.canonical, Promise: tc.promise}
		if got := info.SnapmountSnapshot(); got != tc.want {
			t.Errorf("SnapmountSnapshot(%q, promise %v) = %v, want %v", tc.canonical, tc.promise, got, tc.want)
		}
	}
}

// FuzzParseExportName: the export-name parser never panics and what it
// accepts names a base without '@'.
func FuzzParseExportName(f *testing.F) {
	for _, s := range []string{"disk", "disk@snapshot", "disk@s1", "disk@live", "@", "a@s0", "a@s18446744073709551616"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		ref, err := ParseExportName(name)
		if err == nil && bytes.ContainsRune([]byte(ref.Base), '@') {
			t.Errorf("ParseExportName(%q) accepted base %q", name, ref.Base)
		}
		if err == nil && ref.View == ViewJoinSnapshot && ref.Snapshot == 0 {
			t.Errorf("ParseExportName(%q) accepted snapshot 0", name)
		}
	})
}
