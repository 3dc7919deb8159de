// Command demo runs etcd-proxy-proxy's reference TLS deployment in one process: `go run ./cmd/demo [--dir DIR]`.
// It is a command of its own so that the product binary does not link the harness (embedded etcd members,
// raft, testing and the goldens' -update flag).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
)

// demoStartTimeout bounds the start of the whole reference deployment.
const demoStartTimeout = 2 * time.Minute

// Exit statuses, as etcd-proxy-proxy's.
const (
	exitOK    = 0
	exitError = 1
	exitUsage = 2
)

func main() { os.Exit(demo(os.Args[1:], os.Stdout, os.Stderr)) }

// demo runs the reference TLS deployment in this process until SIGINT/SIGTERM:
//
//	3 TLS members (cluster CA) ← stock v2 proxy (etcd --proxy=on) ← proxy-proxy ← proxy-proxy   v2, the seed's layout
//	3 TLS members              ← proxy-proxy ← proxy-proxy                                      v2 and v3
//
// The stock v2 proxy relays no gRPC, so the v3 lines use the second chain. Listeners that clients see use the
// client CA; everything toward the members uses the cluster CA.
func demo(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	dir := fs.String("dir", filepath.Join(os.TempDir(), "etcd-proxy-proxy-demo"),
		"directory for the certificates and the members' data; emptied first if an earlier demo made it, refused if it holds anything else")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "demo: unexpected arguments: %s\n", strings.Join(fs.Args(), " "))
		return exitUsage
	}
	if err := clearDemoDir(*dir); err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return exitUsage
	}
	env, err := harness.NewEnv(*dir)
	if err == nil {
		err = os.WriteFile(filepath.Join(env.Dir, demoMarker), nil, 0o600)
	}
	if err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return exitError
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	env.Logf = func(format string, a ...any) { log.Debug(fmt.Sprintf(format, a...)) }
	defer func() {
		if err := env.Close(); err != nil {
			fmt.Fprintf(stderr, "demo: shutdown: %v\n", err)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), demoStartTimeout)
	defer cancel()
	fmt.Fprintf(stderr, "starting 3 TLS members, the stock v2 proxy and two chains of proxy-proxies in %s ...\n", env.Dir)
	cluster, err := env.StartCluster(ctx, harness.WithMembers(3), harness.WithTLS())
	if err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return exitError
	}
	seed, err := env.StartOn(ctx, cluster, harness.StockV2Hop{TLS: true},
		harness.ProxyProxyHop{TLS: true}, harness.ProxyProxyHop{TLS: true})
	if err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return exitError
	}
	v3, err := env.StartOn(ctx, cluster, harness.ProxyProxyHop{TLS: true}, harness.ProxyProxyHop{TLS: true})
	if err != nil {
		fmt.Fprintf(stderr, "demo: %v\n", err)
		return exitError
	}
	printDemo(stdout, env, seed, v3)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sig)
	for s := range sig { // SIGHUP, on which Go would exit, has nothing to reload here
		if s != syscall.SIGHUP {
			break
		}
	}
	return exitOK // the deferred env.Close stops everything
}

func printDemo(w io.Writer, env *harness.Env, seed, v3 *harness.Running) {
	top2, top3 := seed.Top(), v3.Top()
	fmt.Fprintf(w, `
etcd-proxy-proxy reference TLS deployment (certificates in %[1]s/pki)

  v2 chain, the seed's layout:  %[2]s
  v2 + v3 chain:                %[3]s

Clients trust the client CA and present a client-CA certificate; the proxies present the cluster CA's client
certificate toward the members. No client ever sees a member address.

# etcdctl, v2 API, through two proxy-proxies and the stock v2 proxy (no --no-sync needed):
export ETCDCTL_API=2
%[4]s set foo bar
%[4]s get foo
%[4]s member list
%[4]s cluster-health

# etcdctl, v3 API, through two proxy-proxies:
%[5]s put foo bar
%[5]s get foo
%[5]s member list
%[5]s endpoint status --cluster -w table

# or set the v3 flags once for the shell:
%[10]s
etcdctl get foo

# curl:
%[6]s %[7]s/v2/keys/foo
%[6]s %[7]s/v2/members
%[8]s -X POST %[9]s/v3/cluster/member/list -d '{}'

Press Ctrl-C to stop.
`, env.Dir, chainString(seed), chainString(v3),
		"etcdctl "+strings.Join(env.Etcdctl(2, top2).Args(), " "),
		"ETCDCTL_API=3 etcdctl "+strings.Join(env.Etcdctl(3, top3).Args(), " "),
		curlLine(top2), top2.URLs[0], curlLine(top3), top3.URLs[0], exportLine(top3))
}

func exportLine(ep harness.Endpoint) string {
	return fmt.Sprintf("export ETCDCTL_API=3 ETCDCTL_ENDPOINTS=%s ETCDCTL_CACERT=%s ETCDCTL_CERT=%s ETCDCTL_KEY=%s",
		strings.Join(ep.URLs, ","), ep.TLS.CAFile, ep.TLS.CertFile, ep.TLS.KeyFile)
}

func chainString(r *harness.Running) string {
	parts := []string{"members " + strings.Join(r.Layers[0].URLs, ",")}
	for i, ep := range r.Layers[1:] {
		parts = append(parts, r.Topology.Hops[i].String()+" "+strings.Join(ep.URLs, ","))
	}
	return strings.Join(parts, " ← ")
}

func curlLine(ep harness.Endpoint) string {
	return fmt.Sprintf("curl --cacert %s --cert %s --key %s", ep.TLS.CAFile, ep.TLS.CertFile, ep.TLS.KeyFile)
}

// demoMarker marks a directory the demo made, and so may empty again.
const demoMarker = ".etcd-proxy-proxy-demo"

// clearDemoDir empties dir for a new run, refusing a directory with files that an earlier demo did not make.
func clearDemoDir(dir string) error {
	entries, err := os.ReadDir(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return err
	case len(entries) == 0:
		return nil
	}
	if _, err := os.Stat(filepath.Join(dir, demoMarker)); err != nil {
		return fmt.Errorf("%s is not empty and was not made by the demo: choose another --dir", dir)
	}
	return os.RemoveAll(dir)
}
