package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
)

// v2Topologies are the chains the v2 API is checked through.
var v2Topologies = []topology{
	{"pp-members", func(tls bool) []harness.Hop { return []harness.Hop{pp(tls)} }},
	{"pp-pp-members", func(tls bool) []harness.Hop { return []harness.Hop{pp(tls), pp(tls)} }},
	{"pp-stock", func(tls bool) []harness.Hop { return []harness.Hop{harness.StockV2Hop{TLS: tls}, pp(tls)} }},
	{"pp-pp-stock", func(tls bool) []harness.Hop { return []harness.Hop{harness.StockV2Hop{TLS: tls}, pp(tls), pp(tls)} }},
}

// belowStock reports a topology with etcd's stock v2 proxy in it. That proxy copies response bodies with
// io.Copy and never flushes, so a stream=true watch through it delivers nothing until the stream ends,
// whatever the hops above it do (a long-poll watch, one event per request, works).
func belowStock(name string) bool { return strings.HasSuffix(name, "-stock") }

// v2Cases run in order against one topology: each may depend on what the ones before it wrote. None uses
// --no-sync: syncing must keep etcdctl on the proxy.
var v2Cases = []struct {
	name string
	args []string
}{
	{"01-set", []string{"set", "/foo", "bar"}},
	{"02-get", []string{"get", "/foo"}},
	{"03-mk", []string{"mk", "/dir/a", "1"}},
	{"04-mk-exists", []string{"mk", "/dir/a", "2"}},
	{"05-mkdir", []string{"mkdir", "/empty"}},
	{"06-ls-r", []string{"ls", "-r", "--sort"}},
	{"07-update", []string{"update", "/foo", "baz"}},
	{"08-get-json", []string{"-o", "json", "get", "/foo"}},
	{"09-rm", []string{"rm", "/foo"}},
	{"10-get-missing", []string{"get", "/foo"}},
	{"11-member-list", []string{"member", "list"}},
	{"12-cluster-health", []string{"cluster-health"}},
	{"13-debug-get", []string{"--debug", "get", "/dir/a"}},
	{"14-member-add", []string{"member", "add", "intruder", "http://127.0.0.1:1"}},
	{"15-member-remove", []string{"member", "remove", "proxy-id"}},
}

var v2Goldens goldens

// etcdctl v2 prints the response time of each request in --debug mode for some commands; and its watch
// timing is noise.
var reDebugNoise = regexp.MustCompile(`(?m)^.*(took|response time).*\n`)

// reErrorIndex is the etcd index at the end of a v2 error ("Error:  100: Key not found (/foo) [12]").
var reErrorIndex = regexp.MustCompile(`(?m)(Error: .*) \[\d+\]$`)

// v2Norm normalises etcdctl v2 output for the golden files.
func v2Norm(env *harness.Env) func(string) string {
	return func(str string) string {
		str = reDebugNoise.ReplaceAllString(env.Normalize(str), "")
		return reErrorIndex.ReplaceAllString(str, "$1 [<N>]")
	}
}

func TestV2(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"plain", "tls"} {
		for _, topo := range v2Topologies {
			t.Run(mode+"/"+topo.name, func(t *testing.T) {
				t.Parallel()
				ctx := testContext(t, 3*time.Minute)
				s := start(t, ctx, topo, mode == "tls")
				ctl := s.env.Etcdctl(2, s.top)
				norm := v2Norm(s.env)
				for _, c := range v2Cases {
					args := c.args
					if c.name == "15-member-remove" { // the ID of whatever proxy-proxy is on top
						args = []string{"member", "remove", strings.TrimSuffix(strings.Fields(ctl.Run(ctx, "member", "list").Stdout)[0], ":")}
					}
					res := ctl.Run(ctx, args...)
					if res.Err != nil {
						t.Fatalf("%s: %v", c.name, res.Err)
					}
					v2Goldens.check(t, filepath.Join("testdata", "v2", mode, c.name+".txtar"), res, norm)
				}
				t.Run("watch", func(t *testing.T) { testV2Watch(t, ctx, s, ctl) })
				if !belowStock(topo.name) {
					t.Run("stream", func(t *testing.T) { testV2Stream(t, ctx, s) })
				}
				t.Run("cluster-id", func(t *testing.T) { testV2ClusterID(t, ctx, s) })
				t.Run("cors-collapsed", func(t *testing.T) { testV2CORS(t, ctx, s, belowStock(topo.name)) })
				t.Run("member-add-not-swallowed", func(t *testing.T) { testV2MemberAdd(t, ctx, s) })
			})
		}
	}
}

// testV2Watch: `etcdctl watch` through the proxy prints a value that a second client sets. --after-index makes
// it independent of when the watch reaches the member: the event is in etcd's history either way.
func testV2Watch(t *testing.T, ctx context.Context, s *started, ctl *harness.Etcdctl) {
	set := ctl.Run(ctx, "-o", "extended", "set", "/watched", "before")
	if err := set.Check(); err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`Modified-Index: (\d+)`).FindStringSubmatch(set.Stdout)
	if m == nil {
		t.Fatalf("no Modified-Index in %q", set.Stdout)
	}
	done := make(chan harness.Result, 1)
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	go func() { done <- ctl.Run(wctx, "watch", "--after-index", m[1], "/watched") }()
	if err := s.env.Etcdctl(2, s.top).Run(ctx, "set", "/watched", "after").Check(); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if err := res.Check(); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(res.Stdout); got != "after" {
		t.Errorf("watch printed %q, want %q", got, "after")
	}
}

// httpClient is a client of the topology's top, with its TLS.
func httpClient(t *testing.T, ep harness.Endpoint) *http.Client {
	t.Helper()
	tc, err := ep.TLS.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	tr := &http.Transport{TLSClientConfig: tc}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// testV2Stream: a stream=true watch delivers each event while the stream stays open. Each event is set only
// after the previous one arrived, so a proxy that buffers the stream fails at the first deadline.
func testV2Stream(t *testing.T, ctx context.Context, s *started) {
	c := httpClient(t, s.top)
	base := s.top.URLs[0] + "/v2/keys/streamed"
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(sctx, http.MethodGet, base+"?wait=true&stream=true", nil)
	resp, err := c.Do(req) // returns with the headers: the proxy flushes them before any event
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	lines := make(chan string)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			if strings.TrimSpace(sc.Text()) != "" {
				lines <- sc.Text()
			}
		}
	}()
	for i := 1; i <= 3; i++ {
		put(t, sctx, c, base, strconv.Itoa(i))
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("stream ended before event %d", i)
			}
			var ev struct {
				Action string
				Node   struct{ Value string }
			}
			if err := json.Unmarshal([]byte(line), &ev); err != nil {
				t.Fatalf("event %d: %v in %q", i, err, line)
			}
			if ev.Action != "set" || ev.Node.Value != strconv.Itoa(i) {
				t.Fatalf("event %d = %s", i, line)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("event %d did not arrive while the stream was open", i)
		}
	}
}

func put(t *testing.T, ctx context.Context, c *http.Client, u, value string) {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, u, strings.NewReader(url.Values{"value": {value}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("PUT %s: %s %s", value, resp.Status, b)
	}
}

// testV2ClusterID: the membership view comes from the proxy, the cluster ID header from the real cluster.
func testV2ClusterID(t *testing.T, ctx context.Context, s *started) {
	c := httpClient(t, s.top)
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, s.top.URLs[0]+"/v2/members", nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if got, want := resp.Header.Get("X-Etcd-Cluster-Id"), strconv.FormatUint(s.run.Cluster.ID, 16); got != want {
		t.Errorf("X-Etcd-Cluster-Id = %q, want the cluster's %q", got, want)
	}
}

// testV2CORS: the stock v2 proxy adds CORS headers on top of the member's, so its answers carry each twice; the
// proxy-proxy's headers rule collapses them.
func testV2CORS(t *testing.T, ctx context.Context, s *started, stock bool) {
	count := func(ep harness.Endpoint) int {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ep.URLs[0]+"/v2/keys/", nil)
		resp, err := httpClient(t, ep).Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return len(resp.Header.Values("Access-Control-Allow-Origin"))
	}
	if n := count(s.top); n != 1 {
		t.Errorf("Access-Control-Allow-Origin appears %d times through the proxy-proxy, want 1", n)
	}
	if stock {
		if n := count(s.run.Layers[1]); n != 2 {
			t.Errorf("straight from the stock v2 proxy Access-Control-Allow-Origin appears %d times; the test expects the duplicate it collapses", n)
		}
	}
}

// testV2MemberAdd: a member add is answered with an error, and the cluster still has its 3 members.
func testV2MemberAdd(t *testing.T, ctx context.Context, s *started) {
	c := httpClient(t, s.top)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, s.top.URLs[0]+"/v2/members",
		strings.NewReader(`{"peerURLs":["http://127.0.0.1:1"]}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var e struct{ Message string }
	if resp.StatusCode != http.StatusForbidden || json.Unmarshal(body, &e) != nil || !strings.Contains(e.Message, "--forward-member-changes") {
		t.Errorf("member add: %s %s, want 403 with an etcd-style message", resp.Status, body)
	}
	members := s.run.Cluster.Endpoint()
	mc := httpClient(t, members)
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, members.URLs[0]+"/v2/members", nil)
	resp, err = mc.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list struct{ Members []json.RawMessage }
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil {
		t.Fatal(err)
	}
	if len(list.Members) != 3 {
		t.Errorf("the cluster has %d members after a rejected add, want 3", len(list.Members))
	}
}
