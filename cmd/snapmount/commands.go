package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"

	flag "github.com/spf13/pflag"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// stdio is what a command may print to: the writers run() was given, so
// tests capture output without touching os.Stdout.
type stdio struct {
	out, err io.Writer
}

// command is one subcommand. Each lives in its own file and registers
// itself from init(), so adding one touches no shared list.
type command struct {
	name  string
	args  string // positional arguments for the usage line, e.g. "URI DEST"
	short string // one line for the command list
	long  string // more help, printed by "snapmount help NAME"
	// setup binds the command's flags into fs and returns the function
	// that runs it with the positional arguments.
	setup func(fs *flag.FlagSet) func(ctx context.Context, io stdio, args []string) error
}

var commands = map[string]*command{}

func register(c *command) {
	if _, dup := commands[c.name]; dup {
		panic("snapmount: command registered twice: " + c.name)
	}
	commands[c.name] = c
}

// usageError is a mistake on the command line: it exits with exitUsage.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

// exitError carries the exit code of a failure class.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func withCode(code int, err error) error {
	if err == nil {
		return nil
	}
	return &exitError{code, err}
}

// run is main without the process: it parses args, runs one command and
// returns the exit code. Every failure is printed as one line on stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	std := stdio{stdout, stderr}
	if len(args) == 0 {
		printCommands(stderr)
		return exitUsage
	}
	name := args[0]
	switch name {
	case "-h", "--help", "help":
		if len(args) > 1 {
			if c, ok := commands[args[1]]; ok {
				printCommandHelp(stdout, c)
				return exitOK
			}
		}
		printCommands(stdout)
		return exitOK
	case "-V", "--version", "version":
		fmt.Fprintf(stdout, "snapmount %s\n", version)
		return exitOK
	}
	c, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "snapmount: unknown command %q (run 'snapmount help' for the list)\n", name)
		return exitUsage
	}
	fs := flag.NewFlagSet("snapmount "+c.name, flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are printed below, as one line
	fs.SortFlags = false
	runCmd := c.setup(fs)
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printCommandHelp(stdout, c)
			return exitOK
		}
		fmt.Fprintf(stderr, "snapmount %s: %v (see 'snapmount %s --help')\n", c.name, err, c.name)
		return exitUsage
	}
	err := runCmd(ctx, std, fs.Args())
	if err == nil {
		return exitOK
	}
	msg := strings.TrimSpace(err.Error())
	msg = strings.ReplaceAll(msg, "\n", "; ")
	var ue *usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "snapmount %s: %s (see 'snapmount %s --help')\n", c.name, msg, c.name)
		return exitUsage
	}
	fmt.Fprintf(stderr, "snapmount %s: %s\n", c.name, msg)
	var ee *exitError
	if errors.As(err, &ee) {
		return ee.code
	}
	if ctx.Err() != nil {
		return exitSignal
	}
	return exitFailure
}

func printCommands(w io.Writer) {
	fmt.Fprintf(w, "snapmount %s: mount a read-only, point-in-time snapshot of a live disk image as one file\n\nUsage: snapmount COMMAND [flags] ARGS\n\nCommands:\n", version)
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-8s %s\n", n, commands[n].short)
	}
	fmt.Fprintf(w, "\nRun 'snapmount help COMMAND' or 'snapmount COMMAND --help' for its flags.\n")
}

func printCommandHelp(w io.Writer, c *command) {
	fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
	fs.SortFlags = false
	c.setup(fs)
	fmt.Fprintf(w, "Usage: snapmount %s [flags] %s\n\n%s\n", c.name, c.args, c.short)
	if c.long != "" {
		fmt.Fprintf(w, "\n%s\n", strings.TrimSpace(c.long))
	}
	if fs.HasFlags() {
		fmt.Fprintf(w, "\nFlags:\n%s", fs.FlagUsages())
	}
}

// wantArgs checks the number of positional arguments.
func wantArgs(args []string, n int, names string) error {
	if len(args) != n {
		return usagef("want %s, got %d argument(s)", names, len(args))
	}
	return nil
}

// isTerminal reports whether w is a terminal (for progress output).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
