package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
	"google.golang.org/grpc/codes"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
)

// startProxy starts a Server on a free loopback port with cfg (probe off unless cfg sets it) and returns it
// with its URL.
func startProxy(t *testing.T, cfg Config) (*Server, string) {
	t.Helper()
	cfg.ListenClientURLs = []string{"http://127.0.0.1:0"}
	cfg.AdvertiseClientURLs = []string{"http://pp.example:2379"}
	if cfg.UpstreamHealthInterval == 0 {
		cfg.UpstreamHealthInterval = -1
	}
	srv, err := New(cfg, WithLogger(quiet))
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	return srv, srv.URLs()[0]
}

// named is an upstream that answers every request with its name.
func named(t *testing.T, name string) string {
	t.Helper()
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, name) })
	return up.URL
}

// newConn is a client with its own connection to the proxy.
func newConn() *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{MaxConnsPerHost: 1}}
}

func answer(t *testing.T, c *http.Client, method, url string, body io.Reader) (int, string) {
	t.Helper()
	resp, b := getWith(t, c, method, url, body)
	return resp.StatusCode, string(b)
}

// Each client connection stays on one upstream; connections are spread over all of them.
func TestConnectionAffinity(t *testing.T) {
	t.Parallel()
	_, u := startProxy(t, Config{Upstreams: []string{named(t, "a"), named(t, "b"), named(t, "c")}})
	seen := map[string]int{}
	for range 6 {
		c := newConn()
		_, first := answer(t, c, http.MethodGet, u+"/v2/keys/x", nil)
		for range 5 {
			if _, got := answer(t, c, http.MethodGet, u+"/v2/keys/x", nil); got != first {
				t.Fatalf("one connection was answered by %q, then by %q", first, got)
			}
		}
		seen[first]++
		c.CloseIdleConnections()
	}
	if len(seen) != 3 {
		t.Errorf("6 connections went to %v, want all 3 upstreams used", seen)
	}
}

// A connection whose upstream dies moves to another, body intact, and stays there; the dead one gets no new
// connection during the failure wait.
func TestFailoverRepins(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dying := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "dying") })}
	go dying.Serve(l)
	var bodies atomic.Int64
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
		if b, _ := io.ReadAll(r.Body); string(b) == "value=1" {
			bodies.Add(1)
		}
		io.WriteString(w, "alive")
	})
	_, u := startProxy(t, Config{Upstreams: []string{"http://" + l.Addr().String(), up.URL}, FailureWait: time.Hour})
	// Find a connection pinned to the dying upstream.
	var c *http.Client
	for range 10 {
		c = newConn()
		if _, got := answer(t, c, http.MethodGet, u+"/v2/keys/x", nil); got == "dying" {
			break
		}
	}
	_ = dying.Close()
	if code, got := answer(t, c, http.MethodPut, u+"/v2/keys/x", strings.NewReader("value=1")); code != http.StatusOK || got != "alive" {
		t.Errorf("PUT after the upstream died = %d %q, want the other upstream's answer", code, got)
	}
	if bodies.Load() != 1 {
		t.Errorf("the other upstream got %d whole bodies, want 1", bodies.Load())
	}
	for range 3 {
		if _, got := answer(t, newConn(), http.MethodGet, u+"/v2/keys/x", nil); got != "alive" {
			t.Errorf("a new connection went to %q during the failure wait", got)
		}
	}
}

// A read that reached an upstream which failed to answer is sent to the next one; a write is not.
func TestRetryOnlyReads(t *testing.T) {
	t.Parallel()
	var writes atomic.Int64
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			writes.Add(1)
		}
		io.WriteString(w, "ok")
	})
	_, u := startProxy(t, Config{Upstreams: []string{"http://" + halfAnswer(t), up.URL}})
	for range 4 { // whichever upstream the connection starts at
		if code, got := answer(t, newConn(), http.MethodGet, u+"/v2/keys/x", nil); code != http.StatusOK || got != "ok" {
			t.Errorf("GET = %d %q, want the second upstream's answer", code, got)
		}
	}
	failed := 0
	for range 4 {
		code, _ := answer(t, newConn(), http.MethodPut, u+"/v2/keys/x", strings.NewReader("value=1"))
		if code == http.StatusBadGateway {
			failed++
		}
	}
	// Connections alternate between the two: the ones that started at the broken upstream failed, the others
	// went to the good one, and none was sent twice.
	if failed == 0 || writes.Load() != int64(4-failed) {
		t.Errorf("%d of 4 PUTs failed and the good upstream saw %d: want some failed and the rest seen once", failed, writes.Load())
	}
	// A long poll (wait=1 is one, as etcd reads it) is the client's to restart: not retried either.
	failed = 0
	for range 4 {
		if code, _ := answer(t, newConn(), http.MethodGet, u+"/v2/keys/x?wait=1", nil); code == http.StatusBadGateway {
			failed++
		}
	}
	if failed == 0 {
		t.Error("no long poll failed: those that started at the broken upstream were sent again")
	}
}

// The body of a write survives a failed dial or TLS handshake on every transport: HTTP/1.1 over TLS (whose
// transport closes a body when the dial fails) and gRPC over h2c.
func TestFailoverKeepsBodyTLSAndGRPC(t *testing.T) {
	t.Parallel()
	var whole atomic.Int64
	good := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if b, _ := io.ReadAll(r.Body); string(b) == "value=1" {
			whole.Add(1)
		}
	}))
	t.Cleanup(good.Close)
	// Not TLS at all: the handshake fails, and nothing of a request was sent.
	plain, plainHits := counting(t, func(w http.ResponseWriter, r *http.Request) {})
	_, u := startProxy(t, Config{
		Upstreams:   []string{"https://" + deadAddr(t), "https://" + strings.TrimPrefix(plain.URL, "http://"), good.URL},
		UpstreamTLS: TLSInfo{InsecureSkipVerify: true}, // no files: the handshakes are still the proxy's own
		FailureWait: -1,                                // every connection starts where round-robin puts it
	})
	for range 6 {
		if code, body := answer(t, newConn(), http.MethodPut, u+"/v2/keys/x", strings.NewReader("value=1")); code != http.StatusOK {
			t.Errorf("PUT = %d %s, want the TLS upstream's answer", code, body)
		}
	}
	if whole.Load() != 6 || plainHits.Load() != 0 {
		t.Errorf("the TLS upstream read %d whole bodies, want 6; the non-TLS one saw %d requests, want 0", whole.Load(), plainHits.Load())
	}

	var grpcWhole atomic.Int64
	want := rawFrame([]byte("put"))
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if b, _ := io.ReadAll(r.Body); bytes.Equal(b, want) {
			grpcWhole.Add(1)
		}
		grpcOK(w)
	})
	_, gu := startProxy(t, Config{Upstreams: []string{"http://" + deadAddr(t), up}, FailureWait: -1})
	for range 4 {
		resp := grpcCall(t, gu+"/etcdserverpb.KV/Put", want)
		_, _ = io.ReadAll(resp.Body)
		if got := grpcStatus(resp); got != "0" {
			t.Errorf("gRPC Put = status %q (%s), want 0", got, resp.Trailer.Get("Grpc-Message"))
		}
	}
	if grpcWhole.Load() != 4 {
		t.Errorf("the gRPC upstream read %d whole requests, want 4", grpcWhole.Load())
	}
}

// A v3 Range that reached an upstream which broke the stream goes to the next; a Put never goes to two.
func TestRangeRetried(t *testing.T) {
	t.Parallel()
	var brokenPuts, goodPuts atomic.Int64
	broken := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		if strings.HasSuffix(r.URL.Path, "/Put") {
			brokenPuts.Add(1)
		}
		panic(http.ErrAbortHandler) // RST_STREAM: the call reached it and got no answer
	})
	good := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		if strings.HasSuffix(r.URL.Path, "/Put") {
			goodPuts.Add(1)
		}
		grpcOK(w)
	})
	_, u := startProxy(t, Config{Upstreams: []string{broken, good}})
	for range 4 {
		resp := grpcCall(t, u+grpcRange, rawFrame([]byte("range")))
		_, _ = io.ReadAll(resp.Body)
		if got := grpcStatus(resp); got != "0" {
			t.Errorf("Range = status %q, want 0 from the second upstream", got)
		}
	}
	ok := 0
	for range 4 {
		resp := grpcCall(t, u+"/etcdserverpb.KV/Put", rawFrame([]byte("put")))
		_, _ = io.ReadAll(resp.Body)
		if grpcStatus(resp) == "0" {
			ok++
		}
	}
	if brokenPuts.Load()+goodPuts.Load() != 4 || goodPuts.Load() != int64(ok) || ok == 4 {
		t.Errorf("Puts: %d answered, %d seen by the broken upstream, %d by the good one: want each seen once, and those on the broken one failed",
			ok, brokenPuts.Load(), goodPuts.Load())
	}
}

// An endpoint marked failed comes back as soon as a probe finds it healthy, before the failure wait ends.
func TestProbeBringsEndpointBack(t *testing.T) {
	t.Parallel()
	srv, _ := startProxy(t, Config{Upstreams: []string{named(t, "a"), named(t, "b")}, FailureWait: time.Hour})
	eps := srv.forwarder.endpoints.current()
	srv.forwarder.endpoints.failed(eps[0])
	if eps[0].available(time.Now().UnixNano()) {
		t.Fatal("an endpoint just marked failed is available")
	}
	p := newProber(srv.forwarder, HealthCheckHTTP, time.Hour, srv.ops.m)
	p.round(context.Background())
	if !eps[0].available(time.Now().UnixNano()) {
		t.Error("a probe that passed did not bring the endpoint back")
	}
}

// A gRPC stream whose client sends a message over the limit and gRPC's overhead (as etcd's server reads) ends
// with ResourceExhausted.
func TestStreamMessageTooLarge(t *testing.T) {
	t.Parallel()
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", rules.GRPCContentType)
		w.Write(rawFrame([]byte("created")))
		w.(http.Flusher).Flush()
		_, _ = io.Copy(io.Discard, r.Body)
	})
	_, u := startProxy(t, Config{Upstreams: []string{up}, MaxRequestBytes: 1000})
	pr, pw := io.Pipe()
	go pw.Write(rawFrame([]byte("create")))
	resp := grpcStream(t, u+"/etcdserverpb.Lease/LeaseKeepAlive", pr)
	defer resp.Body.Close()
	first := make([]byte, len(rawFrame([]byte("created"))))
	if _, err := io.ReadFull(resp.Body, first); err != nil {
		t.Fatal(err)
	}
	go pw.Write(rawFrame(make([]byte, 1000+grpcOverheadBytes+1)))
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Errorf("the stream broke off (%v), want a clean end", err)
	}
	if got := grpcStatus(resp); got != fmt.Sprint(rules.CodeResourceExhausted) {
		t.Errorf("grpc-status = %q (%s), want %d", got, resp.Trailer.Get("Grpc-Message"), rules.CodeResourceExhausted)
	}
	pw.Close()
}

// --proxy-read-timeout: an upstream that does not answer in time gets 504.
func TestReadTimeout(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) { <-release })
	t.Cleanup(func() { close(release) }) // before up.Close, which waits for the handler
	_, u := startProxy(t, Config{Upstreams: []string{up.URL}, ReadTimeout: 100 * time.Millisecond})
	resp, body := get(t, http.MethodPut, u+"/v2/keys/x", strings.NewReader("value=1"))
	etcdError(t, resp, body, http.StatusGatewayTimeout)
	noLeak(t, resp, body, strings.TrimPrefix(up.URL, "http://"))

	// Not gRPC: a Lock answers when it has the lock, and its client's deadline is what bounds it.
	slow := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(300 * time.Millisecond) // the lock is held by someone else for a while
		grpcOK(w)
	})
	_, gu := startProxy(t, Config{Upstreams: []string{slow}, ReadTimeout: 100 * time.Millisecond})
	lock := grpcCall(t, gu+"/v3lockpb.Lock/Lock", rawFrame([]byte("name")))
	_, _ = io.ReadAll(lock.Body)
	if got := grpcStatus(lock); got != "0" {
		t.Errorf("a Lock answered after 300 ms through a proxy with a 100 ms read timeout: status %q, want 0", got)
	}
}

// --max-request-bytes: a body that says it is too large never reaches the upstream; one that turns out too
// large is cut off before the upstream has it whole.
func TestMaxRequestBytes(t *testing.T) {
	t.Parallel()
	var whole atomic.Int64
	up, hits := counting(t, func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err == nil {
			whole.Add(1)
		}
	})
	_, u := startProxy(t, Config{Upstreams: []string{up.URL}, MaxRequestBytes: 1000})
	resp, body := get(t, http.MethodPut, u+"/v2/keys/x", strings.NewReader("value="+strings.Repeat("x", 1000)))
	etcdError(t, resp, body, http.StatusRequestEntityTooLarge)
	if hits.Load() != 0 {
		t.Errorf("the upstream saw %d requests with a Content-Length over the limit", hits.Load())
	}
	chunked := io.MultiReader(strings.NewReader("value="), bytes.NewReader(make([]byte, 5000)))
	resp, body = get(t, http.MethodPut, u+"/v2/keys/x", io.NopCloser(chunked)) // no length: chunked
	etcdError(t, resp, body, http.StatusRequestEntityTooLarge)
	if whole.Load() != 0 {
		t.Errorf("the upstream read %d whole bodies over the limit", whole.Load())
	}
	if code, _ := answer(t, client, http.MethodPut, u+"/v2/keys/x", strings.NewReader("value=1")); code != http.StatusOK {
		t.Errorf("a small PUT = %d", code)
	}
}

// A write's gRPC message over the limit is answered as etcd answers it (InvalidArgument "etcdserver: request is
// too large"), one past the limit and gRPC's overhead ResourceExhausted; the upstream never gets either. A read's
// message is bounded by the gRPC limit alone, as by etcd.
func TestMaxRequestBytesGRPC(t *testing.T) {
	t.Parallel()
	var whole atomic.Int64
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(r.Body); err == nil {
			whole.Add(1)
		}
		grpcOK(w)
	})
	_, u := startProxy(t, Config{Upstreams: []string{up}, MaxRequestBytes: 1000})
	for _, c := range []struct {
		method string
		size   int
		status string
		msg    string
	}{
		{"/etcdserverpb.KV/Put", 1001, fmt.Sprint(int(codes.InvalidArgument)), "etcdserver: request is too large"},
		{"/etcdserverpb.KV/Put", 1000 + grpcOverheadBytes + 1, fmt.Sprint(rules.CodeResourceExhausted), "grpc: received message larger than max"},
		{"/etcdserverpb.KV/Range", 1000 + grpcOverheadBytes + 1, fmt.Sprint(rules.CodeResourceExhausted), "grpc: received message larger than max"},
	} {
		resp := grpcCall(t, u+c.method, rawFrame(make([]byte, c.size)))
		_, _ = io.ReadAll(resp.Body)
		msg, _ := url.PathUnescape(resp.Trailer.Get("Grpc-Message") + resp.Header.Get("Grpc-Message"))
		if got := grpcStatus(resp); got != c.status || !strings.HasPrefix(msg, c.msg) {
			t.Errorf("%s of %d bytes: grpc-status %q %q, want %s %q", c.method, c.size, got, msg, c.status, c.msg)
		}
	}
	if whole.Load() != 0 {
		t.Errorf("the upstream read %d whole requests over the limit", whole.Load())
	}
	for _, c := range []struct {
		method string
		size   int
	}{{"/etcdserverpb.KV/Put", 1000}, {"/etcdserverpb.KV/Range", 1001}} {
		resp := grpcCall(t, u+c.method, rawFrame(make([]byte, c.size)))
		_, _ = io.ReadAll(resp.Body)
		if got := grpcStatus(resp); got != "0" {
			t.Errorf("%s of %d bytes: grpc-status %q, want 0", c.method, c.size, got)
		}
	}
}

// --max-header-bytes and --listen-read-header-timeout bound what a client can make the proxy hold.
func TestListenerBounds(t *testing.T) {
	t.Parallel()
	_, u := startProxy(t, Config{Upstreams: []string{named(t, "a")}, MaxHeaderBytes: 4096, ReadHeaderTimeout: 200 * time.Millisecond})
	req, _ := http.NewRequest(http.MethodGet, u+"/v2/keys/x", nil)
	req.Header.Set("X-Big", strings.Repeat("x", 10000))
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
		t.Errorf("a 10 KB header = %d, want 431", resp.StatusCode)
	}
	// A client that starts a request and never finishes its header is disconnected.
	c, err := net.Dial("tcp", strings.TrimPrefix(u, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /v2/keys/x HTTP/1.1\r\nHost: x\r\n")
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	start := time.Now()
	_, err = bufio.NewReader(c).ReadString('\n')
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("a slow client's connection still open after %v", time.Since(start))
	}
}

// Graceful shutdown: unary requests in flight finish, open streams end at once and cleanly.
func TestGracefulShutdown(t *testing.T) {
	t.Parallel()
	slowStarted, lockStarted := make(chan struct{}, 1), make(chan struct{}, 1)
	release := make(chan struct{})
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/slow":
			slowStarted <- struct{}{}
			<-release
			io.WriteString(w, "done")
		case r.URL.Path == "/v3lockpb.Lock/Lock": // a lock someone else holds
			lockStarted <- struct{}{}
			<-r.Context().Done()
		case rules.IsGRPC(r): // a watch: one message, then nothing until the client goes
			w.Header().Set("Content-Type", rules.GRPCContentType)
			w.Write(rawFrame([]byte("event")))
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		case r.URL.Query().Get("stream") == "true": // a v2 stream watch: one event, then waits
			io.WriteString(w, `{"action":"set"}`)
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		default: // a v2 long poll with nothing to say yet
			<-r.Context().Done()
		}
	})
	srv, u := startProxy(t, Config{Upstreams: []string{up}})

	slow := make(chan string, 1)
	go func() {
		_, got := answer(t, newConn(), http.MethodGet, u+"/slow", nil)
		slow <- got
	}()
	<-slowStarted
	longPoll := make(chan string, 1)
	go func() {
		code, got := answer(t, newConn(), http.MethodGet, u+"/v2/keys/x?wait=true", nil)
		longPoll <- fmt.Sprint(code, " ", got)
	}()
	lock := make(chan string, 1)
	go func() {
		resp := grpcCall(t, u+"/v3lockpb.Lock/Lock", rawFrame([]byte("name")))
		_, _ = io.ReadAll(resp.Body)
		lock <- grpcStatus(resp)
	}()
	<-lockStarted
	stream, err := newConn().Get(u + "/v2/keys/x?wait=true&stream=true")
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Body.Close()
	watch := grpcCall(t, u+"/etcdserverpb.Lease/LeaseKeepAlive", rawFrame([]byte("create")))
	defer watch.Body.Close()
	first := make([]byte, len(rawFrame([]byte("event"))))
	if _, err := io.ReadFull(watch.Body, first); err != nil {
		t.Fatalf("watch: %v", err)
	}

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- srv.Shutdown(ctx)
	}()
	if rest, err := io.ReadAll(watch.Body); err != nil || len(rest) != 0 {
		t.Errorf("gRPC watch after shutdown: %q, %v; want a clean end", rest, err)
	}
	if got := grpcStatus(watch); got != "14" || !strings.Contains(watch.Trailer.Get("Grpc-Message"), "shutting down") {
		t.Errorf("gRPC watch ended with status %q %q, want 14 (Unavailable) shutting down", got, watch.Trailer.Get("Grpc-Message"))
	}
	if b, err := io.ReadAll(stream.Body); err != nil || string(b) != `{"action":"set"}` {
		t.Errorf("v2 stream watch: %q, %v; want its event and a clean end", b, err)
	}
	if got := <-longPoll; !strings.HasPrefix(got, "503 ") || !strings.Contains(got, "shutting down") {
		t.Errorf("v2 long poll = %s, want 503 shutting down", got)
	}
	if got := <-lock; got != "14" {
		t.Errorf("a waiting Lock ended with status %q, want 14 (Unavailable)", got)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned (%v) while a request was in flight", err)
	default:
	}
	close(release)
	if got := <-slow; got != "done" {
		t.Errorf("the request in flight was answered %q, want done", got)
	}
	if err := <-done; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
}

// h2cUpstream serves h with HTTP/1.1 and h2c, as an etcd member does.
func h2cUpstream(t *testing.T, h http.HandlerFunc) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h, Protocols: new(http.Protocols)}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return "http://" + l.Addr().String()
}

// grpcOK answers a unary gRPC call as a server does: one (empty) message, then status OK in the trailers.
func grpcOK(w http.ResponseWriter) {
	w.Header().Set("Content-Type", rules.GRPCContentType)
	w.Header().Set("Trailer", "Grpc-Status")
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(rawFrame(nil))
	w.Header().Set("Grpc-Status", "0")
}

// grpcFrameHeader is the length prefix of every gRPC message: a compressed flag and a 4-byte length.
const grpcFrameHeader = 5

const grpcRange = "/etcdserverpb.KV/Range"

func rawFrame(msg []byte) []byte {
	b := make([]byte, grpcFrameHeader, grpcFrameHeader+len(msg))
	binary.BigEndian.PutUint32(b[1:], uint32(len(msg)))
	return append(b, msg...)
}

// grpcCall sends one gRPC request over h2c and returns the response, its body unread.
func grpcCall(t *testing.T, url string, body []byte) *http.Response {
	t.Helper()
	return grpcStream(t, url, bytes.NewReader(body))
}

// grpcStream starts a gRPC call over h2c, on a connection of its own, whose request stream is body (a pipe keeps
// it open, as a watching client's is), and returns the response once its headers came, its body unread.
func grpcStream(t *testing.T, url string, body io.Reader) *http.Response {
	t.Helper()
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	t.Cleanup(tr.CloseIdleConnections)
	req, _ := http.NewRequest(http.MethodPost, url, body)
	req.Header.Set("Content-Type", rules.GRPCContentType)
	req.Header.Set("Te", "trailers")
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// grpcStatus is the status of a call read to its end: in the trailers, or in the headers of a trailers-only
// answer.
func grpcStatus(resp *http.Response) string {
	if s := resp.Trailer.Get("Grpc-Status"); s != "" {
		return s
	}
	return resp.Header.Get("Grpc-Status")
}

// A new endpoint list keeps what is known of the endpoints that stay and reports those that went (their pooled
// connections are closed).
func TestEndpointSetReplaced(t *testing.T) {
	t.Parallel()
	parse := func(raw ...string) (us []*url.URL) {
		for _, r := range raw {
			u, _ := url.Parse(r)
			us = append(us, u)
		}
		return us
	}
	s := newEndpointSet(parse("http://a:1", "http://b:1"), time.Hour)
	var gone []string
	s.removed = func(us []*url.URL) {
		for _, u := range us {
			gone = append(gone, u.Host)
		}
	}
	s.failed(s.current()[0])
	if !s.set(parse("http://c:1", "http://a:1")) {
		t.Fatal("a different list did not count as a change")
	}
	now := time.Now().UnixNano()
	if eps := s.current(); len(eps) != 2 || eps[1].url.Host != "a:1" || eps[1].available(now) || !eps[0].available(now) {
		t.Errorf("after the change: %v; want c (available), a (still failed)", eps)
	}
	if len(gone) != 1 || gone[0] != "b:1" {
		t.Errorf("removed = %v, want [b:1]", gone)
	}
	if s.set(parse("http://c:1", "http://a:1")) || s.set(nil) {
		t.Error("the same list, or an empty one, counted as a change")
	}
}

// A request body the client breaks (a chunk size that overflows) is the client's fault: 400, not an upstream
// failure, on the HTTP/1.1 path and through http.Transport alike.
func TestMalformedBody(t *testing.T) {
	t.Parallel()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.Copy(io.Discard, r.Body) })
	plain, tlsUp := httptest.NewServer(h), httptest.NewTLSServer(h)
	t.Cleanup(plain.Close)
	t.Cleanup(tlsUp.Close)
	for _, up := range []string{plain.URL, tlsUp.URL} {
		cfg := Config{Upstreams: []string{up}}
		cfg.UpstreamTLS.InsecureSkipVerify = true
		_, u := startProxy(t, cfg)
		c, err := net.Dial("tcp", strings.TrimPrefix(u, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "PUT /v2/keys/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"+
			"Content-Type: application/x-www-form-urlencoded\r\n\r\n6\r\nvalue=\r\nffffffffffffffffffff\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		if msg := etcdError(t, resp, body, http.StatusBadRequest); msg != msgMalformed {
			t.Errorf("upstream %s: message %q", up, msg)
		}
	}
}

// An upstream that ends a shared watch's stream with a status of its own other than Unavailable (a proxy below
// refusing the client, say) gives that status to the watch's clients at once; the fan-out does not take it for
// a lost member and try every endpoint until it gives up.
func TestWatchUpstreamStatusPassed(t *testing.T) {
	t.Parallel()
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", rules.GRPCContentType)
		w.Header().Set("Grpc-Status", "7")
		w.Header().Set("Grpc-Message", "etcdserver: permission denied")
		w.WriteHeader(http.StatusOK)
	})
	_, u := startProxy(t, Config{Upstreams: []string{up}})
	create, _ := (&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
		CreateRequest: &pb.WatchCreateRequest{Key: []byte("k")}}}).Marshal()
	pr, pw := io.Pipe()
	defer pw.Close()
	go pw.Write(rawFrame(create))
	began := time.Now()
	resp := grpcStream(t, u+"/etcdserverpb.Watch/Watch", pr)
	defer resp.Body.Close()
	_, _ = io.ReadAll(resp.Body)
	if got := grpcStatus(resp); got != "7" || time.Since(began) > 2*time.Second {
		t.Fatalf("grpc-status %q %q after %v, want 7 at once", got, resp.Trailer.Get("Grpc-Message"), time.Since(began))
	}
}

// A cancel reason from below that names an address reaches the client withheld, as a status message would; one
// etcd gives passes as it is.
func TestWatchCancelReasonScrubbed(t *testing.T) {
	t.Parallel()
	for reason, want := range map[string]string{
		"dial tcp 10.1.2.3:2379: connect: connection refused":                     rules.TransportFailure,
		"member m2 (10.1.2.3) says no":                                            rules.WithheldMessage(int(codes.Canceled)),
		"etcdserver: permission denied":                                           "etcdserver: permission denied",
		"rpc error: code = PermissionDenied desc = etcdserver: permission denied": "rpc error: code = PermissionDenied desc = etcdserver: permission denied",
		"rpc error: code = Unavailable desc = dial tcp 10.1.2.3:2379":             rules.TransportFailure,
	} {
		answer, _ := (&pb.WatchResponse{Header: &pb.ResponseHeader{Revision: 1}, WatchId: -1, Created: true,
			Canceled: true, CancelReason: reason}).Marshal()
		up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", rules.GRPCContentType)
			w.Header().Set("Trailer", "Grpc-Status")
			w.Write(rawFrame(answer))
			w.(http.Flusher).Flush()
			<-r.Context().Done()
			w.Header().Set("Grpc-Status", "0")
		})
		_, u := startProxy(t, Config{Upstreams: []string{up}})
		create, _ := (&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
			CreateRequest: &pb.WatchCreateRequest{Key: []byte("k")}}}).Marshal()
		pr, pw := io.Pipe()
		go pw.Write(rawFrame(create))
		resp := grpcStream(t, u+"/etcdserverpb.Watch/Watch", pr)
		frame := make([]byte, grpcFrameHeader)
		if _, err := io.ReadFull(resp.Body, frame); err != nil {
			t.Fatal(err)
		}
		msg := make([]byte, binary.BigEndian.Uint32(frame[1:]))
		if _, err := io.ReadFull(resp.Body, msg); err != nil {
			t.Fatal(err)
		}
		var got pb.WatchResponse
		if err := got.Unmarshal(msg); err != nil {
			t.Fatal(err)
		}
		pw.Close()
		resp.Body.Close()
		if !got.Canceled || got.CancelReason != want {
			t.Errorf("upstream reason %q: the client got %+v, want the reason %q", reason, &got, want)
		}
	}
}

// Fragments of a revision from below are passed on as they come, not held until its last one: an upstream that
// never sends the last cannot make the proxy buffer without bound (and a member's fragments stream).
func TestWatchFragmentsPassedAsTheyCome(t *testing.T) {
	t.Parallel()
	msg := func(r *pb.WatchResponse) []byte {
		b, _ := r.Marshal()
		return rawFrame(b)
	}
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", rules.GRPCContentType)
		w.Write(msg(&pb.WatchResponse{Header: &pb.ResponseHeader{Revision: 1}, Created: true}))
		for i := range 3 {
			w.Write(msg(&pb.WatchResponse{Header: &pb.ResponseHeader{Revision: 2}, Fragment: true,
				Events: []*mvccpb.Event{{Kv: &mvccpb.KeyValue{Key: []byte{'k', byte('0' + i)}, ModRevision: 2}}}}))
		}
		w.(http.Flusher).Flush()
		<-r.Context().Done() // the last fragment never comes
	})
	_, u := startProxy(t, Config{Upstreams: []string{up}})
	create, _ := (&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
		CreateRequest: &pb.WatchCreateRequest{Key: []byte("k"), RangeEnd: []byte("l"), Fragment: true}}}).Marshal()
	pr, pw := io.Pipe()
	defer pw.Close()
	go pw.Write(rawFrame(create))
	resp := grpcStream(t, u+"/etcdserverpb.Watch/Watch", pr)
	defer resp.Body.Close()
	stop := time.AfterFunc(10*time.Second, func() { resp.Body.Close() }) // fragments held: no answer
	defer stop.Stop()
	var keys []string
	for len(keys) < 3 {
		frame := make([]byte, grpcFrameHeader)
		if _, err := io.ReadFull(resp.Body, frame); err != nil {
			t.Fatalf("after %v: %v", keys, err)
		}
		b := make([]byte, binary.BigEndian.Uint32(frame[1:]))
		if _, err := io.ReadFull(resp.Body, b); err != nil {
			t.Fatal(err)
		}
		var got pb.WatchResponse
		if err := got.Unmarshal(b); err != nil {
			t.Fatal(err)
		}
		for _, ev := range got.Events {
			if !got.Fragment {
				t.Fatalf("event %s not marked as a fragment", ev.Kv.Key)
			}
			keys = append(keys, string(ev.Kv.Key))
		}
	}
	if fmt.Sprint(keys) != "[k0 k1 k2]" {
		t.Fatalf("fragments %v, want [k0 k1 k2]", keys)
	}
}
