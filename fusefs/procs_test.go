package fusefs

import (
	"slices"
	"testing"
	"time"
)

// The governor drops to one processor after an interval without
// overlapping reads, asks for all of them the moment two reads overlap,
// stays there while they keep overlapping, and gives them back at stop.
func TestProcGovernor(t *testing.T) {
	var set []int
	g := newProcGovernor(4, time.Hour, func(n int) { set = append(set, n) })

	g.tick() // an interval with no reads
	g.enter()
	g.leave()
	g.enter()
	g.tick() // one read at a time, one still in flight
	if !slices.Equal(set, []int{1}) {
		t.Fatalf("after serial reads: GOMAXPROCS set to %v, want [1]", set)
	}
	select {
	case <-g.raise:
		t.Fatal("a single read in flight asked for more processors")
	default:
	}

	g.enter() // overlaps the one in flight
	select {
	case <-g.raise:
		g.setOne(false) // what run does
	default:
		t.Fatal("overlapping reads did not ask for more processors")
	}
	if !slices.Equal(set, []int{1, 4}) {
		t.Fatalf("after overlapping reads: GOMAXPROCS set to %v, want [1 4]", set)
	}
	g.leave()
	g.tick() // the interval saw two at once: stay
	g.leave()
	g.tick() // the next interval started with one in flight, then none
	if !slices.Equal(set, []int{1, 4, 1}) {
		t.Fatalf("after the overlap ended: GOMAXPROCS set to %v, want [1 4 1]", set)
	}

	stop := make(chan struct{})
	close(stop)
	g.run(stop)
	if !slices.Equal(set, []int{1, 4, 1, 4}) {
		t.Fatalf("after stop: GOMAXPROCS set to %v, want [1 4 1 4]", set)
	}
}
