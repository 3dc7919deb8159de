package agent_test

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/agent"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// Our agent serves the stock konnectivity server (v0.36.0, mTLS): our proxy → stock server ← our agent → a
// member; etcdctl v3 and v2 through it. The same member named localhost:PORT instead of the allowed
// 127.0.0.1:PORT is refused (matched as written, before any resolution) and the client gets the proxy's 502.
// After the proxies stop and the agent's context ends, not one goroutine of either is left. Not parallel: goleak
// sees the whole process (the member runs as a process).
func TestAgentServesStockServer(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithProcesses())
	if err != nil {
		t.Fatal(err)
	}
	member, _ := url.Parse(c.Members[0].ClientURL)
	k, err := e.StartKonnectivity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())

	var logs harness.Buffer
	defer harness.RunAgent(t, agent.Config{Servers: []string{"konnectivity://" + k.AgentAddr}, ID: "ours",
		Allow: []string{member.Host}, CAFile: k.AgentTLS.CAFile, CertFile: k.AgentTLS.CertFile, KeyFile: k.AgentTLS.KeyFile},
		&logs)()
	if err := k.WaitAgent(ctx); err != nil {
		t.Fatalf("%v (agent log: %s)", err, logs.String())
	}

	via := func(upstream string) harness.ProxyProxyHop {
		return harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
			cfg.Upstreams = []string{upstream}
			cfg.UpstreamVia = "konnectivity://" + k.Addr
			cfg.TunnelTLS = proxy.TLSInfo{CAFile: k.ClientTLS.CAFile, CertFile: k.ClientTLS.CertFile, KeyFile: k.ClientTLS.KeyFile}
			cfg.UpstreamKeepAliveTime = -1
		}}
	}
	pp, err := e.StartProxyProxy(ctx, c.Endpoint(), via(c.Members[0].ClientURL))
	if err != nil {
		t.Fatal(err)
	}
	v3 := e.Etcdctl(3, pp.Endpoint)
	if r := v3.Run(ctx, "put", "ak", "through-our-agent"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "OK" {
		t.Fatalf("v3 put: %v: %s%s (agent log: %s)", r.Check(), r.Stdout, r.Stderr, logs.String())
	}
	if r := v3.Run(ctx, "get", "ak", "--print-value-only"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "through-our-agent" {
		t.Fatalf("v3 get: %v: %q %s", r.Check(), r.Stdout, r.Stderr)
	}
	v2 := e.Etcdctl(2, pp.Endpoint)
	if r := v2.Run(ctx, "set", "/ak2", "v2-through-our-agent"); r.Check() != nil {
		t.Fatalf("v2 set: %v: %s%s", r.Check(), r.Stdout, r.Stderr)
	}
	if r := v2.Run(ctx, "get", "/ak2"); r.Check() != nil || strings.TrimSpace(r.Stdout) != "v2-through-our-agent" {
		t.Fatalf("v2 get: %v: %q %s", r.Check(), r.Stdout, r.Stderr)
	}

	// The same member by another name: not on the list as written, refused before any resolution.
	other := "http://localhost:" + member.Port()
	ppOther, err := e.StartProxyProxy(ctx, c.Endpoint(), via(other))
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(ppOther.Endpoint.URLs[0] + "/v2/keys/ak2")
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway {
		t.Errorf("GET to a destination the agent does not allow: %d, want 502", resp.StatusCode)
	}
	if !strings.Contains(logs.String(), "destination not allowed") || !strings.Contains(logs.String(), "localhost:"+member.Port()) {
		t.Errorf("the agent did not say it refused localhost:%s: %s", member.Port(), logs.String())
	}

	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	defer scancel()
	for _, p := range []*harness.ProxyProxy{pp, ppOther} {
		if err := p.Stop(sctx); err != nil {
			t.Fatal(err)
		}
	}
}

// Every problem in one message.
func TestValidate(t *testing.T) {
	t.Parallel()
	err := (&agent.Config{Servers: []string{"http://h:1", "konnectivity://noport"}, Allow: []string{"h"},
		CertFile: "/nonexistent", MaxPendingDials: -1}).Validate()
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{`--tunnel-server "http://h:1": scheme must be konnectivity or https`,
		`"konnectivity://noport": want konnectivity://HOST:PORT`, `--allow "h": want host:port`,
		"--tunnel-cert-file and --tunnel-key-file go together", "--tunnel-cert-file: no such file",
		"--max-pending-dials: must not be negative"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%q does not say %q", err, want)
		}
	}
	if err := (&agent.Config{}).Validate(); err == nil || !strings.Contains(err.Error(), "--tunnel-server is required") ||
		!strings.Contains(err.Error(), "--allow is required") {
		t.Errorf("empty configuration: %v", err)
	}
	if err := (&agent.Config{Servers: []string{"konnectivity://h:8091"}, Allow: []string{"m1:2379"}}).Validate(); err != nil {
		t.Errorf("valid configuration: %v", err)
	}
}

// A server that ends every session at once (a restart, a drain): the agent comes back each time, with the path
// and metadata the stock server expects (/AgentService/Connect, agentID, agentIdentifiers), and stops cleanly.
func TestAgentReconnects(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	sessions := make(chan string, 100)
	addr, caFile, stopServer := fakeServer(t, func(_ any, stream grpc.ServerStream) error {
		method, _ := grpc.MethodFromServerStream(stream)
		md, _ := metadata.FromIncomingContext(stream.Context())
		_ = stream.SendHeader(metadata.Pairs("serverID", "fake", "serverCount", "1"))
		sessions <- method + " " + strings.Join(md.Get("agentID"), ",") + " " + strings.Join(md.Get("agentIdentifiers"), ",")
		return status.Error(codes.Unavailable, "going away")
	})
	defer stopServer()
	a, err := agent.New(agent.Config{Servers: []string{"konnectivity://" + addr}, ID: "ours",
		Identifiers: "host=m1", Allow: []string{"m1:2379"}, CAFile: caFile}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { a.Run(ctx); close(stopped) }()
	deadline := time.After(10 * time.Second)
	for i := range 3 {
		select {
		case s := <-sessions:
			if s != "/AgentService/Connect ours host=m1" {
				t.Errorf("session %d: %q", i, s)
			}
		case <-deadline:
			t.Fatalf("%d sessions in 10 s, want 3", i)
		}
	}
	cancel()
	<-stopped
}

// fakeServer is a konnectivity server of the test's own, for what the stock one cannot be made to do: TLS with a
// certificate of a new CA, every stream served by handler. It gives its address, the CA file that verifies it,
// and stop (to defer before goleak's check, which runs first).
func fakeServer(t *testing.T, handler grpc.StreamHandler) (addr, caFile string, stop func()) {
	t.Helper()
	ca, err := harness.NewCA(t.TempDir(), "tunnel-ca")
	if err != nil {
		t.Fatal(err)
	}
	srvFiles, err := ca.Issue("server", harness.ServerAuth())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(srvFiles.CertFile, srvFiles.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}})),
		grpc.UnknownServiceHandler(handler))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(l) }()
	return l.Addr().String(), ca.CertFile, srv.Stop
}
