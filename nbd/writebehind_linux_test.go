package nbd

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unsafe"
)

// resident reports which pages of f's first n bytes are in the page cache.
func resident(t *testing.T, f *os.File, n int) []bool {
	t.Helper()
	m, err := syscall.Mmap(int(f.Fd()), 0, n, syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(m)
	vec := make([]byte, n/os.Getpagesize())
	if _, _, e := syscall.Syscall(syscall.SYS_MINCORE, uintptr(unsafe.Pointer(&m[0])), uintptr(n), uintptr(unsafe.Pointer(&vec[0]))); e != 0 {
		t.Fatal(e)
	}
	out := make([]bool, len(vec))
	for i, v := range vec {
		out[i] = v&1 != 0
	}
	return out
}

func TestWriteBehindDropsOldPages(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "store"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var st syscall.Statfs_t
	if err := syscall.Fstatfs(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	if st.Type == 0x01021994 { // TMPFS_MAGIC: its pages are the file
		t.Skip("the temporary directory is on tmpfs, whose pages cannot be dropped")
	}
	const chunk, chunks = 256 << 10, 16
	w := NewWriteBehind(int(f.Fd()))
	w.window = 4 * chunk
	buf := make([]byte, chunk)
	for i := range buf {
		buf[i] = byte(i)
	}
	for i := range chunks {
		if _, err := f.WriteAt(buf, int64(i*chunk)); err != nil {
			t.Fatal(err)
		}
		w.Written(int64(i*chunk), chunk)
	}
	pages := resident(t, f, chunks*chunk)
	perChunk := chunk / os.Getpagesize()
	for i := range chunks {
		in := pages[i*perChunk]
		if want := i >= chunks-4; in != want {
			t.Errorf("chunk %d: resident %v, want %v (only the last window stays cached)", i, in, want)
		}
	}
	// Dropping pages never loses data.
	got := make([]byte, chunk)
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i := range got {
		if got[i] != byte(i) {
			t.Fatalf("byte %d of the first chunk reads %d after write-behind", i, got[i])
		}
	}
}
