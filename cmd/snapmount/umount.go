package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	flag "github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"snapmount/fusefs"
)

func init() {
	register(&command{
		name:  "umount",
		args:  "MOUNTPOINT",
		short: "unmount a snapmount mount and wait for its process to finish",
		long: `Unmounts MOUNTPOINT and waits for the mount process to exit. A mount
whose file is open is busy and stays mounted (close the file, or use
--lazy), unless its readers wait for a server that does not answer (the
server is unreachable, being reconnected to, its snapshot is gone, or a
read has waited over a second for its reply): then the mount process
fails those reads with EIO and ends the mount. A mount whose process is
gone ("transport endpoint is not connected") is cleaned up.`,
		setup: func(fs *flag.FlagSet) func(context.Context, stdio, []string) error {
			var lazy bool
			var wait time.Duration
			fs.BoolVarP(&lazy, "lazy", "z", false, "detach now even if files in the mount are still open")
			fs.DurationVar(&wait, "wait", 30*time.Second, "how long to wait for the mount process to exit")
			return func(ctx context.Context, std stdio, args []string) error {
				if err := wantArgs(args, 1, "MOUNTPOINT"); err != nil {
					return err
				}
				dir, err := filepath.Abs(args[0])
				if err != nil {
					return err
				}
				return runUmount(std, dir, lazy, wait)
			}
		},
	})
	register(&command{
		name:  "stats",
		args:  "MOUNTPOINT",
		short: "print a mount's state, cache and connection counters and its snapshot name",
		long: `Prints what the mount process of MOUNTPOINT (a snapmount mount) counts,
first its state, which says what reads of what is not cached get now:
  connected                      the server answers
  reconnecting since T           no connection: reads wait for one, for
                                 --timeout at most
  server unreachable since T     no answer for --timeout: reads fail at once
                                 with EIO until it answers again
  snapshot broken since T        the server broke the snapshot (its store
                                 full, or a failed copy): reads fail with EIO
  snapshot gone, export gone     the server no longer has it: reads fail with
                                 EIO; mount again for a new snapshot
  export changed                 the export is not the one mounted (its size
                                 or flags changed): reads fail with EIO
  unmounting                     the mount is ending
each followed by what the mount process knows of why.`,
		setup: func(fs *flag.FlagSet) func(context.Context, stdio, []string) error {
			var asJSON bool
			fs.BoolVar(&asJSON, "json", false, "print the raw JSON")
			return func(ctx context.Context, std stdio, args []string) error {
				if err := wantArgs(args, 1, "MOUNTPOINT"); err != nil {
					return err
				}
				dir, err := filepath.Abs(args[0])
				if err != nil {
					return err
				}
				if err := checkFuseMount(dir); err != nil {
					return err
				}
				raw, err := readStatsRawWithin(dir, statsWait)
				if err != nil {
					return err
				}
				if asJSON {
					fmt.Fprintf(std.out, "%s\n", raw)
					return nil
				}
				var st mountStats
				if err := json.Unmarshal(raw, &st); err != nil {
					return fmt.Errorf("reading counters: %w", err)
				}
				printStats(std, &st)
				return nil
			}
		},
	})
}

// statsWait bounds reading a mount's counters: a mount process that is
// stopped never answers.
const statsWait = 3 * time.Second

// checkFuseMount refuses a dir (absolute) where no FUSE file system is
// mounted, as no snapmount mount can be there. Any FUSE mount passes: one
// whose process is gone answers nothing that tells whose it was.
func checkFuseMount(dir string) error {
	typ, ok := fusefs.MountType(dir)
	if !ok {
		return withCode(exitMount, fmt.Errorf("%s is not a snapmount mount (nothing is mounted there)", dir))
	}
	if !strings.HasPrefix(typ, "fuse") {
		return withCode(exitMount, fmt.Errorf("%s is a %s mount, not snapmount's", dir, typ))
	}
	return nil
}

func runUmount(std stdio, dir string, lazy bool, wait time.Duration) error {
	if err := checkFuseMount(dir); err != nil {
		return err
	}
	// Learn the mount process before it goes, to wait for it.
	st, err := readStatsWithin(dir, statsWait)
	var gone *mountGoneError
	if errors.As(err, &gone) {
		if err := fusermount("-u", "-z", dir); err != nil {
			return withCode(exitMount, fmt.Errorf("%s: its mount process is gone, and removing the mount failed: %v", dir, err))
		}
		fmt.Fprintf(std.err, "snapmount umount: the mount process of %s was gone; removed its mount\n", dir)
		return nil
	}
	fmArgs := []string{"-u", dir}
	if lazy {
		fmArgs = []string{"-u", "-z", dir}
	}
	err = fusermount(fmArgs...)
	switch {
	case err == nil:
		if st != nil {
			if err := waitExit(st.PID, wait); err != nil {
				return withCode(exitMount, err)
			}
		}
		return nil
	case !strings.Contains(err.Error(), "busy"):
		return withCode(exitMount, fmt.Errorf("unmounting %s: %v", dir, err))
	case st == nil:
		return withCode(exitMount, fmt.Errorf("%s is busy (a file in it is open) and its mount process does not answer; use --lazy", dir))
	case !stuckOnServer(dir, st):
		return withCode(exitMount, fmt.Errorf("%s is busy (a file in it is open); close it, or use --lazy", dir))
	}
	// Readers wait for a server that does not answer: the mount process
	// fails their reads and ends the mount (see endMount).
	if err := syscall.Kill(st.PID, syscall.SIGTERM); err != nil {
		return withCode(exitMount, fmt.Errorf("%s is busy, and telling its mount process %d to end failed: %v", dir, st.PID, err))
	}
	if err := waitExit(st.PID, wait); err != nil {
		return withCode(exitMount, err)
	}
	if _, still := fusefs.MountType(dir); still {
		return withCode(exitMount, fmt.Errorf("the mount process of %s ended, but the mount is still there", dir))
	}
	return nil
}

// stuckOnServer reports whether the readers of the mount at dir (whose
// stats are st) are stuck on its server. A request in flight is watched
// until it has waited stuckWait, to tell a slow reply from none.
func stuckOnServer(dir string, st *mountStats) bool {
	for deadline := time.Now().Add(2 * stuckWait); ; {
		if st.waitsForServer() {
			return true
		}
		if st.Client.OldestWait == 0 || time.Now().After(deadline) {
			return false
		}
		time.Sleep(stuckWait / 10)
		next, err := readStatsWithin(dir, statsWait)
		if err != nil {
			return false
		}
		st = next
	}
}

// mountGoneError: the mount's process is gone, and the kernel answers
// ENOTCONN for the mount.
type mountGoneError struct{ dir string }

func (e *mountGoneError) Error() string {
	return fmt.Sprintf("the mount process of %s is gone (transport endpoint is not connected); 'snapmount umount %s' cleans up", e.dir, e.dir)
}

// readStatsRaw reads the counters of the mount at dir from its first file
// (the whole disk; every file has them).
func readStatsRaw(dir string) ([]byte, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, syscall.ENOTCONN) {
		return nil, &mountGoneError{dir}
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %v", dir, err)
	}
	if len(entries) == 0 || !entries[0].Type().IsRegular() {
		return nil, fmt.Errorf("%s does not look like a snapmount mount (it holds no file)", dir)
	}
	path := filepath.Join(dir, entries[0].Name())
	buf := make([]byte, 4096)
	for {
		n, err := unix.Getxattr(path, fusefs.StatsXattr, buf)
		if errors.Is(err, syscall.ERANGE) {
			buf = make([]byte, len(buf)*4)
			continue
		}
		if errors.Is(err, syscall.ENODATA) || errors.Is(err, syscall.ENOTSUP) {
			return nil, fmt.Errorf("%s is not a snapmount mount (no %s)", dir, fusefs.StatsXattr)
		}
		if errors.Is(err, syscall.ENOTCONN) {
			return nil, &mountGoneError{dir}
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %v", path, err)
		}
		return buf[:n], nil
	}
}

// readStatsRawWithin is readStatsRaw, giving up after d: a stopped mount
// process leaves the file system calls waiting.
func readStatsRawWithin(dir string, d time.Duration) ([]byte, error) {
	type result struct {
		raw []byte
		err error
	}
	done := make(chan result, 1)
	go func() {
		raw, err := readStatsRaw(dir)
		done <- result{raw, err}
	}()
	select {
	case r := <-done:
		return r.raw, r.err
	case <-time.After(d):
		return nil, fmt.Errorf("the mount process of %s does not answer (stopped?) within %v", dir, d)
	}
}

func readStatsWithin(dir string, d time.Duration) (*mountStats, error) {
	raw, err := readStatsRawWithin(dir, d)
	if err != nil {
		return nil, err
	}
	var st mountStats
	if err := json.Unmarshal(raw, &st); err != nil {
		return nil, err
	}
	return &st, nil
}

func printStats(std stdio, st *mountStats) {
	w := std.out
	view := "treated as live: may change under the mount"
	switch {
	case st.FrozenByUser:
		view = "frozen, as --frozen says"
	case st.Frozen:
		view = "frozen snapshot"
	}
	c, n := st.Cache, st.Client
	lookups := c.Hits + c.Misses + c.ZeroHits + c.InflightJoins
	hitRate := 0.0
	if lookups > 0 {
		hitRate = float64(c.Hits+c.ZeroHits+c.InflightJoins) * 100 / float64(lookups)
	}
	fmt.Fprintf(w, "export:         %s (%s)\n", st.Export, view)
	fmt.Fprintf(w, "state:          %s\n", st.mountState)
	fmt.Fprintf(w, "uri:            %s\n", st.URI)
	fmt.Fprintf(w, "size:           %d (%s)\n", st.Size, humanSize(uint64(st.Size)))
	fmt.Fprintf(w, "pid:            %d, mounted %s, %d Go processors\n", st.PID, st.MountedAt.Format(time.RFC3339), st.Procs)
	fmt.Fprintf(w, "connections:    %d of %d alive, %d reconnects, %d retries, %d timeouts, %d failed at once (server unreachable)\n", n.Conns, n.Slots, n.Reconnects, n.Retries, n.Timeouts, n.FailedFast)
	if e := n.LastServerError; e != nil {
		fmt.Fprintf(w, "server errors:  %d, the last at %s: %s %s\n", e.Count, e.At.Format(time.RFC3339), e.Errno, e.Message)
	}
	fmt.Fprintf(w, "requests:       %d (%s read from the server)\n", n.Requests, humanSize(uint64(n.BytesRead)))
	fmt.Fprintf(w, "cache:          %s of %s in %s blocks\n", humanSize(uint64(c.CachedBytes)), humanSize(uint64(c.MaxBytes)), humanSize(uint64(c.BlockSize)))
	fmt.Fprintf(w, "block lookups:  %d hits, %d zero (holes, no transfer), %d joined a fetch, %d misses (%.1f%% served without a new fetch)\n", c.Hits, c.ZeroHits, c.InflightJoins, c.Misses, hitRate)
	fmt.Fprintf(w, "uncached:       %d first random misses read around the cache\n", c.Uncached)
	fmt.Fprintf(w, "fetched:        %s in %d requests, %d errors\n", humanSize(uint64(c.BytesFetched)), c.SourceReads, c.Errors)
	fmt.Fprintf(w, "readahead:      %d blocks, %d used, %d wasted\n", c.ReadaheadBlocks, c.ReadaheadUsed, c.ReadaheadWasted)
	fmt.Fprintf(w, "evictions:      %d\n", c.Evictions)
	printDiskStats(w, st.Partitions, st.Overlay)
}

// waitExit waits for a process to exit, without polling: a pidfd becomes
// readable when its process ends.
func waitExit(pid int, timeout time.Duration) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if errors.Is(err, syscall.ESRCH) {
		return nil // already gone
	}
	if err != nil {
		return nil // cannot watch it; the unmount itself succeeded
	}
	defer unix.Close(fd)
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return fmt.Errorf("unmounted, but the mount process %d is still running after %v", pid, timeout)
		}
		n, err := unix.Poll(fds, int(left.Milliseconds())+1)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil || n > 0 {
			return nil
		}
	}
}
