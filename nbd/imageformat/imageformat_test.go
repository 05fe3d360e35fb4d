package imageformat

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"snapmount/test/testenv"
)

func run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func probeFile(t testing.TB, path string) *Format {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Probe(f, st.Size())
	if err != nil {
		t.Fatalf("Probe(%s): %v", path, err)
	}
	return got
}

// qemuImages are the containers qemu-img creates, each with the Format
// Probe must find in it.
var qemuImages = []struct {
	format, opts string
	want         Format
}{
	{"qcow2", "compat=1.1", Format{Name: "qcow2", Driver: "qcow2"}},
	{"qcow2", "compat=0.10", Format{Name: "qcow2", Driver: "qcow2"}},
	{"qcow", "", Format{Name: "qcow (version 1)", Driver: "qcow"}},
	{"qed", "", Format{Name: "QED", Driver: "qed"}},
	{"vmdk", "subformat=monolithicSparse", Format{Name: "VMDK (monolithicSparse)", Driver: "vmdk"}},
	{"vmdk", "subformat=streamOptimized", Format{Name: "VMDK (streamOptimized)", Driver: "vmdk"}},
	{"vmdk", "subformat=monolithicFlat", Format{Name: "VMDK descriptor (monolithicFlat)", Driver: "vmdk", RawExtent: "vm disk-flat.vmdk"}},
	{"vmdk", "subformat=twoGbMaxExtentFlat", Format{Name: "VMDK descriptor (twoGbMaxExtentFlat)", Driver: "vmdk", RawExtent: "vm disk-f001.vmdk"}},
	{"vmdk", "subformat=twoGbMaxExtentSparse", Format{Name: "VMDK descriptor (twoGbMaxExtentSparse)", Driver: "vmdk"}},
	{"vdi", "static=off", Format{Name: "VDI", Driver: "vdi"}},
	{"vdi", "static=on", Format{Name: "VDI", Driver: "vdi"}},
	{"vhdx", "subformat=dynamic", Format{Name: "VHDX", Driver: "vhdx"}},
	{"vhdx", "subformat=fixed", Format{Name: "VHDX", Driver: "vhdx"}},
	{"vpc", "subformat=dynamic", Format{Name: "VHD (dynamic)", Driver: "vpc"}},
	{"vpc", "subformat=fixed", Format{Name: "VHD (fixed)", Driver: "vpc"}},
	{"parallels", "", Format{Name: "Parallels", Driver: "parallels"}},
}

// qemuImage creates an image with qemu-img create in dir and returns its
// path. The name has a space, as users' file names do.
func qemuImage(t testing.TB, dir, format, opts string) string {
	t.Helper()
	path := filepath.Join(dir, "vm disk."+format)
	args := []string{"create", "-q", "-f", format}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	run(t, "qemu-img", append(args, path, "1M")...)
	return path
}

func TestProbeQemuImages(t *testing.T) {
	testenv.RequireCmd(t, "qemu-img")
	for _, c := range qemuImages {
		t.Run(c.format+"/"+c.opts, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := qemuImage(t, dir, c.format, c.opts)
			got := probeFile(t, path)
			if got == nil || *got != c.want {
				t.Fatalf("Probe = %+v, want %+v", got, c.want)
			}
			// A flat extent is the raw disk itself.
			if got.RawExtent != "" {
				if f := probeFile(t, filepath.Join(dir, got.RawExtent)); f != nil {
					t.Errorf("the flat extent %s probes as %+v, want raw", got.RawExtent, f)
				}
			}
		})
	}
}

// The extents of a split sparse VMDK are sparse VMDKs themselves.
func TestProbeSplitSparseExtent(t *testing.T) {
	testenv.RequireCmd(t, "qemu-img")
	dir := t.TempDir()
	qemuImage(t, dir, "vmdk", "subformat=twoGbMaxExtentSparse")
	got := probeFile(t, filepath.Join(dir, "vm disk-s001.vmdk"))
	if want := (Format{Name: "VMDK (sparse)", Driver: "vmdk"}); got == nil || *got != want {
		t.Fatalf("Probe = %+v, want %+v", got, want)
	}
}

// LUKS headers are made here by the on-disk format specifications, not by
// qemu-img create -f luks: qemu benchmarks its key derivation for at
// least a second of CPU and fails ("Unable to get accurate CPU usage")
// when the machine is busy.

// luks1Image is a LUKS1 volume's start: the partition header with one
// active key slot, as cryptsetup and qemu write it.
func luks1Image(size int) []byte {
	img := make([]byte, size)
	copy(img, "LUKS\xba\xbe")
	binary.BigEndian.PutUint16(img[6:], 1)
	copy(img[8:], "aes")
	copy(img[40:], "xts-plain64")
	copy(img[72:], "sha256")
	binary.BigEndian.PutUint32(img[104:], 4096) // payload offset, sectors
	binary.BigEndian.PutUint32(img[108:], 64)   // key bytes
	binary.BigEndian.PutUint32(img[164:], 1000) // digest iterations
	copy(img[168:], "0c1f3c1e-8d2b-4f3c-9a55-6f2f5b2c2d10")
	for slot := 0; slot < 8; slot++ {
		ks := img[208+48*slot:]
		binary.BigEndian.PutUint32(ks, 0x0000DEAD) // disabled
		if slot == 0 {
			binary.BigEndian.PutUint32(ks, 0x00AC71F3) // enabled
			binary.BigEndian.PutUint32(ks[4:], 1000)
		}
		binary.BigEndian.PutUint32(ks[40:], uint32(8+slot*512)) // key material, sectors
		binary.BigEndian.PutUint32(ks[44:], 4000)               // stripes
	}
	return img
}

// luks2Image is a LUKS2 volume's start: the binary header, its JSON
// area, the checksum over both, and the secondary header after them.
func luks2Image(size int) []byte {
	const hdrSize = 16 << 10
	img := make([]byte, size)
	put := func(b []byte, magic string, offset uint64) {
		copy(b, magic)
		binary.BigEndian.PutUint16(b[6:], 2)
		binary.BigEndian.PutUint64(b[8:], hdrSize)
		binary.BigEndian.PutUint64(b[16:], 1) // seqid
		copy(b[72:], "sha256")
		copy(b[168:], "6f2f5b2c-8d2b-4f3c-9a55-0c1f3c1e2d10")
		binary.BigEndian.PutUint64(b[256:], offset)
		copy(b[4096:], `{"keyslots":{},"tokens":{},"segments":{},"digests":{},"config":{"json_size":"12288","keyslots_size":"0"}}`)
		sum := sha256.Sum256(b[:hdrSize])
		copy(b[448:], sum[:])
	}
	put(img[:hdrSize], "LUKS\xba\xbe", 0)
	put(img[hdrSize:2*hdrSize], "SKUL\xba\xbe", hdrSize)
	return img
}

func TestDetectLUKS(t *testing.T) {
	for _, c := range []struct {
		img  []byte
		want string
	}{{luks1Image(1 << 20), "LUKS1"}, {luks2Image(1 << 20), "LUKS2"}} {
		got := Detect(c.img[:HeadSize], c.img[len(c.img)-TailSize:], false)
		if want := (Format{Name: c.want, Driver: "luks"}); got == nil || *got != want {
			t.Errorf("Detect = %+v, want %+v", got, want)
		}
	}
}

// Raw disks: nothing in them may pass for a container.
func TestProbeRaw(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	random := make([]byte, 1<<20)
	rand.New(rand.NewSource(1)).Read(random)
	paths := []string{
		write("empty", nil),
		write("tiny", []byte("version=1")), // shorter than any header
		write("zeros", make([]byte, 1<<20)),
		write("random", random),
	}
	// A partitioned disk and a file system, as real tools make them.
	if _, err := exec.LookPath("sfdisk"); err == nil {
		p := write("mbr", make([]byte, 4<<20))
		cmd := exec.Command("sfdisk", "-q", p)
		cmd.Stdin = strings.NewReader("label: dos\n,1M,L\n,,L\n")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("sfdisk: %v: %s", err, out)
		}
		paths = append(paths, p)
	}
	if _, err := exec.LookPath("mkfs.ext4"); err == nil {
		p := write("ext4", make([]byte, 8<<20))
		run(t, "mkfs.ext4", "-q", "-F", p)
		paths = append(paths, p)
	}
	for _, p := range paths {
		if got := probeFile(t, p); got != nil {
			t.Errorf("%s: Probe = %+v, want nil (raw)", filepath.Base(p), got)
		}
	}
}

func TestDetectDescriptorVariants(t *testing.T) {
	for _, c := range []struct {
		name, text string
		whole      bool
		want       *Format
	}{
		{"CRLF and comments", "# Disk DescriptorFile\r\n  \r\nversion=1\r\ncreateType=\"vmfs\"\r\nRW 2048 VMFS \"disk-flat.vmdk\"\r\n", true,
			&Format{Name: "VMDK descriptor (vmfs)", Driver: "vmdk", RawExtent: "disk-flat.vmdk"}},
		{"two extents", "version=1\ncreateType=\"twoGbMaxExtentFlat\"\nRW 4 FLAT \"a\" 0\nRW 4 FLAT \"b\" 0\n", true,
			&Format{Name: "VMDK descriptor (twoGbMaxExtentFlat)", Driver: "vmdk"}},
		{"flat at an offset", "version=1\nRW 4 FLAT \"a\" 100\n", true,
			&Format{Name: "VMDK descriptor", Driver: "vmdk"}},
		{"may continue past the head", "version=2\nRW 4 FLAT \"a\" 0\n", false,
			&Format{Name: "VMDK descriptor", Driver: "vmdk"}},
		{"hostile createType", "version=3\ncreateType=\"a\x1b[2Jb\xff\"\n", true,
			&Format{Name: "VMDK descriptor (a?[2Jb?)", Driver: "vmdk"}},
		{"text first", "hello\nversion=1\n", true, nil},
		{"version 4", "version=4\n", true, nil},
	} {
		got := Detect([]byte(c.text), nil, c.whole)
		if (got == nil) != (c.want == nil) || got != nil && *got != *c.want {
			t.Errorf("%s: Detect = %+v, want %+v", c.name, got, c.want)
		}
	}
}

// A fixed VHD's footer is found at the end, and only there.
func TestDetectVHDFooterOnly(t *testing.T) {
	footer := make([]byte, TailSize)
	copy(footer, "conectix")
	binary.BigEndian.PutUint32(footer[60:], 2)
	if got := Detect(make([]byte, HeadSize), footer, false); got == nil || got.Name != "VHD (fixed)" {
		t.Fatalf("Detect = %+v, want VHD (fixed)", got)
	}
	if got := Detect(make([]byte, HeadSize), footer[:TailSize-1], false); got != nil {
		t.Fatalf("a short tail: Detect = %+v, want nil", got)
	}
}

func FuzzDetect(f *testing.F) {
	for _, magic := range []string{"QFI\xfb\x00\x00\x00\x03", "QED\x00", "KDMV\x01\x00\x00\x00", "COWD", "vhdxfile", "conectix", "LUKS\xba\xbe\x00\x02", "WithoutFreeSpace",
		"# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"x-flat.vmdk\" 0\n"} {
		f.Add([]byte(magic), []byte(nil), true)
	}
	vmdk := make([]byte, 1024)
	copy(vmdk, "KDMV")
	binary.LittleEndian.PutUint64(vmdk[28:], 1)
	binary.LittleEndian.PutUint64(vmdk[36:], 1)
	copy(vmdk[512:], "version=1\ncreateType=\"streamOptimized\"\n")
	f.Add(vmdk, []byte(nil), false)
	for _, luks := range [][]byte{luks1Image(64 << 10), luks2Image(64 << 10)} {
		f.Add(luks[:HeadSize], luks[len(luks)-TailSize:], false)
	}
	// Real headers, when qemu-img is here to make them.
	if _, err := exec.LookPath("qemu-img"); err == nil {
		dir := f.TempDir()
		for _, c := range qemuImages {
			data, err := os.ReadFile(qemuImage(f, dir, c.format, c.opts))
			if err != nil {
				f.Fatal(err)
			}
			f.Add(data[:min(len(data), HeadSize)], data[max(0, len(data)-TailSize):], len(data) <= HeadSize)
		}
	}
	f.Fuzz(func(t *testing.T, head, tail []byte, whole bool) {
		got := Detect(head, tail, whole)
		if got == nil {
			return
		}
		if got.Name == "" || got.Driver == "" {
			t.Fatalf("a format without a name: %+v", got)
		}
		for _, r := range got.Name {
			if r < 0x20 || r > 0x7e {
				t.Fatalf("Name %q is not printable ASCII", got.Name)
			}
		}
		if got.RawExtent != "" && (got.Driver != "vmdk" || !whole) {
			t.Fatalf("RawExtent from a %s image (whole %v)", got.Driver, whole)
		}
		if again := Detect(bytes.Clone(head), bytes.Clone(tail), whole); *again != *got {
			t.Fatalf("Detect is not deterministic: %+v then %+v", got, again)
		}
	})
}
