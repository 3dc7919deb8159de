package proxy_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// TestWatchSlowClient: two clients watch one key through the fan-out, whose history is 4 responses; one reads
// nothing while 30 large events go by (its connection's flow-control window fills, the shared history passes
// it). The other gets every event without waiting for it; the slow one, when it reads, gets every event too, in
// order, caught up by an upstream watch of its own — nothing skipped, nothing repeated.
func TestWatchSlowClient(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	front, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.WatchHistory = 4
		cfg.ListenMetricsURLs = []string{"http://127.0.0.1:0"}
	}})
	if err != nil {
		t.Fatal(err)
	}
	addr := strings.TrimPrefix(front.Endpoint.URLs[0], "http://")
	fast := watchBig(ctx, t, addr)
	// A fixed window of 64 KiB (no BDP growth): one event fills it.
	slow := watchBig(ctx, t, addr, grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))

	const n = 30
	revs := putBig(ctx, t, c.Endpoint().URLs, n)
	check := func(name string, s pb.Watch_WatchClient) {
		t.Helper()
		var got []int64
		for len(got) < n {
			r, err := s.Recv()
			if err != nil {
				t.Fatalf("%s: %v after %d events", name, err, len(got))
			}
			for _, ev := range r.Events {
				if want := fmt.Sprint(len(got)); !bytes.HasPrefix(ev.Kv.Value, []byte(want+"x")) {
					t.Fatalf("%s: event %d has value %.8q…", name, len(got), ev.Kv.Value)
				}
				got = append(got, ev.Kv.ModRevision)
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(revs) {
			t.Fatalf("%s: revisions %v, want %v", name, got, revs)
		}
	}
	check("fast client", fast) // while the slow one has read nothing
	check("slow client", slow)

	resp, err := http.Get(front.Server.MetricsURLs()[0] + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// Caught up (at least once), and back on the shared upstream watch once caught up.
	if m := string(body); strings.Contains(m, "etcd_proxy_proxy_watch_catch_ups_total 0\n") ||
		!strings.Contains(m, "etcd_proxy_proxy_watch_upstream_watches 1\n") {
		t.Errorf("want catch-ups of the slow client, and one upstream watch at the end:\n%s", grep(m, "watch_"))
	}
}

// putBig writes n values of 64 KiB to the key "big" on the members, and returns their revisions.
func putBig(ctx context.Context, t *testing.T, members []string, n int) []int64 {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: members, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	var revs []int64
	for i := range n {
		r, err := cli.Put(ctx, "big", fmt.Sprint(i, strings.Repeat("x", 64<<10)))
		if err != nil {
			t.Fatal(err)
		}
		revs = append(revs, r.Header.Revision)
	}
	return revs
}

// watchBig watches the key "big" through the proxy at addr on a connection of its own, created.
func watchBig(ctx context.Context, t *testing.T, addr string, opts ...grpc.DialOption) pb.Watch_WatchClient {
	t.Helper()
	cc, err := grpc.NewClient(addr, append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	s, err := pb.NewWatchClient(cc).Watch(ctx)
	if err == nil {
		err = s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
			CreateRequest: &pb.WatchCreateRequest{Key: []byte("big")}}})
	}
	if err != nil {
		t.Fatal(err)
	}
	if r, err := s.Recv(); err != nil || !r.Created {
		t.Fatalf("created: %v %v", r, err)
	}
	return s
}

func grep(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestWatchSlowClientCancelled: past --watch-catch-up-limit slow clients being caught up at once, one more
// that falls behind has its watch cancelled with a CancelReason naming the revision to watch again from, after
// every event before that revision: nothing is skipped silently. The one being caught up still gets every event.
func TestWatchSlowClientCancelled(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	front, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.WatchHistory, cfg.WatchCatchUpLimit = 4, 1
		cfg.ListenMetricsURLs = []string{"http://127.0.0.1:0"}
	}})
	if err != nil {
		t.Fatal(err)
	}
	metric := func(name string) string {
		resp, err := http.Get(front.Server.MetricsURLs()[0] + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		for _, l := range strings.Split(string(body), "\n") {
			if strings.HasPrefix(l, name+" ") {
				return l
			}
		}
		return ""
	}
	addr := strings.TrimPrefix(front.Endpoint.URLs[0], "http://")
	slowWatch := func() pb.Watch_WatchClient {
		return watchBig(ctx, t, addr, grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	}
	one, two := slowWatch(), slowWatch()
	const n = 20
	revs := putBig(ctx, t, c.Endpoint().URLs, n)
	recv := func(s pb.Watch_WatchClient, got *[]int64) *pb.WatchResponse {
		t.Helper()
		r, err := s.Recv()
		if err != nil {
			t.Fatal(err)
		}
		for _, ev := range r.Events {
			*got = append(*got, ev.Kv.ModRevision)
		}
		return r
	}
	// The first reads a little: it falls behind and is being caught up.
	var got1 []int64
	for metric("etcd_proxy_proxy_watch_catch_ups_total") == "etcd_proxy_proxy_watch_catch_ups_total 0" {
		if ctx.Err() != nil {
			t.Fatal("the first client was never caught up")
		}
		recv(one, &got1)
	}
	// The second then falls behind too, past the limit: cancelled after every event before the revision named.
	var got2 []int64
	for {
		r := recv(two, &got2)
		if r.Canceled {
			want := fmt.Sprintf("watch again from revision %d", revs[len(got2)])
			if !strings.Contains(r.CancelReason, want) || fmt.Sprint(got2) != fmt.Sprint(revs[:len(got2)]) {
				t.Fatalf("cancelled after %v with %q; want the revisions before and %q", got2, r.CancelReason, want)
			}
			break
		}
	}
	if m := metric("etcd_proxy_proxy_watch_slow_cancels_total"); m != "etcd_proxy_proxy_watch_slow_cancels_total 1" {
		t.Errorf("metrics: %q, want one slow cancel", m)
	}
	for len(got1) < n {
		recv(one, &got1)
	}
	if fmt.Sprint(got1) != fmt.Sprint(revs) {
		t.Fatalf("the client caught up got %v, want %v", got1, revs)
	}
}
