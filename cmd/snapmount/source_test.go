package main

import "testing"

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
