package main

import (
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		bad  bool
	}{
		{"0", 0, false},
		{"4096", 4096, false},
		{"64K", 64 << 10, false},
		{"512M", 512 << 20, false},
		{"4G", 4 << 30, false},
		{"1T", 1 << 40, false},
		{"4GiB", 4 << 30, false},
		{"16mb", 16 << 20, false},
		{"", 0, true},
		{"-1", 0, true},
		{"1.5G", 0, true},
		{"G", 0, true},
		{"99999999999T", 0, true},
	} {
		got, err := parseSize(tc.in)
		if (err != nil) != tc.bad || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.bad)
		}
	}
}

func TestSizes(t *testing.T) {
	for in, want := range map[string]int64{"4096": 4096, "64K": 64 << 10, "256M": 256 << 20, "1G": 1 << 30, "2GiB": 2 << 30, "1t": 1 << 40, "0": 0} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1", "1.5G", "12Q", "99999999999T"} {
		if _, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) accepted", in)
		}
	}
	for n, want := range map[uint64]string{0: "0", 512: "512", 1 << 20: "1M", 64 << 20: "64M", 3 << 30: "3G", 1536: "1.5K", 1<<30 + 1: "1G"} {
		if got := humanSize(n); got != want {
			t.Errorf("humanSize(%d) = %q, want %q", n, got, want)
		}
	}
}
