package main

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"snapmount/test/testenv"
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

// A pipe or a character device is written in place and is not opened to
// look at first: a pipe's open for reading would wait for a writer while
// the reader at its other end waits for copy. A socket, which no open
// can write to, is refused.
func TestCheckDestOpensNoPipe(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "pipe")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	type checked struct {
		inPlace bool
		err     error
	}
	for _, dest := range []string{fifo, "/dev/null"} {
		done := make(chan checked, 1)
		go func() {
			inPlace, err := checkDest(dest, false)
			done <- checked{inPlace, err}
		}()
		if c := testenv.Receive(t, done, "checkDest of "+dest); !c.inPlace || c.err != nil {
			t.Errorf("checkDest(%s) = %v, %v; want it written in place", dest, c.inPlace, c.err)
		}
	}

	sock := filepath.Join(testenv.ShortTempDir(t), "s.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := checkDest(sock, true); err == nil || !strings.Contains(err.Error(), "is a socket") {
		t.Errorf("checkDest of a socket: %v; want it refused as one", err)
	}
}
