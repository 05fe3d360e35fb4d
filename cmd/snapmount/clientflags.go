package main

import (
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
	fs.DurationVar(&f.timeout, "timeout", 30*time.Second, "how long to wait for the server once it stops answering: then reads fail at once with EIO until it is back")
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
