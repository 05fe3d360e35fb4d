package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"snapmount/test/testenv"
)

// serve refuses an image whose header says it is a container, in one line
// that names the format and what to use instead, with exit code 2 and
// nothing listening; --format raw serves it.
func TestServeRefusesContainers(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, head []byte) string {
		img := make([]byte, 1<<20)
		copy(img, head)
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, img, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	qcow2 := write("vm.qcow2", binary.BigEndian.AppendUint32([]byte("QFI\xfb"), 3))
	luks := write("crypt.img", binary.BigEndian.AppendUint16([]byte("LUKS\xba\xbe"), 2))
	desc := filepath.Join(dir, "flat.vmdk")
	os.WriteFile(desc, []byte("# Disk DescriptorFile\nversion=1\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"flat-flat.vmdk\" 0\n"), 0o644)
	raw := write("raw.img", nil)
	sock := filepath.Join(testenv.ShortTempDir(t), "s.sock")

	for _, tc := range []struct {
		image string
		want  []string
	}{
		{qcow2, []string{qcow2 + " is a qcow2 image, not a raw disk", "qemu-storage-daemon", "qemu-nbd -f qcow2", "--format raw"}},
		{luks, []string{"a LUKS2 encrypted volume", "cryptsetup open", "--format raw"}},
		{desc, []string{"a VMDK descriptor (monolithicFlat), not a raw disk", "raw file " + filepath.Join(dir, "flat-flat.vmdk") + ": serve that"}},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), []string{"serve", "--no-tcp", "--socket", sock, raw, tc.image}, &stdout, &stderr)
		msg := stderr.String()
		if code != exitUsage || strings.Count(msg, "\n") != 1 || stdout.Len() != 0 {
			t.Errorf("serve %s: exit %d, stderr %q, stdout %q; want exit 2 and one line", tc.image, code, msg, stdout.String())
		}
		for _, w := range tc.want {
			if !strings.Contains(msg, w) {
				t.Errorf("serve %s: %q does not say %q", tc.image, msg, w)
			}
		}
		if _, err := os.Stat(sock); err == nil {
			t.Fatalf("serve %s listened before refusing", tc.image)
		}
	}

	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"serve", "--no-tcp", "--socket", sock, "--format", "qcow2", qcow2}, &stdout, &stderr); code != exitUsage ||
		!strings.Contains(stderr.String(), "qemu-nbd -f qcow2") {
		t.Errorf("--format qcow2: exit %d, %q; want a usage error pointing to qemu-nbd", code, stderr.String())
	}

	// --format raw: served as it is.
	serveInProcess(t, "--no-tcp", "--socket", sock, "--format", "raw", qcow2)()
}
