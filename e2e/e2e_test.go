// Package e2e checks etcd-proxy-proxy end to end: the real etcdctl through real topologies of embedded etcd
// members, etcd's stock proxies and chains of proxy-proxies, compared with golden files.
package e2e

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// testContext bounds a test: every wait in it ends by d at the latest.
func testContext(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// topology is a named chain of hops on top of 3 members; the same list runs plain and with TLS on every hop.
type topology struct {
	name string
	hops func(tls bool) []harness.Hop
}

func pp(tls bool) harness.Hop { return harness.ProxyProxyHop{TLS: tls} }

// started is a running topology whose outermost proxy-proxy is registered as "proxy": every placeholder a
// client of the deployment sees is the same whatever is below it, so one golden file serves every topology.
type started struct {
	env *harness.Env
	run *harness.Running
	top harness.Endpoint
}

func start(t *testing.T, ctx context.Context, topo topology, tls bool) *started {
	t.Helper()
	return startVersion(t, ctx, topo, tls, "")
}

// startVersion is start on members of etcd version (one of harness.EtcdVersions, run as processes); ""
// embeds v3.5.35 members.
func startVersion(t *testing.T, ctx context.Context, topo topology, tls bool, version string) *started {
	t.Helper()
	e := harness.NewTestEnv(t)
	r, err := e.Start(ctx, harness.Topology{Name: topo.name, Members: 3, TLS: tls, Version: version, Hops: topo.hops(tls)})
	if err != nil {
		t.Fatal(err)
	}
	top := r.Top()
	registerTop(t, e, top)
	return &started{env: e, run: r, top: top}
}

// registerTop registers the proxy-proxy a client talks to as "proxy" (its address and ID) and the client's
// TLS files, as every golden file names them.
func registerTop(t *testing.T, e *harness.Env, top harness.Endpoint) {
	t.Helper()
	u, err := url.Parse(top.URLs[0])
	if err != nil {
		t.Fatal(err)
	}
	e.Register(u.Host, "proxy")
	e.Register(rules.NewSelf("etcd-proxy-proxy", top.URLs).IDString(), "proxy-id")
	e.Register(top.TLS.CertFile, "$CLIENT_CERT")
	e.Register(top.TLS.KeyFile, "$CLIENT_KEY")
	e.Register(top.TLS.CAFile, "$CLIENT_CA")
}

// goldens compares results of several topologies with one golden file each. With -update the first topology
// to reach a case writes it and the others compare with what it wrote, so a topology that differs still fails.
type goldens struct {
	mu      sync.Mutex
	written map[string]bool
}

func (g *goldens) check(t *testing.T, path string, res harness.Result, norm func(string) string) {
	t.Helper()
	if !*harness.Update {
		harness.CheckGolden(t, path, res, norm)
		return
	}
	g.mu.Lock()
	first := !g.written[path]
	if first {
		if g.written == nil {
			g.written = map[string]bool{}
		}
		g.written[path] = true
	}
	if first {
		harness.CheckGolden(t, path, res, norm) // writes
		g.mu.Unlock()
		return
	}
	g.mu.Unlock()
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := harness.Golden(res, norm); string(got) != string(want) {
		t.Errorf("%s: this topology differs from the one that wrote the golden file:\n%s", filepath.Base(path), got)
	}
}

// issueCert issues a certificate from ca, or fails the test.
func issueCert(t *testing.T, ca *harness.CA, name string, opts ...harness.CertOption) harness.TLSFiles {
	t.Helper()
	f, err := ca.Issue(name, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return f
}
