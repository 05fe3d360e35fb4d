package main

import (
	"fmt"
	"strings"
	"time"

	flag "github.com/spf13/pflag"

	"snapmount/nbd"
)

// clientFlags are the flags every command that connects to a server
// shares (info, copy, mount).
type clientFlags struct {
	tlsCA, tlsCert, tlsKey string
	noPromise              bool
	timeout                time.Duration
}

func (f *clientFlags) bind(fs *flag.FlagSet) {
	fs.StringVar(&f.tlsCA, "tls-ca", "", "CA certificate (PEM) that signed the server's certificate")
	fs.StringVar(&f.tlsCert, "tls-cert", "", "client certificate (PEM) for servers that ask for one")
	fs.StringVar(&f.tlsKey, "tls-key", "", "key (PEM) of the client certificate")
	fs.BoolVar(&f.noPromise, "no-promise", false, "do not send the read-only promise (NBD_OPT_X_READ_ONLY)")
	fs.DurationVar(&f.timeout, "timeout", 30*time.Second, "fail a read with EIO after this long without the server (reconnects included)")
}

// parse reads the URI argument and builds the dial options.
func (f *clientFlags) parse(arg string) (*nbd.URI, nbd.DialOptions, error) {
	var opt nbd.DialOptions
	u, err := nbd.ParseURI(arg)
	if err != nil {
		return nil, opt, &usageError{err.Error()}
	}
	if f.timeout <= 0 {
		return nil, opt, usagef("--timeout must be positive")
	}
	opt.NoPromise = f.noPromise
	opt.HandshakeTimeout = f.timeout
	tlsFiles := f.tlsCA != "" || f.tlsCert != "" || f.tlsKey != ""
	if tlsFiles && !u.TLS {
		return nil, opt, usagef("--tls-ca/--tls-cert/--tls-key need an nbds:// or nbds+unix:// URI")
	}
	if u.TLS {
		cfg, err := nbd.TLSConfig(u, f.tlsCA, f.tlsCert, f.tlsKey)
		if err != nil {
			return nil, opt, &usageError{err.Error()}
		}
		opt.TLS = cfg
	}
	return u, opt, nil
}

// humanSize prints a byte count the way nbdinfo does: with the largest
// binary unit that divides it exactly, else with one decimal.
func humanSize(n uint64) string {
	units := []string{"", "K", "M", "G", "T", "P", "E"}
	i := 0
	for i < len(units)-1 && n >= 1024 && n%1024 == 0 {
		n /= 1024
		i++
	}
	if i > 0 || n < 1024 {
		return fmt.Sprintf("%d%s", n, units[i])
	}
	f := float64(n)
	for i < len(units)-1 && f >= 1024 {
		f /= 1024
		i++
	}
	return strings.TrimSuffix(fmt.Sprintf("%.1f", f), ".0") + units[i]
}

// sizeFlag is a pflag.Value for byte sizes with suffixes.
type sizeFlag struct{ v *int64 }

func (s sizeFlag) String() string {
	if s.v == nil {
		return "0"
	}
	return humanSize(uint64(*s.v))
}
func (s sizeFlag) Set(v string) error {
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	*s.v = n
	return nil
}
func (s sizeFlag) Type() string { return "size" }
