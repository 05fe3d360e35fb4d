package main

import (
	"testing"
	"time"

	"snapmount/nbd"
)

// A frozen mount whose server reported a broken snapshot, in the words
// of nbd.SnapshotBrokenError, says so in its state; any other error, or
// a live view, leaves it connected.
func TestStateOfBrokenSnapshot(t *testing.T) {
	broken := (&nbd.SnapshotBrokenError{Snapshot: "disk@s1", Reason: "the stores are full"}).Error()
	for _, c := range []struct {
		frozen bool
		msg    string
		want   string
	}{
		{true, broken, "snapshot broken"},
		{false, broken, "connected"},
		{true, "snapshot disk@s1 was dropped", "connected"},
	} {
		cs := nbd.ClientStats{State: "connected", LastServerError: &nbd.ServerErrorReport{At: time.Now(), Errno: "EIO", Message: c.msg}}
		if got := stateOf(c.frozen, time.Second, cs).State; got != c.want {
			t.Errorf("frozen %v, the server said %q: state %q, want %q", c.frozen, c.msg, got, c.want)
		}
	}
}
