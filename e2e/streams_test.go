package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// Upstream keep-alive of the proxy under test: a stopped member is found within keepAlive + keepAliveTimeout.
const (
	keepAlive        = time.Second
	keepAliveTimeout = time.Second
)

// TestStreamsEnd is contract rule 6 with real member processes: the member serving a watch (every client kind:
// clientv3, etcdctl, the JSON gateway, v2 long polls and v2 stream watches), a lease keep-alive and an election
// observer is stopped with SIGTERM, SIGKILL or SIGSTOP while a writer puts a key every 50 ms through the other
// members. Every stream ends for its client soon enough (2 s after the connection is gone; keep-alive time +
// timeout for a stopped process), every client that re-establishes gets every acknowledged write exactly once
// and in order, the lease stays alive and the observer sees the leader again. One cluster per signal; the
// three run side by side.
func TestStreamsEnd(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL, syscall.SIGSTOP} {
		t.Run(strings.ToUpper(sigName(sig)), func(t *testing.T) {
			t.Parallel()
			testStreamsEnd(t, sig)
		})
	}
}

func sigName(sig syscall.Signal) string {
	switch sig {
	case syscall.SIGTERM:
		return "sigterm"
	case syscall.SIGKILL:
		return "sigkill"
	}
	return "sigstop"
}

func testStreamsEnd(t *testing.T, sig syscall.Signal) {
	ctx := testContext(t, 90*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithProcesses())
	if err != nil {
		t.Fatal(err)
	}
	// The member to stop is a follower, so that writes go on without an election.
	ids := map[string]uint64{}
	var target *harness.Member
	var others []*harness.Member
	for _, m := range c.Members {
		cli := v3Client(t, m.ClientURL)
		st, err := cli.Status(ctx, m.ClientURL)
		if err != nil {
			t.Fatal(err)
		}
		ids[m.Name] = st.Header.MemberId
		if target == nil && st.Leader != st.Header.MemberId {
			target = m
		} else {
			others = append(others, m)
		}
	}
	// The proxy's endpoints: the target, and the other members behind relays that open only once every stream
	// is established: until then the proxy can reach the target alone, so every stream is served by it.
	relays := []*relay{newRelay(t, others[0].ClientURL), newRelay(t, others[1].ClientURL)}
	front, err := e.StartProxyProxy(ctx, harness.Endpoint{Name: "members", URLs: []string{target.ClientURL, relays[0].url, relays[1].url}},
		harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
			cfg.UpstreamKeepAliveTime, cfg.UpstreamKeepAliveTimeout = keepAlive, keepAliveTimeout
			cfg.UpstreamHealthInterval = 300 * time.Millisecond
			cfg.ListenMetricsURLs = []string{"http://127.0.0.1:0"}
		}})
	if err != nil {
		t.Fatal(err)
	}
	base := front.Endpoint.URLs[0]
	direct := v3Client(t, others[0].ClientURL, others[1].ClientURL)
	get, err := direct.Get(ctx, "w/")
	if err != nil {
		t.Fatal(err)
	}
	rev0 := get.Header.Revision
	v2cl := &http.Client{Transport: &http.Transport{}}
	t.Cleanup(v2cl.CloseIdleConnections)
	resp, _, err := doResp(ctx, v2cl, http.MethodGet, others[0].ClientURL+"/v2/keys/", "")
	if err != nil {
		t.Fatal(err)
	}
	index0, _ := strconv.ParseInt(resp.Header.Get("X-Etcd-Index"), 10, 64)

	// The streams, all through the proxy.
	// With SIGTERM, etcd finishes the long polls in flight and closes the connection: a v2 client may not
	// see anything end.
	cut := sig != syscall.SIGTERM
	cctx, stopClients := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() { stopClients(); wg.Wait() }()
	pcli := v3Client(t, base)
	// v3 watches go on: the proxy's watch fan-out resumes them on another member (watchhub.go); the gateway's
	// client, which cannot resume by itself, sees no end.
	watchers := []*streamClient{
		{name: "clientv3 watch"}, {name: "etcdctl watch"}, {name: "gateway watch", mustNotEnd: true},
		{name: "v2 wait=true", v2: true, mustEnd: cut}, {name: "v2 stream=true", v2: true, mustEnd: cut},
	}
	runs := []func(context.Context, *streamClient){
		func(ctx context.Context, s *streamClient) { clientv3Watch(ctx, s, pcli, rev0+1) },
		func(ctx context.Context, s *streamClient) { etcdctlWatch(ctx, s, e.Etcdctl(3, front.Endpoint), rev0+1) },
		func(ctx context.Context, s *streamClient) { gatewayWatch(ctx, s, base, rev0+1) },
		func(ctx context.Context, s *streamClient) { v2Watch(ctx, s, base, index0+1, false) },
		func(ctx context.Context, s *streamClient) { v2Watch(ctx, s, base, index0+1, true) },
	}
	for i, s := range watchers {
		wg.Go(func() { runs[i](cctx, s) })
	}
	lease, err := pcli.Grant(ctx, 5)
	if err != nil {
		t.Fatal(err)
	}
	beats := &streamClient{name: "lease keep-alive"}
	wg.Go(func() { keepLease(cctx, beats, pcli, lease.ID) })
	session, err := concurrency.NewSession(direct, concurrency.WithTTL(30))
	if err != nil {
		t.Fatal(err)
	}
	defer session.Close()
	if err := concurrency.NewElection(session, "streams-election").Campaign(ctx, "leader-1"); err != nil {
		t.Fatal(err)
	}
	observer := &streamClient{name: "election observe"}
	wg.Go(func() { observe(cctx, observer, pcli, "streams-election") })

	// A first write that every stream delivers: then every stream is established, on the target.
	w := &writers{v3: direct, v2: v2cl, v2URLs: []string{others[0].ClientURL, others[1].ClientURL}}
	w.write(ctx, "first")
	eventually(t, ctx, "every stream established", func() (bool, string) {
		var waiting []string
		for _, s := range watchers {
			if !s.delivered(w.last(s.v2)) {
				waiting = append(waiting, s.name)
			}
		}
		for _, s := range []*streamClient{beats, observer} {
			if s.count() == 0 {
				waiting = append(waiting, s.name)
			}
		}
		return len(waiting) == 0, "waiting for " + strings.Join(waiting, ", ")
	})
	for _, s := range []*streamClient{watchers[0], beats} {
		if got := s.member(); got != ids[target.Name] {
			t.Fatalf("%s is served by member %x, want the target %s (%x)", s.name, got, target.Name, ids[target.Name])
		}
	}
	for _, r := range relays {
		r.open(t)
	}
	metrics := front.Server.MetricsURLs()[0]
	eventually(t, ctx, "the proxy finds the other members healthy", func() (bool, string) {
		mf := scrape(t, metrics)
		for _, ep := range []string{"1", "2"} {
			if v, _ := metricValue(mf, "etcd_proxy_proxy_upstream_healthy", map[string]string{"endpoint": ep}); v != 1 {
				return false, "endpoint " + ep + " not healthy"
			}
		}
		return true, ""
	})

	// Writes, the signal, writes.
	wctx, stopWriters := context.WithCancel(ctx)
	var wwg sync.WaitGroup
	wwg.Go(func() { w.run(wctx) })
	pause(ctx, 500*time.Millisecond)
	killed := time.Now()
	if err := target.Signal(sig); err != nil {
		t.Fatal(err)
	}
	if sig == syscall.SIGSTOP {
		t.Cleanup(func() { _ = target.Signal(syscall.SIGCONT) })
	}
	ref := killed // when the connections are gone (or the process stopped answering)
	bound := 2 * time.Second
	if sig == syscall.SIGTERM {
		select { // etcd stops gracefully: streams go on until its servers close
		case <-target.Exited():
			ref = time.Now()
		case <-ctx.Done():
			t.Fatalf("%s did not exit after SIGTERM", target.Name)
		}
	}
	if sig == syscall.SIGSTOP {
		bound = keepAlive + keepAliveTimeout + 1500*time.Millisecond // a ping at most keepAlive after the last frame
	}
	t.Logf("%s %s at +0, connections gone at +%v", sigName(sig), target.Name, ref.Sub(killed).Round(time.Millisecond))
	pause(ctx, time.Until(ref.Add(bound+2*time.Second)))
	stopWriters()
	wwg.Wait()
	// Every client re-establishes and catches up with the last acknowledged write; a hung one never does.
	dctx, cancel := context.WithTimeout(ctx, 8*time.Second)
	for dctx.Err() == nil && slices.ContainsFunc(watchers, func(s *streamClient) bool { return !s.delivered(w.last(s.v2)) }) {
		pause(dctx, 20*time.Millisecond)
	}
	cancel()
	lcli := v3Client(t, others[0].ClientURL)
	ttl, ttlErr := lcli.TimeToLive(ctx, lease.ID)
	stopClients()
	wg.Wait()

	acks3, acks2 := w.acked()
	t.Logf("acknowledged writes: %d v3, %d v2", len(acks3), len(acks2))
	if len(acks3) < 20 || len(acks2) < 20 {
		t.Errorf("too few writes acknowledged (v3 %d, v2 %d): the writer could not write through the other members", len(acks3), len(acks2))
	}
	for _, s := range watchers {
		t.Run(s.name, func(t *testing.T) {
			acks := acks3
			if s.v2 {
				acks = acks2
			}
			s.checkDelivered(t, acks, killed, ref, bound)
		})
	}
	t.Run("lease keep-alive", func(t *testing.T) {
		beats.checkEnded(t, killed, ref, bound)
		switch {
		case ttlErr != nil:
			t.Errorf("TimeToLive of the lease: %v", ttlErr)
		case ttl.TTL <= 0:
			t.Errorf("the lease expired: its keep-alive stream did not recover (%s)", beats.summary(killed))
		}
		if after := beats.countAfter(ref.Add(bound)); after == 0 {
			t.Errorf("no keep-alive answer after the stream should have ended (%s)", beats.summary(killed))
		}
	})
	t.Run("election observe", func(t *testing.T) {
		observer.checkEnded(t, killed, ref, bound)
		if observer.countAfter(observer.firstEnd(killed)) == 0 {
			t.Errorf("no leader observed again after the stream ended (%s)", observer.summary(killed))
		}
	})
	if sig == syscall.SIGKILL {
		t.Run("restart", func(t *testing.T) {
			began := time.Now()
			if err := target.Restart(ctx); err != nil {
				t.Fatal(err)
			}
			t.Logf("%s restarted and healthy in %v", target.Name, time.Since(began).Round(time.Millisecond))
		})
	}
}

// streamClient records what one client received and when its streams ended.
type streamClient struct {
	name       string
	v2         bool
	mustEnd    bool // the client sees its stream end (and it has to)
	mustNotEnd bool // the client sees no end: its stream goes on

	mu   sync.Mutex
	got  []delivery
	ends []end
	last uint64 // member ID of the last response, where the client sees it
}

type delivery struct {
	rev int64 // v3 mod revision, v2 modified index (or, for a lease, the TTL)
	at  time.Time
}

type end struct {
	at  time.Time
	why string
}

func (s *streamClient) add(rev int64, member uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.got = append(s.got, delivery{rev, time.Now()})
	if member != 0 {
		s.last = member
	}
}

func (s *streamClient) ended(why string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ends = append(s.ends, end{time.Now(), why})
}

func (s *streamClient) member() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

func (s *streamClient) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.got)
}

func (s *streamClient) countAfter(t0 time.Time) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, d := range s.got {
		if d.at.After(t0) {
			n++
		}
	}
	return n
}

// firstEnd is when a stream of the client first ended after t0 (t0 if none did).
func (s *streamClient) firstEnd(t0 time.Time) time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range s.ends {
		if e.at.After(t0) {
			return e.at
		}
	}
	return t0
}

// lastRev is the revision (index) the client's next stream starts after.
func (s *streamClient) lastRev(from int64) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.got) == 0 {
		return from - 1
	}
	return s.got[len(s.got)-1].rev
}

func (s *streamClient) delivered(rev int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.ContainsFunc(s.got, func(d delivery) bool { return d.rev == rev })
}

func (s *streamClient) summary(killed time.Time) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "%d received", len(s.got))
	var gap time.Duration
	for i := 1; i < len(s.got); i++ {
		if s.got[i].at.After(killed) {
			gap = max(gap, s.got[i].at.Sub(s.got[i-1].at))
		}
	}
	fmt.Fprintf(&b, ", longest silence after the signal %v", gap.Round(time.Millisecond))
	for _, e := range s.ends {
		fmt.Fprintf(&b, "; ended at %+v: %s", e.at.Sub(killed).Round(time.Millisecond), e.why)
	}
	return b.String()
}

// checkEnded: a stream of the client ended by ref + bound (a SIGTERMed member may end it before it exits).
func (s *streamClient) checkEnded(t *testing.T, killed, ref time.Time, bound time.Duration) {
	t.Helper()
	s.mu.Lock()
	ends := slices.Clone(s.ends)
	s.mu.Unlock()
	i := slices.IndexFunc(ends, func(e end) bool { return e.at.After(killed) })
	switch {
	case i < 0:
		t.Errorf("%s: the stream never ended after the signal (%s)", s.name, s.summary(killed))
	case strings.HasPrefix(ends[i].why, "NOT "):
		t.Errorf("%s: the stream ended with %s, want Unavailable (%s)", s.name, ends[i].why, s.summary(killed))
	case ends[i].at.Sub(ref) > bound:
		t.Errorf("%s: the stream ended %v after the connection was gone, want ≤ %v (%s)", s.name,
			ends[i].at.Sub(ref).Round(time.Millisecond), bound, s.summary(killed))
	default:
		t.Logf("%s: the stream ended %v after the connection was gone: %s", s.name, ends[i].at.Sub(ref).Round(time.Millisecond), ends[i].why)
	}
}

// checkDelivered: every acknowledged write delivered, none twice, in order; each soon enough after its
// acknowledgement; for the clients that see it, the stream ended in time.
func (s *streamClient) checkDelivered(t *testing.T, acks []delivery, killed, ref time.Time, bound time.Duration) {
	t.Helper()
	s.mu.Lock()
	got := slices.Clone(s.got)
	s.mu.Unlock()
	for i := 1; i < len(got); i++ {
		if got[i].rev <= got[i-1].rev {
			t.Errorf("delivered out of order or twice: %d after %d", got[i].rev, got[i-1].rev)
		}
	}
	var worst time.Duration
	missing := 0
	for _, a := range acks {
		i := slices.IndexFunc(got, func(d delivery) bool { return d.rev == a.rev })
		if i < 0 {
			if missing++; missing <= 3 {
				t.Errorf("acknowledged write %d (acknowledged at %+v) never delivered", a.rev, a.at.Sub(killed).Round(time.Millisecond))
			}
			continue
		}
		worst = max(worst, got[i].at.Sub(a.at))
	}
	if missing > 3 {
		t.Errorf("… %d acknowledged writes in all never delivered (of %d)", missing, len(acks))
	}
	// Delivery waits at most for the stream to end and the client to come back.
	if limit := ref.Sub(killed) + bound + 1500*time.Millisecond; worst > limit {
		t.Errorf("a write was delivered %v after its acknowledgement, want ≤ %v", worst.Round(time.Millisecond), limit)
	}
	t.Logf("%d of %d acknowledged writes delivered, longest delay %v; %s", len(acks)-missing, len(acks),
		worst.Round(time.Millisecond), s.summary(killed))
	if s.mustEnd {
		s.checkEnded(t, killed, ref, bound)
	}
	if s.mustNotEnd {
		s.mu.Lock()
		ends := slices.Clone(s.ends)
		s.mu.Unlock()
		for _, e := range ends {
			if !strings.Contains(e.why, context.Canceled.Error()) { // the test's own end
				t.Errorf("the stream ended at +%v (%s), want no end", e.at.Sub(killed).Round(time.Millisecond), e.why)
			}
		}
	}
}

// writers put w/k through the members other than the target, v3 and v2, every 50 ms each.
type writers struct {
	v3     *clientv3.Client
	v2     *http.Client
	v2URLs []string

	mu           sync.Mutex
	acks3, acks2 []delivery
	n            int
}

func (w *writers) write(ctx context.Context, value string) {
	var wg sync.WaitGroup
	wg.Go(func() {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		if r, err := w.v3.Put(cctx, "w/k", value); err == nil {
			w.mu.Lock()
			w.acks3 = append(w.acks3, delivery{r.Header.Revision, time.Now()})
			w.mu.Unlock()
		}
	})
	wg.Go(func() {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		w.mu.Lock()
		w.n++
		u := w.v2URLs[w.n%len(w.v2URLs)] + "/v2/keys/w/k"
		w.mu.Unlock()
		resp, body, err := doResp(cctx, w.v2, http.MethodPut, u, "value="+url.QueryEscape(value))
		if err != nil || resp.StatusCode/100 != 2 {
			return
		}
		var ev v2Event
		if json.Unmarshal(body, &ev) == nil && ev.Node.ModifiedIndex > 0 {
			w.mu.Lock()
			w.acks2 = append(w.acks2, delivery{ev.Node.ModifiedIndex, time.Now()})
			w.mu.Unlock()
		}
	})
	wg.Wait()
}

func (w *writers) run(ctx context.Context) {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for i := 0; ; i++ {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		w.write(ctx, strconv.Itoa(i))
	}
}

func (w *writers) last(v2 bool) int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	acks := w.acks3
	if v2 {
		acks = w.acks2
	}
	if len(acks) == 0 {
		return -1
	}
	return acks[len(acks)-1].rev
}

func (w *writers) acked() (v3, v2 []delivery) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return slices.Clone(w.acks3), slices.Clone(w.acks2)
}

type v2Event struct {
	Node struct {
		ModifiedIndex int64 `json:"modifiedIndex"`
	} `json:"node"`
}

func v3Client(t *testing.T, endpoints ...string) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 2 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// clientv3Watch watches w/ with clientv3, which re-establishes the watch by itself.
func clientv3Watch(ctx context.Context, s *streamClient, cli *clientv3.Client, from int64) {
	for r := range cli.Watch(ctx, "w/", clientv3.WithPrefix(), clientv3.WithRev(from)) {
		for _, ev := range r.Events {
			s.add(ev.Kv.ModRevision, r.Header.MemberId)
		}
	}
}

// etcdctlWatch runs `etcdctl watch -w json` through the proxy; etcdctl re-establishes the watch by itself.
func etcdctlWatch(ctx context.Context, s *streamClient, ctl *harness.Etcdctl, from int64) {
	bin, err := harness.Tool(ctx, "etcdctl")
	if err != nil {
		s.ended(err.Error())
		return
	}
	cmd := exec.CommandContext(ctx, bin, append(ctl.Args(), "watch", "--prefix", "w/", "--rev="+strconv.FormatInt(from, 10), "-w", "json")...)
	cmd.Env = append(os.Environ(), "ETCDCTL_API=3")
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	cmd.WaitDelay = 2 * time.Second
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		s.ended(err.Error())
		return
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var r struct {
			Header struct {
				MemberID uint64 `json:"member_id"`
			}
			Events []struct {
				Kv struct {
					ModRevision int64 `json:"mod_revision"`
				} `json:"kv"`
			}
		}
		if json.Unmarshal(sc.Bytes(), &r) != nil {
			continue
		}
		for _, ev := range r.Events {
			s.add(ev.Kv.ModRevision, r.Header.MemberID)
		}
	}
	err = cmd.Wait()
	s.ended(fmt.Sprintf("etcdctl: %v %s", err, strings.TrimSpace(stderr.String())))
}

// gatewayWatch watches w/ on the JSON gateway as curl would: it starts again after the last revision it got
// whenever the stream ends.
func gatewayWatch(ctx context.Context, s *streamClient, base string, from int64) {
	cl := &http.Client{Transport: &http.Transport{}}
	defer cl.CloseIdleConnections()
	b64 := base64.StdEncoding.EncodeToString
	for ctx.Err() == nil {
		body := fmt.Sprintf(`{"create_request":{"key":%q,"range_end":%q,"start_revision":%d}}`, b64([]byte("w/")), b64([]byte("w0")), s.lastRev(from)+1)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v3/watch", strings.NewReader(body))
		resp, err := cl.Do(req)
		if err != nil {
			s.ended(err.Error())
			pause(ctx, 50*time.Millisecond)
			continue
		}
		dec := json.NewDecoder(resp.Body)
		why := ""
		for {
			var r struct {
				Result struct {
					Header struct {
						MemberID string `json:"member_id"`
					} `json:"header"`
					Events []struct {
						Kv struct {
							ModRevision string `json:"mod_revision"`
						} `json:"kv"`
					} `json:"events"`
				} `json:"result"`
				Error json.RawMessage `json:"error"`
			}
			if err := dec.Decode(&r); err != nil {
				why = err.Error()
				break
			}
			if r.Error != nil {
				why = string(r.Error)
				break
			}
			member, _ := strconv.ParseUint(r.Result.Header.MemberID, 10, 64)
			for _, ev := range r.Result.Events {
				rev, _ := strconv.ParseInt(ev.Kv.ModRevision, 10, 64)
				s.add(rev, member)
			}
		}
		_ = resp.Body.Close()
		s.ended(why)
	}
}

// v2Watch long-polls w/ (stream=false: one event per request) or streams it, and starts again after the last
// index it got whenever the answer ends. A v2 stream watch whose waitIndex is in etcd's event history answers
// that one event and then nothing (the watcher is never registered): once its stream ended, the stream client
// catches up with long polls, as etcdctl v2 watches.
func v2Watch(ctx context.Context, s *streamClient, base string, from int64, stream bool) {
	cl := &http.Client{Transport: &http.Transport{}}
	defer cl.CloseIdleConnections()
	for ctx.Err() == nil {
		u := fmt.Sprintf("%s/v2/keys/w?wait=true&recursive=true&waitIndex=%d", base, s.lastRev(from)+1)
		if stream {
			u += "&stream=true"
		}
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		resp, err := cl.Do(req)
		if err != nil {
			s.ended(err.Error())
			pause(ctx, 50*time.Millisecond)
			continue
		}
		dec := json.NewDecoder(resp.Body)
		n := 0
		var why string
		for {
			var ev v2Event
			if err := dec.Decode(&ev); err != nil {
				why = fmt.Sprintf("%d: %v", resp.StatusCode, err)
				break
			}
			if ev.Node.ModifiedIndex == 0 {
				why = fmt.Sprintf("%d: not an event", resp.StatusCode)
				break
			}
			s.add(ev.Node.ModifiedIndex, 0)
			if n++; !stream {
				break
			}
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		_ = resp.Body.Close()
		if stream || n == 0 {
			s.ended(why)
			stream = false
		}
	}
}

// observe follows the election's leader with the Election service's Observe stream (a server stream: no
// clientv3 retry under it) and observes again whenever the stream ends.
func observe(ctx context.Context, s *streamClient, cli *clientv3.Client, name string) {
	ec := v3electionpb.NewElectionClient(cli.ActiveConnection())
	for ctx.Err() == nil {
		st, err := ec.Observe(ctx, &v3electionpb.LeaderRequest{Name: []byte(name)})
		for err == nil {
			var r *v3electionpb.LeaderResponse
			if r, err = st.Recv(); err == nil && r.Kv != nil {
				s.add(r.Kv.ModRevision, r.Header.MemberId)
			}
		}
		if ctx.Err() != nil {
			return
		}
		s.ended(grpcEnd(err))
		pause(ctx, 50*time.Millisecond)
	}
}

// keepLease keeps a lease alive on its own LeaseKeepAlive stream, a beat every 1.5 s, quiet in between as
// clients are (clientv3 beats every TTL/3), and opens a new stream whenever one ends.
func keepLease(ctx context.Context, s *streamClient, cli *clientv3.Client, id clientv3.LeaseID) {
	lc := pb.NewLeaseClient(cli.ActiveConnection())
	for ctx.Err() == nil {
		sctx, cancel := context.WithCancel(ctx)
		st, err := lc.LeaseKeepAlive(sctx)
		if err == nil {
			go func() { // Send fails with EOF when the stream ends; Recv has the status
				for st.Send(&pb.LeaseKeepAliveRequest{ID: int64(id)}) == nil && sctx.Err() == nil {
					pause(sctx, 1500*time.Millisecond)
				}
			}()
		}
		for err == nil {
			var r *pb.LeaseKeepAliveResponse
			if r, err = st.Recv(); err == nil {
				s.add(r.TTL, r.Header.MemberId)
			}
		}
		cancel()
		if ctx.Err() != nil {
			return
		}
		s.ended(grpcEnd(err))
		pause(ctx, 50*time.Millisecond)
	}
}

// grpcEnd says how a gRPC stream ended, marked "NOT Unavailable" when it did not end as an ended upstream should.
func grpcEnd(err error) string {
	st, _ := status.FromError(err)
	why := fmt.Sprintf("%s: %s", st.Code(), st.Message())
	if st.Code() != codes.Unavailable {
		why = "NOT Unavailable: " + why
	}
	return why
}

// relay is a TCP relay to a member that listens only once opened: until then the proxy cannot reach the
// member through it (connections are refused), so that every stream goes to the member under test.
type relay struct {
	url, to string
	addr    string

	mu    sync.Mutex
	ln    net.Listener
	conns []net.Conn
}

func newRelay(t *testing.T, to string) *relay {
	t.Helper()
	addr := closedAddr(t) // free now; the relay listens there once it opens
	r := &relay{url: "http://" + addr, to: strings.TrimPrefix(to, "http://"), addr: addr}
	t.Cleanup(r.close)
	return r
}

func (r *relay) open(t *testing.T) {
	t.Helper()
	l, err := net.Listen("tcp", r.addr)
	if err != nil {
		t.Fatal(err)
	}
	r.mu.Lock()
	r.ln = l
	r.mu.Unlock()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			d, err := net.Dial("tcp", r.to)
			if err != nil {
				_ = c.Close()
				continue
			}
			r.mu.Lock()
			r.conns = append(r.conns, c, d)
			r.mu.Unlock()
			go func() { _, _ = io.Copy(d, c); _ = d.(*net.TCPConn).CloseWrite() }()
			go func() { _, _ = io.Copy(c, d); _ = c.(*net.TCPConn).CloseWrite() }()
		}
	}()
}

func (r *relay) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ln != nil {
		_ = r.ln.Close()
	}
	for _, c := range r.conns {
		_ = c.Close()
	}
}
