package e2e

import (
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/agent"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// The two-piece deployment: our proxy (TLS listener; --tunnel-listen, mTLS) ← our agent → a TLS member, verified
// end to end against the member's name; the golden cases give the direct topologies' output. An agent whose
// certificate is not of the tunnel's CA is refused. Under load the agent is stopped: reads fail, the proxy counts
// no agent and /readyz says not ready; a new agent connects: reads recover, no write is applied twice and every
// acknowledged one is there.
func TestTunnelListen(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithTLS())
	if err != nil {
		t.Fatal(err)
	}
	member, _ := url.Parse(c.Members[0].ClientURL)
	srvFiles, agentFiles, err := harness.NewTunnelPKI(filepath.Join(e.Dir, "tunnel-ca"))
	if err != nil {
		t.Fatal(err)
	}
	pp, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{TLS: true, Configure: func(cfg *proxy.Config) {
		cfg.Upstreams = []string{"tunnel://a1/" + c.Members[0].ClientURL}
		cfg.TunnelListen = "https://127.0.0.1:0"
		cfg.TunnelTLS = proxy.TLSInfo{CAFile: srvFiles.CAFile, CertFile: srvFiles.CertFile, KeyFile: srvFiles.KeyFile}
		cfg.UpstreamHealthInterval = 50 * time.Millisecond
		cfg.DialTimeout = time.Second
		cfg.ListenMetricsURLs = []string{"http://127.0.0.1:0"}
	}})
	if err != nil {
		t.Fatal(err)
	}
	tunnel := "https://" + pp.Server.TunnelListenAddr()
	metrics := pp.Server.MetricsURLs()[0]
	agents := func() float64 {
		n, _ := metricValue(scrape(t, metrics), "etcd_proxy_proxy_tunnel_agents_connected", nil)
		return n
	}
	conns := func() float64 {
		n, _ := metricValue(scrape(t, metrics), "etcd_proxy_proxy_tunnel_connections", nil)
		return n
	}
	cfg := func(id string, f harness.TLSFiles) agent.Config {
		return agent.Config{Servers: []string{tunnel}, ID: id, Allow: []string{member.Host},
			CAFile: srvFiles.CAFile, CertFile: f.CertFile, KeyFile: f.KeyFile}
	}

	// A client certificate of another CA: the handshake fails, the agent retries.
	var strangerLogs harness.Buffer
	stopStranger := harness.RunAgent(t, cfg("a1", issueCert(t, e.PKI.Other, "stranger-agent", harness.ClientAuth())), &strangerLogs)
	eventually(t, ctx, "the stranger refused", func() (bool, string) {
		return strings.Count(strangerLogs.String(), "tunnel server connection ended") >= 2, strangerLogs.String()
	})
	stopStranger()
	if n := agents(); n != 0 {
		t.Errorf("tunnel_agents_connected = %v with an agent of another CA, want 0", n)
	}
	if ok, _ := pp.Server.Ready(); ok {
		t.Error("ready although no agent is connected")
	}

	var logs harness.Buffer
	stop := harness.RunAgent(t, cfg("a1", agentFiles), &logs)
	eventually(t, ctx, "ready through the agent", func() (bool, string) { return pp.Server.Ready() })
	if n := agents(); n != 1 {
		t.Errorf("tunnel_agents_connected = %v, want 1", n)
	}
	tunnelGoldens(t, ctx, e, pp.Endpoint)
	ppTLS, err := pp.Endpoint.TLS.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: pp.Endpoint.URLs, TLS: ppTLS, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()

	load := startPutGetLoad(ctx, cli)
	defer load.stop()
	eventually(t, ctx, "reads through the agent", func() (bool, string) { return load.readOK.Load() >= 5, "" })
	if n := conns(); n < 2 { // at least the clients' gRPC connection and the probes'
		t.Errorf("tunnel_connections = %v with load through the agent, want ≥ 2", n)
	}
	stop()
	eventually(t, ctx, "reads fail without an agent", func() (bool, string) { return load.readErr.Load() > 0, "" })
	eventually(t, ctx, "not ready without an agent", func() (bool, string) { ok, why := pp.Server.Ready(); return !ok, why })
	if n := agents(); n != 0 {
		t.Errorf("tunnel_agents_connected = %v after the agent stopped, want 0", n)
	}
	// Every tunnelled connection ended with the agent's control stream.
	eventually(t, ctx, "tunnel_connections back to 0", func() (bool, string) { n := conns(); return n == 0, fmt.Sprint(n) })
	harness.RunAgent(t, cfg("a1", agentFiles), &logs)
	okBefore := load.readOK.Load()
	eventually(t, ctx, "reads recover with a new agent", func() (bool, string) {
		return load.readOK.Load() >= okBefore+5, fmt.Sprintf("%d reads failed", load.readErr.Load())
	})
	load.stop()

	// The key's whole history, from the member itself.
	tc, err := c.TLS.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	direct, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoint().URLs, TLS: tc, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	load.checkAppliedOnce(t, ctx, direct)
	mf := scrape(t, metrics)
	if n, _ := metricValue(mf, "etcd_proxy_proxy_tunnel_dials_total", map[string]string{"result": "ok"}); n < 2 {
		t.Errorf("tunnel_dials_total{result=ok} = %v, want the connections of both agents", n)
	}
	if n, _ := metricValue(mf, "etcd_proxy_proxy_tunnel_dials_total", map[string]string{"result": "failed"}); n < 1 {
		t.Errorf("tunnel_dials_total{result=failed} = %v, want the dials without an agent", n)
	}
}
