package agent_test

import (
	"context"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/agent"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// The two-piece deployment, in process: our proxy (--tunnel-listen, mTLS) ← our agent → a member; etcdctl v3
// and v2 through it. A second proxy names the same member as localhost:PORT, which the agent does not allow
// (matched as written): 502, naming nothing behind the tunnel; a third names an agent that never connects: 502
// too. After the proxies stop and the agent's context ends, not one goroutine of any of them is left. Not
// parallel: goleak sees the whole process (the member runs as a process).
func TestAgentServesProxyProxy(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithProcesses())
	if err != nil {
		t.Fatal(err)
	}
	member, _ := url.Parse(c.Members[0].ClientURL)
	srvFiles, agentFiles, err := harness.NewTunnelPKI(filepath.Join(e.Dir, "tunnel-ca"))
	if err != nil {
		t.Fatal(err)
	}
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())

	through := func(upstream string) harness.ProxyProxyHop {
		return harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
			cfg.Upstreams = []string{upstream}
			cfg.TunnelListen = "https://127.0.0.1:0"
			cfg.TunnelTLS = proxy.TLSInfo{CAFile: srvFiles.CAFile, CertFile: srvFiles.CertFile, KeyFile: srvFiles.KeyFile}
			cfg.UpstreamKeepAliveTime = -1
			cfg.DialTimeout = 2 * time.Second
		}}
	}
	pp, err := e.StartProxyProxy(ctx, c.Endpoint(), through("tunnel://a1/"+c.Members[0].ClientURL))
	if err != nil {
		t.Fatal(err)
	}
	ppOther, err := e.StartProxyProxy(ctx, c.Endpoint(), through("tunnel://a1/http://localhost:"+member.Port()))
	if err != nil {
		t.Fatal(err)
	}
	ppNobody, err := e.StartProxyProxy(ctx, c.Endpoint(), through("tunnel://nobody/"+c.Members[0].ClientURL))
	if err != nil {
		t.Fatal(err)
	}

	var logs harness.Buffer
	defer harness.RunAgent(t, agent.Config{ID: "a1", Allow: []string{member.Host},
		Servers: []string{"https://" + pp.Server.TunnelListenAddr(), "https://" + ppOther.Server.TunnelListenAddr()},
		CAFile:  agentFiles.CAFile, CertFile: agentFiles.CertFile, KeyFile: agentFiles.KeyFile}, &logs)()

	v3 := e.Etcdctl(3, pp.Endpoint)
	for { // until the agent is connected: the first commands may find it not yet there
		r := v3.Run(ctx, "put", "tk", "through-the-tunnel", "--command-timeout=2s")
		if r.Check() == nil && strings.TrimSpace(r.Stdout) == "OK" {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("v3 put: %v: %s%s (agent log: %s)", r.Check(), r.Stdout, r.Stderr, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if r := v3.Run(ctx, "get", "tk", "--print-value-only"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "through-the-tunnel" {
		t.Fatalf("v3 get: %v: %q %s", r.Check(), r.Stdout, r.Stderr)
	}
	v2 := e.Etcdctl(2, pp.Endpoint)
	if r := v2.Run(ctx, "set", "/tk2", "v2-through-the-tunnel"); r.Check() != nil {
		t.Fatalf("v2 set: %v: %s%s", r.Check(), r.Stdout, r.Stderr)
	}
	if r := v2.Run(ctx, "get", "/tk2"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "v2-through-the-tunnel" {
		t.Fatalf("v2 get: %v: %q %s", r.Check(), r.Stdout, r.Stderr)
	}

	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	for _, p := range []*harness.ProxyProxy{ppOther, ppNobody} {
		resp, err := (&http.Client{Transport: tr}).Get(p.Endpoint.URLs[0] + "/v2/keys/tk2")
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body) // the whole answer: one Read may return only its start
		_ = resp.Body.Close()
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), "tunnel") {
			t.Errorf("GET through %s: %d %s, want 502 naming the tunnel", p.Config.Upstreams[0], resp.StatusCode, body)
		}
		for _, leak := range []string{member.Port(), "nobody", "a1"} {
			if strings.Contains(string(body), leak) {
				t.Errorf("the answer names %q: %s", leak, body)
			}
		}
	}
	if !strings.Contains(logs.String(), "destination not allowed") || !strings.Contains(logs.String(), "localhost:"+member.Port()) {
		t.Errorf("the agent did not say it refused localhost:%s: %s", member.Port(), logs.String())
	}

	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	defer scancel()
	for _, p := range []*harness.ProxyProxy{pp, ppOther, ppNobody} {
		if err := p.Stop(sctx); err != nil {
			t.Fatal(err)
		}
	}
}
