package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	flag "github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"snapmount/nbd"
	"snapmount/nbd/server"
)

func init() {
	register(&command{
		name:  "serve",
		args:  "[NAME=]IMAGE...",
		short: "serve images over NBD: read-write to writers, point-in-time snapshots to readers",
		long: `Serves each IMAGE (a file or block device) as an NBD export named NAME,
by default the image's base name. For export "disk" clients may open:

  disk           read-write, live (a writer); a client that sent the
                 read-only promise (snapmount mount does) gets a new
                 snapshot instead, or the live image with --reader-view=live
  disk@snapshot  a new point-in-time snapshot, read-only (any client)
  disk@sN        join snapshot N, e.g. to reconnect (error once it is gone)
  disk@live      read-only, live

A snapshot's canonical name (disk@s7) is sent in NBD_INFO_NAME. Snapshots
are kept by copy-before-write: before a writer changes a block a snapshot
still needs, the old block is copied to the snapshot's store. A snapshot
lives while a connection uses it, plus --snapshot-linger.

Stores are sparse files in --snapshot-dir ($TMPDIR, else /tmp, by
default) with no name on disk (O_TMPFILE, or unlinked as soon as made
where the file system cannot): ls does not show them, df does. The
kernel frees their space when the snapshot goes or the server ends, even
if the server is killed or crashes; nothing is left to clean up.

Only writes that go through this server are seen by snapshots: if another
process changes the image file, snapshots of it are not point-in-time.

Images are served as raw disks. One whose header says it is a container
(qcow2, QED, VMDK, VDI, VHDX, VHD, LUKS, ...) is refused, with what to
use instead, unless --format raw.

Listens on TCP (--listen, default 127.0.0.1:10809; --listen "" or --no-tcp
turns TCP off) and/or a Unix socket (--socket). Prints one line when ready,
and tells a service manager (systemd Type=notify, $NOTIFY_SOCKET) too.
SIGINT/SIGTERM stop it cleanly: requests in flight finish, images are
flushed, snapshot stores are freed.

The socket file is the access control of --socket: a client needs write
permission on it. --socket-group GROUP (mode 0660) lets GROUP's members,
e.g. the users who mount snapshots, connect to a server run as root.

Examples:
  snapmount serve --socket /tmp/nbd.sock vm.img
  snapmount serve --no-tcp --socket /run/vm1.sock --socket-group kvm vm1.img
  snapmount serve --max-writers 1 --busy refuse disk=/dev/vg/vm1
  nbdcopy nbd://127.0.0.1/vm.img@snapshot backup.img`,
		setup: setupServe,
	})
}

type serveFlags struct {
	listen, socket           string
	socketMode, socketGroup  string
	noTCP                    bool
	tlsMode, tlsCert, tlsKey string
	tlsCA                    string
	readOnly                 bool
	format                   string
	maxWriters               int
	busy                     string
	snapDir                  string
	snapMax                  int64
	snapLinger               time.Duration
	onFull                   string
	snapBlock                int64
	readerView               string
	maxConns, maxHandshakes  int
	handshakeTimeout         time.Duration
	workers                  int
	descriptions             []string
	verbose                  bool
}

func setupServe(fs *flag.FlagSet) func(ctx context.Context, io stdio, args []string) error {
	var f serveFlags
	fs.StringVar(&f.listen, "listen", "127.0.0.1:10809", "listen on TCP at `HOST:PORT` (\"\" for no TCP)")
	fs.BoolVar(&f.noTCP, "no-tcp", false, "do not listen on TCP (same as --listen \"\")")
	fs.StringVar(&f.socket, "socket", "", "also listen on the Unix socket at `PATH`")
	fs.StringVar(&f.socketMode, "socket-mode", "", "permissions of the --socket file, octal `MODE` (default: 0660 with --socket-group, else as the umask gives)")
	fs.StringVar(&f.socketGroup, "socket-group", "", "give the --socket file to `GROUP`, whose members may then connect")
	fs.StringVar(&f.tlsMode, "tls", "off", "`MODE`: off, on (offered) or require")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "server certificate `FILE` (PEM)")
	fs.StringVar(&f.tlsKey, "tls-key", "", "server private key `FILE` (PEM)")
	fs.StringVar(&f.tlsCA, "tls-ca", "", "require client certificates signed by the CA in `FILE` (PEM)")
	fs.BoolVar(&f.readOnly, "readonly", false, "serve every image read-only (no writers)")
	fs.StringVar(&f.format, "format", "", "`raw`: serve every IMAGE as raw bytes even if its header says qcow2, VMDK, VHD, LUKS, ... (such images are refused otherwise)")
	fs.IntVar(&f.maxWriters, "max-writers", 0, "`N` writer connections per export at most, 0 for unlimited")
	fs.StringVar(&f.busy, "busy", "readonly", "what a writer over --max-writers gets (`POLICY`): readonly (a live read-only view) or refuse")
	fs.StringVar(&f.snapDir, "snapshot-dir", "", "`DIR` for snapshot stores, files with no name (default: $TMPDIR, else /tmp)")
	fs.Var(sizeFlag{&f.snapMax}, "snapshot-max", "all snapshot stores may hold together, e.g. 512M or 4G (0: no limit)")
	fs.DurationVar(&f.snapLinger, "snapshot-linger", server.DefaultSnapshotLinger, "keep an unused snapshot this long for reconnects")
	fs.StringVar(&f.onFull, "on-snapshot-full", "break-snapshot", "`POLICY` when a snapshot cannot keep a block: break-snapshot (its readers get EIO) or fail-writer (the write fails)")
	f.snapBlock = 64 << 10
	fs.Var(sizeFlag{&f.snapBlock}, "snapshot-block", "copy-before-write granularity, a power of two from 4K to 16M")
	fs.StringVar(&f.readerView, "reader-view", "snapshot", "`VIEW` a client that promised to read only gets for NAME: snapshot or live")
	fs.IntVar(&f.maxConns, "max-conns", server.DefaultMaxConns, "at most `N` connections past their handshake; one more is refused (NBD_REP_ERR_POLICY) until one ends")
	fs.IntVar(&f.maxHandshakes, "max-handshakes", server.DefaultMaxHandshakes, "at most `N` connections in their handshake; a new one closes the oldest")
	fs.DurationVar(&f.handshakeTimeout, "handshake-timeout", server.DefaultHandshakeTimeout, "time a client has to choose an export")
	fs.IntVar(&f.workers, "workers", server.DefaultWorkers, "`N` requests of one connection handled at once")
	fs.StringArrayVar(&f.descriptions, "description", nil, "describe an export: `NAME=TEXT` (repeatable)")
	fs.BoolVarP(&f.verbose, "verbose", "v", false, "log refused options and requests too")
	return func(ctx context.Context, std stdio, args []string) error {
		return runServe(ctx, std, &f, args, fs.Changed("listen"))
	}
}

// serveConfig turns flags and arguments into a server configuration.
func serveConfig(f *serveFlags, args []string) (server.Config, error) {
	var cfg server.Config
	if len(args) == 0 {
		return cfg, usagef("want at least one [NAME=]IMAGE")
	}
	for _, a := range args {
		ec, err := parseExportArg(a)
		if err != nil {
			return cfg, usagef("%v", strings.TrimPrefix(err.Error(), "nbd: "))
		}
		cfg.Exports = append(cfg.Exports, ec)
	}
	for _, d := range f.descriptions {
		name, text, ok := strings.Cut(d, "=")
		i := exportIndex(cfg.Exports, name)
		if !ok || i < 0 {
			return cfg, usagef("--description %q: want NAME=TEXT with the NAME of an export", d)
		}
		cfg.Exports[i].Description = text
	}
	cfg.ReadOnly = f.readOnly
	switch f.tlsMode {
	case "off":
		cfg.TLSMode = server.TLSOff
	case "on":
		cfg.TLSMode = server.TLSOn
	case "require":
		cfg.TLSMode = server.TLSRequire
	default:
		return cfg, usagef("--tls=%q: want off, on or require", f.tlsMode)
	}
	if cfg.TLSMode != server.TLSOff {
		if f.tlsCert == "" || f.tlsKey == "" {
			return cfg, usagef("--tls=%s needs --tls-cert and --tls-key", f.tlsMode)
		}
		tc, err := server.TLSConfig(f.tlsCert, f.tlsKey, f.tlsCA)
		if err != nil {
			return cfg, err
		}
		cfg.TLSConfig = tc
	} else if f.tlsCert != "" || f.tlsKey != "" || f.tlsCA != "" {
		return cfg, usagef("--tls-cert, --tls-key and --tls-ca need --tls=on or --tls=require")
	}
	if f.maxWriters < 0 {
		return cfg, usagef("--max-writers %d: want 0 (unlimited) or more", f.maxWriters)
	}
	cfg.MaxWriters = f.maxWriters
	switch f.busy {
	case "readonly":
		cfg.Busy = server.BusyReadOnly
	case "refuse":
		cfg.Busy = server.BusyRefuse
	default:
		return cfg, usagef("--busy=%q: want readonly or refuse", f.busy)
	}
	cfg.SnapshotDir = f.snapDir
	cfg.SnapshotMax = f.snapMax
	switch {
	case f.snapLinger < 0:
		return cfg, usagef("--snapshot-linger %v: want 0 or more", f.snapLinger)
	case f.snapLinger == 0:
		cfg.SnapshotLinger = -1 // drop as soon as unused
	default:
		cfg.SnapshotLinger = f.snapLinger
	}
	switch f.onFull {
	case "break-snapshot":
		cfg.OnSnapshotFull = server.BreakSnapshot
	case "fail-writer":
		cfg.OnSnapshotFull = server.FailWriter
	default:
		return cfg, usagef("--on-snapshot-full=%q: want break-snapshot or fail-writer", f.onFull)
	}
	if b := f.snapBlock; b < 4096 || b > 16<<20 || b&(b-1) != 0 {
		return cfg, usagef("--snapshot-block %s: want a power of two from 4K to 16M", humanSize(uint64(b)))
	}
	cfg.SnapshotBlock = int(f.snapBlock)
	switch f.readerView {
	case "snapshot":
		cfg.ReaderView = server.ReaderViewSnapshot
	case "live":
		cfg.ReaderView = server.ReaderViewLive
	default:
		return cfg, usagef("--reader-view=%q: want snapshot or live", f.readerView)
	}
	if f.maxConns <= 0 {
		return cfg, usagef("--max-conns %d: want at least 1", f.maxConns)
	}
	cfg.MaxConns = f.maxConns
	if f.maxHandshakes <= 0 {
		return cfg, usagef("--max-handshakes %d: want at least 1", f.maxHandshakes)
	}
	cfg.MaxHandshakes = f.maxHandshakes
	if f.handshakeTimeout <= 0 {
		return cfg, usagef("--handshake-timeout %v: want more than 0", f.handshakeTimeout)
	}
	cfg.HandshakeTimeout = f.handshakeTimeout
	if f.workers <= 0 || f.workers > 1024 {
		return cfg, usagef("--workers %d: want 1 to 1024", f.workers)
	}
	cfg.Workers = f.workers
	return cfg, nil
}

func exportIndex(exports []server.ExportConfig, name string) int {
	for i, e := range exports {
		if e.Name == name {
			return i
		}
	}
	return -1
}

func runServe(ctx context.Context, std stdio, f *serveFlags, args []string, listenSet bool) error {
	cfg, err := serveConfig(f, args)
	if err != nil {
		return err
	}
	tcpAddr := f.listen
	if f.noTCP {
		if listenSet && f.listen != "" {
			return usagef("--no-tcp and --listen %q contradict each other", f.listen)
		}
		tcpAddr = ""
	}
	if tcpAddr == "" && f.socket == "" {
		return usagef("nothing to listen on: give --socket PATH or a --listen address")
	}
	if tcpAddr != "" {
		if err := checkListenAddr(tcpAddr); err != nil {
			return err
		}
	}
	sockPerm, err := parseSocketPerm(f.socket, f.socketMode, f.socketGroup)
	if err != nil {
		return err
	}
	paths := make([]string, len(cfg.Exports))
	for i, e := range cfg.Exports {
		paths[i] = e.Path
	}
	if err := checkImageFormat(f.format, paths); err != nil {
		return err
	}
	level := slog.LevelInfo
	if f.verbose {
		level = slog.LevelDebug
	}
	cfg.Logger = slog.New(slog.NewTextHandler(std.err, &slog.HandlerOptions{Level: level}))

	srv, err := server.New(cfg)
	if err != nil {
		return err
	}
	var listeners []net.Listener
	var where []string
	fail := func(err error) error {
		for _, l := range listeners {
			l.Close()
		}
		srv.Close()
		return withCode(exitConnect, err)
	}
	if f.socket != "" {
		l, err := listenUnix(f.socket, sockPerm)
		if err != nil {
			return fail(err)
		}
		listeners = append(listeners, l)
		where = append(where, "unix:"+f.socket)
	}
	if tcpAddr != "" {
		l, err := net.Listen("tcp", tcpAddr)
		if err != nil {
			return fail(listenError(tcpAddr, err))
		}
		listeners = append(listeners, l)
		where = append(where, "tcp:"+l.Addr().String())
	}

	errc := make(chan error, len(listeners))
	for _, l := range listeners {
		go func() { errc <- srv.Serve(l) }()
	}
	fmt.Fprintf(std.out, "snapmount serve: listening on %s (exports: %s)\n", strings.Join(where, ", "), strings.Join(srv.Exports(), ", "))
	notifySocket := os.Getenv("NOTIFY_SOCKET")
	if err := sdNotify(notifySocket, "READY=1\nSTATUS=listening on "+strings.Join(where, ", ")); err != nil {
		cfg.Logger.Warn(err.Error())
	}

	var serveErr error
	select {
	case <-ctx.Done():
		cfg.Logger.Info("shutting down: finishing requests in flight")
	case serveErr = <-errc:
	}
	if err := sdNotify(notifySocket, "STOPPING=1"); err != nil {
		cfg.Logger.Warn(err.Error())
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	shutErr := srv.Shutdown(sctx)
	if f.socket != "" {
		os.Remove(f.socket)
	}
	if serveErr != nil && !errors.Is(serveErr, server.ErrClosed) {
		return serveErr
	}
	return shutErr
}

// checkListenAddr refuses a --listen address that is not HOST:PORT with
// a port from 0 to 65535 (or a service name): a command-line error, not a
// server already there.
func checkListenAddr(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return usagef("--listen %q: want HOST:PORT, e.g. 127.0.0.1:10809 (%v)", addr, err)
	}
	if n, err := strconv.Atoi(port); err == nil {
		if n < 0 || n > 65535 {
			return usagef("--listen %q: invalid port %d (want 0 to 65535)", addr, n)
		}
		return nil
	}
	if _, err := net.LookupPort("tcp", port); err != nil {
		return usagef("--listen %q: invalid port %q (want a number from 0 to 65535)", addr, port)
	}
	return nil
}

// listenError says why listening on a well-formed address failed, with
// what to do about it.
func listenError(addr string, err error) error {
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		return fmt.Errorf("listening on %s: the address is in use (another server there? pick another with --listen)", addr)
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("listening on %s: no interface of this machine has that address", addr)
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("listening on %s: permission denied (ports below 1024 need privileges)", addr)
	case errors.As(err, &dnsErr):
		return fmt.Errorf("listening on %s: cannot resolve host %q", addr, dnsErr.Name)
	}
	return fmt.Errorf("listening on %s: %w", addr, err)
}

// listenUnix listens on a Unix socket, replacing a stale socket file left
// by a crashed server but never one a live server still answers on, and
// gives it perm.
func listenUnix(path string, perm socketPerm) (net.Listener, error) {
	if st, err := os.Lstat(path); err == nil {
		if st.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("--socket %s exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("--socket %s: another server is listening there", path)
		}
		os.Remove(path)
	}
	// The socket is born owner-only, so that nobody connects before it
	// has its mode and group (the process is not serving yet: nothing
	// else creates files meanwhile).
	umask := unix.Umask(0o177)
	l, err := net.Listen("unix", path)
	unix.Umask(umask)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false) // removed by runServe, after shutdown
	mode := 0o777 &^ os.FileMode(umask)
	if perm.setMode {
		mode = perm.mode
	}
	if perm.gid >= 0 {
		if err := os.Chown(path, -1, perm.gid); err != nil {
			l.Close()
			os.Remove(path)
			return nil, fmt.Errorf("--socket-group %s: %w (only root or a member of the group may give it a file)", perm.group, err)
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		l.Close()
		os.Remove(path)
		return nil, fmt.Errorf("--socket-mode: %w", err)
	}
	return l, nil
}

// parseExportArg parses a command-line export, "[NAME=]IMAGE". Without a
// NAME the export is named after the image file's base name.
func parseExportArg(arg string) (server.ExportConfig, error) {
	var ec server.ExportConfig
	name, path, ok := strings.Cut(arg, "=")
	if !ok || strings.Contains(name, "/") {
		// No '=' before the first '/': the whole argument is a path.
		name, path = "", arg
	}
	if path == "" {
		return ec, fmt.Errorf("nbd: %q names no image file", arg)
	}
	if name == "" {
		name = baseName(path)
	}
	if err := nbd.CheckExportName(name); err != nil {
		return ec, err
	}
	return server.ExportConfig{Name: name, Path: path}, nil
}

func baseName(path string) string {
	path = strings.TrimRight(path, "/")
	if i := strings.LastIndexByte(path, '/'); i >= 0 {
		return path[i+1:]
	}
	return path
}
