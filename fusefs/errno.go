package fusefs

import (
	"context"
	"errors"
	"fmt"
	"log"
	"sync"
	"syscall"
	"time"
)

// syscaller is an error that knows its errno without wrapping a
// syscall.Errno, such as the NBD client's wire errno type.
type syscaller interface {
	Syscall() syscall.Errno
}

// toErrno is the only place where an error from the reader becomes the
// errno the kernel hands to the application:
//
//   - the request was interrupted (ctx is done) or the error is
//     context.Canceled: EINTR, as go-fuse's interrupt protocol asks;
//   - the error wraps a syscall.Errno (errors.As): that errno, so an NBD
//     server's EIO or EINVAL reaches the application unchanged;
//   - the error has a Syscall() syscall.Errno method: that errno;
//   - anything else, context.DeadlineExceeded included (a timeout below us is
//     a failed read, not an interrupt): EIO.
//
// A nil error maps to 0.
func toErrno(ctx context.Context, err error) syscall.Errno {
	if err == nil {
		return 0
	}
	if ctx.Err() != nil || errors.Is(err, context.Canceled) {
		return syscall.EINTR
	}
	var errno syscall.Errno
	if errors.As(err, &errno) && errno != 0 {
		return errno
	}
	var sc syscaller
	if errors.As(err, &sc) {
		if errno := sc.Syscall(); errno != 0 {
			return errno
		}
	}
	return syscall.EIO
}

// Log rate limit: a dead server fails every request, and the kernel retries
// readahead page by page; a few lines say as much as thousands.
const (
	logWindow = 10 * time.Second
	logBurst  = 10 // lines per window
)

// errorLog writes errors to a log.Logger, at most logBurst lines per
// logWindow; the number of lines dropped is reported with the next line that
// gets through. It is safe for concurrent use.
type errorLog struct {
	logger *log.Logger
	now    func() time.Time

	mu          sync.Mutex // protects following
	windowStart time.Time
	inWindow    int // lines printed since windowStart
	dropped     int // lines dropped since the last printed line
}

func newErrorLog(logger *log.Logger) *errorLog {
	return &errorLog{logger: logger, now: time.Now}
}

func (l *errorLog) printf(format string, args ...any) {
	l.mu.Lock()
	now := l.now()
	if now.Sub(l.windowStart) >= logWindow {
		l.windowStart = now
		l.inWindow = 0
	}
	if l.inWindow >= logBurst {
		l.dropped++
		l.mu.Unlock()
		return
	}
	l.inWindow++
	dropped := l.dropped
	l.dropped = 0
	l.mu.Unlock()

	msg := fmt.Sprintf(format, args...)
	if dropped > 0 {
		msg += fmt.Sprintf(" (%d similar errors not logged)", dropped)
	}
	l.logger.Print(msg)
}
