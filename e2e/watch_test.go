package e2e

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// watchSpec is one watch of the differential test.
type watchSpec struct {
	key, end         string
	prevKV           bool
	noPut, noDelete  bool
	start            int64 // 0: from now (the created answer's revision)
	cancelAfter      int   // cancelled after this many operations of the workload; 0: never
	wantCompacted    bool
	direct, proxied  *watchRun
	openedAt, client int
	openRev          int64 // the last revision written before it was opened
}

func (s *watchSpec) options() []clientv3.OpOption {
	opts := []clientv3.OpOption{clientv3.WithCreatedNotify()}
	if s.end != "" {
		opts = append(opts, clientv3.WithRange(s.end))
	}
	if s.prevKV {
		opts = append(opts, clientv3.WithPrevKV())
	}
	if s.noPut {
		opts = append(opts, clientv3.WithFilterPut())
	}
	if s.noDelete {
		opts = append(opts, clientv3.WithFilterDelete())
	}
	if s.start > 0 {
		opts = append(opts, clientv3.WithRev(s.start))
	}
	return opts
}

// watchRun is what one watch received.
type watchRun struct {
	name      string
	mu        sync.Mutex
	created   int64 // the created answer's revision
	events    []string
	evs       []*clientv3.Event
	compacted int64
	err       error
	seen      atomic.Int64 // the revision it is known to have everything up to (progress, events)
	cancel    context.CancelFunc
	done      chan struct{}
}

func (r *watchRun) run(ctx context.Context, cli *clientv3.Client, s *watchSpec) {
	ctx, r.cancel = context.WithCancel(ctx)
	r.done = make(chan struct{})
	go func() {
		defer close(r.done)
		for resp := range cli.Watch(ctx, s.key, s.options()...) {
			r.mu.Lock()
			switch {
			case resp.Created:
				r.created = resp.Header.Revision
			case resp.CompactRevision != 0:
				r.compacted = resp.CompactRevision
			case resp.Err() != nil:
				r.err = resp.Err()
			}
			for _, ev := range resp.Events {
				r.events = append(r.events, eventString(ev))
				r.evs = append(r.evs, ev)
				r.seen.Store(max(r.seen.Load(), ev.Kv.ModRevision))
			}
			r.mu.Unlock()
			if resp.IsProgressNotify() {
				r.seen.Store(max(r.seen.Load(), resp.Header.Revision))
			}
		}
	}()
}

func eventString(ev *clientv3.Event) string {
	s := fmt.Sprintf("%d %s %s=%s", ev.Kv.ModRevision, ev.Type, ev.Kv.Key, ev.Kv.Value)
	if ev.PrevKv != nil {
		s += fmt.Sprintf(" prev=%s@%d", ev.PrevKv.Value, ev.PrevKv.ModRevision)
	}
	return s
}

// expected is what s should have received of the reference history, from its first revision on.
func (s *watchSpec) expected(ref []*clientv3.Event, from int64) []string {
	var out []string
	for _, ev := range ref {
		k := string(ev.Kv.Key)
		in := k == s.key
		if s.end != "" {
			in = k >= s.key && k < s.end
		}
		if !in || ev.Kv.ModRevision < from || (s.noPut && ev.Type == mvccpb.PUT) ||
			(s.noDelete && ev.Type == mvccpb.DELETE) {
			continue
		}
		e := *ev
		if !s.prevKV {
			e.PrevKv = nil
		}
		out = append(out, eventString(&e))
	}
	return out
}

// TestWatchFanOutDifferential is issue 14's differential test: a random workload (puts, deletes, txns, a
// compaction, leases expiring) on a 3-member cluster whose members are stopped with SIGKILL and restarted one
// after the other under open watches; the same random watches (ranges, start revisions, filters, prev_kv, some
// cancelled midway), opened directly on the members and through a proxy-proxy whose watch fan-out has a small
// history (so that watches join shared ones from the past, and fall behind them), get the same events: per
// watch, from its first revision, the same (revision, type, key, value, prev_kv) sequence as a reference watch
// of everything, the same compaction error; the cancelled ones a prefix of it.
func TestWatchFanOutDifferential(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 150*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithProcesses())
	if err != nil {
		t.Fatal(err)
	}
	front, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.UpstreamKeepAliveTime, cfg.UpstreamKeepAliveTimeout = keepAlive, keepAliveTimeout
		cfg.UpstreamHealthInterval = 300 * time.Millisecond
		cfg.WatchHistory = 8
		cfg.ListenMetricsURLs = []string{"http://127.0.0.1:0"}
	}})
	if err != nil {
		t.Fatal(err)
	}
	members := c.Endpoint().URLs
	writer, direct := v3Client(t, members...), v3Client(t, members...)
	proxied := []*clientv3.Client{v3Client(t, front.Endpoint.URLs...), v3Client(t, front.Endpoint.URLs...)}
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	key := func() string { return fmt.Sprintf("k/%02d", rng.IntN(16)) }

	// A history before the watches, compacted halfway.
	var rev int64
	for i := range 20 {
		r, err := writer.Put(ctx, key(), fmt.Sprint("pre", i))
		if err != nil {
			t.Fatal(err)
		}
		rev = r.Header.Revision
		if i == 9 {
			if _, err := writer.Compact(ctx, rev); err != nil {
				t.Fatal(err)
			}
		}
	}
	compactRev := rev - 10
	ref := &watchRun{name: "reference"}
	refSpec := &watchSpec{key: "k/", end: "k0", prevKV: true, start: compactRev + 1}
	ref.run(ctx, direct, refSpec)

	// The watches: few shapes, so that many are identical and share upstream watches.
	shapes := []watchSpec{
		{key: "k/", end: "k0"}, {key: "k/", end: "k0", prevKV: true}, {key: "k/03"}, {key: "k/1", end: "k/2"},
		{key: "k/05", end: "k/12", noDelete: true}, {key: "k/", end: "k0", noPut: true, prevKV: true},
	}
	var specs []*watchSpec
	open := func(op int) {
		s := shapes[rng.IntN(len(shapes))]
		switch rng.IntN(3) {
		case 0: // from now
		case 1:
			s.start = rev + 1
		default:
			s.start = max(compactRev+1, rev-int64(rng.IntN(30)))
		}
		if rng.IntN(4) == 0 {
			s.cancelAfter = op + 20 + rng.IntN(100)
		}
		s.openedAt, s.client, s.openRev = op, rng.IntN(len(proxied)), rev
		s.direct = &watchRun{name: fmt.Sprintf("watch %d direct %+v", len(specs), s)}
		s.proxied = &watchRun{name: fmt.Sprintf("watch %d proxied (client %d)", len(specs), s.client)}
		s.direct.run(ctx, direct, &s)
		s.proxied.run(ctx, proxied[s.client], &s)
		specs = append(specs, &s)
	}
	// One from before the compaction: both must end with the compaction error.
	old := &watchSpec{key: "k/", end: "k0", start: compactRev - 5, wantCompacted: true, direct: &watchRun{}, proxied: &watchRun{}}
	old.direct.run(ctx, direct, old)
	old.proxied.run(ctx, proxied[0], old)
	for range 10 {
		open(0)
	}

	lease, err := writer.Grant(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	const ops = 240
	var killed *harness.Member
	for op := 1; op <= ops; op++ {
		switch {
		case op%60 == 0 && killed == nil: // a member dies under open watches...
			killed = c.Members[(op/60)%len(c.Members)]
			if err := killed.Signal(syscall.SIGKILL); err != nil {
				t.Fatal(err)
			}
			select {
			case <-killed.Exited():
			case <-ctx.Done():
				t.Fatal("the killed member did not exit")
			}
		case op%60 == 30 && killed != nil: // ...and comes back
			if err := killed.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			killed = nil
		case op%8 == 0:
			open(op)
		case op%40 == 0: // a lease of 1 s that nobody keeps alive: its keys are deleted by the cluster
			if l, err := writer.Grant(ctx, 1); err == nil {
				lease = l
			}
		}
		for _, s := range specs {
			if s.cancelAfter == op {
				s.direct.cancel()
				s.proxied.cancel()
			}
		}
		var r clientv3.OpResponse
		opCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		switch n := rng.IntN(10); {
		case n < 5:
			r, err = writer.Do(opCtx, clientv3.OpPut(key(), fmt.Sprint("v", op)))
		case n < 7:
			r, err = writer.Do(opCtx, clientv3.OpDelete(key()))
		case n < 8:
			r, err = writer.Do(opCtx, clientv3.OpPut(key(), fmt.Sprint("leased", op), clientv3.WithLease(lease.ID)))
		default:
			k := key()
			r, err = writer.Do(opCtx, clientv3.OpTxn(
				[]clientv3.Cmp{clientv3.Compare(clientv3.Version(k), ">", 0)},
				[]clientv3.Op{clientv3.OpPut(k, fmt.Sprint("t", op)), clientv3.OpPut(key(), fmt.Sprint("t2-", op))},
				[]clientv3.Op{clientv3.OpDelete(key()), clientv3.OpPut(k, fmt.Sprint("e", op))}))
		}
		cancel()
		if err == nil {
			rev = max(rev, revOf(r))
		} // a write that failed may have been applied or not: both sides see the same history either way
	}
	if killed != nil {
		if err := killed.Restart(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// The keys of the last lease go with it (those of the others went when they expired: deletes no client
	// wrote).
	if _, err := writer.Revoke(ctx, lease.ID); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		t.Fatal(err)
	}
	last, err := writer.Put(ctx, "k/99", "end")
	if err != nil {
		t.Fatal(err)
	}
	final := last.Header.Revision

	// Everyone has everything up to final once a progress answer (or an event) says so.
	runs := []*watchRun{ref, old.direct, old.proxied}
	for _, s := range specs {
		if s.cancelAfter == 0 {
			runs = append(runs, s.direct, s.proxied)
		}
	}
	for {
		var behind []string
		for _, r := range runs {
			if r.seen.Load() < final && r != old.direct && r != old.proxied {
				r.mu.Lock()
				behind = append(behind, fmt.Sprintf("%s: seen %d, %d events, created at %d, err %v", r.name,
					r.seen.Load(), len(r.events), r.created, r.err))
				r.mu.Unlock()
			}
		}
		if len(behind) == 0 {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("%d watches never got to revision %d:\n%s", len(behind), final, strings.Join(behind, "\n"))
		}
		for _, cli := range append([]*clientv3.Client{direct}, proxied...) {
			_ = cli.RequestProgress(ctx)
		}
		select {
		case <-ctx.Done():
		case <-time.After(100 * time.Millisecond):
		}
	}
	ref.cancel()
	<-ref.done
	refEvents := ref.evs

	for _, r := range []*watchRun{old.direct, old.proxied} {
		<-r.done
		if r.compacted != compactRev {
			t.Errorf("watch from before the compaction: compact revision %d, want %d", r.compacted, compactRev)
		}
	}
	for i, s := range specs {
		for side, r := range map[string]*watchRun{"direct": s.direct, "proxied": s.proxied} {
			r.cancel()
			<-r.done
			from := s.start
			if from == 0 {
				from = r.created + 1
				// A watch from now starts at a revision a member could give it: never one already compacted
				// (the shared watch of a watch from the past must not serve it before it has caught up).
				if r.created < compactRev {
					t.Errorf("watch %d (%+v) %s: created at revision %d, below the compaction at %d",
						i, *s.withoutRuns(), side, r.created, compactRev)
				}
			}
			want := s.expected(refEvents, from)
			got := r.events
			if s.cancelAfter > 0 {
				want = want[:min(len(want), len(got))]
			}
			if (s.cancelAfter == 0 && r.err != nil) || r.compacted != 0 || !slices.Equal(got, want) {
				t.Errorf("watch %d (%+v) %s: err %v, compacted %d,\n got  %d events %q\n want %d events %q", i,
					*s.withoutRuns(), side, r.err, r.compacted, len(got), head(got), len(want), head(want))
			}
		}
	}

	mf := scrape(t, front.Server.MetricsURLs()[0])
	resumes, _ := metricValue(mf, "etcd_proxy_proxy_watch_resumes_total", nil)
	catchUps, _ := metricValue(mf, "etcd_proxy_proxy_watch_catch_ups_total", nil)
	t.Logf("%d watches, %d resumes of shared watches, %d catch-ups", len(specs)+1, int(resumes), int(catchUps))
	if resumes == 0 {
		t.Error("no shared watch was resumed: the kills did not test resuming")
	}
}

func (s *watchSpec) withoutRuns() *watchSpec {
	c := *s
	c.direct, c.proxied = nil, nil
	return &c
}

func head(s []string) []string { return s[:min(len(s), 6)] }

func revOf(r clientv3.OpResponse) int64 {
	switch {
	case r.Put() != nil:
		return r.Put().Header.Revision
	case r.Del() != nil:
		return r.Del().Header.Revision
	case r.Txn() != nil:
		return r.Txn().Header.Revision
	}
	return 0
}

// TestWatchFanOutShares: 10,000 watches of one key through one proxy-proxy, on 10 streams of raw gRPC, are one
// upstream watch on the member (its own metrics say so), and every watch gets every event; a progress request
// is answered with the revision of the last write.
func TestWatchFanOutShares(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithProcesses())
	if err != nil {
		t.Fatal(err)
	}
	front, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.ListenMetricsURLs = []string{"http://127.0.0.1:0"}
	}})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := grpc.NewClient(strings.TrimPrefix(front.Endpoint.URLs[0], "http://"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	const streams, perStream = 10, 1000
	var ss []pb.Watch_WatchClient
	for range streams {
		s, err := pb.NewWatchClient(cc).Watch(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for range perStream {
			if err := s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
				CreateRequest: &pb.WatchCreateRequest{Key: []byte("shared")}}}); err != nil {
				t.Fatal(err)
			}
		}
		for i := range perStream {
			r, err := s.Recv()
			if err != nil || !r.Created || r.WatchId != int64(i) {
				t.Fatalf("created answer %d: %v %v", i, r, err)
			}
		}
		ss = append(ss, s)
	}
	cli := v3Client(t, c.Endpoint().URLs...)
	var last int64
	for i := range 3 {
		r, err := cli.Put(ctx, "shared", fmt.Sprint(i))
		if err != nil {
			t.Fatal(err)
		}
		last = r.Header.Revision
	}
	for i, s := range ss {
		got := map[int64][]int64{}
		for n := 0; n < 3*perStream; {
			r, err := s.Recv()
			if err != nil {
				t.Fatalf("stream %d: %v", i, err)
			}
			for _, ev := range r.Events {
				got[r.WatchId] = append(got[r.WatchId], ev.Kv.ModRevision)
				n++
			}
		}
		for id := range int64(perStream) {
			if want := []int64{last - 2, last - 1, last}; !slices.Equal(got[id], want) {
				t.Fatalf("stream %d watch %d: revisions %v, want %v", i, id, got[id], want)
			}
		}
	}
	// A progress request on a stream is answered with the last revision.
	if err := ss[0].Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}}); err != nil {
		t.Fatal(err)
	}
	if r, err := ss[0].Recv(); err != nil || r.WatchId != -1 || r.Header.Revision != last || len(r.Events) > 0 {
		t.Fatalf("progress answer %v, %v; want watch ID -1 at revision %d", r, err, last)
	}
	// The member's own count of watchers: the proxy's one.
	mf := scrape(t, c.Members[0].ClientURL)
	if n, ok := metricValue(mf, "etcd_debugging_mvcc_watcher_total", nil); !ok || n != 1 {
		t.Errorf("the member has %v watchers (found: %v), want 1", n, ok)
	}
	pmf := scrape(t, front.Server.MetricsURLs()[0])
	if n, _ := metricValue(pmf, "etcd_proxy_proxy_watch_client_watches", nil); n != streams*perStream {
		t.Errorf("watch_client_watches %v, want %d", n, streams*perStream)
	}
}

// TestWatchFanOutResumeCompacted: when the member of a shared watch goes away and the revision the watch must
// resume from has been compacted meanwhile, the client gets the compaction error a member would give (its
// watch cancelled with the compact revision), not a silent gap.
func TestWatchFanOutResumeCompacted(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The proxy reaches member 0 through a relay that can be cut, and member 1 through one that opens later:
	// the shared watch is made on member 0.
	a, b := newRelay(t, c.Members[0].ClientURL), newRelay(t, c.Members[1].ClientURL)
	a.open(t)
	front, err := e.StartProxyProxy(ctx, harness.Endpoint{Name: "members", URLs: []string{a.url, b.url}}, harness.ProxyProxyHop{})
	if err != nil {
		t.Fatal(err)
	}
	cli, direct := v3Client(t, front.Endpoint.URLs...), v3Client(t, c.Endpoint().URLs...)
	wch := cli.Watch(ctx, "quiet", clientv3.WithCreatedNotify())
	if r := <-wch; !r.Created {
		t.Fatalf("first answer %+v, want created", r)
	}
	// Writes the watch does not see, then a compaction past the revision it would resume from.
	var last int64
	for range 5 {
		r, err := direct.Put(ctx, "other", "x")
		if err != nil {
			t.Fatal(err)
		}
		last = r.Header.Revision
	}
	if _, err := direct.Compact(ctx, last); err != nil {
		t.Fatal(err)
	}
	b.open(t)
	a.close()
	select {
	case r, ok := <-wch:
		if !ok || r.CompactRevision != last || !r.Canceled {
			t.Fatalf("after the member went away: %+v (open %v), want the watch cancelled with compact revision %d", r, ok, last)
		}
	case <-ctx.Done():
		t.Fatal("no answer after the member went away")
	}
}

// TestWatchFanOutAuth: with auth on, watches of two users on the same key are two upstream watches (etcd checks
// permissions when a watch is created), each user gets their own answer — events for the one allowed, the
// member's refusal for the other — and a watch with a token the member does not know gets the member's error
// at once, not an Unavailable after the upstream was given up.
func TestWatchFanOutAuth(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	root := v3Client(t, c.Endpoint().URLs...)
	for _, step := range []func() error{
		func() error { _, err := root.RoleAdd(ctx, "reader"); return err },
		func() error {
			_, err := root.RoleGrantPermission(ctx, "reader", "shared", "", clientv3.PermissionType(clientv3.PermRead))
			return err
		},
		func() error { _, err := root.UserAdd(ctx, "root", "rootpw"); return err },
		func() error { _, err := root.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := root.UserAdd(ctx, "alice", "alicepw"); return err },
		func() error { _, err := root.UserGrantRole(ctx, "alice", "reader"); return err },
		func() error { _, err := root.UserAdd(ctx, "bob", "bobpw"); return err },
		func() error { _, err := root.AuthEnable(ctx); return err },
	} {
		if err := step(); err != nil {
			t.Fatal(err)
		}
	}
	front, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{})
	if err != nil {
		t.Fatal(err)
	}
	user := func(name, pw string) *clientv3.Client {
		cli, err := clientv3.New(clientv3.Config{Endpoints: front.Endpoint.URLs, Username: name, Password: pw,
			DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cli.Close() })
		return cli
	}
	alice, bob := user("alice", "alicepw"), user("bob", "bobpw")
	aw := alice.Watch(ctx, "shared", clientv3.WithCreatedNotify())
	if r := <-aw; !r.Created || r.Err() != nil {
		t.Fatalf("alice's watch: %+v %v", r, r.Err())
	}
	bw := bob.Watch(ctx, "shared")
	if r := <-bw; r.Err() == nil || !strings.Contains(r.Err().Error(), "permission denied") {
		t.Fatalf("bob's watch: %+v, %v; want permission denied", r, r.Err())
	}
	admin := user("root", "rootpw")
	if _, err := admin.Put(ctx, "shared", "v"); err != nil {
		t.Fatal(err)
	}
	if r := <-aw; len(r.Events) != 1 || string(r.Events[0].Kv.Value) != "v" {
		t.Fatalf("alice's event: %+v %v", r, r.Err())
	}

	// A token the member does not know: its error, at once.
	cc, err := grpc.NewClient(strings.TrimPrefix(front.Endpoint.URLs[0], "http://"),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	began := time.Now()
	s, err := pb.NewWatchClient(cc).Watch(metadata.AppendToOutgoingContext(ctx, "token", "not-a-token"))
	if err == nil {
		err = s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
			CreateRequest: &pb.WatchCreateRequest{Key: []byte("shared")}}})
	}
	var r *pb.WatchResponse
	if err == nil {
		r, err = s.Recv()
	}
	if err == nil && r.Canceled {
		err = errors.New(r.CancelReason)
	}
	if err == nil || !strings.Contains(err.Error(), "invalid auth token") || time.Since(began) > 2*time.Second {
		t.Fatalf("watch with an unknown token: %v, %v after %v; want the member's invalid auth token at once", r, err,
			time.Since(began).Round(time.Millisecond))
	}
}

// TestWatchFanOutNoLeader is etcd's TestWatchWithRequireLeader through the proxy (the fan-out made every upstream
// watch ask for a leader, and it failed there): with two of three members stopped, a watch that asks for a leader
// ends at once with etcd's "no leader", and one that does not ask is served from what the member has, as a
// member serves it directly.
func TestWatchFanOutNoLeader(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	m0 := c.Members[0]
	front, err := e.StartProxyProxy(ctx, harness.Endpoint{Name: "member-0", URLs: []string{m0.ClientURL}}, harness.ProxyProxyHop{})
	if err != nil {
		t.Fatal(err)
	}
	direct := v3Client(t, m0.ClientURL)
	if _, err := direct.Put(ctx, "foo", "bar"); err != nil {
		t.Fatal(err)
	}
	for _, m := range c.Members[1:] {
		if err := m.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, ctx, "member 0 without a leader", func() (bool, string) {
		st, err := direct.Status(ctx, m0.ClientURL)
		return err == nil && st.Leader == 0, fmt.Sprint(st, err)
	})
	cli := v3Client(t, front.Endpoint.URLs...)
	began := time.Now()
	withLeader := cli.Watch(clientv3.WithRequireLeader(ctx), "foo", clientv3.WithRev(1))
	without := cli.Watch(ctx, "foo", clientv3.WithRev(1))
	if r, ok := <-withLeader; !ok || !errors.Is(r.Err(), rpctypes.ErrNoLeader) || time.Since(began) > 3*time.Second {
		t.Fatalf("watch asking for a leader: %+v (open %v, err %v) after %v; want %v at once", r, ok, r.Err(),
			time.Since(began), rpctypes.ErrNoLeader)
	}
	if r, ok := <-without; !ok || len(r.Events) != 1 || string(r.Events[0].Kv.Value) != "bar" {
		t.Fatalf("watch not asking for a leader: %+v (open %v, err %v); want the event", r, ok, r.Err())
	}
}
