package main

// Mounting in the background: the command starts itself again in a
// session of its own and waits on a pipe until the mount process says it
// is ready, or why it failed.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
)

// readyFDEnv names the file descriptor on which a background mount
// process reports to the command that started it.
const readyFDEnv = "SNAPMOUNT_READY_FD"

// spawnMount starts this command again as a background process and waits
// until it reports that the mount is ready, or why it failed.
func spawnMount(ctx context.Context, std stdio) error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	self, err := os.Executable()
	if err != nil {
		self = "/proc/self/exe"
	}
	cmd := exec.Command(self, os.Args[1:]...)
	cmd.Env = append(os.Environ(), readyFDEnv+"=3")
	cmd.ExtraFiles = []*os.File{w}
	// A session of its own: the mount outlives the terminal and is not
	// hit by the shell's ^C meant for this command.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return withCode(exitMount, fmt.Errorf("starting the mount process: %w", err))
	}
	w.Close()
	go func() { _ = cmd.Wait() }() // reap it if it dies while we wait

	sc := bufio.NewScanner(r)
	for sc.Scan() {
		kind, msg, _ := strings.Cut(sc.Text(), " ")
		switch kind {
		case "warn":
			fmt.Fprintf(std.err, "snapmount mount: warning: %s\n", msg)
		case "ready":
			return nil
		case "error":
			codeStr, text, _ := strings.Cut(msg, " ")
			code, _ := strconv.Atoi(codeStr)
			if code == 0 {
				code = exitFailure
			}
			return withCode(code, errors.New(text))
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return withCode(exitMount, errors.New("the mount process ended without reporting; run with -f to see why"))
}

// reporter tells the starting command how the mount went: through the
// ready pipe for a background process, on stderr in the foreground.
type reporter struct {
	pipe   *os.File // nil in the foreground
	stderr io.Writer
}

func newReporter(fd string, stderr io.Writer) (*reporter, error) {
	if fd == "" {
		return &reporter{stderr: stderr}, nil
	}
	n, err := strconv.Atoi(fd)
	if err != nil || n < 3 {
		return nil, fmt.Errorf("bad %s=%q", readyFDEnv, fd)
	}
	return &reporter{pipe: os.NewFile(uintptr(n), "ready-pipe"), stderr: stderr}, nil
}

func (r *reporter) warn(msg string) {
	if r.pipe != nil {
		fmt.Fprintf(r.pipe, "warn %s\n", oneLine(msg))
		return
	}
	fmt.Fprintf(r.stderr, "snapmount mount: warning: %s\n", msg)
}

func (r *reporter) ready() {
	if r.pipe != nil {
		fmt.Fprintln(r.pipe, "ready")
		r.pipe.Close()
		r.pipe = nil
	}
}

// done reports a failure before the mount was ready (after that there is
// no one to tell but the log).
func (r *reporter) done(err error) {
	if r.pipe == nil {
		return
	}
	if err != nil {
		code := exitFailure
		var ee *exitError
		if errors.As(err, &ee) {
			code = ee.code
		}
		fmt.Fprintf(r.pipe, "error %d %s\n", code, oneLine(err.Error()))
	}
	r.pipe.Close()
	r.pipe = nil
}

func oneLine(s string) string { return strings.ReplaceAll(strings.TrimSpace(s), "\n", "; ") }
