package proxy_test

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// TestUpstreamIdentityPerClient: on the HTTP path toward a TLS upstream, each client's requests reach the
// upstream with the certificate of its identity, over kept-alive connections that never serve two identities;
// a client without a pair gets the shared certificate; a pair added to the folder counts after a reload
// (SIGHUP). Without per-client identities the upstream sees CN=root for every client.
func TestUpstreamIdentityPerClient(t *testing.T) {
	t.Parallel()
	pki, err := harness.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	issue := func(ca *harness.CA, name, cn string, opts ...harness.CertOption) harness.TLSFiles {
		f, err := ca.Issue(name, append(opts, harness.CommonName(cn))...)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	upServer := issue(pki.Cluster, "upstream", "upstream", harness.ServerAuth())
	root := issue(pki.Cluster, "up-root", "root", harness.ClientAuth())
	aliceUp := issue(pki.Cluster, "up-alice", "alice-upstream", harness.ClientAuth())
	malloryUp := issue(pki.Cluster, "up-mallory", "mallory-upstream", harness.ClientAuth())
	listener := issue(pki.Client, "listener", "listener", harness.ServerAuth())

	upCert, err := tls.LoadX509KeyPair(upServer.CertFile, upServer.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	up := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, r.TLS.PeerCertificates[0].Subject.CommonName)
	}))
	up.TLS = &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pki.Cluster.Pool(),
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return &tls.Config{ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pki.Cluster.Pool(),
				Certificates: []tls.Certificate{upCert}, NextProtos: []string{"h2", "http/1.1"}}, nil
		}}
	up.EnableHTTP2 = true
	up.StartTLS()
	t.Cleanup(up.Close)

	dir := t.TempDir()
	copyPair(t, dir, "alice", aliceUp)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := "https://" + l.Addr().String()
	srv, err := proxy.New(proxy.Config{
		Upstreams:           []string{up.URL},
		UpstreamTLS:         proxy.TLSInfo{CAFile: pki.Cluster.CertFile, CertFile: root.CertFile, KeyFile: root.KeyFile},
		UpstreamCertDir:     dir,
		ListenClientURLs:    []string{u},
		AdvertiseClientURLs: []string{u},
		ListenerTLS:         proxy.TLSInfo{CertFile: listener.CertFile, KeyFile: listener.KeyFile, CAFile: pki.Client.CertFile},
		OpsConfig:           proxy.OpsConfig{CertReloadInterval: -1, UpstreamHealthInterval: -1},
	}, proxy.WithListener(u, l), proxy.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })

	client := func(cn string) *http.Client {
		tc := &tls.Config{RootCAs: pki.Client.Pool()}
		if cn != "" {
			c := issue(pki.Client, "client-"+cn, cn, harness.ClientAuth())
			cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
			if err != nil {
				t.Fatal(err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		tr := &http.Transport{TLSClientConfig: tc}
		t.Cleanup(tr.CloseIdleConnections)
		return &http.Client{Transport: tr}
	}
	clients := map[string]*http.Client{"alice": client("alice"), "mallory": client("mallory"), "": client("")}
	seenBy := func(who string) string {
		t.Helper()
		resp, err := clients[who].Get(u + "/version")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	// Interleaved, twice: kept-alive upstream connections must not carry one identity's requests for another.
	for range 2 {
		for who, want := range map[string]string{"alice": "alice-upstream", "mallory": "root", "": "root"} {
			if got := seenBy(who); got != want {
				t.Errorf("client %q reached the upstream as %q, want %q", who, got, want)
			}
		}
	}

	copyPair(t, dir, "mallory", malloryUp)
	if err := srv.ReloadCertificates(); err != nil {
		t.Fatal(err)
	}
	if got := seenBy("mallory"); got != "mallory-upstream" {
		t.Errorf("after the reload mallory reached the upstream as %q, want mallory-upstream", got)
	}
}

func copyPair(t *testing.T, dir, cn string, f harness.TLSFiles) {
	t.Helper()
	for src, dst := range map[string]string{f.KeyFile: cn + ".key", f.CertFile: cn + ".crt"} {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, dst), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}
