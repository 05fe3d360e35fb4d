package server

import (
	"log/slog"
	"sync"
	"time"
)

// quietLog logs a warning that may recur in bursts (a flood of
// connections) at most once per quietInterval. What it holds back is
// counted, not lost: the next line gives the count of occurrences since
// the last one, and a burst's last occurrences are logged once the
// interval ends even if no other comes.
type quietLog struct {
	log *slog.Logger
	msg string

	mu      sync.Mutex // protects following
	next    time.Time  // when a line may be logged again
	held    int        // occurrences since the last line
	attrs   []any      // those of the last occurrence held back
	pending *time.Timer
}

const quietInterval = time.Second

// add counts one occurrence and logs it, with attrs, unless a line was
// logged less than quietInterval ago.
func (q *quietLog) add(attrs ...any) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.held++
	now := time.Now()
	if now.Before(q.next) {
		q.attrs = attrs
		if q.pending == nil {
			q.pending = time.AfterFunc(q.next.Sub(now), q.flush)
		}
		return
	}
	q.emitLocked(now, attrs)
}

// flush logs what was held back, if anything.
func (q *quietLog) flush() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.pending != nil {
		q.pending.Stop()
		q.pending = nil
	}
	if q.held > 0 {
		q.emitLocked(time.Now(), q.attrs)
	}
}

func (q *quietLog) emitLocked(now time.Time, attrs []any) {
	q.log.Warn(q.msg, append(attrs, "count", q.held)...)
	q.held, q.attrs, q.next = 0, nil, now.Add(quietInterval)
}
