package nbd

import "testing"

// A snapshot's breakage, as a server words it with SnapshotBrokenError,
// is what IsSnapshotBroken recognises, and nothing else is: not a dropped
// snapshot, not another error that says "broken".
func TestSnapshotBrokenWording(t *testing.T) {
	err := &SnapshotBrokenError{Snapshot: "disk@s7", Reason: "the stores reached --snapshot-max (1M)"}
	if !IsSnapshotBroken(err.Error()) {
		t.Errorf("IsSnapshotBroken(%q) = false", err.Error())
	}
	if ErrnoOf(err) != EIO {
		t.Errorf("ErrnoOf(%v) = %v, want EIO", err, ErrnoOf(err))
	}
	for _, msg := range []string{
		"",
		"snapshot disk@s7 was dropped",
		"snapshot disk@s7@s1 does not exist",
		"copy of block 3: the disk is broken (EIO)",
	} {
		if IsSnapshotBroken(msg) {
			t.Errorf("IsSnapshotBroken(%q) = true", msg)
		}
	}
}
