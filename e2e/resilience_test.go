package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// TestResilience stops members and proxy-proxies under load and checks what the proxy-proxy owes its clients
// then: writes keep being acknowledged through the members that are left, none is sent twice, a proxy below that
// comes back is used again without a restart, and a loop is answered without eating sockets. The subtests share
// one cluster and run one after the other: two of them measure time.
func TestResilience(t *testing.T) {
	ctx := testContext(t, 120*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(3))
	if err != nil {
		t.Fatal(err)
	}
	front, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{})
	if err != nil {
		t.Fatal(err)
	}
	base := front.Endpoint.URLs[0]

	// Members[0] is one of the proxy's upstreams: the writers' connections are spread over all three, so the
	// writers pinned to Members[0] move when it stops.
	t.Run("follower stop under write load", func(t *testing.T) {
		waitLeader(t, ctx, c)
		if err := c.MoveLeader(ctx, 1); err != nil {
			t.Fatal(err)
		}
		follower := c.Members[0]
		ws := newWriters("p", 8, base)
		r := runLoad(t, ctx, "load", ws, 1500*time.Millisecond, func() {
			if c.Leader() == follower {
				t.Errorf("%s became the leader again: not a follower stop", follower.Name)
			}
			stopMember(t, ctx, follower)
		})
		for _, w := range ws {
			first, gap, ok := w.afterStop(r)
			switch {
			case !ok:
				t.Errorf("%s: no write sent after %s began to stop was acknowledged (%s)", w.name, follower.Name, w.errSummary(r))
			case first > time.Second:
				t.Errorf("%s: first write sent after %s began to stop acknowledged %v after, want ≤ 1s (%s)", w.name, follower.Name, first, w.errSummary(r))
			}
			t.Logf("%s: %d acked; first ack of a write sent after the stop +%v, worst gap %v; errors: %s", w.name, len(w.acks),
				first.Round(time.Millisecond), gap.Round(time.Millisecond), w.errSummary(r))
		}
		checkReadBack(t, ctx, base, "load", ws)
		restartMember(t, ctx, follower)
	})

	t.Run("leader stop", func(t *testing.T) {
		waitLeader(t, ctx, c)
		if err := c.MoveLeader(ctx, 0); err != nil {
			t.Fatal(err)
		}
		leader, survivor := c.Members[0], c.Members[1]
		proxied := newWriters("p", 8, base)
		direct := newWriters("d", 8, survivor.ClientURL)
		all := append(slices.Clone(proxied), direct...)
		// Long enough for a write lost with the leader to time out and for the writers to settle again.
		r := runLoad(t, ctx, "load-leader", all, 3*time.Second, func() { stopMember(t, ctx, leader) })
		pFirst, pGap := stall(t, proxied, r)
		dFirst, dGap := stall(t, direct, r)
		t.Logf("stall after the leader (%s) began to stop: proxied: first ack of a write sent after it %v, worst gap %v; direct (%s): %v, %v",
			leader.Name, pFirst.Round(time.Millisecond), pGap.Round(time.Millisecond), survivor.Name,
			dFirst.Round(time.Millisecond), dGap.Round(time.Millisecond))
		if pFirst > dFirst+time.Second {
			t.Errorf("proxied writers waited %v for their first ack after the leader stopped, direct ones %v: want ≤ direct + 1s", pFirst, dFirst)
		}
		if pGap > dGap+time.Second {
			t.Errorf("proxied writers' worst gap after the leader stopped is %v, direct ones' %v: want ≤ direct + 1s", pGap, dGap)
		}
		checkReadBack(t, ctx, base, "load-leader", all)
		restartMember(t, ctx, leader)
	})

	t.Run("all upstreams down and back", func(t *testing.T) {
		waitLeader(t, ctx, c)
		middle, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{})
		if err != nil {
			t.Fatal(err)
		}
		outer, err := e.StartProxyProxy(ctx, middle.Endpoint, harness.ProxyProxyHop{})
		if err != nil {
			t.Fatal(err)
		}
		cl := &http.Client{Transport: &http.Transport{}, Timeout: 2 * time.Second}
		defer cl.CloseIdleConnections()
		key := outer.Endpoint.URLs[0] + "/v2/keys/resilience/down-and-back"
		if code, body := do(ctx, cl, http.MethodPut, key, "value=before"); code/100 != 2 {
			t.Fatalf("PUT through the chain: %d %s", code, body)
		}
		// Quorum reads: the middle's new connections may land on another member, and a plain v2 GET is
		// answered from that member's own store, which may lag behind the write.
		if code, body := do(ctx, cl, http.MethodGet, key+"?quorum=true", ""); code != http.StatusOK {
			t.Fatalf("GET through the chain: %d %s", code, body)
		}

		mu, err := url.Parse(middle.Endpoint.URLs[0])
		if err != nil {
			t.Fatal(err)
		}
		leaks := leakSetOf(append([]string{middle.Endpoint.URLs[0]}, c.Endpoint().URLs...))
		port := regexp.MustCompile(`\b` + regexp.QuoteMeta(mu.Port()) + `\b`)
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err = middle.Stop(sctx)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		// The outer may still hold a connection to the middle that the middle closed: the first answer may
		// be a 502 for it. Within a moment every answer is the 503 of "no upstream at all".
		var seen []int
		deadline := time.Now().Add(3 * time.Second)
		for {
			resp, body, err := doResp(ctx, cl, http.MethodGet, key, "")
			if err != nil {
				t.Fatalf("GET with the middle down: %v", err)
			}
			seen = append(seen, resp.StatusCode)
			dump := dumpResponse(resp, body)
			leaks.check(t, "GET with the middle down", dump)
			if port.MatchString(string(body)) {
				t.Errorf("middle's port %s in the body: %s", mu.Port(), body)
			}
			for k, vs := range resp.Header {
				for _, v := range vs {
					if strings.Contains(v, mu.Host) || port.MatchString(v) {
						t.Errorf("middle's address in header %s: %q", k, v)
					}
				}
			}
			var msg struct {
				Message *string `json:"message"`
			}
			if err := json.Unmarshal(body, &msg); err != nil || msg.Message == nil || *msg.Message == "" {
				t.Errorf("GET with the middle down: want an etcd-style JSON {\"message\"}, got\n%s", dump)
			}
			if resp.StatusCode == http.StatusServiceUnavailable {
				if want := "etcd-proxy-proxy: no upstream endpoint available"; msg.Message == nil || *msg.Message != want {
					t.Errorf("503 with the middle down: message %q, want %q", body, want)
				}
				break
			}
			if resp.StatusCode != http.StatusBadGateway && resp.StatusCode != http.StatusGatewayTimeout {
				t.Fatalf("GET with the middle down: want 502/503/504, got\n%s", dump)
			}
			if time.Now().After(deadline) {
				t.Fatalf("no 503 within 3s of the middle stopping; statuses: %v", seen)
			}
			pause(ctx, 20*time.Millisecond)
		}
		t.Logf("answers with the middle down: %v", seen)

		began := time.Now()
		if err := middle.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		back := time.Now()
		var last string
		for {
			code, body := do(ctx, cl, http.MethodGet, key+"?quorum=true", "")
			if code == http.StatusOK && strings.Contains(body, `"value":"before"`) {
				break
			}
			last = fmt.Sprintf("%d %s", code, body)
			if time.Since(back) > 5*time.Second {
				t.Fatalf("the outer did not recover within 5s of the middle being back (last: %s)", last)
			}
			pause(ctx, 10*time.Millisecond)
		}
		recovered := time.Since(back)
		t.Logf("middle restarted in %v; first 200 through the outer %v after the middle was back (last failure: %s)",
			back.Sub(began).Round(time.Millisecond), recovered.Round(time.Millisecond), last)
		if recovered > 2*time.Second {
			t.Errorf("first 200 through the outer %v after the middle was back, want ≤ 2s", recovered)
		}
	})

	t.Run("loop", func(t *testing.T) {
		self, err := e.StartProxyProxy(ctx, harness.Endpoint{Name: "itself"}, harness.ProxyProxyHop{
			Configure: func(cfg *proxy.Config) { cfg.Upstreams = cfg.ListenClientURLs },
		})
		if err != nil {
			t.Fatal(err)
		}
		// Two proxies that are each other's upstream: b in front of a, then a restarted in front of b.
		a, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{})
		if err != nil {
			t.Fatal(err)
		}
		b, err := e.StartProxyProxy(ctx, a.Endpoint, harness.ProxyProxyHop{})
		if err != nil {
			t.Fatal(err)
		}
		a.Config.Upstreams = b.Endpoint.URLs
		if err := a.Restart(ctx); err != nil {
			t.Fatal(err)
		}

		cl := &http.Client{Transport: &http.Transport{}, Timeout: 5 * time.Second}
		defer cl.CloseIdleConnections()
		before, fdOK := openFDs()
		for _, l := range []struct{ name, url string }{{"self loop", self.Endpoint.URLs[0]}, {"a ⇄ b", a.Endpoint.URLs[0]}} {
			start := time.Now()
			bad := 0
			for i := range 500 {
				resp, body, err := doResp(ctx, cl, http.MethodGet, l.url+"/v2/keys/x", "")
				if err != nil {
					t.Fatalf("%s: request %d: %v", l.name, i, err)
				}
				var msg struct {
					Message string `json:"message"`
				}
				if resp.StatusCode != http.StatusLoopDetected || json.Unmarshal(body, &msg) != nil || msg.Message == "" {
					if bad++; bad <= 3 {
						t.Errorf("%s: request %d: want 508 with a JSON message, got\n%s", l.name, i, dumpResponse(resp, body))
					}
				}
			}
			if bad > 0 {
				t.Errorf("%s: %d of 500 requests not answered 508", l.name, bad)
			}
			t.Logf("%s: 500 requests in %v", l.name, time.Since(start).Round(time.Millisecond))
		}
		if !fdOK {
			t.Log("no /proc/self/fd: open descriptors not counted")
			return
		}
		after, _ := openFDs()
		t.Logf("open descriptors: %d before the loops, %d after 1000 looping requests", before, after)
		if after-before >= 50 {
			t.Errorf("open descriptors grew by %d (%d → %d) over 1000 looping requests, want < 50", after-before, before, after)
		}
	})
}

// writer sends POSTs of in-order keys, one at a time on a connection of its own, each with a unique value, and
// records what was acknowledged and what failed.
type writer struct {
	name string // also the prefix of its values
	base string
	cl   *http.Client
	// pace is a pause after each write; zero writes back to back.
	pace time.Duration
	acks []ack
	errs []writeErr
}

type ack struct {
	value     string
	call, ret time.Time
}

type writeErr struct {
	call, ret time.Time
	what      string // a status or a transport error, for the summary
}

// writeTimeout is the writers' client timeout. A write in flight when the leader stops may be lost in the
// leadership change and then waits for the client's timeout, whether it went through the proxy or not and to
// whichever member: a short timeout keeps that cost (one per writer at most) below the 1 s the proxy is allowed.
const writeTimeout = 500 * time.Millisecond

func newWriters(prefix string, n int, base string) []*writer {
	ws := make([]*writer, n)
	for i := range ws {
		// A transport each: one connection per writer, so that the proxy sees as many clients.
		tr := &http.Transport{MaxIdleConnsPerHost: 1}
		ws[i] = &writer{name: fmt.Sprintf("%s%d", prefix, i), base: base, cl: &http.Client{Transport: tr, Timeout: writeTimeout}}
	}
	return ws
}

// run writes until done is closed; the write in flight then ends (or times out) first.
func (w *writer) run(ctx context.Context, dir string, done <-chan struct{}) {
	defer w.cl.CloseIdleConnections()
	for seq := 0; ; seq++ {
		select {
		case <-done:
			return
		case <-ctx.Done():
			return
		default:
		}
		value := fmt.Sprintf("%s-%d", w.name, seq)
		call := time.Now()
		resp, body, err := doResp(ctx, w.cl, http.MethodPost, w.base+"/v2/keys/"+dir, "value="+value)
		ret := time.Now()
		var what string
		switch ue := (*url.Error)(nil); {
		case errors.As(err, &ue):
			what = ue.Err.Error() // without the URL
		case err != nil:
			what = err.Error()
		case resp.StatusCode/100 == 2:
			w.acks = append(w.acks, ack{value, call, ret})
			pause(ctx, w.pace)
			continue
		default:
			what = fmt.Sprintf("%d %s", resp.StatusCode, strings.TrimSpace(string(body)))
		}
		w.errs = append(w.errs, writeErr{call, ret, what})
		pause(ctx, w.pace)
	}
}

// afterStop measures the writer after the fault: first is the time from the fault to the ack of the first write
// sent after it began (ok is false when there is none); worstGap is the longest time without an ack between
// the fault and the end of the load, both ends included.
func (w *writer) afterStop(r loadRun) (first, worstGap time.Duration, ok bool) {
	prev := r.stopAt
	for _, a := range w.acks {
		if a.ret.Before(r.stopAt) || a.ret.After(r.end) {
			continue
		}
		if !ok && !a.call.Before(r.stopAt) {
			first, ok = a.ret.Sub(r.stopAt), true
		}
		worstGap = max(worstGap, a.ret.Sub(prev))
		prev = a.ret
	}
	return first, max(worstGap, r.end.Sub(prev)), ok
}

// errSummary counts the writer's failures by kind, with when the failed writes were sent relative to the
// fault: "none" or "502 … ×2, 503 … ×1 (sent at -1ms, +2ms, +3ms)".
func (w *writer) errSummary(r loadRun) string {
	if len(w.errs) == 0 {
		return "none"
	}
	n := map[string]int{}
	var at []string
	for _, e := range w.errs {
		n[e.what]++
		if len(at) < 5 {
			d, sign := e.call.Sub(r.stopAt).Round(time.Millisecond), "+"
			if d < 0 {
				sign = ""
			}
			at = append(at, sign+d.String())
		}
	}
	var kinds []string
	for k := range n {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	var parts []string
	for _, k := range kinds {
		parts = append(parts, fmt.Sprintf("%s ×%d", k, n[k]))
	}
	return fmt.Sprintf("%s (sent at %s)", strings.Join(parts, ", "), strings.Join(at, ", "))
}

// loadRun is when a load's fault began and when the load was told to end.
type loadRun struct {
	stopAt, end time.Time
}

// runLoad runs the writers for a second, calls fault in the background, goes on for after, then stops the
// writers and waits for them and for fault.
func runLoad(t *testing.T, ctx context.Context, dir string, ws []*writer, after time.Duration, fault func()) loadRun {
	t.Helper()
	done := make(chan struct{})
	var wg sync.WaitGroup
	for _, w := range ws {
		wg.Go(func() { w.run(ctx, dir, done) })
	}
	pause(ctx, time.Second)
	r := loadRun{stopAt: time.Now()}
	var fwg sync.WaitGroup
	fwg.Go(fault)
	pause(ctx, after)
	r.end = time.Now()
	close(done)
	wg.Wait()
	fwg.Wait()
	for _, w := range ws {
		if !slices.ContainsFunc(w.acks, func(a ack) bool { return a.ret.Before(r.stopAt) }) {
			t.Errorf("%s: no write acknowledged in the second before the fault (%s)", w.name, w.errSummary(r))
		}
	}
	return r
}

// stall is the worst, over the writers, of afterStop's first and worstGap; a writer without an ack of a write
// sent after the fault counts the whole time the load went on after it.
func stall(t *testing.T, ws []*writer, r loadRun) (first, gap time.Duration) {
	t.Helper()
	for _, w := range ws {
		f, g, ok := w.afterStop(r)
		if !ok {
			f = r.end.Sub(r.stopAt)
		}
		t.Logf("%s: %d acked; first ack of a write sent after the stop +%v, worst gap %v; errors: %s", w.name, len(w.acks),
			f.Round(time.Millisecond), g.Round(time.Millisecond), w.errSummary(r))
		first, gap = max(first, f), max(gap, g)
	}
	return first, gap
}

// checkReadBack reads dir back through the proxy with a quorum read: every acknowledged value must be there,
// and no value twice (a write sent again would be).
func checkReadBack(t *testing.T, ctx context.Context, base, dir string, ws []*writer) {
	t.Helper()
	cl := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
	defer cl.CloseIdleConnections()
	code, body := do(ctx, cl, http.MethodGet, base+"/v2/keys/"+dir+"?recursive=true&sorted=true&quorum=true", "")
	if code != http.StatusOK {
		t.Fatalf("read back %s: %d %s", dir, code, body)
	}
	var r struct {
		Node struct {
			Nodes []struct {
				Key   string `json:"key"`
				Value string `json:"value"`
			} `json:"nodes"`
		} `json:"node"`
	}
	if err := json.Unmarshal([]byte(body), &r); err != nil {
		t.Fatalf("read back %s: %v", dir, err)
	}
	count := map[string]int{}
	for _, n := range r.Node.Nodes {
		count[n.Value]++
	}
	acked, failed, missing := 0, 0, 0
	for _, w := range ws {
		failed += len(w.errs)
		for _, a := range w.acks {
			acked++
			if count[a.value] == 0 {
				if missing++; missing <= 5 {
					t.Errorf("acknowledged write %s (acked at %s) missing from the read-back", a.value, a.ret.Format("15:04:05.000"))
				}
			}
		}
	}
	if missing > 0 {
		t.Errorf("%d acknowledged writes missing", missing)
	}
	dups := 0
	for v, n := range count {
		if n > 1 {
			if dups++; dups <= 5 {
				t.Errorf("value %s stored %d times: a write was sent again", v, n)
			}
		}
	}
	if dups > 0 {
		t.Errorf("%d values stored more than once", dups)
	}
	t.Logf("read back %s: %d keys; %d writes acknowledged, %d failed (outcome unknown; %d of those stored)",
		dir, len(r.Node.Nodes), acked, failed, len(r.Node.Nodes)-acked+missing)
}

// waitLeader waits until every member runs and all agree on a leader.
func waitLeader(t *testing.T, ctx context.Context, c *harness.Cluster) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	eventually(t, wctx, "every member up under one leader", func() (bool, string) {
		for _, m := range c.Members {
			if !m.Running() {
				return false, m.Name + " stopped"
			}
		}
		return c.Leader() != nil, "no leader"
	})
}

// stopMember stops m, waiting at most 5 s: a member's Close may wait longer for a connection that a layer
// above opened and left idle (see upstreamDown); its client side is down by then.
func stopMember(t *testing.T, ctx context.Context, m *harness.Member) {
	t.Helper()
	began := time.Now()
	sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := m.Stop(sctx); err != nil {
		t.Logf("%s still closing after %v: %v", m.Name, time.Since(began).Round(time.Millisecond), err)
		return
	}
	t.Logf("%s stopped in %v", m.Name, time.Since(began).Round(time.Millisecond))
}

// restartMember restarts m, waiting at most 10 s.
func restartMember(t *testing.T, ctx context.Context, m *harness.Member) {
	t.Helper()
	began := time.Now()
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := m.Restart(rctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s restarted in %v", m.Name, time.Since(began).Round(time.Millisecond))
}

// do sends a request (a form body when body is set) and returns the status and body, or 0 and the error.
func do(ctx context.Context, cl *http.Client, method, u, body string) (int, string) {
	resp, b, err := doResp(ctx, cl, method, u, body)
	if err != nil {
		return 0, err.Error()
	}
	return resp.StatusCode, string(b)
}

func doResp(ctx context.Context, cl *http.Client, method, u, body string) (*http.Response, []byte, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, nil, err
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := cl.Do(req)
	if err != nil {
		return nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, nil, fmt.Errorf("%s %s: reading the body: %w", method, u, err)
	}
	return resp, b, nil
}

// pause lets time pass (load run, polling interval); it ends early with ctx.
func pause(ctx context.Context, d time.Duration) {
	if d <= 0 {
		return
	}
	select {
	case <-ctx.Done():
	case <-time.After(d):
	}
}

// openFDs counts this process's open file descriptors; ok is false where /proc/self/fd does not exist.
func openFDs() (n int, ok bool) {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return 0, false
	}
	return len(ents), true
}
