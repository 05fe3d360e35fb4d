package main

import (
	"strings"
	"testing"

	"snapmount/fusefs"
	"snapmount/fusefs/partition"
)

func TestDiskFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		err  string
	}{
		{[]string{"mount", "--overlay-dir", "/tmp", "nbd://h/x", "/mnt"}, "--overlay-dir needs --overlay"},
		{[]string{"mount", "--overlay-max", "1G", "nbd://h/x", "/mnt"}, "--overlay-max needs --overlay"},
		{[]string{"mount", "--overlay", "--overlay-max", "100", "nbd://h/x", "/mnt"}, "--overlay-max must be at least 4K"},
		{[]string{"mount", "--overlay", "--overlay-dir", "/nonexistent", "nbd://h/x", "/mnt"}, "--overlay-dir /nonexistent is not a directory"},
		{[]string{"info", "--partitions", "--map", "nbd://h/x"}, "cannot be combined"},
	} {
		code, _, errs := runArgs(c.args...)
		if code != exitUsage || !strings.Contains(errs, c.err) {
			t.Errorf("%q: exit %d, %q; want a usage error with %q", c.args, code, errs, c.err)
		}
	}
}

func TestDefaultOverlayDir(t *testing.T) {
	for env, want := range map[string]string{
		"XDG_RUNTIME_DIR=/run/user/1 TMPDIR=/var/tmp": "/run/user/1",
		"TMPDIR=/var/tmp": "/var/tmp",
		"":                "/tmp",
	} {
		vars := map[string]string{}
		for _, kv := range strings.Fields(env) {
			k, v, _ := strings.Cut(kv, "=")
			vars[k] = v
		}
		if got := defaultOverlayDir(func(k string) string { return vars[k] }); got != want {
			t.Errorf("%s: %s, want %s", env, got, want)
		}
	}
}

func TestTableLine(t *testing.T) {
	for _, c := range []struct {
		dk   disk
		want string
	}{
		{disk{table: &partition.Table{Scheme: partition.None, Note: "no partition table (no boot signature 55 AA at byte 510)"}},
			"no partitions shown, only the whole disk: no partition table (no boot signature 55 AA at byte 510)"},
		{disk{table: &partition.Table{Scheme: partition.GPT, SectorSize: 4096, Note: "skipped p3 overlaps another partition"},
			windows: []fusefs.Window{{Name: "d-p1"}, {Name: "d-p2"}}},
			"gpt, 4096-byte sectors: d-p1, d-p2; skipped p3 overlaps another partition"},
		{disk{table: &partition.Table{Scheme: partition.DOS, SectorSize: 512}, windows: []fusefs.Window{{Name: "d-p5"}}},
			"dos, 512-byte sectors: d-p5"},
	} {
		if got := c.dk.tableLine(); got != c.want {
			t.Errorf("got %q, want %q", got, c.want)
		}
	}
}
