package cli

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"path"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// rewrapPage is how many keys one range of rewrap reads.
const rewrapPage = 500

// rewrap re-encrypts with the first key every stale value under a prefix (read with a later key, or plaintext
// read as it is), talking to the upstream directly (or through --upstream-via's tunnel). Each value is replaced with a compare-and-swap on its
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
	deterministic := fs.Bool("deterministic", false, "the prefix's resource has deterministic: true: write its values deterministic (AES-SIV); without it they are made random again")
	etcvault := fs.String("etcvault-keychain", "", "etcvault's keychain directory (NAME.pem): encrypt etcvault's values too")
	dryRun := fs.Bool("dry-run", false, "count what would be rewrapped, change nothing")
	user := fs.String("user", "", "etcd user[:password] when the cluster has auth on")
	var tlsInfo transport.TLSInfo
	fs.StringVar(&tlsInfo.TrustedCAFile, "upstream-ca-file", "", "verify the upstream's certificate with this CA bundle")
	fs.StringVar(&tlsInfo.CertFile, "upstream-cert-file", "", "client certificate presented to the upstream")
	fs.StringVar(&tlsInfo.KeyFile, "upstream-key-file", "", "key of --upstream-cert-file")
	var via proxy.ViaDialer // --upstream-via and the --tunnel-* files, as the proxy's
	via.AddFlags(fs)
	timeout := fs.Duration("timeout", 5*time.Second, "how long each request to the upstream may take")
	api := fs.Int("api", 3, "the keys to rewrap: 3 (v3, the default) or 2 (v2's store, over HTTP)")
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
	problems = append(problems, via.Validate()...)
	if *api != 2 && *api != 3 {
		problems = append(problems, fmt.Errorf("--api %d: want 2 or 3", *api))
	}
	if fs.NArg() > 0 {
		problems = append(problems, fmt.Errorf("unexpected arguments %q", fs.Args()))
	}
	keys, errs := loadKeys(files, *plaintext, *etcvault)
	problems = append(problems, errs...)
	var ring *crypt.Keyring
	if len(keys) > 0 {
		var err error
		newRing := crypt.NewKeyring
		if *deterministic {
			newRing = crypt.NewDeterministicKeyring
		}
		if ring, err = newRing(keys...); err != nil {
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
	// Through --upstream-via, every connection to the upstream goes through the tunnel, as the proxy's do.
	var dial func(ctx context.Context, network, addr string) (net.Conn, error)
	tunnelled, err := via.Open(*timeout)
	if err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy rewrap: %v\n", err)
		return exitError
	}
	defer via.Close()
	if tunnelled {
		dial = func(ctx context.Context, _, addr string) (net.Conn, error) { return via.Dial(ctx, addr) }
		cfg.DialOptions = append(cfg.DialOptions, grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dial(ctx, "tcp", addr)
		}))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *api == 2 {
		rw := &rewrapper{ring: ring, dryRun: *dryRun, timeout: *timeout, progress: stderr,
			v2: &v2Client{urls: upstreams, user: *user, http: &http.Client{Timeout: *timeout,
				Transport: &http.Transport{TLSClientConfig: cfg.TLS, DialContext: dial}}}}
		return rw.run(ctx, prefixes, stdout, stderr)
	}
	cli, err := clientv3.New(cfg)
	if err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy rewrap: %v\n", err)
		return exitError
	}
	defer cli.Close()
	rw := &rewrapper{cli: cli, ring: ring, dryRun: *dryRun, timeout: *timeout, progress: stderr}
	return rw.run(ctx, prefixes, stdout, stderr)
}

// run rewraps every prefix and reports.
func (r *rewrapper) run(ctx context.Context, prefixes []string, stdout, stderr io.Writer) int {
	for _, p := range prefixes {
		var err error
		if r.v2 != nil {
			err = r.v2Prefix(ctx, p)
		} else {
			err = r.prefix(ctx, p)
		}
		if err != nil {
			fmt.Fprintf(stderr, "\netcd-proxy-proxy rewrap: %s: %v\n", p, err)
			r.report(stdout)
			return exitError
		}
	}
	r.report(stdout)
	if r.failed > 0 {
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
	cli      *clientv3.Client // v3
	v2       *v2Client        // v2, instead of cli
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

// v2Client talks to the v2 keys API of the upstream.
type v2Client struct {
	urls []string
	user string
	http *http.Client
}

// v2Node is a node of a v2 answer.
type v2Node struct {
	Key           string   `json:"key"`
	Value         *string  `json:"value"`
	Dir           bool     `json:"dir"`
	TTL           int64    `json:"ttl"`
	ModifiedIndex uint64   `json:"modifiedIndex"`
	Nodes         []v2Node `json:"nodes"`
}

// do sends a request for node key with form (nil: GET with query q) and decodes the answer into out.
func (c *v2Client) do(ctx context.Context, method, key string, q, form url.Values, out any) (int, error) {
	var last error
	for _, base := range c.urls {
		u, err := url.Parse(base)
		if err != nil {
			return 0, err
		}
		u.Path, u.RawQuery = "/v2/keys"+key, q.Encode()
		var body io.Reader
		if form != nil {
			body = strings.NewReader(form.Encode())
		}
		req, err := http.NewRequestWithContext(ctx, method, u.String(), body)
		if err != nil {
			return 0, err
		}
		if form != nil {
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		}
		if c.user != "" {
			name, pass, _ := strings.Cut(c.user, ":")
			req.SetBasicAuth(name, pass)
		}
		resp, err := c.http.Do(req)
		if err != nil {
			last = err
			if form != nil { // a write may have been delivered: not sent again
				return 0, err
			}
			continue
		}
		err = json.NewDecoder(resp.Body).Decode(out)
		_ = resp.Body.Close()
		return resp.StatusCode, err
	}
	return 0, last
}

// v2Prefix rewraps every stale value of the v2 store whose path starts with p: the directory that holds them is
// read recursively, and each value replaced with a compare-and-swap on its modifiedIndex (prevIndex), its TTL
// kept to the second (v2 has no way to keep an expiration as it is).
func (r *rewrapper) v2Prefix(ctx context.Context, p string) error {
	dir := path.Dir(p + "x") // "/a/" → "/a", "/a/b" → "/a"
	var ans struct {
		Node      *v2Node `json:"node"`
		ErrorCode int     `json:"errorCode"`
		Message   string  `json:"message"`
	}
	code, err := r.v2.do(ctx, http.MethodGet, dir, url.Values{"recursive": {"true"}, "quorum": {"true"}}, nil, &ans)
	switch {
	case err != nil:
		return err
	case code == http.StatusNotFound && ans.ErrorCode == 100: // nothing there
		fmt.Fprintf(r.progress, "%s: nothing stored\n", p)
		return nil
	case code != http.StatusOK || ans.Node == nil:
		return fmt.Errorf("reading %s: %d %s", dir, code, ans.Message)
	}
	var walk func(n *v2Node) error
	walk = func(n *v2Node) error {
		for i := range n.Nodes {
			if err := walk(&n.Nodes[i]); err != nil {
				return err
			}
		}
		if n.Dir || n.Value == nil || !strings.HasPrefix(n.Key, p) {
			return nil
		}
		r.scanned++
		plain, read, err := r.ring.Decrypt([]byte(n.Key), []byte(*n.Value))
		if err != nil {
			r.failed++
			fmt.Fprintf(r.progress, "\n%q: %v: left as it is\n", n.Key, err)
			return nil
		}
		if !read.Stale {
			return nil
		}
		r.stale++
		if r.dryRun {
			return nil
		}
		v, err := r.ring.Encrypt([]byte(n.Key), plain) // bound to its own key now that it is known
		if err != nil {
			return err
		}
		form := url.Values{"value": {string(v)}, "prevIndex": {strconv.FormatUint(n.ModifiedIndex, 10)}}
		if n.TTL > 0 {
			form.Set("ttl", strconv.FormatInt(n.TTL, 10))
		}
		var res struct {
			ErrorCode int    `json:"errorCode"`
			Message   string `json:"message"`
		}
		code, err := r.v2.do(ctx, http.MethodPut, n.Key, nil, form, &res)
		switch {
		case err != nil:
			return err
		case code == http.StatusOK:
			r.rewrapped++
		case res.ErrorCode == 101 || res.ErrorCode == 100: // compare failed, or gone: a newer write wins
			r.changed++
		default:
			return fmt.Errorf("writing %s: %d %s", n.Key, code, res.Message)
		}
		if r.scanned%rewrapPage == 0 {
			fmt.Fprintf(r.progress, "\r%s: %d scanned, %d stale, %d rewrapped", p, r.scanned, r.stale, r.rewrapped)
		}
		return nil
	}
	if err := walk(ans.Node); err != nil {
		return err
	}
	fmt.Fprintf(r.progress, "\r%s: %d scanned, %d stale, %d rewrapped\n", p, r.scanned, r.stale, r.rewrapped)
	return nil
}
