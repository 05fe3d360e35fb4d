package partition

import (
	"testing"
)

// FuzzParseTable reads arbitrary bytes as a disk's first sectors, on a disk
// as long as the bytes or claiming to be far longer (zeros after them):
// Read must not fail, panic or hang, must keep Table's promises, and must
// read no more than its bounds allow.
func FuzzParseTable(f *testing.F) {
	// Disks of 16 sectors, so that minimizing an input stays quick.
	const small = 16 * 512
	gpt := newImage(small)
	gpt.gpt(gptLayout{ss: 512, numEntries: 4}, gptPart{index: 1, first: 3, last: 12, typ: linuxFS, name: "x"})
	dos := newImage(small)
	dos.entry(0, 0, 0x80, 0x83, 1, 3)
	dos.entry(0, 1, 0, 0x05, 4, 12)
	dos.ebr(4, 1, 3, 4, 4)
	dos.ebr(8, 1, 3, 0, 0)
	loop := append(image(nil), dos...)
	loop.entry(8*512, 1, 0, 0x05, 0, 4) // back to the first EBR
	// The same GPT without its protective MBR, then without its primary
	// header too: read from the backup.
	noMBR := append(image(nil), gpt...)
	clear(noMBR[:512])
	backupOnly := append(image(nil), noMBR...)
	clear(backupOnly[512:1024])
	seeds := []image{gpt, dos, loop, noMBR, backupOnly}
	for _, s := range seeds {
		f.Add([]byte(s), uint64(0))
		f.Add([]byte(s), uint64(1)<<40)
	}
	f.Fuzz(func(t *testing.T, data []byte, extra uint64) {
		size := int64(len(data)) + int64(extra%(1<<50))
		r := &recordingReader{data: data, size: size}
		tab, err := Read(r, size)
		if err != nil {
			t.Fatalf("Read of a readable disk failed: %v", err)
		}
		checkInvariants(t, tab, size)
		if r.largest > max(MaxEntryArray, 4096) || r.reads > MaxEBRs+8 {
			t.Fatalf("%d reads, the largest %d bytes: beyond the bounds", r.reads, r.largest)
		}
	})
}
