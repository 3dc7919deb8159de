package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

// rewrapPage is how many keys one range of rewrap reads.
const rewrapPage = 500

// rewrap re-encrypts with the first key every stale value under a prefix (read with a later key, or plaintext
// read as it is), talking to the upstream directly. Each value is replaced with a compare-and-swap on its
// mod_revision, keeping its lease: a write that came meanwhile wins and nothing is lost.
func rewrap(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("etcd-proxy-proxy rewrap", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		files, prefixes []string
		upstreams       []string
	)
	fs.Func("upstream", "the etcd client URL(s) to talk to, comma-separated (required)", func(s string) error {
		for _, u := range strings.Split(s, ",") {
			if u = strings.TrimSpace(u); u != "" {
				upstreams = append(upstreams, u)
			}
		}
		return nil
	})
	fs.Func("prefix", "rewrap the values under this key prefix (repeatable; required)", func(s string) error {
		prefixes = append(prefixes, s)
		return nil
	})
	fs.Func("encryption-key-file", "an encryption key's file (repeatable: the first encrypts, all decrypt), as the proxy's", func(s string) error {
		files = append(files, s)
		return nil
	})
	plaintext := fs.Bool("encryption-read-plaintext", false, "encrypt the values that are not encrypted too")
	dryRun := fs.Bool("dry-run", false, "count what would be rewrapped, change nothing")
	user := fs.String("user", "", "etcd user[:password] when the cluster has auth on")
	var tlsInfo transport.TLSInfo
	fs.StringVar(&tlsInfo.TrustedCAFile, "upstream-ca-file", "", "verify the upstream's certificate with this CA bundle")
	fs.StringVar(&tlsInfo.CertFile, "upstream-cert-file", "", "client certificate presented to the upstream")
	fs.StringVar(&tlsInfo.KeyFile, "upstream-key-file", "", "key of --upstream-cert-file")
	timeout := fs.Duration("timeout", 5*time.Second, "how long each request to the upstream may take")
	if err := fs.Parse(args); err != nil {
		return usageStatus(err)
	}
	var problems []error
	if len(upstreams) == 0 {
		problems = append(problems, errors.New("--upstream is required"))
	}
	if len(prefixes) == 0 {
		problems = append(problems, errors.New("--prefix is required"))
	}
	if len(files) == 0 {
		problems = append(problems, errors.New("--encryption-key-file is required"))
	}
	if fs.NArg() > 0 {
		problems = append(problems, fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	var keys []*crypt.Key
	for _, f := range files {
		k, err := crypt.LoadKeyFile(f)
		if err != nil {
			problems = append(problems, err)
			continue
		}
		keys = append(keys, k)
	}
	if *plaintext {
		keys = append(keys, crypt.IdentityKey())
	}
	var ring *crypt.Keyring
	if len(keys) > 0 {
		var err error
		if ring, err = crypt.NewKeyring(keys...); err != nil {
			problems = append(problems, err)
		}
	}
	cfg := clientv3.Config{Endpoints: upstreams, DialTimeout: *timeout, Logger: zap.NewNop()}
	if !tlsInfo.Empty() || tlsInfo.TrustedCAFile != "" || anyHTTPS(upstreams) {
		tc, err := tlsInfo.ClientConfig()
		if err != nil {
			problems = append(problems, fmt.Errorf("upstream TLS: %w", err))
		}
		cfg.TLS = tc
	}
	if *user != "" {
		cfg.Username, cfg.Password, _ = strings.Cut(*user, ":")
	}
	if problems != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy rewrap: %v\n", errors.Join(problems...))
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	cli, err := clientv3.New(cfg)
	if err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy rewrap: %v\n", err)
		return exitError
	}
	defer cli.Close()
	rw := &rewrapper{cli: cli, ring: ring, dryRun: *dryRun, timeout: *timeout, progress: stderr}
	for _, p := range prefixes {
		if err := rw.prefix(ctx, p); err != nil {
			fmt.Fprintf(stderr, "\netcd-proxy-proxy rewrap: %s: %v\n", p, err)
			rw.report(stdout)
			return exitError
		}
	}
	rw.report(stdout)
	if rw.failed > 0 {
		return exitError
	}
	return exitOK
}

func anyHTTPS(urls []string) bool {
	for _, u := range urls {
		if strings.HasPrefix(u, "https://") {
			return true
		}
	}
	return false
}

// rewrapper walks prefixes and rewraps what is stale, counting.
type rewrapper struct {
	cli      *clientv3.Client
	ring     *crypt.Keyring
	dryRun   bool
	timeout  time.Duration
	progress io.Writer

	scanned, stale, rewrapped, changed, failed int
}

// prefix rewraps every stale value under p, a page of keys at a time, each page read at one revision.
func (r *rewrapper) prefix(ctx context.Context, p string) error {
	end := clientv3.GetPrefixRangeEnd(p)
	from := p
	for {
		rctx, cancel := context.WithTimeout(ctx, r.timeout)
		resp, err := r.cli.Get(rctx, from, clientv3.WithRange(end), clientv3.WithLimit(rewrapPage),
			clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
		cancel()
		if err != nil {
			return err
		}
		for _, kv := range resp.Kvs {
			r.scanned++
			plain, read, err := r.ring.Decrypt(kv.Key, kv.Value)
			if err != nil {
				r.failed++
				fmt.Fprintf(r.progress, "\n%q: %v: left as it is\n", kv.Key, err)
				continue
			}
			if !read.Stale {
				continue
			}
			r.stale++
			if r.dryRun {
				continue
			}
			v, err := r.ring.Encrypt(kv.Key, plain)
			if err != nil {
				return err
			}
			tctx, cancel := context.WithTimeout(ctx, r.timeout)
			// Compare-and-swap on the revision read: a write since then wins; the lease stays.
			t, err := r.cli.Txn(tctx).If(clientv3.Compare(clientv3.ModRevision(string(kv.Key)), "=", kv.ModRevision)).
				Then(clientv3.OpPut(string(kv.Key), string(v), clientv3.WithIgnoreLease())).Commit()
			cancel()
			switch {
			case err != nil:
				return err
			case t.Succeeded:
				r.rewrapped++
			default:
				r.changed++
			}
		}
		fmt.Fprintf(r.progress, "\r%s: %d scanned, %d stale, %d rewrapped", p, r.scanned, r.stale, r.rewrapped)
		if !resp.More || len(resp.Kvs) == 0 {
			fmt.Fprintln(r.progress)
			return nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

func (r *rewrapper) report(w io.Writer) {
	verb := "rewrapped"
	if r.dryRun {
		verb = "would rewrap (dry run)"
	}
	fmt.Fprintf(w, "scanned %d, stale %d, %s %d, changed meanwhile (left to the newer write) %d, failed to decrypt %d\n",
		r.scanned, r.stale, verb, map[bool]int{false: r.rewrapped, true: r.stale}[r.dryRun], r.changed, r.failed)
}
