// Package cli is the etcd-proxy-proxy command: flags and environment to proxy.Config, the serve loop with its
// signals, and the version subcommand. The demo is a command of its own, cmd/demo, so that this one links no
// test rig.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/hashicorp/go-multierror"
	"go.etcd.io/etcd/api/v3/version"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// Version is the release, set with -ldflags "-X .../cli.Version=...".
var Version = "0.1.0-dev"

// Exit statuses.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

// Main runs the command with args (os.Args) and returns the exit status.
func Main(args []string, stdout, stderr io.Writer) int {
	if len(args) > 1 {
		switch args[1] {
		case "demo":
			// Older READMEs ran the demo as a subcommand: say where it went rather than parse "demo" as an argument.
			fmt.Fprintln(stderr, "etcd-proxy-proxy: the demo is a command of its own now: go run ./cmd/demo [--dir DIR], in the source tree")
			return exitUsage
		case "version":
			printVersion(stdout)
			return exitOK
		case "agent":
			return runAgent(args[2:], stderr) // agent.go
		case "keygen":
			return keygen(args[2:], stdout, stderr)
		case "encrypt", "decrypt":
			return transform(args[1] == "decrypt", args[2:], os.Stdin, stdout, stderr)
		case "rewrap":
			return rewrap(args[2:], stdout, stderr)
		}
	}
	return serve(args, stdout, stderr)
}

func printVersion(w io.Writer) {
	fmt.Fprintf(w, "etcd-proxy-proxy %s\nGo %s %s/%s\n"+
		"etcd API: v2 (HTTP), v3 (gRPC and the JSON gateway /v3), as etcd %s serves them (cluster version %s)\n",
		Version, runtime.Version(), runtime.GOOS, runtime.GOARCH, version.Version, version.APIVersion)
}

// logFlags are the command's own logging flags (the proxy's flags are proxy.Config's).
type logFlags struct {
	level  slog.Level
	format string
}

func (l *logFlags) addFlags(fs *flag.FlagSet) {
	l.format = "text"
	fs.TextVar(&l.level, "log-level", slog.LevelInfo, "log level: debug, info, warn or error")
	fs.StringVar(&l.format, "log-format", l.format, "log format: text (key=value) or json (one object per line)")
}

func (l *logFlags) validate() error {
	if l.format != "text" && l.format != "json" {
		return fmt.Errorf("--log-format %q: want text or json", l.format)
	}
	return nil
}

// logger is the process's logger: log/slog from the standard library (no dependency), key=value text for
// people, JSON for log pipelines.
func (l *logFlags) logger(w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: l.level}
	if l.format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// parseFlags parses args into cfg, taking the environment for what the command line leaves unset. Every
// problem — unknown flags, bad values, an invalid configuration — comes back in one error.
func parseFlags(name string, args []string, cfg *proxy.Config, stderr io.Writer) (showVersion bool, err error) {
	var lf logFlags
	return parseAllFlags(name, args, cfg, &lf, stderr)
}

// parseAllFlags is parseFlags with the logging flags.
func parseAllFlags(name string, args []string, cfg *proxy.Config, lf *logFlags, stderr io.Writer) (showVersion bool, err error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg.AddFlags(fs)
	lf.addFlags(fs)
	fs.BoolVar(&showVersion, "version", false, "print the version and exit")
	fs.Usage = func() { usage(stderr, fs) }
	var errs *multierror.Error
	known, unknown := splitUnknown(fs, args)
	for _, u := range unknown {
		errs = multierror.Append(errs, fmt.Errorf("unknown flag %s", u))
	}
	if err := fs.Parse(known); err != nil {
		if errors.Is(err, flag.ErrHelp) { // the flag package has printed the usage
			return false, flag.ErrHelp
		}
		errs = multierror.Append(errs, err)
	}
	if fs.NArg() > 0 {
		errs = multierror.Append(errs, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " ")))
	}
	if err := proxy.SetFlagsFromEnv(fs, nil); err != nil {
		errs = multierror.Append(errs, err)
	}
	if showVersion {
		return true, nil
	}
	if err := cfg.Validate(); err != nil {
		errs = multierror.Append(errs, err)
	}
	if err := lf.validate(); err != nil {
		errs = multierror.Append(errs, err)
	}
	return false, errs.ErrorOrNil()
}

// splitUnknown separates the flags fs does not define, so that they are reported together with every other
// problem instead of stopping the parse at the first.
func splitUnknown(fs *flag.FlagSet, args []string) (known, unknown []string) {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" || !strings.HasPrefix(a, "-") || a == "-" {
			return append(known, args[i:]...), unknown
		}
		name := strings.TrimLeft(a, "-")
		name, _, hasValue := strings.Cut(name, "=")
		f := fs.Lookup(name)
		if f == nil && name != "h" && name != "help" {
			unknown = append(unknown, a)
			// Its value, if it has one, goes with it: it must not end the flags.
			if !hasValue && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				i++
			}
			continue
		}
		known = append(known, a)
		if f == nil || hasValue {
			continue
		}
		if bf, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && bf.IsBoolFlag() {
			continue
		}
		if i+1 < len(args) {
			i++
			known = append(known, args[i])
		}
	}
	return known, unknown
}

func usage(w io.Writer, fs *flag.FlagSet) {
	fmt.Fprintf(w, "Usage: %s --upstream URL [flags]\n       %s version\n"+
		"       %[1]s agent --tunnel-server URL --allow HOST:PORT[,...] [flags]\n"+
		"       %[1]s keygen --out FILE [--name NAME]\n"+
		"       %[1]s encrypt|decrypt --key-file FILE... --key ETCD_KEY [VALUE]\n"+
		"       %[1]s rewrap --upstream URL --prefix P --encryption-key-file FILE... [--dry-run]\n\n"+
		"Every flag can also be set from the environment: --listen-client-urls is %[3]sLISTEN_CLIENT_URLS.\n"+
		"The reference TLS deployment is a command of its own: go run ./cmd/demo, in the source tree.\n\nFlags:\n",
		fs.Name(), fs.Name(), proxy.EnvPrefix)
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

func serve(args []string, stdout, stderr io.Writer) int {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sig)
	return serveUntil(args, stdout, stderr, sig)
}

// serveUntil serves until a signal on sig (SIGINT/SIGTERM stop, SIGHUP reloads the certificates) or a failed
// listener.
func serveUntil(args []string, stdout, stderr io.Writer, sig <-chan os.Signal) int {
	var (
		cfg proxy.Config
		lf  logFlags
	)
	showVersion, err := parseAllFlags("etcd-proxy-proxy", args[1:], &cfg, &lf, stderr)
	switch {
	case errors.Is(err, flag.ErrHelp):
		return exitOK
	case err != nil:
		fmt.Fprintf(stderr, "etcd-proxy-proxy: invalid configuration: %v\nRun 'etcd-proxy-proxy --help' for usage.\n", err)
		return exitUsage
	case showVersion:
		printVersion(stdout)
		return exitOK
	}
	log := lf.logger(stderr)
	srv, err := proxy.New(cfg, proxy.WithLogger(log))
	if err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy: %v\n", err)
		return exitUsage
	}
	if err := srv.Start(); err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy: %v\n", err)
		return exitError
	}
	log.Info("etcd-proxy-proxy started", "version", Version, "member-id", srv.Self().IDString(),
		"advertise-client-urls", strings.Join(cfg.AdvertiseClientURLs, ","))
	notify(log, daemon.SdNotifyReady) // every listener is open
	status := waitAndShutdown(log, sig, srv.Errors(), srv.ReloadCertificates, cfg.ShutdownGrace(), func(ctx context.Context) error {
		notify(log, daemon.SdNotifyStopping)
		return srv.Shutdown(ctx)
	})
	return status
}

// notify tells systemd about a state change (Type=notify units) with the sd_notify datagram protocol, through
// go-systemd's daemon package; without $NOTIFY_SOCKET it does nothing.
func notify(log *slog.Logger, state string) {
	if sent, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("sd_notify failed", "state", state, "err", err)
	} else if sent {
		log.Debug("sd_notify", "state", state)
	}
}

// waitAndShutdown waits for SIGINT/SIGTERM or a failed listener and shuts down gracefully. SIGHUP (on which Go
// would exit) calls reload; a failed reload is logged and serving goes on.
func waitAndShutdown(log *slog.Logger, sig <-chan os.Signal, failed <-chan error, reload func() error,
	grace time.Duration, shutdown func(context.Context) error) int {
	status := exitOK
	for wait := true; wait; {
		select {
		case s := <-sig:
			if s == syscall.SIGHUP {
				if reload == nil {
					log.Info("SIGHUP received; nothing to reload")
				} else if err := reload(); err != nil {
					log.Error("SIGHUP: reload failed; serving on with the previous certificates", "err", err)
				} else {
					log.Info("SIGHUP: certificates reloaded")
				}
				continue
			}
			log.Info("shutting down", "signal", s.String())
			wait = false
		case err := <-failed:
			log.Error("listener failed", "err", err)
			status, wait = exitError, false
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	if err := shutdown(ctx); err != nil {
		log.Warn("shutdown", "err", err)
	}
	return status
}
