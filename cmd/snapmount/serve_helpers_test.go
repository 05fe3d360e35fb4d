package main

import (
	"bytes"
	"os"
	"runtime"
	"sync"
	"testing"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// syncYield lets the server goroutine run while a test polls its output.
func syncYield() { runtime.Gosched() }

// shortDir is a temporary directory with a path short enough for a Unix
// socket.
func shortDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "sm")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}
