package main

import (
	"errors"
	"strings"
	"testing"

	"snapmount/nbd"
)

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

// A snapmount snapshot is frozen; --frozen makes any other export frozen
// but a live view of snapmount serve, which it refuses; without it the
// warning says what snapmount knows of the export.
func TestFrozenView(t *testing.T) {
	for _, c := range []struct {
		name      string
		canonical string
		promise   bool
		flag      bool
		frozen    bool
		warning   string // "" for none, "!" for an error
	}{
		{"snapmount snapshot", "disk@s3", true, false, true, ""},
		{"snapmount live view", "disk@live", true, false, false, "is live and may change under the mount"},
		{"snapmount live view, --frozen", "disk@live", true, true, false, "!"},
		{"another server", "snap", false, false, false, "this server does not say whether export \"snap\" changes; snapmount treats it as live (--frozen if you know it does not)"},
		{"another server, --frozen", "snap", false, true, true, ""},
	} {
		info := &nbd.ExportInfo{CanonicalName: c.canonical, Promise: c.promise}
		frozen, warning, err := frozenView(info, "snap", &mountOptions{frozen: c.flag, noCache: true})
		switch {
		case c.warning == "!":
			var ue *usageError
			if !errors.As(err, &ue) {
				t.Errorf("%s: %v, want a usage error", c.name, err)
			}
		case err != nil || frozen != c.frozen || !strings.Contains(warning, c.warning) || (c.warning == "") != (warning == ""):
			t.Errorf("%s: frozen %v, warning %q, %v; want frozen %v and a warning with %q", c.name, frozen, warning, err, c.frozen, c.warning)
		}
	}
}
