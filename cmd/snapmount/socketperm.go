package main

import (
	"os"
	"os/user"
	"strconv"
)

// socketPerm is who may connect to the Unix socket: its mode and group
// (gid -1: the process's).
type socketPerm struct {
	mode    os.FileMode
	setMode bool
	gid     int
	group   string
}

// parseSocketPerm reads --socket-mode and --socket-group.
func parseSocketPerm(socket, mode, group string) (socketPerm, error) {
	p := socketPerm{gid: -1, group: group}
	if socket == "" && (mode != "" || group != "") {
		return p, usagef("--socket-mode and --socket-group need --socket PATH")
	}
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			g, err = user.LookupGroupId(group)
		}
		if err != nil {
			return p, usagef("--socket-group %q: no such group", group)
		}
		p.gid, _ = strconv.Atoi(g.Gid)
		p.mode, p.setMode = 0o660, true
	}
	if mode != "" {
		m, err := strconv.ParseUint(mode, 8, 32)
		if err != nil || m > 0o777 {
			return p, usagef("--socket-mode %q: want an octal mode such as 0660", mode)
		}
		p.mode, p.setMode = os.FileMode(m), true
	}
	return p, nil
}
