package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/net/dns/dnsmessage"
)

// TestDiscoverSRV: the endpoints are the targets of the domain's SRV records, https for _etcd-client-ssl._tcp and
// http for _etcd-client._tcp, and follow the records when they change.
func TestDiscoverSRV(t *testing.T) {
	dns := startDiscDNS(t)
	plain, secure := discUpstream(t, "plain", false), discUpstream(t, "secure", true)
	dns.set("_etcd-client._tcp.srv.test.", net.SRV{Target: "localhost.", Port: discPort(t, plain)})
	s, proxyURL := startDiscProxy(t, Config{DiscoverySRV: "srv.test", RefreshInterval: 50 * time.Millisecond,
		UpstreamTLS: TLSInfo{InsecureSkipVerify: true}}, io.Discard)
	want := []string{"http://localhost:" + strconv.Itoa(int(discPort(t, plain)))}
	if diff := cmp.Diff(want, discEndpoints(s)); diff != "" {
		t.Fatalf("endpoints (-want +got):\n%s", diff)
	}
	if got := discAsk(t, proxyURL); got != "plain" {
		t.Errorf("answer from %q, want plain", got)
	}

	dns.set("_etcd-client._tcp.srv.test.")
	dns.set("_etcd-client-ssl._tcp.srv.test.", net.SRV{Target: "localhost.", Port: discPort(t, secure)})
	want = []string{"https://localhost:" + strconv.Itoa(int(discPort(t, secure)))}
	discWait(t, "the endpoints to follow the SRV records", func() bool { return slices.Equal(discEndpoints(s), want) })
	if got := discAsk(t, proxyURL); got != "secure" {
		t.Errorf("answer from %q, want secure", got)
	}
}

// TestDiscoverSRVName: --discovery-srv-name suffixes the service names; the plain names are not looked at.
func TestDiscoverSRVName(t *testing.T) {
	dns := startDiscDNS(t)
	named, other := discUpstream(t, "named", false), discUpstream(t, "other", false)
	dns.set("_etcd-client-x._tcp.named.test.", net.SRV{Target: "localhost.", Port: discPort(t, named)})
	dns.set("_etcd-client._tcp.named.test.", net.SRV{Target: "localhost.", Port: discPort(t, other)})
	s, proxyURL := startDiscProxy(t, Config{DiscoverySRV: "named.test", DiscoverySRVName: "x", RefreshInterval: -1},
		io.Discard)
	want := []string{"http://localhost:" + strconv.Itoa(int(discPort(t, named)))}
	if diff := cmp.Diff(want, discEndpoints(s)); diff != "" {
		t.Fatalf("endpoints (-want +got):\n%s", diff)
	}
	if got := discAsk(t, proxyURL); got != "named" {
		t.Errorf("answer from %q, want named", got)
	}
}

// TestDiscoverSRVNothingFound: a domain without records fails Start, naming what was looked up.
func TestDiscoverSRVNothingFound(t *testing.T) {
	startDiscDNS(t)
	s := newDiscProxy(t, Config{DiscoverySRV: "empty.test", DiscoverySRVName: "x"}, io.Discard)
	err := s.Start()
	const want = "discovery: no SRV records at _etcd-client-ssl-x._tcp.empty.test or _etcd-client-x._tcp.empty.test"
	if err == nil || err.Error() != want {
		t.Errorf("Start() = %v, want %s", err, want)
	}
}

// TestDiscoverMembers: the endpoints are the client URLs of the seed's voting members, from the v3 gateway's
// member list, and follow it when it changes; a refresh that fails keeps them.
func TestDiscoverMembers(t *testing.T) {
	t.Parallel()
	m1, m2 := discUpstream(t, "m1", false), discUpstream(t, "m2", false)
	var learnerAsked atomic.Bool
	learner := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { learnerAsked.Store(true) }))
	t.Cleanup(learner.Close)
	var (
		list   atomic.Value // the member list the seed answers with
		broken atomic.Bool  // the seed answers 500
	)
	list.Store(`{"header":{"cluster_id":"1"},"members":[
		{"ID":"2","name":"m2","peerURLs":["http://127.0.0.1:2380"],"clientURLs":["` + m2.URL + `"]},
		{"ID":"1","name":"m1","peerURLs":["http://127.0.0.1:2381"],"clientURLs":["` + m1.URL + `","` + m1.URL + `/"]},
		{"ID":"3","name":"l","peerURLs":["http://127.0.0.1:2382"],"clientURLs":["` + learner.URL + `"],"isLearner":true},
		{"ID":"4","peerURLs":["http://127.0.0.1:2383"]}]}`)
	seed := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if r.Method != http.MethodPost || r.URL.Path != "/v3/cluster/member/list" || string(b) != "{}" {
			t.Errorf("seed asked %s %s %q, want POST /v3/cluster/member/list {}", r.Method, r.URL.Path, b)
		}
		if broken.Load() {
			http.Error(w, "down", http.StatusInternalServerError)
			return
		}
		_, _ = io.WriteString(w, list.Load().(string))
	}))
	t.Cleanup(seed.Close)
	logs := &discLog{}
	s, proxyURL := startDiscProxy(t, Config{Upstreams: []string{seed.URL}, DiscoverMembers: true,
		RefreshInterval: 50 * time.Millisecond}, logs)
	want := []string{m1.URL, m2.URL}
	slices.Sort(want)
	if diff := cmp.Diff(want, discEndpoints(s)); diff != "" {
		t.Fatalf("endpoints (-want +got):\n%s", diff)
	}
	if !strings.Contains(logs.String(), "upstream endpoints changed") || !strings.Contains(logs.String(), "count=2") {
		t.Errorf("the change is not logged with its count:\n%s", logs)
	}
	seen := map[string]bool{}
	discWait(t, "requests on new connections to reach both members", func() bool {
		seen[discAsk(t, proxyURL)] = true
		return seen["m1"] && seen["m2"]
	})
	if len(seen) != 2 || learnerAsked.Load() {
		t.Errorf("answers from %v (learner asked: %v), want m1 and m2 only", seen, learnerAsked.Load())
	}

	list.Store(`{"members":[{"ID":"2","name":"m2","clientURLs":["` + m2.URL + `"]}]}`)
	discWait(t, "the endpoints to follow the member list", func() bool {
		return slices.Equal(discEndpoints(s), []string{m2.URL})
	})
	for range 3 {
		if got := discAsk(t, proxyURL); got != "m2" {
			t.Errorf("answer from %q, want m2", got)
		}
	}

	broken.Store(true)
	discWait(t, "a failed refresh to be logged", func() bool { return strings.Contains(logs.String(), "refresh failed") })
	if got := discEndpoints(s); !slices.Equal(got, []string{m2.URL}) {
		t.Errorf("after a failed refresh the endpoints are %v, want them kept: [%s]", got, m2.URL)
	}
}

// TestDiscoverMembersV2: an upstream without the v3 gateway (404) is asked GET /v2/members; client URLs that are
// not http(s)://host:port are dropped.
func TestDiscoverMembersV2(t *testing.T) {
	t.Parallel()
	m1 := discUpstream(t, "m1", false)
	seed := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || r.URL.Path != "/v2/members" {
			http.NotFound(w, r)
			return
		}
		_, _ = io.WriteString(w, `{"members":[{"id":"1","name":"m1","peerURLs":["http://127.0.0.1:2380"],
			"clientURLs":["`+m1.URL+`","unix:///run/etcd.sock","http://no-port","http://127.0.0.1:1/a/path"]}]}`)
	}))
	t.Cleanup(seed.Close)
	logs := &discLog{}
	s, proxyURL := startDiscProxy(t, Config{Upstreams: []string{seed.URL}, DiscoverMembers: true, RefreshInterval: -1},
		logs)
	if diff := cmp.Diff([]string{m1.URL}, discEndpoints(s)); diff != "" {
		t.Fatalf("endpoints (-want +got):\n%s", diff)
	}
	if got := discAsk(t, proxyURL); got != "m1" {
		t.Errorf("answer from %q, want m1", got)
	}
	if n := strings.Count(logs.String(), "ignoring a member's client URL"); n != 3 {
		t.Errorf("%d bad client URLs logged, want 3:\n%s", n, logs)
	}
}

// TestDiscoverMembersSeedDown: a member list that cannot be had at start does not fail Start; requests go to the
// seeds.
func TestDiscoverMembersSeedDown(t *testing.T) {
	t.Parallel()
	seed := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/v3/cluster/member/list" {
			http.Error(w, "no leader", http.StatusServiceUnavailable)
			return
		}
		_, _ = io.WriteString(w, "seed")
	}))
	t.Cleanup(seed.Close)
	logs := &discLog{}
	s, proxyURL := startDiscProxy(t, Config{Upstreams: []string{seed.URL}, DiscoverMembers: true, RefreshInterval: -1},
		logs)
	if diff := cmp.Diff([]string{seed.URL}, discEndpoints(s)); diff != "" {
		t.Errorf("endpoints (-want +got):\n%s", diff)
	}
	if got := discAsk(t, proxyURL); got != "seed" {
		t.Errorf("answer from %q, want seed", got)
	}
	if !strings.Contains(logs.String(), "no member list yet") {
		t.Errorf("the failure is not logged:\n%s", logs)
	}
}

// TestDiscoverMembersSeedMovedToHTTPS: a seed written http:// whose port now serves only TLS (a member migrated
// to https, the proxy's configuration not yet) is asked again over https, and its member list is used; an https
// seed is never asked over plain http.
func TestDiscoverMembersSeedMovedToHTTPS(t *testing.T) {
	t.Parallel()
	m1 := discUpstream(t, "m1", true)
	seed := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, `{"members":[{"ID":"1","name":"m1","clientURLs":["`+m1.URL+`"]}]}`)
	}))
	t.Cleanup(seed.Close)
	stale := strings.Replace(seed.URL, "https://", "http://", 1)
	s, proxyURL := startDiscProxy(t, Config{Upstreams: []string{stale}, DiscoverMembers: true, RefreshInterval: -1,
		UpstreamTLS: TLSInfo{InsecureSkipVerify: true}}, io.Discard)
	if diff := cmp.Diff([]string{m1.URL}, discEndpoints(s)); diff != "" {
		t.Fatalf("endpoints (-want +got):\n%s", diff)
	}
	if got := discAsk(t, proxyURL); got != "m1" {
		t.Errorf("answer from %q, want m1", got)
	}

	var plainAsked atomic.Bool
	plain := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { plainAsked.Store(true) }))
	t.Cleanup(plain.Close)
	logs := &discLog{}
	startDiscProxy(t, Config{Upstreams: []string{strings.Replace(plain.URL, "http://", "https://", 1)},
		DiscoverMembers: true, RefreshInterval: -1, UpstreamTLS: TLSInfo{InsecureSkipVerify: true}}, logs)
	if plainAsked.Load() {
		t.Error("an https seed was asked over plain http")
	}
}

// TestDiscoverMembersRefreshOnTrouble: an endpoint found unreachable makes discovery look again at once, not at
// the next interval (an hour here): its member may have come back on other URLs.
func TestDiscoverMembersRefreshOnTrouble(t *testing.T) {
	t.Parallel()
	m1, m2 := discUpstream(t, "m1", false), discUpstream(t, "m2", false)
	var list atomic.Value
	list.Store(m1.URL)
	seed := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, `{"members":[{"ID":"1","name":"m","clientURLs":["`+list.Load().(string)+`"]}]}`)
	}))
	t.Cleanup(seed.Close)
	s, proxyURL := startDiscProxy(t, Config{Upstreams: []string{seed.URL}, DiscoverMembers: true,
		RefreshInterval: time.Hour}, io.Discard)
	if diff := cmp.Diff([]string{m1.URL}, discEndpoints(s)); diff != "" {
		t.Fatalf("endpoints (-want +got):\n%s", diff)
	}
	list.Store(m2.URL) // the member moved
	m1.Close()         // and its old URL is gone
	if got := discAsk(t, proxyURL); got == "m2" {
		t.Fatalf("answer from m2 before anything was found unreachable")
	}
	discWait(t, "the endpoints to follow the member list after a request found m1 unreachable", func() bool {
		return slices.Equal(discEndpoints(s), []string{m2.URL})
	})
	if got := discAsk(t, proxyURL); got != "m2" {
		t.Errorf("answer from %q, want m2", got)
	}
}

// TestDiscoverSRVMembers: with both, the SRV records name the seeds and their member list the endpoints.
func TestDiscoverSRVMembers(t *testing.T) {
	dns := startDiscDNS(t)
	m1 := discUpstream(t, "m1", false)
	seed := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_ = json.NewEncoder(w).Encode(map[string]any{"members": []map[string]any{{"ID": "1", "clientURLs": []string{m1.URL}}}})
	}))
	t.Cleanup(seed.Close)
	dns.set("_etcd-client._tcp.both.test.", net.SRV{Target: "localhost.", Port: discPort(t, seed)})
	s, proxyURL := startDiscProxy(t, Config{DiscoverySRV: "both.test", DiscoverMembers: true, RefreshInterval: -1},
		io.Discard)
	if diff := cmp.Diff([]string{m1.URL}, discEndpoints(s)); diff != "" {
		t.Fatalf("endpoints (-want +got):\n%s", diff)
	}
	if got := discAsk(t, proxyURL); got != "m1" {
		t.Errorf("answer from %q, want m1", got)
	}
}

// discDNS is a DNS server on 127.0.0.1 that answers SRV questions from a table the test changes; every name not
// in the table is NXDOMAIN.
type discDNS struct {
	mu      sync.Mutex
	records map[string][]net.SRV // by lower-case absolute name
}

// startDiscDNS starts a discDNS and points discovery at it (the test hook) for the test's duration: tests that
// call it are not parallel.
func startDiscDNS(t *testing.T) *discDNS {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d := &discDNS{records: map[string][]net.SRV{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if resp, err := d.answer(buf[:n]); err == nil {
				_, _ = pc.WriteTo(resp, from)
			}
		}
	}()
	addr := pc.LocalAddr().String()
	discoveryResolver = &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "udp", addr)
	}}
	t.Cleanup(func() {
		discoveryResolver = nil
		_ = pc.Close()
		<-done
	})
	return d
}

// set replaces the records of name (absolute, with the trailing dot); none removes the name.
func (d *discDNS) set(name string, recs ...net.SRV) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(recs) == 0 {
		delete(d.records, name)
		return
	}
	d.records[name] = recs
}

func (d *discDNS) answer(query []byte) ([]byte, error) {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil {
		return nil, err
	}
	q, err := p.Question()
	if err != nil {
		return nil, err
	}
	d.mu.Lock()
	recs, ok := d.records[strings.ToLower(q.Name.String())]
	d.mu.Unlock()
	rh := dnsmessage.Header{ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired,
		RecursionAvailable: true}
	if !ok {
		rh.RCode = dnsmessage.RCodeNameError
	}
	b := dnsmessage.NewBuilder(nil, rh)
	errs := []error{b.StartQuestions(), b.Question(q), b.StartAnswers()}
	for _, r := range recs {
		if q.Type != dnsmessage.TypeSRV {
			break
		}
		target, err := dnsmessage.NewName(r.Target)
		errs = append(errs, err, b.SRVResource(
			dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET},
			dnsmessage.SRVResource{Priority: r.Priority, Weight: r.Weight, Port: r.Port, Target: target}))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return b.Finish()
}

// discUpstream is an upstream that answers every request with its name.
func discUpstream(t *testing.T, name string, tls bool) *httptest.Server {
	t.Helper()
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, name) })
	var s *httptest.Server
	if tls {
		s = httptest.NewTLSServer(h)
	} else {
		s = httptest.NewServer(h)
	}
	t.Cleanup(s.Close)
	return s
}

func discPort(t *testing.T, s *httptest.Server) uint16 {
	t.Helper()
	u, err := url.Parse(s.URL)
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.ParseUint(u.Port(), 10, 16)
	if err != nil {
		t.Fatal(err)
	}
	return uint16(p)
}

// newDiscProxy builds a Server listening on a free port, without the upstream probe, logging into logs.
func newDiscProxy(t *testing.T, cfg Config, logs io.Writer) *Server {
	t.Helper()
	cfg.ListenClientURLs, cfg.AdvertiseClientURLs = []string{"http://127.0.0.1:0"}, []string{"http://127.0.0.1:2379"}
	cfg.UpstreamHealthInterval = -1
	s, err := New(cfg, WithLogger(slog.New(slog.NewTextHandler(logs, nil))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// startDiscProxy starts newDiscProxy's Server and returns it with its URL.
func startDiscProxy(t *testing.T, cfg Config, logs io.Writer) (*Server, string) {
	t.Helper()
	s := newDiscProxy(t, cfg, logs)
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	return s, s.URLs()[0]
}

// discEndpoints are the URLs of the server's current endpoints.
func discEndpoints(s *Server) []string {
	var urls []string
	for _, e := range s.forwarder.endpoints.current() {
		urls = append(urls, e.url.String())
	}
	return urls
}

// discAsk sends a request through the proxy on a new connection (each may be pinned to another endpoint) and
// returns the answer.
func discAsk(t *testing.T, proxyURL string) string {
	t.Helper()
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 5 * time.Second}
	resp, err := c.Get(proxyURL + "/v2/keys/who")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// discWait polls cond until it holds, failing the test after 5 s.
func discWait(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 5 s for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// discLog is a log the server writes while the test reads it.
type discLog struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *discLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *discLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
