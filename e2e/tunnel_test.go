package e2e

import (
	"context"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/agent"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// tunnelHost is the members' name behind the tunnel: only the CONNECT proxy resolves it (.invalid never
// resolves), so an upstream connection that does not go through the tunnel cannot be made at all.
const tunnelHost = "member.tunnel.invalid"

// connectProxy stands for any HTTP CONNECT proxy: it checks Proxy-Authorization, resolves only the names it
// knows, and counts the connections it carries by target.
type connectProxy struct {
	auth  string            // the Proxy-Authorization it wants; "" for none
	hosts map[string]string // name → IP
	mu    sync.Mutex
	dials map[string]int // target host:port → CONNECTs carried
	other []string       // CONNECT targets it did not know
}

func (p *connectProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
		return
	}
	if p.auth != "" && r.Header.Get("Proxy-Authorization") != p.auth {
		w.Header().Set("Proxy-Authenticate", `Basic realm="test"`)
		http.Error(w, "who are you", http.StatusProxyAuthRequired)
		return
	}
	host, port, err := net.SplitHostPort(r.Host)
	p.mu.Lock()
	ip, ok := p.hosts[host]
	p.mu.Unlock()
	if err != nil || !ok {
		p.mu.Lock()
		p.other = append(p.other, r.Host)
		p.mu.Unlock()
		http.Error(w, "unknown host", http.StatusBadGateway)
		return
	}
	up, err := net.DialTimeout("tcp", net.JoinHostPort(ip, port), 5*time.Second)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	p.mu.Lock()
	p.dials[r.Host]++
	p.mu.Unlock()
	c, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		_ = up.Close()
		return
	}
	_, _ = c.Write([]byte("HTTP/1.1 200 Connection established\r\n\r\n"))
	go func() {
		_, _ = io.Copy(up, brw) // what the client sent after its CONNECT may already be buffered
		_ = up.Close()
	}()
	_, _ = io.Copy(c, up)
	_ = c.Close()
}

func (p *connectProxy) seen() (map[string]int, []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	dials := map[string]int{}
	for k, v := range p.dials {
		dials[k] = v
	}
	return dials, append([]string(nil), p.other...)
}

func basicAuth(user, pass string) string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(user+":"+pass))
}

// Every upstream connection goes through --upstream-via: the members are named by a host only the CONNECT proxy
// resolves, yet v3 and v2 commands work, the probes (HTTP, and TCP) find the member healthy, and TLS toward the
// member is verified end to end against that name inside the tunnel. mTLS and basic auth toward the CONNECT
// proxy (https-connect); a wrong password is a 502 that names nothing behind the proxy.
func TestUpstreamViaHTTPConnect(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 90*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithTLS(),
		harness.WithMemberCertOptions(harness.Hosts(tunnelHost, "localhost", "127.0.0.1")))
	if err != nil {
		t.Fatal(err)
	}
	member, _ := url.Parse(c.Members[0].ClientURL)
	target := net.JoinHostPort(tunnelHost, member.Port())
	upstream := "https://" + target

	// The CONNECT proxy on TLS, requiring a client certificate of its own CA (not the cluster's or the clients').
	tunnelCA, err := harness.NewCA(filepath.Join(e.Dir, "tunnel-ca"), "tunnel-ca")
	if err != nil {
		t.Fatal(err)
	}
	serverFiles := issueCert(t, tunnelCA, "connect-proxy", harness.ServerAuth())
	clientFiles := issueCert(t, tunnelCA, "connect-client", harness.ClientAuth())
	serverCert, err := tls.LoadX509KeyPair(serverFiles.CertFile, serverFiles.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	cp := &connectProxy{auth: basicAuth("epp", "s3cret"), hosts: map[string]string{tunnelHost: member.Hostname()}, dials: map[string]int{}}
	srv := httptest.NewUnstartedServer(cp)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{serverCert}, ClientCAs: tunnelCA.Pool(),
		ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	proxyAddr := srv.Listener.Addr().String()

	via := func(check string) func(*proxy.Config) {
		return func(cfg *proxy.Config) {
			cfg.Upstreams = []string{upstream}
			cfg.UpstreamVia = "https-connect://epp:s3cret@" + proxyAddr
			cfg.TunnelTLS = proxy.TLSInfo{CAFile: tunnelCA.CertFile, CertFile: clientFiles.CertFile, KeyFile: clientFiles.KeyFile}
			cfg.UpstreamHealthInterval = 20 * time.Millisecond
			cfg.UpstreamHealthCheck = check
			cfg.ListenMetricsURLs = []string{"http://127.0.0.1:0"}
		}
	}
	pp, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: via(proxy.HealthCheckHTTP)})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, ctx, "ready through the tunnel", func() (bool, string) { return pp.Server.Ready() })
	v3 := e.Etcdctl(3, pp.Endpoint)
	if r := v3.Run(ctx, "put", "tk", "v3-through-connect"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "OK" {
		t.Fatalf("v3 put: %v: %s%s", r.Check(), r.Stdout, r.Stderr)
	}
	if r := v3.Run(ctx, "get", "tk", "--print-value-only"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "v3-through-connect" {
		t.Fatalf("v3 get: %v: %q %s", r.Check(), r.Stdout, r.Stderr)
	}
	v2 := e.Etcdctl(2, pp.Endpoint)
	if r := v2.Run(ctx, "set", "/tk2", "v2-through-connect"); r.Check() != nil {
		t.Fatalf("v2 set: %v: %s%s", r.Check(), r.Stdout, r.Stderr)
	}
	if r := v2.Run(ctx, "get", "/tk2"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "v2-through-connect" {
		t.Fatalf("v2 get: %v: %q %s", r.Check(), r.Stdout, r.Stderr)
	}

	// The TCP probe dials through the tunnel too: a direct dial of the name cannot be made, so it would find the
	// only member unhealthy and /readyz would never answer ready.
	ppTCP, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: via(proxy.HealthCheckTCP)})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, ctx, "ready with TCP probes through the tunnel", func() (bool, string) { return ppTCP.Server.Ready() })

	mfOK := scrape(t, pp.Server.MetricsURLs()[0])
	if n, _ := metricValue(mfOK, "etcd_proxy_proxy_tunnel_dials_total", map[string]string{"result": "ok"}); n < 2 {
		t.Errorf("tunnel_dials_total{result=ok} = %v, want the proxy's connections", n)
	}
	if n, _ := metricValue(mfOK, "etcd_proxy_proxy_tunnel_connections", nil); n < 1 {
		t.Errorf("tunnel_connections = %v, want the proxy's open connections", n)
	}
	dials, other := cp.seen()
	if dials[target] < 3 || len(dials) != 1 || len(other) != 0 {
		t.Errorf("the CONNECT proxy carried %v (unknown targets %v); want several connections to %s and nothing else",
			dials, other, target)
	}

	// Endpoints found by discovery are dialled through the tunnel too: the member list names the member by its
	// address, which the CONNECT proxy is now told to reach as well.
	cp.mu.Lock()
	cp.hosts[member.Hostname()] = member.Hostname()
	cp.mu.Unlock()
	ppDisc, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		via(proxy.HealthCheckHTTP)(cfg)
		cfg.DiscoverMembers = true
	}})
	if err != nil {
		t.Fatal(err)
	}
	if r := e.Etcdctl(3, ppDisc.Endpoint).Run(ctx, "get", "tk", "--print-value-only"); r.Check() != nil ||
		strings.TrimSpace(r.Stdout) != "v3-through-connect" {
		t.Fatalf("v3 get through discovered endpoints: %v: %q %s", r.Check(), r.Stdout, r.Stderr)
	}
	if dials, _ := cp.seen(); dials[member.Host] == 0 {
		t.Errorf("the discovered endpoint %s was not dialled through the tunnel: %v", member.Host, dials)
	}

	// A wrong password: the CONNECT proxy answers 407; the client gets the proxy's 502 naming nothing behind it.
	authFile := filepath.Join(t.TempDir(), "via-auth")
	if err := os.WriteFile(authFile, []byte("epp:wrong\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	ppBad, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		via(proxy.HealthCheckHTTP)(cfg)
		cfg.UpstreamVia = "https-connect://" + proxyAddr
		cfg.UpstreamViaAuthFile = authFile
	}})
	if err != nil {
		t.Fatal(err)
	}
	status, body := httpGet(t, http.DefaultClient, ppBad.Endpoint.URLs[0]+"/v2/keys/tk2")
	if status != http.StatusBadGateway || !strings.Contains(body, "tunnel") {
		t.Errorf("GET through a tunnel that refuses our password: %d %s; want 502 naming the tunnel", status, body)
	}
	r := e.Etcdctl(3, ppBad.Endpoint).Run(ctx, "get", "tk", "--command-timeout=3s")
	if r.Exit == 0 {
		t.Errorf("v3 get through a tunnel that refuses our password succeeded: %s", r.Stdout)
	}
	for _, leak := range []string{tunnelHost, member.Port(), proxyAddr, member.Host} {
		if strings.Contains(body, leak) || strings.Contains(r.Stdout+r.Stderr, leak) {
			t.Errorf("an answer names %q: %s | %s", leak, body, r.Stdout+r.Stderr)
		}
	}
	mf := scrape(t, ppBad.Server.MetricsURLs()[0])
	if n, _ := metricValue(mf, "etcd_proxy_proxy_tunnel_dials_total", map[string]string{"result": "failed"}); n < 1 {
		t.Errorf("tunnel_dials_total{result=failed} = %v, want the refused dials", n)
	}
	if n, _ := metricValue(mf, "etcd_proxy_proxy_errors_total", map[string]string{"reason": "tunnel"}); n < 1 {
		t.Errorf("errors_total{reason=tunnel} = %v, want the refused requests", n)
	}
	if n, ok := metricValue(mf, "etcd_proxy_proxy_tunnel_connections", nil); !ok || n != 0 {
		t.Errorf("tunnel_connections = %v (present: %v) when every dial is refused, want 0", n, ok)
	}
	if ok, why := ppBad.Server.Ready(); ok {
		t.Errorf("ready although the tunnel refuses every connection (%s)", why)
	}
}

// Interop with the stock konnectivity server and agent: our proxy → konnectivity server (gRPC mode, and
// http-connect mode through --upstream-via https-connect://; mTLS) ← stock agent → a TLS member. etcdctl v3 and
// v2 work through it, with the member's certificate verified end to end inside the tunnel, and the server counts
// the dials it carried.
func TestUpstreamViaKonnectivity(t *testing.T) {
	t.Parallel()
	for _, mode := range []struct {
		name     string
		scheme   string
		ourAgent bool
		opts     []harness.KonnectivityOption
	}{
		{"grpc", "konnectivity://", false, nil},
		{"http-connect", "https-connect://", false, []harness.KonnectivityOption{harness.KonnectivityHTTPConnect()}},
		{"grpc-our-agent", "konnectivity://", true, nil},
	} {
		t.Run(mode.name, func(t *testing.T) {
			t.Parallel()
			testViaKonnectivity(t, mode.scheme, mode.ourAgent, mode.opts...)
		})
	}
}

// testViaKonnectivity: our proxy (TLS listener, client certificates) → the stock server ← the stock agent or
// ours (ourAgent) → a TLS member; the golden cases first, on the fresh store.
func testViaKonnectivity(t *testing.T, scheme string, ourAgent bool, opts ...harness.KonnectivityOption) {
	ctx := testContext(t, 90*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithTLS())
	if err != nil {
		t.Fatal(err)
	}
	k, err := e.StartKonnectivity(ctx, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if ourAgent {
		member, _ := url.Parse(c.Members[0].ClientURL)
		var logs harness.Buffer
		harness.RunAgent(t, agent.Config{Servers: []string{"konnectivity://" + k.AgentAddr}, ID: "ours", Allow: []string{member.Host},
			CAFile: k.AgentTLS.CAFile, CertFile: k.AgentTLS.CertFile, KeyFile: k.AgentTLS.KeyFile}, &logs)
		if err := k.WaitAgent(ctx); err != nil {
			t.Fatalf("%v (agent log: %s)", err, logs.String())
		}
	} else if _, err := k.StartStockAgent(ctx, "agent-1"); err != nil {
		t.Fatal(err)
	}
	pp, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{TLS: true, Configure: func(cfg *proxy.Config) {
		cfg.UpstreamVia = scheme + k.Addr
		cfg.TunnelTLS = proxy.TLSInfo{CAFile: k.ClientTLS.CAFile, CertFile: k.ClientTLS.CertFile, KeyFile: k.ClientTLS.KeyFile}
		cfg.UpstreamHealthInterval = 50 * time.Millisecond
	}})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, ctx, "ready through konnectivity", func() (bool, string) { return pp.Server.Ready() })
	tunnelGoldens(t, ctx, e, pp.Endpoint)
	v3 := e.Etcdctl(3, pp.Endpoint)
	if r := v3.Run(ctx, "put", "kk", "v3-through-konnectivity"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "OK" {
		t.Fatalf("v3 put: %v: %s%s", r.Check(), r.Stdout, r.Stderr)
	}
	if r := v3.Run(ctx, "get", "kk", "--print-value-only"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "v3-through-konnectivity" {
		t.Fatalf("v3 get: %v: %q %s", r.Check(), r.Stdout, r.Stderr)
	}
	v2 := e.Etcdctl(2, pp.Endpoint)
	if r := v2.Run(ctx, "set", "/kk2", "v2-through-konnectivity"); r.Check() != nil {
		t.Fatalf("v2 set: %v: %s%s", r.Check(), r.Stdout, r.Stderr)
	}
	if r := v2.Run(ctx, "get", "/kk2"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "v2-through-konnectivity" {
		t.Fatalf("v2 get: %v: %q %s", r.Check(), r.Stdout, r.Stderr)
	}
	if n := k.Metric(ctx, "konnectivity_network_proxy_server_dial_duration_seconds_count"); n < 2 {
		t.Errorf("the konnectivity server carried %v dials, want the proxy's connections (at least 2: gRPC, HTTP)", n)
	}
}

// The stock agent killed under load and started again: reads fail while no agent is connected (every connection
// goes through the tunnel) and recover once one is; no write is applied twice (each put's value appears at most
// once in the key's history) and every acknowledged one is there.
func TestKonnectivityAgentRestart(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 90*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	k, err := e.StartKonnectivity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	kill, err := k.StartStockAgent(ctx, "agent-1")
	if err != nil {
		t.Fatal(err)
	}
	pp, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.UpstreamVia = "konnectivity://" + k.Addr
		cfg.TunnelTLS = proxy.TLSInfo{CAFile: k.ClientTLS.CAFile, CertFile: k.ClientTLS.CertFile, KeyFile: k.ClientTLS.KeyFile}
	}})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: pp.Endpoint.URLs, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()

	load := startPutGetLoad(ctx, cli)
	defer load.stop()
	eventually(t, ctx, "reads through the agent", func() (bool, string) { return load.readOK.Load() >= 5, "" })
	if err := kill(); err != nil {
		t.Fatal(err)
	}
	eventually(t, ctx, "reads fail without an agent", func() (bool, string) { return load.readErr.Load() > 0, "" })
	if _, err := k.StartStockAgent(ctx, "agent-2"); err != nil {
		t.Fatal(err)
	}
	okBefore := load.readOK.Load()
	eventually(t, ctx, "reads recover with a new agent", func() (bool, string) {
		return load.readOK.Load() >= okBefore+5, fmt.Sprintf("%d reads failed", load.readErr.Load())
	})
	load.stop()

	// The key's whole history, from the member itself.
	direct, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoint().URLs, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	load.checkAppliedOnce(t, ctx, direct)
}

// tunnelGoldens runs the first etcdctl cases of TestV3 and TestV2 (puts, gets, a delete, a txn; sets, gets, a
// listing, updates, removes) through top, the proxy-proxy on top of a tunnel, on a fresh store, and compares
// them with the SAME golden files as the direct topologies: what a client sees must not depend on the path to
// the members. top must have a TLS listener (the tls goldens); run it before anything else writes.
func tunnelGoldens(t *testing.T, ctx context.Context, e *harness.Env, top harness.Endpoint) {
	t.Helper()
	registerTop(t, e, top)
	e.Register(fmt.Sprint(rules.NewSelf("etcd-proxy-proxy", top.URLs).ID), "proxy-id")
	v3, norm3 := e.Etcdctl(3, top), v3Norm(e)
	for _, c := range v3Cases[:slices.IndexFunc(v3Cases, func(c v3Case) bool { return c.name == "07-txn" })+1] {
		res := v3.RunWith(ctx, c.stdin, c.until, c.args...)
		if res.Err != nil {
			t.Fatalf("%s: %v", c.name, res.Err)
		}
		v3Goldens.check(t, filepath.Join("testdata", "v3", "tls", c.name+".txtar"), res, norm3)
	}
	v2, norm2 := e.Etcdctl(2, top), v2Norm(e)
	for _, c := range v2Cases[:10] { // up to 10-get-missing: the rest is about membership, not the path
		res := v2.Run(ctx, c.args...)
		if res.Err != nil {
			t.Fatalf("%s: %v", c.name, res.Err)
		}
		v2Goldens.check(t, filepath.Join("testdata", "v2", "tls", c.name+".txtar"), res, norm2)
	}
}

// rewrap dials the upstream through --upstream-via as the proxy does: the member is named by a host only the
// CONNECT proxy resolves, yet rewrap re-encrypts its plaintext values, v3 and v2 (--api 2), and the CONNECT proxy
// carried its connections.
func TestRewrapUpstreamVia(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	member, _ := url.Parse(c.Members[0].ClientURL)
	target := net.JoinHostPort(tunnelHost, member.Port())
	cp := &connectProxy{hosts: map[string]string{tunnelHost: member.Hostname()}, dials: map[string]int{}}
	srv := httptest.NewServer(cp)
	t.Cleanup(srv.Close)

	direct, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoint().URLs, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	if _, err := direct.Put(ctx, "/r/a", "plain"); err != nil {
		t.Fatal(err)
	}
	if code, b := do(ctx, http.DefaultClient, http.MethodPut, c.Members[0].ClientURL+"/v2/keys/r/b", "value=plain"); code != http.StatusCreated {
		t.Fatalf("v2 PUT: %d %s", code, b)
	}
	keyFile := filepath.Join(t.TempDir(), "k1.key")
	if code, out, errOut := runCLI("keygen", "--out", keyFile, "--name", "k1"); code != 0 {
		t.Fatalf("keygen: %d %s %s", code, out, errOut)
	}
	for _, api := range []string{"3", "2"} {
		code, out, errOut := runCLI("rewrap", "--api", api, "--upstream", "http://"+target, "--upstream-via",
			"http-connect://"+srv.Listener.Addr().String(), "--prefix", "/r/", "--encryption-key-file", keyFile,
			"--encryption-read-plaintext", "--timeout", "3s")
		if code != 0 || !strings.Contains(out, "scanned 1, stale 1, rewrapped 1,") {
			t.Fatalf("rewrap --api %s through the tunnel: exit %d, %q, %q", api, code, out, errOut)
		}
	}
	if r, err := direct.Get(ctx, "/r/a"); err != nil || len(r.Kvs) != 1 || !strings.HasPrefix(string(r.Kvs[0].Value), "epp:enc:v1:") {
		t.Errorf("/r/a after rewrap: %v %v; want the key's ciphertext", r, err)
	}
	if _, b := do(ctx, http.DefaultClient, http.MethodGet, c.Members[0].ClientURL+"/v2/keys/r/b", ""); !strings.Contains(b, `"value":"epp:enc:v1:`) {
		t.Errorf("v2 /r/b after rewrap: %s; want the key's ciphertext", b)
	}
	if dials, other := cp.seen(); dials[target] < 2 || len(other) != 0 {
		t.Errorf("the CONNECT proxy carried %v (unknown targets %v); want rewrap's connections to %s", dials, other, target)
	}
}

// putGetLoad puts the key w, one put at a time with a value of its own, and gets it, both until stop: the load
// of the agent-restart tests.
type putGetLoad struct {
	mu      sync.Mutex
	acked   []string // the values of the acknowledged puts
	readOK  atomic.Int64
	readErr atomic.Int64
	cancel  context.CancelFunc
	wg      sync.WaitGroup
}

func startPutGetLoad(ctx context.Context, cli *clientv3.Client) *putGetLoad {
	l := &putGetLoad{}
	lctx, cancel := context.WithCancel(ctx)
	l.cancel = cancel
	l.wg.Go(func() {
		for i := 0; lctx.Err() == nil; i++ {
			v := strconv.Itoa(i)
			cctx, cancel := context.WithTimeout(lctx, time.Second)
			_, err := cli.Put(cctx, "w", v)
			cancel()
			if err == nil {
				l.mu.Lock()
				l.acked = append(l.acked, v)
				l.mu.Unlock()
			}
		}
	})
	l.wg.Go(func() {
		for lctx.Err() == nil {
			cctx, cancel := context.WithTimeout(lctx, 500*time.Millisecond)
			_, err := cli.Get(cctx, "w")
			cancel()
			if err == nil {
				l.readOK.Add(1)
			} else if lctx.Err() == nil {
				l.readErr.Add(1)
			}
		}
	})
	return l
}

// stop ends the load and waits for it; again is a no-op.
func (l *putGetLoad) stop() { l.cancel(); l.wg.Wait() }

// checkAppliedOnce reads the key's whole history from the member itself (direct), after stop: no put is applied
// twice (each value appears at most once) and every acknowledged one is applied exactly once.
func (l *putGetLoad) checkAppliedOnce(t *testing.T, ctx context.Context, direct *clientv3.Client) {
	t.Helper()
	cur, err := direct.Get(ctx, "w")
	if err != nil {
		t.Fatal(err)
	}
	applied := map[string]int{}
	if len(cur.Kvs) > 0 { // no put applied at all: no history to read
		wctx, cancelWatch := context.WithCancel(ctx)
		defer cancelWatch()
		for wr := range direct.Watch(wctx, "w", clientv3.WithRev(1)) {
			for _, ev := range wr.Events {
				applied[string(ev.Kv.Value)]++
			}
			if len(wr.Events) > 0 && wr.Events[len(wr.Events)-1].Kv.ModRevision >= cur.Kvs[0].ModRevision {
				break
			}
		}
	}
	for v, n := range applied {
		if n > 1 {
			t.Errorf("put %q applied %d times", v, n)
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, v := range l.acked {
		if applied[v] != 1 {
			t.Errorf("acknowledged put %q applied %d times", v, applied[v])
		}
	}
	t.Logf("%d puts acknowledged, %d applied; reads: %d ok, %d failed", len(l.acked), len(applied), l.readOK.Load(), l.readErr.Load())
}
