package proxy_test

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// startServer starts a proxy.Server on a free port with cfg (Upstreams set by the caller) and a logger into logs.
func startServer(t *testing.T, cfg proxy.Config, logs io.Writer) (*proxy.Server, string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := "http://" + l.Addr().String()
	cfg.ListenClientURLs, cfg.AdvertiseClientURLs = []string{u}, []string{u}
	srv, err := proxy.New(cfg, proxy.WithListener(u, l), proxy.WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	return srv, u
}

func do(t *testing.T, req *http.Request) (int, string) {
	t.Helper()
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// The access log shows what happened and nothing a client would want kept secret.
func TestAccessLogHasNoSecrets(t *testing.T) {
	t.Parallel()
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "{}") }))
	t.Cleanup(up.Close)
	logs := &harness.Buffer{}
	_, u := startServer(t, proxy.Config{Upstreams: []string{up.URL}, OpsConfig: proxy.OpsConfig{AccessLog: true}}, logs)

	req, _ := http.NewRequest(http.MethodPut, u+"/v2/keys/app/db?value=hunter2&prevExist=false", nil)
	req.Header.Set("Authorization", "Basic cm9vdDpodW50ZXIy")
	do(t, req)
	req, _ = http.NewRequest(http.MethodPut, u+"/v2/auth/users/root?password=hunter2",
		strings.NewReader(`{"user":"root","password":"hunter2"}`))
	do(t, req)
	req, _ = http.NewRequest(http.MethodGet, u+"/v2/keys/app?token=tok123&wait=true", nil)
	do(t, req)

	out := logs.String()
	for _, want := range []string{"msg=access", "method=PUT", "path=/v2/keys/app/db", "query=\"value=REDACTED&prevExist=false\"",
		"path=/v2/auth/users/root", "status=200", "query=\"token=REDACTED&wait=true\"", "remote=127.0.0.1:", "duration=", "bytes=2"} {
		if !strings.Contains(out, want) {
			t.Errorf("access log lacks %q:\n%s", want, out)
		}
	}
	for _, secret := range []string{"hunter2", "cm9vdDpodW50ZXIy", "tok123", "password", "Authorization"} {
		if strings.Contains(out, secret) {
			t.Errorf("access log contains %q:\n%s", secret, out)
		}
	}
	if n := strings.Count(out, "msg=access"); n != 3 {
		t.Errorf("%d access lines, want 3", n)
	}
}

// New upstream connections present the client certificate and trust the CA bundle loaded last.
func TestUpstreamCertificatesReload(t *testing.T) {
	t.Parallel()
	pki, err := harness.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	serverA, _ := pki.Cluster.Issue("upstream-a", harness.ServerAuth())
	serverB, _ := pki.Other.Issue("upstream-b", harness.ServerAuth())
	wrongHost, _ := pki.Other.Issue("upstream-wrong-host", harness.ServerAuth(), harness.Hosts("wrong.example"))
	client1, _ := pki.Cluster.Issue("client-1", harness.ClientAuth())
	client2, _ := pki.Cluster.Issue("client-2", harness.ClientAuth())
	certA, _ := tls.LoadX509KeyPair(serverA.CertFile, serverA.KeyFile)
	certB, _ := tls.LoadX509KeyPair(serverB.CertFile, serverB.KeyFile)
	certWrong, _ := tls.LoadX509KeyPair(wrongHost.CertFile, wrongHost.KeyFile)

	var useB, useWrong atomic.Bool
	var seen atomic.Value // CN of the last client certificate
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen.Store(r.TLS.PeerCertificates[0].Subject.CommonName)
		w.Header().Set("Connection", "close") // every request on a new connection
		_, _ = io.WriteString(w, "{}")
	}))
	// GetConfigForClient, not GetCertificate: without SNI (an IP address) Go serves Certificates[0], which
	// StartTLS fills in.
	up.TLS = &tls.Config{
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			c := &tls.Config{ClientAuth: tls.RequireAnyClientCert, Certificates: []tls.Certificate{certA}}
			if useB.Load() {
				c.Certificates = []tls.Certificate{certB}
			}
			if useWrong.Load() {
				c.Certificates = []tls.Certificate{certWrong}
			}
			return c, nil
		},
	}
	up.StartTLS()
	t.Cleanup(up.Close)

	dir := t.TempDir()
	ca, cert, key := dir+"/ca.crt", dir+"/client.crt", dir+"/client.key"
	cp := func(dst, src string) {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cp(ca, pki.Cluster.CertFile)
	cp(cert, client1.CertFile)
	cp(key, client1.KeyFile)
	srv, u := startServer(t, proxy.Config{
		Upstreams:   []string{up.URL},
		UpstreamTLS: proxy.TLSInfo{CAFile: ca, CertFile: cert, KeyFile: key},
		OpsConfig:   proxy.OpsConfig{CertReloadInterval: -1, UpstreamHealthInterval: -1},
	}, io.Discard)
	get := func() (int, string) {
		req, _ := http.NewRequest(http.MethodGet, u+"/version", nil)
		return do(t, req)
	}
	if code, _ := get(); code != 200 || seen.Load() != "client-1" {
		t.Fatalf("before: %d, client %v", code, seen.Load())
	}

	cp(cert, client2.CertFile)
	cp(key, client2.KeyFile)
	if err := srv.ReloadCertificates(); err != nil {
		t.Fatal(err)
	}
	if code, _ := get(); code != 200 || seen.Load() != "client-2" {
		t.Errorf("after the client certificate changed: %d, client %v", code, seen.Load())
	}

	// The upstream moves to a certificate of another CA: refused until the bundle is replaced.
	useB.Store(true)
	if code, body := get(); code != http.StatusBadGateway || !strings.Contains(body, "TLS") {
		t.Errorf("upstream of an unknown CA: %d %s", code, body)
	}
	cp(ca, pki.Other.CertFile)
	if err := srv.ReloadCertificates(); err != nil {
		t.Fatal(err)
	}
	if code, body := get(); code != 200 {
		t.Errorf("after the CA bundle changed: %d %s", code, body)
	}

	// The name is still verified: a certificate of the trusted CA for another host is refused.
	useWrong.Store(true)
	if code, body := get(); code != http.StatusBadGateway || !strings.Contains(body, "TLS") {
		t.Errorf("upstream certificate for another host: %d %s", code, body)
	}
	useWrong.Store(false)

	// A broken file keeps what was loaded.
	if err := os.WriteFile(cert, []byte("not a certificate"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := srv.ReloadCertificates(); err == nil || !strings.Contains(err.Error(), "upstream TLS") {
		t.Errorf("reload of a broken file = %v", err)
	}
	if code, _ := get(); code != 200 || seen.Load() != "client-2" {
		t.Errorf("after a broken file: %d, client %v", code, seen.Load())
	}
}

// Without the upstream, /readyz says why, without naming it; the metrics listener serves only its own paths.
func TestReadyzWithoutUpstream(t *testing.T) {
	t.Parallel()
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := l.Addr().String()
	_ = l.Close()
	srv, u := startServer(t, proxy.Config{
		Upstreams: []string{"http://" + dead},
		OpsConfig: proxy.OpsConfig{ListenMetricsURLs: []string{"http://127.0.0.1:0"}, UpstreamHealthInterval: 50 * time.Millisecond,
			UpstreamHealthCheck: proxy.HealthCheckTCP},
	}, io.Discard)
	m := srv.MetricsURLs()[0]
	deadline := time.Now().Add(10 * time.Second)
	for {
		req, _ := http.NewRequest(http.MethodGet, m+"/readyz", nil)
		code, body := do(t, req)
		if code == http.StatusServiceUnavailable && strings.Contains(body, `"ready":false`) && strings.Contains(body, "no upstream endpoint is healthy") {
			if strings.Contains(body, dead) || strings.Contains(body, "127.0.0.1") {
				t.Errorf("reason names the upstream: %s", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz = %d %s", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	for path, want := range map[string]int{"/livez": 200, "/v2/keys": 404, "/version": 404} {
		req, _ := http.NewRequest(http.MethodGet, m+path, nil)
		if code, _ := do(t, req); code != want {
			t.Errorf("metrics listener %s = %d, want %d", path, code, want)
		}
	}
	req, _ := http.NewRequest(http.MethodGet, u+"/readyz", nil)
	if code, _ := do(t, req); code != http.StatusServiceUnavailable { // forwarded: the upstream is down
		t.Errorf("client port /readyz = %d, want the forwarded 503", code)
	}
}

// Each upstream connection is verified against the host it dialled, IP addresses included: a certificate that is
// valid only for another of the --upstream hosts is refused.
func TestUpstreamCertificateForAnotherUpstream(t *testing.T) {
	t.Parallel()
	pki, err := harness.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	other, err := pki.Cluster.Issue("upstream-127-0-0-2", harness.ServerAuth(), harness.Hosts("127.0.0.2"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(other.CertFile, other.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "{}")
	}))
	up.TLS = &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return &tls.Config{Certificates: []tls.Certificate{cert}}, nil
	}}
	up.StartTLS()
	t.Cleanup(up.Close)
	_, u := startServer(t, proxy.Config{
		Upstreams:   []string{up.URL, "https://127.0.0.2:1"},
		UpstreamTLS: proxy.TLSInfo{CAFile: pki.Cluster.CertFile},
		OpsConfig:   proxy.OpsConfig{CertReloadInterval: -1, UpstreamHealthInterval: -1},
	}, io.Discard)
	req, _ := http.NewRequest(http.MethodGet, u+"/version", nil)
	if code, body := do(t, req); code != http.StatusBadGateway || !strings.Contains(body, "TLS") {
		t.Errorf("upstream 127.0.0.1 with a certificate for 127.0.0.2: %d %s, want 502 TLS", code, body)
	}
}

// Requests go to upstreams the probe found healthy: an endpoint that answers but is unhealthy (a member without
// a leader answers /health 503) gets nothing, and new connections again once it is healthy.
func TestRequestsGoToAHealthyUpstream(t *testing.T) {
	t.Parallel()
	var sick atomic.Bool
	sick.Store(true)
	upstream := func(name string, healthy func() bool) *httptest.Server {
		up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/health" && !healthy() {
				w.WriteHeader(http.StatusServiceUnavailable)
			}
			_, _ = io.WriteString(w, name)
		}))
		t.Cleanup(up.Close)
		return up
	}
	first := upstream("first", func() bool { return !sick.Load() })
	second := upstream("second", func() bool { return true })
	srv, u := startServer(t, proxy.Config{
		Upstreams: []string{first.URL, second.URL},
		OpsConfig: proxy.OpsConfig{UpstreamHealthInterval: 20 * time.Millisecond},
	}, io.Discard)
	// Each request on a connection of its own: a connection stays with its endpoint while that is available
	// (connection affinity), so only new connections show where requests go.
	fresh := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	answer := func() string {
		resp, err := fresh.Get(u + "/v2/keys/a")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	deadline := time.Now().Add(5 * time.Second)
	for ok, _ := srv.Ready(); !ok; ok, _ = srv.Ready() { // the first probe round has run
		if time.Now().After(deadline) {
			t.Fatal("not ready after 5 s")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := answer(); got != "second" {
		t.Errorf("with the first upstream unhealthy the answer came from %q, want second", got)
	}
	sick.Store(false)
	for answer() != "first" {
		if time.Now().After(deadline) {
			t.Fatal("requests did not go back to the first upstream within 5 s of it being healthy")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
