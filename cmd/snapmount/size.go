package main

// Byte sizes on the command line: parsing, printing and the flag type.

import (
	"fmt"
	"strconv"
	"strings"
)

// parseSize parses a byte count with an optional binary suffix: 4096,
// 64K, 512M, 4G, 1T (also KiB, MB, ...: all powers of 1024).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(strings.ToUpper(s))
	t = strings.TrimSuffix(strings.TrimSuffix(t, "B"), "I")
	shift := 0
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'K':
			shift = 10
		case 'M':
			shift = 20
		case 'G':
			shift = 30
		case 'T':
			shift = 40
		}
		if shift > 0 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v < 0 || v > (1<<62)>>shift {
		return 0, fmt.Errorf("%q is not a size (want bytes, or a number with K, M, G or T)", s)
	}
	return v << shift, nil
}

// humanSize prints a byte count the way nbdinfo does: with the largest
// binary unit that divides it exactly, else with one decimal.
func humanSize(n uint64) string {
	units := []string{"", "K", "M", "G", "T", "P", "E"}
	i := 0
	for i < len(units)-1 && n >= 1024 && n%1024 == 0 {
		n /= 1024
		i++
	}
	if i > 0 || n < 1024 {
		return fmt.Sprintf("%d%s", n, units[i])
	}
	f := float64(n)
	for i < len(units)-1 && f >= 1024 {
		f /= 1024
		i++
	}
	return strings.TrimSuffix(fmt.Sprintf("%.1f", f), ".0") + units[i]
}

// sizeFlag is a pflag.Value for byte sizes with suffixes.
type sizeFlag struct{ v *int64 }

func (s sizeFlag) String() string {
	if s.v == nil {
		return "0"
	}
	return humanSize(uint64(*s.v))
}

func (s sizeFlag) Set(v string) error {
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	*s.v = n
	return nil
}

func (s sizeFlag) Type() string { return "size" }
