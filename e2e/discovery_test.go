package e2e

import (
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// TestDiscoverMembers: given one member, --discover-members finds the others in the cluster's member list, so
// the proxy keeps serving when the member it was given stops; what clients see of the membership is still only
// the proxy.
func TestDiscoverMembers(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(3))
	if err != nil {
		t.Fatal(err)
	}
	waitLeader(t, ctx, c)
	seed := c.Members[0]
	if c.Leader() == seed {
		if err := c.MoveLeader(ctx, 1); err != nil {
			t.Fatal(err)
		}
	}
	ep := c.Endpoint()
	ep.URLs = []string{seed.ClientURL}
	p, err := e.StartProxyProxy(ctx, ep, harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.DiscoverMembers = true
		cfg.RefreshInterval = 200 * time.Millisecond
	}})
	if err != nil {
		t.Fatal(err)
	}
	base := p.Endpoint.URLs[0]
	cl := &http.Client{Timeout: 5 * time.Second}
	if code, body := do(ctx, cl, http.MethodPut, base+"/v2/keys/discovered", "value=1"); code != http.StatusCreated && code != http.StatusOK {
		t.Fatalf("PUT through the proxy: %d %s", code, body)
	}
	stopMember(t, ctx, seed)
	code, body := do(ctx, cl, http.MethodGet, base+"/v2/keys/discovered?quorum=true", "")
	if code != http.StatusOK || !strings.Contains(body, `"value":"1"`) {
		t.Errorf("GET after the only --upstream stopped: %d %s; want the value from the members discovery found", code, body)
	}
	code, body = do(ctx, cl, http.MethodGet, base+"/v2/members", "")
	if code != http.StatusOK || strings.Count(body, `"id"`) != 1 || !strings.Contains(body, base) {
		t.Errorf("membership view: %d %s; want the proxy alone", code, body)
	}
	for _, m := range c.Members {
		if strings.Contains(body, strings.TrimPrefix(m.ClientURL, "http://")) {
			t.Errorf("membership view names member %s: %s", m.Name, body)
		}
	}
}
