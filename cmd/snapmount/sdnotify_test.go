package main

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestSdNotifyErrors(t *testing.T) {
	if err := sdNotify("", "READY=1"); err != nil {
		t.Errorf("without NOTIFY_SOCKET: %v, want nothing done", err)
	}
	if err := sdNotify("relative.sock", "READY=1"); err == nil || !strings.Contains(err.Error(), "NOTIFY_SOCKET") {
		t.Errorf("a relative NOTIFY_SOCKET: %v, want an error naming it", err)
	}
	missing := filepath.Join(t.TempDir(), "none.sock")
	if err := sdNotify(missing, "READY=1"); err == nil || !strings.Contains(err.Error(), missing) {
		t.Errorf("a NOTIFY_SOCKET nobody listens on: %v, want an error naming it", err)
	}
}
