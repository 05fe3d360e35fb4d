package main

import (
	"fmt"
	"time"

	"snapmount/nbd"
)

// mountState says what reads of the mount get now, from the client's
// state: the first line a user who got EIO should read.
type mountState struct {
	State  string    `json:"state"` // connected, reconnecting, server unreachable, snapshot broken, snapshot gone, export changed, unmounting
	Since  time.Time `json:"state_since,omitzero"`
	Detail string    `json:"state_detail,omitempty"`
}

// stateOf derives the mount's state from the pool's (see
// nbd.ClientStats.State). A snapshot the server broke (its store full,
// or a failed copy) is only known from the errors the server reported:
// snapmount serve words them as nbd.SnapshotBrokenError.
func stateOf(frozen bool, timeout time.Duration, cs nbd.ClientStats) mountState {
	switch cs.State {
	case "closed":
		return mountState{State: "unmounting"}
	case "gone":
		what := "export"
		if frozen {
			what = "snapshot"
		}
		return mountState{State: what + " gone", Detail: cs.Reason + "; reads of what is not cached fail with EIO: mount again for a new snapshot"}
	case "changed":
		if frozen { // the server has another snapshot under its name
			return mountState{State: "snapshot gone", Detail: cs.Reason + "; reads of what is not cached fail with EIO: mount again for a new snapshot"}
		}
		return mountState{State: "export changed", Detail: cs.Reason + "; reads of what is not cached fail with EIO"}
	case "unreachable":
		return mountState{State: "server unreachable", Since: cs.Since,
			Detail: cs.Reason + "; reads of what is not cached fail at once with EIO until it answers again (reconnecting in the background)"}
	case "reconnecting":
		d := fmt.Sprintf("no connection; reads of what is not cached wait for one, for %v at most", timeout)
		if cs.Reason != "" {
			d += " (" + cs.Reason + ")"
		}
		return mountState{State: "reconnecting", Since: cs.Since, Detail: d}
	}
	if e := cs.LastServerError; frozen && e != nil && nbd.IsSnapshotBroken(e.Message) {
		return mountState{State: "snapshot broken", Since: e.At,
			Detail: "the server says: " + e.Message + "; reads of what is not cached fail with EIO: mount again for a new snapshot"}
	}
	return mountState{State: "connected"}
}

// waitsForServer reports whether the mount's readers are stuck on its
// server: it does not work now, or a request has waited for a reply for
// more than stuckWait.
func (st *mountStats) waitsForServer() bool {
	return st.State != "connected" || st.Client.OldestWait > stuckWait
}

// stuckWait is how long a request may wait for its reply before umount
// counts its reader as stuck on the server.
const stuckWait = time.Second

// String is the state as 'snapmount stats' prints it.
func (s mountState) String() string {
	out := s.State
	if !s.Since.IsZero() {
		out += " since " + s.Since.Format("2006-01-02 15:04:05")
	}
	if s.Detail != "" {
		out += ": " + s.Detail
	}
	return out
}
