package harness

import (
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// etcdctl v2 picks a random member from the synced list for each request; which one is noise.
var reKeysOnMember = regexp.MustCompile(`\b(c\d+-)?member-\d+/v2/keys`)

// TestStockTopologies starts 3 members ← the stock v2 proxy, plain and with TLS, checks that etcdctl works
// through the top, and records today's behaviour of the stock proxies in testdata/before/*.txtar: etcdctl ends up
// talking to the members (their URLs leak through /v2/members), and the grpc-proxy either hides the members
// (--advertise-client-url) or lists them.
func TestStockTopologies(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"plain", "tls"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			tls := mode == "tls"
			ctx := testContext(t, 120*time.Second)
			e := NewTestEnv(t)
			r, err := e.Start(ctx, Topology{Name: mode, Members: 3, TLS: tls, Hops: []Hop{StockV2Hop{TLS: tls}}})
			if err != nil {
				t.Fatal(err)
			}
			if len(r.Layers) != 2 || r.Top().Name != "stock-v2" || r.Layers[0].Name != "members" {
				t.Fatalf("layers = %+v", r.Layers)
			}
			// member list marks the leader; make it the same member every run.
			if err := r.Cluster.MoveLeader(ctx, 0); err != nil {
				t.Fatal(err)
			}
			v2 := e.Etcdctl(2, r.Top())
			if err := v2.Run(ctx, "--no-sync", "set", "foo", "bar").Check(); err != nil {
				t.Fatal(err)
			}
			var proxies []*GRPCProxy
			for _, adv := range []bool{false, true} {
				opts := []GRPCProxyOption{WithAdvertise(adv)}
				if tls {
					opts = append(opts, WithTLS())
				}
				p, err := e.StartGRPCProxy(ctx, r.Cluster.Endpoint(), opts...)
				if err != nil {
					t.Fatal(err)
				}
				proxies = append(proxies, p)
			}

			t.Run("get-through-top", func(t *testing.T) {
				t.Parallel()
				res := v2.Run(ctx, "get", "foo")
				if err := res.Check(); err != nil {
					t.Fatal(err)
				}
				if got := strings.TrimSpace(res.Stdout); got != "bar" {
					t.Errorf("get foo through %s = %q, want bar", r.Top().Name, got)
				}
			})

			norm := func(s string) string {
				return reKeysOnMember.ReplaceAllString(e.Normalize(s), "member-N/v2/keys")
			}
			goldens := []struct {
				name string
				ctl  *Etcdctl
				args []string
			}{
				{"stock-v2-debug-get", v2, []string{"--debug", "get", "foo"}},
				{"stock-v2-member-list", v2, []string{"member", "list"}},
				{"stock-v2-cluster-health", v2, []string{"cluster-health"}},
				{"stock-v2-no-sync-get", v2, []string{"--debug", "--no-sync", "get", "foo"}},
				{"grpc-proxy-member-list", e.Etcdctl(3, proxies[0].Endpoint()), []string{"member", "list"}},
				{"grpc-proxy-advertise-member-list", e.Etcdctl(3, proxies[1].Endpoint()), []string{"member", "list"}},
			}
			for _, g := range goldens {
				t.Run(g.name, func(t *testing.T) {
					t.Parallel()
					res := g.ctl.Run(ctx, g.args...)
					if res.Err != nil {
						t.Fatal(res.Err)
					}
					CheckGolden(t, filepath.Join("testdata", "before", mode+"-"+g.name+".txtar"), res, norm)
				})
			}
		})
	}
}
