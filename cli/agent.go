package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os/signal"
	"strings"
	"syscall"

	"github.com/hashicorp/go-multierror"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/agent"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// runAgent is `etcd-proxy-proxy agent`: the far end of a dial-back tunnel (package agent), until SIGINT/SIGTERM.
func runAgent(args []string, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return agentUntil(ctx, args, stderr)
}

func agentUntil(ctx context.Context, args []string, stderr io.Writer) int {
	var (
		cfg agent.Config
		lf  logFlags
	)
	fs := flag.NewFlagSet("etcd-proxy-proxy agent", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg.AddFlags(fs)
	lf.addFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: etcd-proxy-proxy agent --tunnel-server konnectivity://HOST:PORT|https://HOST:PORT --allow HOST:PORT[,...] [flags]\n\n"+
			"Every flag can also be set from the environment: --allow is %sALLOW.\n\nFlags:\n", proxy.EnvPrefix)
		fs.SetOutput(stderr)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	var errs *multierror.Error
	known, unknown := splitUnknown(fs, args)
	for _, u := range unknown {
		errs = multierror.Append(errs, fmt.Errorf("unknown flag %s", u))
	}
	if err := fs.Parse(known); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		errs = multierror.Append(errs, err)
	}
	if fs.NArg() > 0 {
		errs = multierror.Append(errs, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " ")))
	}
	if err := proxy.SetFlagsFromEnv(fs, nil); err != nil {
		errs = multierror.Append(errs, err)
	}
	if err := cfg.Validate(); err != nil {
		errs = multierror.Append(errs, err)
	}
	if err := lf.validate(); err != nil {
		errs = multierror.Append(errs, err)
	}
	if errs != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy agent: invalid configuration: %v\nRun 'etcd-proxy-proxy agent --help' for usage.\n", errs)
		return exitUsage
	}
	log := lf.logger(stderr)
	a, err := agent.New(cfg, log)
	if err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy agent: %v\n", err)
		return exitUsage
	}
	log.Info("etcd-proxy-proxy agent started", "version", Version, "servers", strings.Join(cfg.Servers, ","))
	a.Run(ctx)
	return exitOK
}
