package testenv

import (
	"os"
	"path/filepath"
	"testing"
)

// TestWidenMode overlaps two tests that need a file's mode wide: the first
// widens it, it stays wide when the first ends while the second runs, and
// the second's end puts it back.
func TestWidenMode(t *testing.T) {
	dir := t.TempDir()
	dev, prefix := filepath.Join(dir, "dev"), filepath.Join(dir, "lock")
	if err := os.WriteFile(dev, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	mode := func(t *testing.T) os.FileMode {
		st, err := os.Stat(dev)
		if err != nil {
			t.Fatal(err)
		}
		return st.Mode().Perm()
	}
	t.Run("overlapping", func(t *testing.T) {
		firstIn, secondIn, firstDone := make(chan struct{}), make(chan struct{}), make(chan struct{})
		t.Run("first", func(t *testing.T) {
			t.Parallel()
			t.Cleanup(func() { close(firstDone) }) // runs after widenMode's
			widenMode(t, dev, prefix)
			if m := mode(t); m != 0o666 {
				t.Errorf("mode %o while needed", m)
			}
			close(firstIn)
			<-secondIn // the first ends while the second runs
		})
		t.Run("second", func(t *testing.T) {
			t.Parallel()
			<-firstIn
			widenMode(t, dev, prefix)
			close(secondIn)
			<-firstDone
			if m := mode(t); m != 0o666 {
				t.Errorf("mode %o after the first ended, while the second still needs it", m)
			}
		})
	})
	if m := mode(t); m != 0o600 {
		t.Fatalf("mode %o after both ended, want 0600 back", m)
	}
	if _, err := os.Stat(prefix + ".mode"); !os.IsNotExist(err) {
		t.Errorf("the saved mode is left behind: %v", err)
	}
}
