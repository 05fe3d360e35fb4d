package main

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// sdNotify tells the service manager that started this process (systemd
// with Type=notify) about a change of state, e.g. "READY=1". The protocol
// is one datagram to the Unix socket $NOTIFY_SOCKET names, where a leading
// '@' means an abstract socket. addr "" (no service manager) does nothing.
func sdNotify(addr, state string) error {
	if addr == "" {
		return nil
	}
	if addr[0] != '/' && addr[0] != '@' {
		return fmt.Errorf("NOTIFY_SOCKET=%q is not a socket path or @name", addr)
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("notifying the service manager: %w", err)
	}
	defer unix.Close(fd)
	if err := unix.Sendto(fd, []byte(state), 0, &unix.SockaddrUnix{Name: addr}); err != nil {
		return fmt.Errorf("notifying the service manager at %s: %w", addr, err)
	}
	return nil
}
