package proxy_test

// Review of the watch fan-out (issue 14): each test here failed on the fan-out as first merged (4e450b6).

import (
	"context"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/goleak"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// fanOut starts one member and a proxy in front of it: a client of the member, the member's and the proxy's
// client URLs.
func fanOut(t *testing.T, ctx context.Context, configure func(*proxy.Config)) (*clientv3.Client, string, string) {
	t.Helper()
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	front, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: configure})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoint().URLs, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli, c.Endpoint().URLs[0], front.Endpoint.URLs[0]
}

// watchStream opens a raw Watch stream to url.
func watchStream(t *testing.T, ctx context.Context, url string, opts ...grpc.DialOption) pb.Watch_WatchClient {
	t.Helper()
	s, cc := watchConn(t, ctx, url, opts...)
	t.Cleanup(func() { _ = cc.Close() })
	return s
}

// watchConn opens a raw Watch stream to url on a connection of its own.
func watchConn(t *testing.T, ctx context.Context, url string, opts ...grpc.DialOption) (pb.Watch_WatchClient, *grpc.ClientConn) {
	t.Helper()
	cc, err := grpc.NewClient(strings.TrimPrefix(url, "http://"), append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
	if err != nil {
		t.Fatal(err)
	}
	s, err := pb.NewWatchClient(cc).Watch(ctx)
	if err != nil {
		_ = cc.Close()
		t.Fatal(err)
	}
	return s, cc
}

func createReq(r *pb.WatchCreateRequest) *pb.WatchRequest {
	return &pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: r}}
}

// recvTimeout is the next answer on s within d.
func recvTimeout(s pb.Watch_WatchClient, d time.Duration) (*pb.WatchResponse, error) {
	type res struct {
		r   *pb.WatchResponse
		err error
	}
	ch := make(chan res, 1)
	go func() {
		r, err := s.Recv()
		ch <- res{r, err}
	}()
	select {
	case r := <-ch:
		return r.r, r.err
	case <-time.After(d):
		return nil, fmt.Errorf("no answer within %v", d)
	}
}

// TestWatchReviewCloseSend: a member keeps serving the watches of a stream whose client closed its sending side
// (etcd's recvLoop returns nil on EOF and Watch waits for the stream's context): grpcurl -d '{"create_request":…}'
// does that, and gets events from a member. Through the fan-out the stream ended with OK at once, after the
// created answer. (The proxy's own JSON gateway hides its half-close, gateway.go.)
func TestWatchReviewCloseSend(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, member, front := fanOut(t, ctx, nil)
	for _, tc := range []struct{ name, url string }{{"member", member}, {"proxy", front}} {
		t.Run("grpc/"+tc.name, func(t *testing.T) {
			s := watchStream(t, ctx, tc.url)
			key := "closesend-" + tc.name
			if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte(key)})); err != nil {
				t.Fatal(err)
			}
			if r, err := recvTimeout(s, 5*time.Second); err != nil || !r.Created {
				t.Fatalf("created: %v %v", r, err)
			}
			if err := s.CloseSend(); err != nil {
				t.Fatal(err)
			}
			p, err := cli.Put(ctx, key, "v")
			if err != nil {
				t.Fatal(err)
			}
			r, err := recvTimeout(s, 5*time.Second)
			if err != nil || len(r.Events) != 1 || r.Events[0].Kv.ModRevision != p.Header.Revision {
				t.Fatalf("after CloseSend: %v, %v; want the event at revision %d", r, err, p.Header.Revision)
			}
		})
	}
}

// TestWatchReviewNowAfterFutureStart: a watch from a future revision makes the shared group of its key; a watch
// of the same key from now joined it and started at that future revision: it missed every event until then,
// and its created answer carried a revision the store had not reached.
func TestWatchReviewNowAfterFutureStart(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, _, front := fanOut(t, ctx, nil)
	p, err := cli.Put(ctx, "future", "0")
	if err != nil {
		t.Fatal(err)
	}
	cur := p.Header.Revision
	s1 := watchStream(t, ctx, front)
	if err := s1.Send(createReq(&pb.WatchCreateRequest{Key: []byte("future"), StartRevision: cur + 1000})); err != nil {
		t.Fatal(err)
	}
	if r, err := recvTimeout(s1, 5*time.Second); err != nil || !r.Created || r.Canceled {
		t.Fatalf("created (future): %v %v", r, err)
	}
	s2 := watchStream(t, ctx, front)
	if err := s2.Send(createReq(&pb.WatchCreateRequest{Key: []byte("future")})); err != nil {
		t.Fatal(err)
	}
	r, err := recvTimeout(s2, 5*time.Second)
	if err != nil || !r.Created || r.Canceled {
		t.Fatalf("created (now): %v %v", r, err)
	}
	if r.Header.Revision != cur {
		t.Errorf("created answer of a watch from now at revision %d, want the store's %d", r.Header.Revision, cur)
	}
	p, err = cli.Put(ctx, "future", "1")
	if err != nil {
		t.Fatal(err)
	}
	r, err = recvTimeout(s2, 5*time.Second)
	if err != nil || len(r.Events) != 1 || r.Events[0].Kv.ModRevision != p.Header.Revision {
		t.Fatalf("watch from now: %v, %v; want the event at revision %d", r, err, p.Header.Revision)
	}
}

// TestWatchReviewNowAfterPastStart: a watch from an old revision makes the shared group of its key; a watch of
// the same key from now, created while the member is still catching the first up, joined it at that old
// revision: its created answer carried the old revision and it got the old events — a member gives a watch from
// now only what comes after its created answer. And when the old revision was compacted, the watch from now was
// cancelled with the compaction error of the other.
func TestWatchReviewNowAfterPastStart(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, _, front := fanOut(t, ctx, nil)
	var cur int64
	for i := range 5 {
		p, err := cli.Put(ctx, "past", fmt.Sprint(i))
		if err != nil {
			t.Fatal(err)
		}
		cur = p.Header.Revision
	}
	for _, tc := range []struct {
		name    string
		compact bool
	}{{"history", false}, {"compacted", true}} {
		t.Run(tc.name, func(t *testing.T) {
			key := "past"
			start := cur - 3
			if tc.compact {
				key = "compacted"
				if _, err := cli.Put(ctx, key, "x"); err != nil {
					t.Fatal(err)
				}
				p, err := cli.Put(ctx, key, "y")
				if err != nil {
					t.Fatal(err)
				}
				if _, err := cli.Compact(ctx, p.Header.Revision); err != nil {
					t.Fatal(err)
				}
				start = 1
			}
			g, err := cli.Get(ctx, "any")
			if err != nil {
				t.Fatal(err)
			}
			now := g.Header.Revision
			// Both in one go: the second is served right after the upstream created the first, before the member
			// (which syncs unsynced watchers every 100 ms) sent it its old events.
			s := watchStream(t, ctx, front)
			if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte(key), StartRevision: start})); err != nil {
				t.Fatal(err)
			}
			if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte(key), WatchId: 7})); err != nil {
				t.Fatal(err)
			}
			var fromNow []*pb.WatchResponse
			var p *clientv3.PutResponse
			for deadline := time.Now().Add(5 * time.Second); ; {
				r, err := recvTimeout(s, time.Until(deadline))
				if err != nil {
					t.Fatalf("watch 7: %v after %v", err, fromNow)
				}
				if r.WatchId != 7 {
					continue
				}
				fromNow = append(fromNow, r)
				if r.Created {
					if r.Header.Revision < now {
						t.Errorf("created answer of a watch from now at revision %d, before the store's %d", r.Header.Revision, now)
					}
					if p, err = cli.Put(ctx, key, "new"); err != nil {
						t.Fatal(err)
					}
					continue
				}
				if r.Canceled || len(r.Events) != 1 || r.Events[0].Kv.ModRevision != p.Header.Revision {
					t.Fatalf("watch from now got %v; want only the event at revision %d after its created answer", fromNow, p.Header.Revision)
				}
				break
			}
		})
	}
}

// TestWatchReviewRequestBackpressure: a member reads no further watch requests of a stream while it cannot send
// their answers (recvLoop blocks on its control channel of 16), so a client that sends without reading is held
// by flow control. The fan-out queued every request of such a client: here 64 MiB of creates went into the
// proxy's memory in a few seconds, without bound.
func TestWatchReviewRequestBackpressure(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, _, front := fanOut(t, ctx, nil)
	// A client that does not read: a fixed 64 KiB window, filled by one large event; the proxy's sends block.
	s := watchStream(t, ctx, front, grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte("stuck")})); err != nil {
		t.Fatal(err)
	}
	if r, err := recvTimeout(s, 5*time.Second); err != nil || !r.Created {
		t.Fatalf("created: %v %v", r, err)
	}
	for i := range 2 {
		if _, err := cli.Put(ctx, "stuck", fmt.Sprint(i, strings.Repeat("x", 256<<10))); err != nil {
			t.Fatal(err)
		}
	}
	const total, size = 64 << 20, 16 << 10
	pad := strings.Repeat("k", size)
	var sent atomic.Int64
	go func() {
		for sent.Load() < total {
			if s.Send(createReq(&pb.WatchCreateRequest{Key: []byte(pad)})) != nil {
				return
			}
			sent.Add(size)
		}
	}()
	time.Sleep(3 * time.Second) // what it can send in 3 s is the measure
	n := sent.Load()
	t.Logf("sent %d KiB of watch requests in 3 s", n>>10)
	if n > total*3/4 {
		t.Fatalf("a client that reads nothing sent %d MiB of watch requests in 3 s; want them held by flow control", n>>20)
	}
}

// TestWatchReviewNoLeak: once its clients have gone, the fan-out has no goroutine left — whatever the watches
// were (shared, catching up from an old revision, from a future revision, half-closed, a progress request
// pending, a client that stopped reading).
func TestWatchReviewNoLeak(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, _, front := fanOut(t, ctx, func(cfg *proxy.Config) { cfg.WatchHistory = 2 })
	warm := watchStream(t, ctx, front)
	if err := warm.Send(createReq(&pb.WatchCreateRequest{Key: []byte("warm")})); err != nil {
		t.Fatal(err)
	}
	if r, err := recvTimeout(warm, 5*time.Second); err != nil || !r.Created {
		t.Fatalf("created: %v %v", r, err)
	}
	p, err := cli.Put(ctx, "leak", "0")
	if err != nil {
		t.Fatal(err)
	}
	rev := p.Header.Revision
	opts := goleak.IgnoreCurrent()

	s1, cc1 := watchConn(t, ctx, front)
	s2, cc2 := watchConn(t, ctx, front, grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	defer cc1.Close()
	defer cc2.Close()
	for _, r := range []*pb.WatchCreateRequest{{Key: []byte("leak")}, {Key: []byte("leak"), StartRevision: 1},
		{Key: []byte("leak"), StartRevision: rev + 100}, {Key: []byte("other")}} {
		for _, s := range []pb.Watch_WatchClient{s1, s2} {
			if err := s.Send(createReq(r)); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, s := range []pb.Watch_WatchClient{s1, s2} {
		for range 4 {
			if r, err := recvTimeout(s, 5*time.Second); err != nil || !r.Created {
				t.Fatalf("created: %v %v", r, err)
			}
		}
	}
	if err := s1.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}); err != nil {
		t.Fatal(err)
	}
	_ = s1.CloseSend()
	for i := range 8 { // s2 reads none of it
		if _, err := cli.Put(ctx, "leak", fmt.Sprint(i, strings.Repeat("x", 64<<10))); err != nil {
			t.Fatal(err)
		}
	}
	for n := 0; n < 8; {
		r, err := recvTimeout(s1, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if r.WatchId == 0 {
			n += len(r.Events)
		}
	}
	_ = cc1.Close()
	_ = cc2.Close()
	// Only the warm stream's watch is left: one upstream watch.
	goleak.VerifyNone(t, opts)
}

// TestWatchReviewProgressWithoutWatches: a member answers nothing to a progress request on a stream without
// watches (RequestProgressAll over no watcher sends nothing, 3.5 and 3.6 alike). The fan-out answered each with
// a Range of its own to the upstream, in a goroutine of its own: one client's stream of 7-byte requests became as
// many reads on the cluster and as many goroutines, without bound.
func TestWatchReviewProgressWithoutWatches(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, member, front := fanOut(t, ctx, nil)
	for _, tc := range []struct{ name, url string }{{"member", member}, {"proxy", front}} {
		t.Run(tc.name, func(t *testing.T) {
			s := watchStream(t, ctx, tc.url)
			const n = 1000
			for range n {
				if err := s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}); err != nil {
					t.Fatal(err)
				}
			}
			key := "nothing-" + tc.name
			if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte(key)})); err != nil {
				t.Fatal(err)
			}
			progress, created := 0, false
			for {
				r, err := recvTimeout(s, 5*time.Second)
				if err != nil {
					t.Fatal(err)
				}
				if r.Created && !created {
					created = true
					if _, err := cli.Put(ctx, key, "v"); err != nil {
						t.Fatal(err)
					}
				}
				if len(r.Events) > 0 {
					break
				}
				if !r.Created && r.WatchId == -1 {
					progress++
				}
			}
			if progress > 0 {
				t.Errorf("%d answers to %d progress requests sent while the stream had no watch; a member sends none", progress, n)
			}
		})
	}
}

// TestWatchReviewIDAfterRefusal: a member numbers only the watches it creates (mvcc's watchStream.Watch refuses an
// empty range before taking an ID), so the watch after a refused one gets the ID the refused one would have had.
// The fan-out took an ID for the refused one: the README promises etcd's numbering.
func TestWatchReviewIDAfterRefusal(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	_, member, front := fanOut(t, ctx, nil)
	for _, tc := range []struct{ name, url string }{{"member", member}, {"proxy", front}} {
		t.Run(tc.name, func(t *testing.T) {
			s := watchStream(t, ctx, tc.url)
			for _, r := range []*pb.WatchCreateRequest{{Key: []byte("b"), RangeEnd: []byte("a")}, {Key: []byte("a")}} {
				if err := s.Send(createReq(r)); err != nil {
					t.Fatal(err)
				}
			}
			r, err := recvTimeout(s, 5*time.Second)
			if err != nil || !r.Created || !r.Canceled || r.WatchId != -1 {
				t.Fatalf("empty range: %v %v; want refused", r, err)
			}
			if r, err = recvTimeout(s, 5*time.Second); err != nil || !r.Created || r.Canceled || r.WatchId != 0 {
				t.Fatalf("the next watch: %v %v; want created with ID 0", r, err)
			}
		})
	}
}

// TestWatchReviewCompactionOfAnother: a watch from a compacted revision makes the shared group of its key; a watch
// of the same key from the revision after the compaction (not compacted: a member cancels a watch only when its
// start is below the compaction) joined it and was cancelled with the other's compaction error.
// TestWatchFanOutDifferential hits this with some seeds (its watch from before the compaction and one from the
// first revision after it, on one client and range): "1 watches never got to revision …".
func TestWatchReviewCompactionOfAnother(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, _, front := fanOut(t, ctx, nil)
	for i := range 3 {
		if _, err := cli.Put(ctx, "cmp", fmt.Sprint(i)); err != nil {
			t.Fatal(err)
		}
	}
	p, err := cli.Put(ctx, "cmp", "3")
	if err != nil {
		t.Fatal(err)
	}
	compacted := p.Header.Revision
	if _, err := cli.Compact(ctx, compacted); err != nil {
		t.Fatal(err)
	}
	s := watchStream(t, ctx, front)
	if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte("cmp"), StartRevision: 1, WatchId: 1})); err != nil {
		t.Fatal(err)
	}
	if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte("cmp"), StartRevision: compacted + 1, WatchId: 2})); err != nil {
		t.Fatal(err)
	}
	var got []*pb.WatchResponse
	for deadline := time.Now().Add(5 * time.Second); ; {
		r, err := recvTimeout(s, time.Until(deadline))
		if err != nil {
			t.Fatalf("%v after %v", err, got)
		}
		if r.WatchId != 2 {
			continue
		}
		got = append(got, r)
		if r.Created {
			if r.Header.Revision < compacted {
				t.Errorf("created answer at revision %d; a member answers with its current revision, %d", r.Header.Revision, compacted)
			}
			if p, err = cli.Put(ctx, "cmp", "new"); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if r.Canceled || len(r.Events) != 1 || r.Events[0].Kv.ModRevision != p.Header.Revision {
			t.Fatalf("watch from %d (after the compaction at %d) got %v; want the event at revision %d", compacted+1, compacted, got, p.Header.Revision)
		}
		break
	}
}

// TestWatchReviewProgressNotify: watches with progress_notify that share an upstream watch each get the member's
// periodic progress notifications, under their own watch IDs, at the revision they have seen everything up to.
func TestWatchReviewProgressNotify(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithMemberConfig(func(_ *harness.Member, cfg *embed.Config) {
		cfg.ExperimentalWatchProgressNotifyInterval = 200 * time.Millisecond // process-wide in an embedded member
	}))
	if err != nil {
		t.Fatal(err)
	}
	front, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{})
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: c.Endpoint().URLs, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	p, err := cli.Put(ctx, "pn", "0")
	if err != nil {
		t.Fatal(err)
	}
	var ss []pb.Watch_WatchClient
	for i := range 2 {
		s := watchStream(t, ctx, front.Endpoint.URLs[0])
		if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte("pn"), ProgressNotify: true, WatchId: int64(5 + i)})); err != nil {
			t.Fatal(err)
		}
		if r, err := recvTimeout(s, 5*time.Second); err != nil || !r.Created {
			t.Fatalf("created: %v %v", r, err)
		}
		ss = append(ss, s)
	}
	for i, s := range ss {
		r, err := recvTimeout(s, 5*time.Second)
		if err != nil || r.WatchId != int64(5+i) || len(r.Events) > 0 || r.Created || r.Canceled || r.Header.Revision != p.Header.Revision {
			t.Fatalf("stream %d: %v %v; want a progress notification of watch %d at revision %d", i, r, err, 5+i, p.Header.Revision)
		}
	}
}

// TestWatchReviewShutdown: a graceful shutdown ends the streams of the fan-out's watches at once with Unavailable
// (clients resume on another proxy), shared and catching-up alike.
func TestWatchReviewShutdown(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	front, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{})
	if err != nil {
		t.Fatal(err)
	}
	var ss []pb.Watch_WatchClient
	for _, start := range []int64{0, 1} {
		s := watchStream(t, ctx, front.Endpoint.URLs[0])
		if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte("down"), StartRevision: start})); err != nil {
			t.Fatal(err)
		}
		if r, err := recvTimeout(s, 5*time.Second); err != nil || !r.Created {
			t.Fatalf("created: %v %v", r, err)
		}
		ss = append(ss, s)
	}
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	defer scancel()
	began := time.Now()
	if err := front.Server.Shutdown(sctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if d := time.Since(began); d > 2*time.Second {
		t.Errorf("shutdown took %v with open watches", d)
	}
	for i, s := range ss {
		r, err := recvTimeout(s, 5*time.Second)
		if status.Code(err) != codes.Unavailable {
			t.Errorf("stream %d: %v, %v; want Unavailable", i, r, err)
		}
	}
}

// TestWatchReviewChurn: streams join and leave the same shared watch concurrently, from now and from recent
// revisions (history 4: some catch up on their own), while a writer writes the key: every watch gets every
// revision from its start in order, its cancel answered, under -race.
func TestWatchReviewChurn(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, _, front := fanOut(t, ctx, func(cfg *proxy.Config) { cfg.WatchHistory = 4 })
	cc, err := grpc.NewClient(strings.TrimPrefix(front, "http://"), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	var last atomic.Int64
	p, err := cli.Put(ctx, "churn", "0")
	if err != nil {
		t.Fatal(err)
	}
	last.Store(p.Header.Revision)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	go func() {
		for i := 0; wctx.Err() == nil; i++ {
			if p, err := cli.Put(wctx, "churn", fmt.Sprint(i)); err == nil {
				last.Store(p.Header.Revision)
			}
		}
	}()
	errs := make(chan error, 64)
	for g := range 8 {
		go func() {
			for i := range 6 {
				errs <- func() error {
					sctx, scancel := context.WithCancel(ctx)
					defer scancel()
					s, err := pb.NewWatchClient(cc).Watch(sctx)
					if err != nil {
						return err
					}
					var start int64
					if (g+i)%2 == 1 {
						start = last.Load() - int64(i*3)
					}
					if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte("churn"), StartRevision: start})); err != nil {
						return err
					}
					r, err := recvTimeout(s, 5*time.Second)
					if err != nil || !r.Created || r.Canceled {
						return fmt.Errorf("created: %v %v", r, err)
					}
					next := start
					if next == 0 {
						next = r.Header.Revision + 1
					}
					for n := 0; n < 10; {
						r, err := recvTimeout(s, 5*time.Second)
						if err != nil {
							return fmt.Errorf("watch from %d: %v after %d events", start, err, n)
						}
						for _, ev := range r.Events {
							if ev.Kv.ModRevision != next {
								return fmt.Errorf("watch from %d: revision %d, want %d", start, ev.Kv.ModRevision, next)
							}
							next++
							n++
						}
					}
					if err := s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: r.WatchId}}}); err != nil {
						return err
					}
					for {
						r, err := recvTimeout(s, 5*time.Second)
						if err != nil {
							return fmt.Errorf("cancel: %v", err)
						}
						if r.Canceled {
							return nil
						}
						for _, ev := range r.Events {
							if ev.Kv.ModRevision != next {
								return fmt.Errorf("watch from %d: revision %d, want %d", start, ev.Kv.ModRevision, next)
							}
							next++
						}
					}
				}()
			}
		}()
	}
	for range 8 * 6 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}

// TestWatchReviewCreatedRevision: a watch from now gets only the events after the revision of its created
// answer. Here each watch makes the shared watch of a key written without pause, whose history (1) passes its
// created answer at once: the watch catches up from an upstream watch of its own, and its created answer carried
// that watch's later revision while its events started at the first one's.
func TestWatchReviewCreatedRevision(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	cli, _, front := fanOut(t, ctx, func(cfg *proxy.Config) { cfg.WatchHistory = 1 })
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	for range 2 {
		go func() {
			for wctx.Err() == nil {
				_, _ = cli.Put(wctx, "hot", "v")
			}
		}()
	}
	s := watchStream(t, ctx, front)
	for i := range 100 {
		if err := s.Send(createReq(&pb.WatchCreateRequest{Key: []byte("hot"), WatchId: 1})); err != nil {
			t.Fatal(err)
		}
		var created int64
		for {
			r, err := recvTimeout(s, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if r.WatchId != 1 {
				continue
			}
			if r.Created {
				created = r.Header.Revision
				continue
			}
			if len(r.Events) > 0 {
				if rev := r.Events[0].Kv.ModRevision; rev <= created {
					t.Fatalf("watch %d created at revision %d got the event at revision %d", i, created, rev)
				}
				break
			}
		}
		if err := s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CancelRequest{CancelRequest: &pb.WatchCancelRequest{WatchId: 1}}}); err != nil {
			t.Fatal(err)
		}
		for {
			r, err := recvTimeout(s, 5*time.Second)
			if err != nil {
				t.Fatal(err)
			}
			if r.Canceled {
				break
			}
		}
	}
}
