package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// startTimeout bounds how long one process may take to become ready.
const startTimeout = 30 * time.Second

// member is one etcd member process.
type member struct {
	*proc
	name      string
	clientURL string
	peerURL   string
}

// topology is every process of a run.
type topology struct {
	ps      *procs
	bins    Binaries
	members []*member
	// target is the member every proxied path ends on: the one the stock v2 proxy picked.
	target      *member
	targetState string       // raft state of target when chosen
	stockV2     *proc        // etcd --proxy=on
	stockV2URL  string       //
	grpcProxy   *proc        // etcd grpc-proxy start
	grpcAddr    string       //
	pp1         *proc        // one proxy-proxy → target
	pp1URL      string       //
	chain       [2]*proc     // chain[0] → chain[1] → target
	chainURL    string       // chain[0]'s URL
	http        *http.Client // readiness checks
}

// startCluster starts 3 members and waits until each answers /health.
func (t *topology) startCluster(ctx context.Context) error {
	var last error
	for attempt := 1; attempt <= 3; attempt++ {
		addrs, err := freeAddrs(6)
		if err != nil {
			return err
		}
		t.members = nil
		var initial []string
		for i := range 3 {
			m := &member{name: fmt.Sprintf("m%d", i), clientURL: "http://" + addrs[2*i], peerURL: "http://" + addrs[2*i+1]}
			t.members = append(t.members, m)
			initial = append(initial, m.name+"="+m.peerURL)
		}
		token := fmt.Sprintf("epp-bench-%d", time.Now().UnixNano())
		for _, m := range t.members {
			m.proc, err = t.ps.start(fmt.Sprintf("%s-try%d", m.name, attempt), t.bins.Etcd,
				"--name", m.name,
				"--data-dir", filepath.Join(t.ps.dataDir, m.name+fmt.Sprint(attempt)),
				"--enable-v2",
				"--listen-client-urls", m.clientURL, "--advertise-client-urls", m.clientURL,
				"--listen-peer-urls", m.peerURL, "--initial-advertise-peer-urls", m.peerURL,
				"--initial-cluster", strings.Join(initial, ","),
				"--initial-cluster-state", "new", "--initial-cluster-token", token,
				"--log-level", "warn")
			if err != nil {
				return err
			}
		}
		last = nil
		cctx, cancel := context.WithTimeout(ctx, startTimeout)
		for _, m := range t.members {
			if err := m.waitReady(cctx, t.checkHealth(m.clientURL)); err != nil {
				last = err
				break
			}
		}
		cancel()
		if last == nil {
			return nil
		}
		raced := false
		for _, m := range t.members {
			raced = raced || m.lostPortRace()
			m.kill()
		}
		if !raced || ctx.Err() != nil {
			break
		}
	}
	return fmt.Errorf("cluster: %w", last)
}

func (t *topology) checkHealth(base string) func(context.Context) error {
	return func(ctx context.Context) error {
		body, err := t.get(ctx, base+"/health")
		if err != nil {
			return err
		}
		if !strings.Contains(body, `"health":"true"`) {
			return fmt.Errorf("unhealthy: %s", body)
		}
		return nil
	}
}

// checkV2 is ready when a v2 GET of a key answers 2xx (the key is written before any proxy starts).
func (t *topology) checkV2(base string) func(context.Context) error {
	return func(ctx context.Context) error {
		_, err := t.get(ctx, base+"/v2/keys/"+benchKey)
		return err
	}
}

// checkV3 is ready when a linearizable Range through addr succeeds.
func checkV3(addr string) func(context.Context) error {
	return func(ctx context.Context) error {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = pb.NewKVClient(conn).Range(ctx, &pb.RangeRequest{Key: []byte(benchKey)})
		return err
	}
}

func both(fs ...func(context.Context) error) func(context.Context) error {
	return func(ctx context.Context) error {
		for _, f := range fs {
			if err := f(ctx); err != nil {
				return err
			}
		}
		return nil
	}
}

func (t *topology) get(ctx context.Context, u string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return "", err
	}
	resp, err := t.http.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode/100 != 2 {
		return "", fmt.Errorf("GET %s: %s: %s", u, resp.Status, b)
	}
	return string(b), nil
}

func (t *topology) put(ctx context.Context, base, key, value string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, base+"/v2/keys/"+key,
		strings.NewReader(url.Values{"value": {value}}.Encode()))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := t.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("PUT %s: %s", key, resp.Status)
	}
	return nil
}

// startWithPorts starts a process that listens on one probed port, retrying with a new port when another
// program took it first.
func (t *topology) startWithPorts(ctx context.Context, name, bin string, args func(addr string) []string,
	ready func(addr string) func(context.Context) error) (*proc, string, error) {
	var last error
	for attempt := 1; attempt <= 3; attempt++ {
		addrs, err := freeAddrs(1)
		if err != nil {
			return nil, "", err
		}
		p, err := t.ps.start(name, bin, args(addrs[0])...)
		if err != nil {
			return nil, "", err
		}
		cctx, cancel := context.WithTimeout(ctx, startTimeout)
		last = p.waitReady(cctx, ready(addrs[0]))
		cancel()
		if last == nil {
			return p, addrs[0], nil
		}
		p.kill()
		if !p.lostPortRace() || ctx.Err() != nil {
			break
		}
	}
	return nil, "", last
}

// startStockV2 starts `etcd --proxy=on` in front of the whole cluster (it learns the members from their peer
// URLs, as etcd documents it) and finds out which member it sends requests to: its endpoint list is shuffled
// once and then kept, since the refresh interval is set longer than any run.
func (t *topology) startStockV2(ctx context.Context) error {
	var initial []string
	for _, m := range t.members {
		initial = append(initial, m.name+"="+m.peerURL)
	}
	p, addr, err := t.startWithPorts(ctx, "stock-v2-proxy", t.bins.Etcd, func(addr string) []string {
		return []string{"--proxy=on", "--name", "stock-v2-proxy",
			"--data-dir", filepath.Join(t.ps.dataDir, "stock-v2-proxy-"+strings.ReplaceAll(addr, ":", "_")),
			"--listen-client-urls", "http://" + addr,
			"--initial-cluster", strings.Join(initial, ","),
			"--proxy-refresh-interval", "86400000",
			"--log-level", "warn"}
	}, func(addr string) func(context.Context) error { return t.checkV2("http://" + addr) })
	if err != nil {
		return fmt.Errorf("stock v2 proxy: %w", err)
	}
	t.stockV2, t.stockV2URL = p, "http://"+addr
	// /v2/stats/self is answered by the member the request reached.
	var name string
	for range 5 {
		body, err := t.get(ctx, t.stockV2URL+"/v2/stats/self")
		if err != nil {
			return fmt.Errorf("stock v2 proxy: which member: %w", err)
		}
		var self struct{ Name, State string }
		if err := json.Unmarshal([]byte(body), &self); err != nil {
			return fmt.Errorf("stock v2 proxy: /v2/stats/self: %w", err)
		}
		if name != "" && self.Name != name {
			return fmt.Errorf("stock v2 proxy switches members (%s, %s): paths would not end on one member", name, self.Name)
		}
		name = self.Name
	}
	for _, m := range t.members {
		if m.name == name {
			t.target = m
		}
	}
	if t.target == nil {
		return fmt.Errorf("stock v2 proxy reached an unknown member %q", name)
	}
	body, err := t.get(ctx, t.target.clientURL+"/v2/stats/self")
	if err != nil {
		return err
	}
	var self struct{ State string }
	_ = json.Unmarshal([]byte(body), &self)
	t.targetState = strings.TrimPrefix(self.State, "State")
	return nil
}

// startGRPCProxy starts `etcd grpc-proxy start` with the target member as its only endpoint.
func (t *topology) startGRPCProxy(ctx context.Context) error {
	p, addr, err := t.startWithPorts(ctx, "grpc-proxy", t.bins.Etcd, func(addr string) []string {
		return []string{"grpc-proxy", "start",
			"--endpoints=" + strings.TrimPrefix(t.target.clientURL, "http://"),
			"--listen-addr=" + addr,
			"--advertise-client-url=" + addr,
			"--data-dir=" + filepath.Join(t.ps.dataDir, "grpc-proxy-"+strings.ReplaceAll(addr, ":", "_"))}
	}, checkV3)
	if err != nil {
		return fmt.Errorf("grpc-proxy: %w", err)
	}
	t.grpcProxy, t.grpcAddr = p, addr
	return nil
}

// startProxyProxy starts bin (etcd-proxy-proxy, or the profiling wrapper with its leading args) in front of
// upstream and waits until v2 and v3 requests go through it.
func (t *topology) startProxyProxy(ctx context.Context, name, upstream string, prefix ...string) (*proc, string, error) {
	bin := t.bins.Proxy
	if len(prefix) > 0 {
		bin, prefix = prefix[0], prefix[1:]
	}
	p, addr, err := t.startWithPorts(ctx, name, bin, func(addr string) []string {
		return append(append([]string{}, prefix...),
			"--upstream", upstream,
			"--listen-client-urls", "http://"+addr,
			"--advertise-client-urls", "http://"+addr,
			"--name", name)
	}, func(addr string) func(context.Context) error {
		return both(t.checkV2("http://"+addr), checkV3(addr))
	})
	if err != nil {
		return nil, "", fmt.Errorf("%s: %w", name, err)
	}
	return p, "http://" + addr, nil
}

// start brings up the whole topology of a run: the cluster, the stock proxies and the proxy-proxies.
func (t *topology) start(ctx context.Context, logf func(string, ...any)) error {
	if err := t.startCluster(ctx); err != nil {
		return err
	}
	logf("cluster: %s %s, %s %s, %s %s", t.members[0].name, t.members[0].clientURL,
		t.members[1].name, t.members[1].clientURL, t.members[2].name, t.members[2].clientURL)
	if err := t.put(ctx, t.members[0].clientURL, benchKey, benchValue); err != nil {
		return fmt.Errorf("seeding %s: %w", benchKey, err)
	}
	if err := t.startStockV2(ctx); err != nil {
		return err
	}
	logf("stock v2 proxy %s → %s (%s); every other path ends on %s too", t.stockV2URL, t.target.name,
		t.targetState, t.target.name)
	if err := t.startGRPCProxy(ctx); err != nil {
		return err
	}
	var err error
	if t.pp1, t.pp1URL, err = t.startProxyProxy(ctx, "pp1", t.target.clientURL); err != nil {
		return err
	}
	var backURL string
	if t.chain[1], backURL, err = t.startProxyProxy(ctx, "pp-chain-back", t.target.clientURL); err != nil {
		return err
	}
	if t.chain[0], t.chainURL, err = t.startProxyProxy(ctx, "pp-chain-front", backURL); err != nil {
		return err
	}
	logf("grpc-proxy %s, proxy-proxy %s, chain %s → %s", t.grpcAddr, t.pp1URL, t.chainURL, backURL)
	return nil
}
