package main

import (
	"os"
	"path/filepath"
	"testing"
)

// A copy's file becomes DEST only when committed, replacing what was
// there; discarded, it leaves nothing, whether it had no name (O_TMPFILE)
// or a .partial one.
func TestDestFile(t *testing.T) {
	for _, c := range []struct {
		name   string
		create func(dest string) (*destFile, error)
	}{
		{"O_TMPFILE", createBeside},
		{"partial", func(dest string) (*destFile, error) {
			d := &destFile{dest: dest}
			return d, d.createPartial()
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			dest := filepath.Join(dir, "out.img")
			d, err := c.create(dest)
			if err != nil {
				t.Fatal(err)
			}
			if (c.name == "partial") != (d.partial != "") {
				t.Fatalf("made with a name %q", d.partial)
			}
			d.WriteString("half")
			d.discard()
			if entries, _ := os.ReadDir(dir); len(entries) != 0 {
				t.Errorf("a discarded copy left %v", entries)
			}

			os.WriteFile(dest, []byte("old"), 0o644)
			if d, err = c.create(dest); err != nil {
				t.Fatal(err)
			}
			d.WriteString("new")
			if b, _ := os.ReadFile(dest); string(b) != "old" {
				t.Errorf("DEST is %q before the commit, want it unchanged", b)
			}
			if err := d.commit(true); err != nil {
				t.Fatal(err)
			}
			d.discard()
			if b, _ := os.ReadFile(dest); string(b) != "new" {
				t.Errorf("DEST is %q after the commit", b)
			}
			if entries, _ := os.ReadDir(dir); len(entries) != 1 {
				t.Errorf("the directory holds %v, want DEST alone", entries)
			}
		})
	}
}
