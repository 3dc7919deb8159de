package proxy

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

var quiet = slog.New(slog.DiscardHandler)

// client never follows redirects and gives up well before the test's deadline.
var client = &http.Client{
	Timeout:       10 * time.Second,
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// startForwarder serves a Forwarder toward upstreams with rs and returns its base URL.
func startForwarder(t *testing.T, cfg Config, rs []rules.Rule) string {
	t.Helper()
	f, err := NewForwarder(&cfg, rs, quiet)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(f)
	t.Cleanup(func() { srv.Close(); f.Close() })
	return srv.URL
}

// defaultRules is the default chain as a Server builds it.
func defaultRules() []rules.Rule {
	return rules.Default(rules.Options{Self: rules.NewSelf("pp", []string{"http://pp.example:2379"}), Instance: "test"})
}

// counting is an upstream that counts its requests.
func counting(t *testing.T, h http.HandlerFunc) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var hits atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		h(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv, &hits
}

func get(t *testing.T, method, url string, body io.Reader) (*http.Response, []byte) {
	t.Helper()
	return getWith(t, client, method, url, body)
}

// getWith sends a request with c and returns the response with its body read.
func getWith(t *testing.T, c *http.Client, method, url string, body io.Reader) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, b
}

// etcdError checks status and an etcd-style {"message": ...} body, and returns the message.
func etcdError(t *testing.T, resp *http.Response, body []byte, status int) string {
	t.Helper()
	if resp.StatusCode != status {
		t.Errorf("status = %d, want %d (body %q)", resp.StatusCode, status, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q", ct)
	}
	var e struct{ Message string }
	if err := json.Unmarshal(body, &e); err != nil || e.Message == "" {
		t.Errorf("body %q is not {\"message\": ...}: %v", body, err)
	}
	return e.Message
}

// noLeak fails when addr (an upstream's host:port) is anywhere in the response.
func noLeak(t *testing.T, resp *http.Response, body []byte, addr string) {
	t.Helper()
	for k, vs := range resp.Header {
		for _, v := range vs {
			if strings.Contains(k, addr) || strings.Contains(v, addr) {
				t.Errorf("header %s: %s leaks the upstream %s", k, v, addr)
			}
		}
	}
	if strings.Contains(string(body), addr) {
		t.Errorf("body %q leaks the upstream %s", body, addr)
	}
}

// recorder is a rule that logs every call to a shared log, and optionally replies or claims the body.
type recorder struct {
	name  string
	log   *callLog
	reply bool // answer the request with 418
	claim bool // claim the body and append the rule's name to it
}

type callLog struct {
	mu    sync.Mutex
	calls []string
}

func (l *callLog) add(s string) { l.mu.Lock(); l.calls = append(l.calls, s); l.mu.Unlock() }
func (l *callLog) get() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.calls)
}

func (r *recorder) Name() string { return r.name }

func (r *recorder) Request(req *http.Request) (*http.Response, error) {
	r.log.add("request " + r.name)
	if r.reply {
		return rules.Reply(req, http.StatusTeapot, "answered by "+r.name), nil
	}
	return nil, nil
}

func (r *recorder) Response(*http.Response) (rules.BodyFunc, error) {
	r.log.add("response " + r.name)
	if !r.claim {
		return nil, nil
	}
	return func(b []byte) ([]byte, error) {
		r.log.add("body " + r.name)
		return append(b, r.name...), nil
	}, nil
}

func TestChainOrder(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		replyAt  int // index of the rule that replies; -1 for none
		wantLog  []string
		wantCode int
		wantBody string
		wantHits int64
	}{
		{
			name: "requests first to last, responses last to first", replyAt: -1,
			wantLog: []string{"request a", "request b", "request c",
				"response c", "body c", "response b", "body b", "response a", "body a"},
			wantCode: http.StatusOK, wantBody: "upstream:cba", wantHits: 1,
		},
		{
			name: "a reply skips the rest and the upstream", replyAt: 1,
			wantLog:  []string{"request a", "request b", "response a", "body a"},
			wantCode: http.StatusTeapot, wantHits: 0,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			up, hits := counting(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "upstream:") })
			log := &callLog{}
			var rs []rules.Rule
			for i, n := range []string{"a", "b", "c"} {
				rs = append(rs, &recorder{name: n, log: log, reply: i == tt.replyAt, claim: true})
			}
			base := startForwarder(t, Config{Upstreams: []string{up.URL}}, rs)
			resp, body := get(t, http.MethodGet, base+"/v2/keys/x", nil)
			if resp.StatusCode != tt.wantCode {
				t.Errorf("status = %d, want %d", resp.StatusCode, tt.wantCode)
			}
			if tt.wantBody != "" && string(body) != tt.wantBody {
				t.Errorf("body = %q, want %q", body, tt.wantBody)
			}
			if got := log.get(); !slices.Equal(got, tt.wantLog) {
				t.Errorf("calls = %q\nwant    %q", got, tt.wantLog)
			}
			if got := hits.Load(); got != tt.wantHits {
				t.Errorf("upstream hits = %d, want %d", got, tt.wantHits)
			}
		})
	}
}

// rewriter claims every body and replaces it.
type rewriter struct {
	rules.Passthrough
	to  string
	err error
}

func (*rewriter) Name() string { return "rewriter" }

func (r *rewriter) Response(*http.Response) (rules.BodyFunc, error) {
	return func([]byte) ([]byte, error) { return []byte(r.to), r.err }, nil
}

func TestContentLengthFixed(t *testing.T) {
	t.Parallel()
	const newBody = "a body longer than the upstream's"
	for _, chunked := range []bool{false, true} {
		t.Run(fmt.Sprintf("chunked=%v", chunked), func(t *testing.T) {
			t.Parallel()
			up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
				if chunked {
					w.(http.Flusher).Flush()
				} else {
					w.Header().Set("Content-Length", "5")
				}
				io.WriteString(w, "short")
			})
			base := startForwarder(t, Config{Upstreams: []string{up.URL}}, []rules.Rule{&rewriter{to: newBody}})
			resp, body := get(t, http.MethodGet, base+"/v2/keys/x", nil)
			if string(body) != newBody {
				t.Errorf("body = %q, want %q", body, newBody)
			}
			if resp.ContentLength != int64(len(newBody)) {
				t.Errorf("Content-Length = %d, want %d", resp.ContentLength, len(newBody))
			}
		})
	}
}

func TestClaimedBodyTooLarge(t *testing.T) {
	t.Parallel()
	for _, chunked := range []bool{false, true} {
		t.Run(fmt.Sprintf("chunked=%v", chunked), func(t *testing.T) {
			t.Parallel()
			up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
				if chunked {
					w.(http.Flusher).Flush()
				}
				w.Write([]byte(strings.Repeat("x", 100)))
			})
			base := startForwarder(t, Config{Upstreams: []string{up.URL}, MaxRuleBody: 16}, []rules.Rule{&rewriter{to: "small"}})
			resp, body := get(t, http.MethodGet, base+"/v2/keys/x", nil)
			if msg := etcdError(t, resp, body, http.StatusBadGateway); !strings.Contains(msg, "too large") {
				t.Errorf("message = %q", msg)
			}
			noLeak(t, resp, body, up.Listener.Addr().String())
		})
	}
}

func TestRuleError(t *testing.T) {
	t.Parallel()
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "x") })
	base := startForwarder(t, Config{Upstreams: []string{up.URL}},
		[]rules.Rule{&rewriter{err: fmt.Errorf("bad answer from %s", up.Listener.Addr())}})
	resp, body := get(t, http.MethodGet, base+"/v2/keys/x", nil)
	if msg := etcdError(t, resp, body, http.StatusBadGateway); !strings.Contains(msg, "rewriter") {
		t.Errorf("message = %q does not name the rule", msg)
	}
	noLeak(t, resp, body, up.Listener.Addr().String())
}

// TestStreamedResponseNotBuffered: a response of unknown length that no rule claims reaches the client while the
// upstream is still writing it.
func TestStreamedResponseNotBuffered(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "second\n")
	})
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	resp, err := client.Get(base + "/v2/keys/dir?recursive=true&stream=true")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.ContentLength != -1 {
		t.Fatalf("Content-Length = %d, want unknown", resp.ContentLength)
	}
	br := bufio.NewReader(resp.Body)
	line := make(chan string, 1)
	go func() { s, _ := br.ReadString('\n'); line <- s }()
	select {
	case s := <-line:
		if s != "first\n" {
			t.Fatalf("first chunk = %q", s)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the first chunk did not arrive while the upstream was still writing")
	}
	close(release)
	rest, err := io.ReadAll(br)
	if err != nil || string(rest) != "second\n" {
		t.Errorf("rest = %q, %v", rest, err)
	}
}

// TestWatchHeadersFlushed: a v2 long poll gets its headers before the upstream has an event to send.
func TestWatchHeadersFlushed(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Etcd-Index", "7")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush() // as etcd does for ?wait=true
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, `{"action":"set"}`+"\n")
	})
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	t.Cleanup(func() {
		select {
		case <-release:
		default:
			close(release)
		}
	})
	type result struct {
		resp *http.Response
		err  error
	}
	got := make(chan result, 1)
	go func() {
		resp, err := client.Get(base + "/v2/keys/foo?wait=true")
		got <- result{resp, err}
	}()
	select {
	case r := <-got:
		if r.err != nil {
			t.Fatal(r.err)
		}
		defer r.resp.Body.Close()
		if r.resp.StatusCode != http.StatusOK || r.resp.Header.Get("X-Etcd-Index") != "7" {
			t.Errorf("headers = %d %q", r.resp.StatusCode, r.resp.Header)
		}
		close(release)
		body, err := io.ReadAll(r.resp.Body)
		if err != nil || !strings.Contains(string(body), `"set"`) {
			t.Errorf("body = %q, %v", body, err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no response headers while the watch waits")
	}
}

func TestXForwardedForAppended(t *testing.T) {
	t.Parallel()
	got := make(chan []string, 1)
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) { got <- r.Header.Values("X-Forwarded-For") })
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	req, _ := http.NewRequest(http.MethodGet, base+"/v2/keys/x", nil)
	req.Header.Set("X-Forwarded-For", "192.0.2.1, 198.51.100.2")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if xff := <-got; !slices.Equal(xff, []string{"192.0.2.1, 198.51.100.2, 127.0.0.1"}) {
		t.Errorf("X-Forwarded-For = %q, want the client's list with our peer appended", xff)
	}
}

func TestLocationRewritten(t *testing.T) {
	t.Parallel()
	var upURL string
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
		// As http.Redirect does: the absolute URL in the header and again in an HTML body.
		http.Redirect(w, r, upURL+"/v2/keys/moved?wait=true", http.StatusTemporaryRedirect)
	})
	upURL = up.URL
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	resp, body := get(t, http.MethodGet, base+"/v2/keys/x", nil)
	if resp.StatusCode != http.StatusTemporaryRedirect {
		t.Fatalf("status = %d", resp.StatusCode)
	}
	// Relative: the client resolves it against the proxy's URL, whichever hop below named itself.
	if loc := resp.Header.Get("Location"); loc != "/v2/keys/moved?wait=true" {
		t.Errorf("Location = %q, want %q", loc, "/v2/keys/moved?wait=true")
	}
	noLeak(t, resp, body, up.Listener.Addr().String())
}

// A redirect to a host that is not the direct upstream (a member behind a stock proxy) must not leak either.
func TestLocationOfDeeperHop(t *testing.T) {
	t.Parallel()
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "https://member-2.internal:2379/v2/keys/x", http.StatusFound)
	})
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	resp, body := get(t, http.MethodGet, base+"/v2/keys/x", nil)
	if loc := resp.Header.Get("Location"); loc != "/v2/keys/x" {
		t.Errorf("Location = %q, want /v2/keys/x", loc)
	}
	noLeak(t, resp, body, "member-2.internal")
}

func TestMembershipNeverReachesUpstream(t *testing.T) {
	t.Parallel()
	up, hits := counting(t, func(w http.ResponseWriter, r *http.Request) {})
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	tests := []struct {
		method, path string
		status       int
	}{
		{http.MethodPost, "/v2/members", http.StatusForbidden},
		{http.MethodPut, "/v2/members/8e9e05c52164694d", http.StatusForbidden},
		{http.MethodDelete, "/v2/members/8e9e05c52164694d", http.StatusForbidden},
		{http.MethodGet, "/debug/vars", http.StatusNotFound},
		{http.MethodGet, "/v2/config/local/proxy", http.StatusNotFound},
	}
	for _, tt := range tests {
		resp, body := get(t, tt.method, base+tt.path, strings.NewReader(`{"peerURLs":["http://10.0.0.9:2380"]}`))
		etcdError(t, resp, body, tt.status)
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the upstream saw %d requests, want 0", n)
	}
}

func TestMembersAnsweredWithSelf(t *testing.T) {
	t.Parallel()
	var addr string
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Etcd-Cluster-Id", "cdf818194e3a8c32")
		fmt.Fprintf(w, `{"members":[{"id":"8e9e05c52164694d","name":"m1","peerURLs":["http://%s"],"clientURLs":["http://%s"]}]}`, addr, addr)
	})
	addr = up.Listener.Addr().String()
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	resp, body := get(t, http.MethodGet, base+"/v2/members", nil)
	self := rules.NewSelf("pp", []string{"http://pp.example:2379"})
	want := `{"members":[{"id":"` + self.IDString() + `","name":"pp","peerURLs":[],"clientURLs":["http://pp.example:2379"]}]}` + "\n"
	if string(body) != want {
		t.Errorf("body = %s, want %s", body, want)
	}
	if resp.Header.Get("X-Etcd-Cluster-Id") != "cdf818194e3a8c32" || resp.ContentLength != int64(len(want)) {
		t.Errorf("headers = %q", resp.Header)
	}
	noLeak(t, resp, body, addr)
}

func TestFailover(t *testing.T) {
	t.Parallel()
	down := deadAddr(t)
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	base := startForwarder(t, Config{Upstreams: []string{"http://" + down, up.URL}}, defaultRules())
	resp, body := get(t, http.MethodGet, base+"/v2/keys/x", nil)
	if resp.StatusCode != http.StatusOK || string(body) != "ok" {
		t.Errorf("GET = %d %q, want the second upstream's answer", resp.StatusCode, body)
	}
	// A write goes to the next upstream too when the first could not even be dialled: nothing of it was read,
	// so it arrives whole, once.
	var got []string
	var mu sync.Mutex
	up2, hits := counting(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		got = append(got, string(b))
		mu.Unlock()
		io.WriteString(w, "ok")
	})
	base2 := startForwarder(t, Config{Upstreams: []string{"http://" + down, up2.URL}}, defaultRules())
	resp, body = get(t, http.MethodPut, base2+"/v2/keys/x", strings.NewReader("value=1"))
	if resp.StatusCode != http.StatusOK || hits.Load() != 1 || len(got) != 1 || got[0] != "value=1" {
		t.Errorf("PUT = %d %q; the second upstream saw %d requests with bodies %q, want 1 with value=1", resp.StatusCode, body, hits.Load(), got)
	}
	// Every upstream down: a clean 503 without an address.
	base3 := startForwarder(t, Config{Upstreams: []string{"http://" + down, "http://" + deadAddr(t)}}, defaultRules())
	resp, body = get(t, http.MethodPut, base3+"/v2/keys/x", strings.NewReader("value=1"))
	etcdError(t, resp, body, http.StatusServiceUnavailable)
	noLeak(t, resp, body, down)
}

// deadAddr is a local address nobody listens on.
func deadAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// halfAnswer is an upstream that reads a request and hangs up in the middle of the response headers.
func halfAnswer(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
					return
				}
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: appli")
			}()
		}
	}()
	return l.Addr().String()
}

// writeCA writes a CA certificate that signed nothing the test servers use.
func writeCA(t *testing.T) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "unrelated CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return writePEM(t, der)
}

func writePEM(t *testing.T, der []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestErrorMapping(t *testing.T) {
	t.Parallel()
	tlsUp := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "tls ok") }))
	tlsUp.Config.ErrorLog = log.New(io.Discard, "", 0) // the failed handshakes are the point
	tlsUp.StartTLS()
	t.Cleanup(tlsUp.Close)
	tlsAddr := tlsUp.Listener.Addr().String()

	tests := []struct {
		name     string
		upstream string
		tls      TLSInfo
		status   int
		message  string
	}{
		{name: "upstream down", upstream: "http://" + deadAddr(t), status: http.StatusServiceUnavailable,
			message: "no upstream endpoint available"},
		{name: "connection closed in the headers", upstream: "http://" + halfAnswer(t), status: http.StatusBadGateway,
			message: "unable to get a response"},
		{name: "TLS with the wrong CA", upstream: "https://" + tlsAddr, tls: TLSInfo{CAFile: writeCA(t)},
			status: http.StatusBadGateway, message: "TLS"},
		{name: "TLS with the system roots", upstream: "https://" + tlsAddr, status: http.StatusBadGateway, message: "TLS"},
		{name: "plain HTTP to a TLS upstream", upstream: "http://" + tlsAddr, status: http.StatusBadRequest},
		{name: "TLS with the right CA", upstream: "https://" + tlsAddr, tls: TLSInfo{CAFile: writePEM(t, tlsUp.Certificate().Raw)},
			status: http.StatusOK},
		{name: "TLS with -k", upstream: "https://" + tlsAddr, tls: TLSInfo{InsecureSkipVerify: true}, status: http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			base := startForwarder(t, Config{Upstreams: []string{tt.upstream}, UpstreamTLS: tt.tls}, defaultRules())
			start := time.Now()
			resp, body := get(t, http.MethodGet, base+"/v2/keys/x?quorum=true", nil)
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("took %v", d)
			}
			if tt.message != "" {
				if msg := etcdError(t, resp, body, tt.status); !strings.Contains(msg, tt.message) {
					t.Errorf("message = %q, want %q in it", msg, tt.message)
				}
			} else if resp.StatusCode != tt.status {
				t.Errorf("status = %d, want %d", resp.StatusCode, tt.status)
			}
			u, _ := url.Parse(tt.upstream)
			noLeak(t, resp, body, u.Host)
		})
	}
}

func TestServerLoop(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	self := "http://" + l.Addr().String()
	srv, err := New(Config{Upstreams: []string{self}, ListenClientURLs: []string{self}, AdvertiseClientURLs: []string{self}},
		WithLogger(quiet), WithListener(self, l))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	start := time.Now()
	resp, body := get(t, http.MethodGet, srv.URLs()[0]+"/v2/keys/x", nil)
	if msg := etcdError(t, resp, body, http.StatusLoopDetected); !strings.Contains(msg, "loop") {
		t.Errorf("message = %q", msg)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("loop detected after %v", d)
	}
}

// Two proxy-proxies that are each other's upstream: the request comes back to the first, which answers 508;
// for v2 over HTTP/1.1 and for gRPC alike.
func TestServerLoopThroughAnother(t *testing.T) {
	t.Parallel()
	var urls [2]string
	var ls [2]net.Listener
	for i := range ls {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls[i], urls[i] = l, "http://"+l.Addr().String()
	}
	for i := range ls {
		srv, err := New(Config{Upstreams: []string{urls[1-i]}, ListenClientURLs: []string{urls[i]}, AdvertiseClientURLs: []string{urls[i]}},
			WithLogger(quiet), WithListener(urls[i], ls[i]))
		if err != nil {
			t.Fatal(err)
		}
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { srv.Close() })
	}
	start := time.Now()
	resp, body := get(t, http.MethodGet, urls[0]+"/v2/keys/x", nil)
	if msg := etcdError(t, resp, body, http.StatusLoopDetected); !strings.Contains(msg, "loop") {
		t.Errorf("message = %q", msg)
	}
	// gRPC: a trailers-only status, over h2c.
	gresp := grpcCall(t, urls[0]+"/etcdserverpb.KV/Range", rawFrame(nil))
	_, _ = io.Copy(io.Discard, gresp.Body)
	gresp.Body.Close()
	status := grpcStatus(gresp)
	if status != "9" || !strings.Contains(gresp.Header.Get("Grpc-Message")+gresp.Trailer.Get("Grpc-Message"), "loop") {
		t.Errorf("gRPC call in a loop: grpc-status %q, want 9 (FailedPrecondition) naming the loop", status)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("loops detected after %v", d)
	}
}

// grpcUpstream is an h2c upstream that answers every unary gRPC call with the message answer returns.
func grpcUpstream(t *testing.T, answer func(method string) []byte) (string, *atomic.Int64) {
	t.Helper()
	var hits atomic.Int64
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(answer(r.URL.Path))
		w.Header().Set("Grpc-Status", "0")
	})
	return up, &hits
}

func grpcFrame(t *testing.T, m interface{ Marshal() ([]byte, error) }) []byte {
	t.Helper()
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return rawFrame(b)
}

// TestGatewayMembers: the v3 JSON gateway, served by the proxy over its own gRPC path, answers the member list
// with ourselves and rejects member changes before they reach the upstream.
func TestGatewayMembers(t *testing.T) {
	t.Parallel()
	var addr string
	up, hits := grpcUpstream(t, func(method string) []byte {
		if method != "/etcdserverpb.Cluster/MemberList" {
			t.Errorf("upstream called with %s", method)
		}
		return grpcFrame(t, &pb.MemberListResponse{
			Header: &pb.ResponseHeader{ClusterId: 0xcdf818194e3a8c32, MemberId: 0x8e9e05c52164694d, RaftTerm: 2},
			Members: []*pb.Member{{ID: 0x8e9e05c52164694d, Name: "m1",
				PeerURLs: []string{"http://" + addr}, ClientURLs: []string{"http://" + addr}}},
		})
	})
	addr = strings.TrimPrefix(up, "http://")
	base := startForwarder(t, Config{Upstreams: []string{up}}, defaultRules())
	self := rules.NewSelf("pp", []string{"http://pp.example:2379"})

	for _, prefix := range []string{"/v3", "/v3beta"} {
		resp, body := get(t, http.MethodPost, base+prefix+"/cluster/member/list", strings.NewReader("{}"))
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("%s: status = %d, body %s", prefix, resp.StatusCode, body)
		}
		var got struct {
			Header  map[string]string `json:"header"`
			Members []struct {
				ID         string   `json:"ID"`
				Name       string   `json:"name"`
				PeerURLs   []string `json:"peerURLs"`
				ClientURLs []string `json:"clientURLs"`
			} `json:"members"`
		}
		if err := json.Unmarshal(body, &got); err != nil {
			t.Fatalf("%s: %s: %v", prefix, body, err)
		}
		id := fmt.Sprint(self.ID)
		if len(got.Members) != 1 || got.Members[0].ID != id || got.Members[0].Name != "pp" ||
			len(got.Members[0].PeerURLs) != 0 || !slices.Equal(got.Members[0].ClientURLs, self.ClientURLs) ||
			got.Header["member_id"] != id || got.Header["cluster_id"] != fmt.Sprint(uint64(0xcdf818194e3a8c32)) {
			t.Errorf("%s: body = %s, want only us", prefix, body)
		}
		noLeak(t, resp, body, addr)
	}
	before := hits.Load()
	resp, body := get(t, http.MethodPost, base+"/v3/cluster/member/add", strings.NewReader(`{"peerURLs":["http://10.0.0.9:2380"]}`))
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(string(body), "--forward-member-changes") {
		t.Errorf("member add = %d %s, want 403 naming the flag", resp.StatusCode, body)
	}
	if hits.Load() != before {
		t.Error("a rejected member add reached the upstream")
	}
}
