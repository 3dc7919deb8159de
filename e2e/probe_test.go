package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// probeFast is a proxy-proxy that probes its upstream every 20 ms with the default probe.
var probeFast = func(cfg *proxy.Config) { cfg.UpstreamHealthInterval = 20 * time.Millisecond }

// The default upstream probe writes nothing to the cluster: a 3.5 member with v2 on answers etcd's GET /health
// with a v2 QGET through raft, and those WAL entries are "custom v2 content" to etcdutl's v2 deprecation check
// (etcd's TestV2DeprecationCheckCustomContentOffline through the proxy found it). Here a member sees at least 20
// probes and neither its raft index nor its v2 store's read count moves.
func TestProbeWritesNothing(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	member := c.Members[0].ClientURL
	// What the member counts of probes: Maintenance.Status calls (gRPC or gateway) and /health answers.
	probes := func() float64 {
		_, body := httpGet(t, http.DefaultClient, member+"/metrics")
		n := 0.0
		for line := range strings.Lines(body) {
			if strings.HasPrefix(line, "etcd_server_health_success ") ||
				strings.HasPrefix(line, "grpc_server_handled_total{") && strings.Contains(line, `grpc_method="Status"`) {
				v, _ := strconv.ParseFloat(strings.TrimSpace(line[strings.LastIndexByte(line, ' '):]), 64)
				n += v
			}
		}
		return n
	}
	v2Gets := func() float64 {
		_, body := httpGet(t, http.DefaultClient, member+"/v2/stats/store")
		var s struct {
			GetsSuccess float64 `json:"getsSuccess"`
		}
		if err := json.Unmarshal([]byte(body), &s); err != nil {
			t.Fatalf("/v2/stats/store: %v: %s", err, body)
		}
		return s.GetsSuccess
	}
	raftIndex := func() string {
		resp, err := http.Post(member+"/v3/maintenance/status", "application/json", strings.NewReader("{}"))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		var s struct {
			RaftIndex string `json:"raftIndex"`
		}
		if err := json.Unmarshal(body, &s); err != nil || s.RaftIndex == "" {
			t.Fatalf("Status: %v: %s", err, body)
		}
		return s.RaftIndex
	}
	pp, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: probeFast})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, ctx, "ready", func() (bool, string) { ok, why := pp.Server.Ready(); return ok, why })
	index, gets, seen := raftIndex(), v2Gets(), probes()
	eventually(t, ctx, "20 probes", func() (bool, string) {
		n := probes() - seen
		return n >= 20, fmt.Sprintf("%v probes", n)
	})
	if got := v2Gets(); got != gets {
		t.Errorf("the probes made %v v2 reads on the member", got-gets)
	}
	if got := raftIndex(); got != index {
		t.Errorf("raft index %s → %s while only probes reached the member", index, got)
	}
}

// The default probe finds every kind of upstream healthy (a member, plain and TLS; etcd's stock v2 proxy; etcd's
// grpc-proxy, which has no JSON gateway; another proxy-proxy, also in front of the stock v2 proxy, through which
// no gRPC passes), and a member without a leader unhealthy, directly and through a proxy-proxy (which answers
// Status as the leader, but keeps the member's "no leader").
func TestProbeUpstreamKinds(t *testing.T) {
	t.Parallel()
	pp := harness.ProxyProxyHop{Configure: probeFast}
	ready := func(srv *proxy.Server, want bool) func() (bool, string) {
		return func() (bool, string) { ok, why := srv.Ready(); return ok == want, why }
	}
	for _, topo := range []harness.Topology{
		{Name: "member", Members: 1},
		{Name: "member-tls", Members: 1, TLS: true},
		{Name: "stock-v2", Members: 1, Hops: []harness.Hop{harness.StockV2Hop{}}},
		{Name: "grpc-proxy", Members: 1, Hops: []harness.Hop{harness.GRPCProxyHop{}}},
		{Name: "grpc-proxy-tls", Members: 1, TLS: true, Hops: []harness.Hop{harness.GRPCProxyHop{TLS: true}}},
		{Name: "proxy-proxy", Members: 1, Hops: []harness.Hop{pp}},
		{Name: "stock-v2-proxy-proxy", Members: 1, Hops: []harness.Hop{harness.StockV2Hop{}, pp}},
	} {
		t.Run(topo.Name, func(t *testing.T) {
			t.Parallel()
			ctx := testContext(t, 60*time.Second)
			e := harness.NewTestEnv(t)
			r, err := e.Start(ctx, topo)
			if err != nil {
				t.Fatal(err)
			}
			top, err := e.StartProxyProxy(ctx, r.Top(), pp)
			if err != nil {
				t.Fatal(err)
			}
			eventually(t, ctx, "ready", ready(top.Server, true))
		})
	}
	t.Run("no leader", func(t *testing.T) {
		t.Parallel()
		ctx := testContext(t, 60*time.Second)
		e := harness.NewTestEnv(t)
		c, err := e.StartCluster(ctx, harness.WithMembers(3))
		if err != nil {
			t.Fatal(err)
		}
		// The first proxy-proxy has one member as upstream, which loses its leader when the other two stop.
		one := harness.Endpoint{Name: "member-0", URLs: c.Endpoint().URLs[:1]}
		first, err := e.StartProxyProxy(ctx, one, pp)
		if err != nil {
			t.Fatal(err)
		}
		second, err := e.StartProxyProxy(ctx, first.Endpoint, pp)
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, ctx, "both ready", func() (bool, string) {
			a, why := first.Server.Ready()
			b, why2 := second.Server.Ready()
			return a && b, why + why2
		})
		for _, m := range c.Members[1:] {
			if err := m.Stop(ctx); err != nil {
				t.Fatal(err)
			}
		}
		eventually(t, ctx, "the first not ready", ready(first.Server, false))
		eventually(t, ctx, "the second not ready", ready(second.Server, false))
	})
}
