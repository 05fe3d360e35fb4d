package main

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"snapmount/test/testenv"
)

// destFileMakers make a copy's file beside DEST both ways: with no name
// (O_TMPFILE) and, as where the file system cannot, with a .partial one.
var destFileMakers = []struct {
	name   string
	create func(dest string, force bool) (*destFile, error)
}{
	{"O_TMPFILE", createBeside},
	{"partial", func(dest string, force bool) (*destFile, error) {
		d := newDestFile(dest, force)
		return d, d.createPartial()
	}},
}

// A copy's file becomes DEST only when committed, replacing what was
// there; discarded, it leaves nothing, whether it had no name (O_TMPFILE)
// or a .partial one.
func TestDestFile(t *testing.T) {
	for _, c := range destFileMakers {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			dest := filepath.Join(dir, "out.img")
			d, err := c.create(dest, true)
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
			if d, err = c.create(dest, true); err != nil {
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
			checkDestAlone(t, dir, dest, "new")
		})
	}
}

// checkDestAlone checks that dest holds want and that nothing else is
// left in its directory dir.
func checkDestAlone(t *testing.T, dir, dest, want string) {
	t.Helper()
	if b, _ := os.ReadFile(dest); string(b) != want {
		t.Errorf("DEST is %q, want %q", b, want)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("the directory holds %v, want DEST alone", entries)
	}
}

// A DEST that another program makes while the copy runs is never
// replaced, --force or not, when it did not exist as the copy began; nor
// is an empty one that was filled meanwhile, without --force. The copy
// is then discarded, leaving nothing.
func TestDestFileReplacesNothingThatAppeared(t *testing.T) {
	for _, c := range destFileMakers {
		for _, existed := range []bool{false, true} {
			name := c.name + "/new"
			if existed {
				name = c.name + "/empty, filled meanwhile"
			}
			t.Run(name, func(t *testing.T) {
				dir := t.TempDir()
				dest := filepath.Join(dir, "out.img")
				if existed {
					os.WriteFile(dest, nil, 0o644)
				}
				d, err := c.create(dest, !existed) // --force cannot replace what appeared
				if err != nil {
					t.Fatal(err)
				}
				d.WriteString("copy")
				os.WriteFile(dest, []byte("another program's"), 0o644)
				err = d.commit(false)
				d.discard()
				var appeared *destAppearedError
				if existed && (err == nil || !strings.Contains(err.Error(), "without --force")) ||
					!existed && !errors.As(err, &appeared) {
					t.Errorf("commit over a DEST that appeared: %v", err)
				}
				checkDestAlone(t, dir, dest, "another program's")
			})
		}
	}
}

// --force replaces DEST with a new file that has DEST's mode.
func TestDestFileReplacementKeepsMode(t *testing.T) {
	for _, c := range destFileMakers {
		t.Run(c.name, func(t *testing.T) {
			dest := filepath.Join(t.TempDir(), "out.img")
			os.WriteFile(dest, []byte("old"), 0o600)
			os.Chmod(dest, 0o640)
			d, err := c.create(dest, true)
			if err != nil {
				t.Fatal(err)
			}
			defer d.discard()
			d.WriteString("new")
			if err := d.commit(false); err != nil {
				t.Fatal(err)
			}
			if st, err := os.Stat(dest); err != nil || st.Mode().Perm() != 0o640 {
				t.Errorf("the replaced DEST has mode %v (%v), want 0640 as before", st.Mode(), err)
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
