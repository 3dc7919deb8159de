package proxy

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// cuttableUpstream serves h with HTTP/1.1 and h2c, as an etcd member does, and can lose every connection at
// once: closed (a killed process) or frozen (a stopped one: nothing is read or answered, nothing is closed; new
// connections are accepted and frozen too).
type cuttableUpstream struct {
	url    string
	mu     sync.Mutex
	conns  []net.Conn
	frozen chan struct{} // closed by freeze
	done   chan struct{} // closed at cleanup: frozen reads fail
}

func newCuttableUpstream(t *testing.T, h http.HandlerFunc) *cuttableUpstream {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &cuttableUpstream{url: "http://" + l.Addr().String(), frozen: make(chan struct{}), done: make(chan struct{})}
	srv := &http.Server{Handler: h, Protocols: new(http.Protocols)}
	srv.Protocols.SetHTTP1(true)
	srv.Protocols.SetUnencryptedHTTP2(true)
	go srv.Serve(trackingListener{l, u})
	t.Cleanup(func() {
		close(u.done)
		srv.Close()
		u.close()
	})
	return u
}

func (u *cuttableUpstream) close() {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, c := range u.conns {
		c.Close()
	}
}

func (u *cuttableUpstream) freeze() {
	u.mu.Lock()
	defer u.mu.Unlock()
	select {
	case <-u.frozen:
	default:
		close(u.frozen)
	}
}

type trackingListener struct {
	net.Listener
	u *cuttableUpstream
}

func (l trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.u.mu.Lock()
	l.u.conns = append(l.u.conns, c)
	l.u.mu.Unlock()
	return &freezableConn{Conn: c, frozen: l.u.frozen, done: l.u.done}, nil
}

// freezableConn stops reading and writing once frozen: its reads wait for the cleanup, its writes are dropped,
// as a stopped process's socket would keep them in its buffers.
type freezableConn struct {
	net.Conn
	frozen, done chan struct{}
}

func (c *freezableConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	select {
	case <-c.frozen:
		<-c.done
		return 0, net.ErrClosed
	default:
	}
	return n, err
}

func (c *freezableConn) Write(b []byte) (int, error) {
	select {
	case <-c.frozen:
		return len(b), nil
	default:
		return c.Conn.Write(b)
	}
}

// streamUpstream answers a gRPC watch, a v2 long poll and a v2 stream watch the way a member does: headers at
// once, one event for the streams, then nothing until the client goes; anything else (GET /version) at once.
func streamUpstream(w http.ResponseWriter, r *http.Request) {
	switch {
	case rules.IsGRPC(r):
		w.Header().Set("Content-Type", rules.GRPCContentType)
		w.Write(rawFrame([]byte("event")))
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	case r.URL.Query().Get("stream") == "true":
		io.WriteString(w, `{"action":"set"}`)
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	case r.URL.Query().Get("wait") == "true":
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	default:
		io.WriteString(w, `{"etcdserver":"3.5.35"}`)
	}
}

// TestStreamEndsWhenUpstreamLost: a quiet stream whose upstream connection is lost ends for its client, cleanly,
// within the keep-alive time + timeout: a gRPC watch with Unavailable (the HTTP/2 client used to wait for the
// client's next message for ever), a v2 long poll and a v2 stream watch with the end of their answer. Closed: a
// killed member; frozen: a stopped one, found by HTTP/2 pings (gRPC) or by GET /version (HTTP/1.1).
func TestStreamEndsWhenUpstreamLost(t *testing.T) {
	t.Parallel()
	const keepAlive, timeout = 200 * time.Millisecond, 300 * time.Millisecond
	for _, freeze := range []bool{false, true} {
		for _, endpoints := range []int{1, 2} { // 2: the body goes through retryBody
			for _, kind := range []string{"grpc", "v2 wait", "v2 stream"} {
				name := fmt.Sprintf("%s/%d endpoints/closed", kind, endpoints)
				if freeze {
					name = fmt.Sprintf("%s/%d endpoints/frozen", kind, endpoints)
				}
				t.Run(name, func(t *testing.T) {
					t.Parallel()
					var ups []*cuttableUpstream
					var urls []string
					for range endpoints {
						up := newCuttableUpstream(t, streamUpstream)
						ups = append(ups, up)
						urls = append(urls, up.url)
					}
					_, u := startProxy(t, Config{Upstreams: urls, UpstreamKeepAliveTime: keepAlive, UpstreamKeepAliveTimeout: timeout})
					cut := func() {
						for _, up := range ups {
							if freeze {
								up.freeze()
							} else {
								up.close()
							}
						}
					}
					switch kind {
					case "grpc":
						pr, pw := io.Pipe() // the client's side stays open, as a watching client's does
						defer pw.Close()
						go pw.Write(rawFrame([]byte("create")))
						resp := grpcStream(t, u+"/etcdserverpb.Lease/LeaseKeepAlive", pr)
						defer resp.Body.Close()
						if _, err := io.ReadFull(resp.Body, make([]byte, len(rawFrame([]byte("event"))))); err != nil {
							t.Fatal(err)
						}
						began := time.Now()
						cut()
						rest, err := readWithin(resp.Body, 2*time.Second)
						if err != nil || len(rest) != 0 {
							t.Errorf("after the upstream was lost: %q, %v; want a clean end", rest, err)
						}
						if got, msg := grpcStatus(resp), resp.Trailer.Get("Grpc-Message"); got != "14" || msg != msgUpstreamLost {
							t.Errorf("grpc-status %q %q, want 14 %q", got, msg, msgUpstreamLost)
						}
						t.Logf("ended %v after the upstream was lost", time.Since(began).Round(time.Millisecond))
					default:
						q := "?wait=true"
						want := ""
						if kind == "v2 stream" {
							q, want = "?wait=true&stream=true", `{"action":"set"}`
						}
						resp, err := newConn().Get(u + "/v2/keys/x" + q)
						if err != nil {
							t.Fatal(err)
						}
						defer resp.Body.Close()
						if _, err := io.ReadFull(resp.Body, make([]byte, len(want))); err != nil {
							t.Fatal(err)
						}
						began := time.Now()
						cut()
						rest, err := readWithin(resp.Body, 2*time.Second)
						if err != nil || len(rest) != 0 || resp.StatusCode != http.StatusOK {
							t.Errorf("after the upstream was lost: %d %q, %v; want 200 and a clean end", resp.StatusCode, rest, err)
						}
						t.Logf("ended %v after the upstream was lost", time.Since(began).Round(time.Millisecond))
					}
				})
			}
		}
	}
}

// readWithin reads r to its end, failing after d.
func readWithin(r io.Reader, d time.Duration) ([]byte, error) {
	type result struct {
		b   []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		b, err := io.ReadAll(r)
		ch <- result{b, err}
	}()
	select {
	case res := <-ch:
		return res.b, res.err
	case <-time.After(d):
		return nil, fmt.Errorf("still open %v after the upstream was lost", d)
	}
}

// TestStreamLostBeforeHeaders: a stream whose upstream stops answering before its headers ends too: a v2 long
// poll with 502, a gRPC watch with Unavailable — also while its body is held for a retry (two endpoints: the
// HTTP/2 transport waits for the body's Read before it reports the lost connection).
func TestStreamLostBeforeHeaders(t *testing.T) {
	t.Parallel()
	a, b := newCuttableUpstream(t, streamUpstream), newCuttableUpstream(t, streamUpstream)
	a.freeze()
	b.freeze()
	cfg := Config{UpstreamKeepAliveTime: 200 * time.Millisecond, UpstreamKeepAliveTimeout: 300 * time.Millisecond}
	t.Run("v2", func(t *testing.T) {
		t.Parallel()
		cfg := cfg
		cfg.Upstreams = []string{a.url}
		_, u := startProxy(t, cfg)
		c := newConn()
		c.Timeout = 3 * time.Second
		resp, body := getWith(t, c, http.MethodGet, u+"/v2/keys/x?wait=true", nil)
		if msg := etcdError(t, resp, body, http.StatusBadGateway); msg != msgUpstreamLost {
			t.Errorf("message %q, want %q", msg, msgUpstreamLost)
		}
	})
	t.Run("grpc", func(t *testing.T) {
		t.Parallel()
		cfg := cfg
		cfg.Upstreams = []string{a.url, b.url}
		_, u := startProxy(t, cfg)
		pr, pw := io.Pipe()
		// Go's HTTP/2 client has the same wait: it returns only once its body's Read does. Give up after 5 s.
		stop := time.AfterFunc(5*time.Second, func() { pw.CloseWithError(errors.New("no answer after 5s")) })
		defer stop.Stop()
		go pw.Write(rawFrame([]byte("create")))
		began := time.Now()
		resp := grpcStream(t, u+"/etcdserverpb.Lease/LeaseKeepAlive", pr)
		defer resp.Body.Close()
		_, _ = io.ReadAll(resp.Body)
		// Each frozen endpoint costs its dial timeout (1 s: it never finishes the HTTP/2 handshake), nothing of the
		// call having been sent; then no endpoint is left.
		if got, msg := grpcStatus(resp), resp.Header.Get("Grpc-Message"); got != "14" || time.Since(began) > 2500*time.Millisecond {
			t.Errorf("grpc-status %q %q after %v, want 14 within 2.5s", got, msg, time.Since(began).Round(time.Millisecond))
		}
	})
}

func TestUpstreamKeepAliveFlags(t *testing.T) {
	t.Parallel()
	parse := func(args []string, env map[string]string) (*Config, error) {
		var c Config
		fs := flag.NewFlagSet("test", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		c.AddFlags(fs)
		if err := fs.Parse(append([]string{"--upstream=http://h:1"}, args...)); err != nil {
			return nil, err
		}
		if err := SetFlagsFromEnv(fs, func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
			return nil, err
		}
		return &c, c.Validate()
	}
	c, err := parse(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := c.upstreamKeepAlive(); a != 30*time.Second || b != 15*time.Second {
		t.Errorf("defaults %v %v, want 30s 15s", a, b)
	}
	c, err = parse([]string{"--upstream-keepalive-time=1s"}, map[string]string{"ETCD_PROXY_PROXY_UPSTREAM_KEEPALIVE_TIMEOUT": "500ms"})
	if err != nil {
		t.Fatal(err)
	}
	if a, b := c.upstreamKeepAlive(); a != time.Second || b != 500*time.Millisecond {
		t.Errorf("got %v %v, want 1s 500ms", a, b)
	}
	c, err = parse([]string{"--upstream-keepalive-time=0"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a, _ := c.upstreamKeepAlive(); a != 0 {
		t.Errorf("--upstream-keepalive-time=0 gives %v, want 0 (off)", a)
	}
	if _, err := parse([]string{"--upstream-keepalive-timeout=0"}, nil); err == nil || !strings.Contains(err.Error(), "--upstream-keepalive-timeout: must be greater than 0") {
		t.Errorf("--upstream-keepalive-timeout=0: %v", err)
	}
	if _, err := parse([]string{"--upstream-keepalive-time=soon"}, nil); err == nil {
		t.Error("--upstream-keepalive-time=soon accepted")
	}
}

// TestLostEndpointAvoided: once a stream's upstream stopped answering, the client's next stream (on the same
// connection, which was pinned there) goes to another endpoint at once, without waiting for the probe.
func TestLostEndpointAvoided(t *testing.T) {
	t.Parallel()
	named := func(name string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", rules.GRPCContentType)
			w.Write(rawFrame([]byte(name)))
			w.(http.Flusher).Flush()
			<-r.Context().Done()
		}
	}
	a, b := newCuttableUpstream(t, named("a")), newCuttableUpstream(t, named("b"))
	_, u := startProxy(t, Config{Upstreams: []string{a.url, b.url}, UpstreamKeepAliveTime: 200 * time.Millisecond,
		UpstreamKeepAliveTimeout: 300 * time.Millisecond})
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	t.Cleanup(tr.CloseIdleConnections)
	watch := func() (string, *http.Response) {
		pr, pw := io.Pipe()
		t.Cleanup(func() { pw.Close() })
		req, _ := http.NewRequest(http.MethodPost, u+"/etcdserverpb.Lease/LeaseKeepAlive", pr)
		req.Header.Set("Content-Type", rules.GRPCContentType)
		go pw.Write(rawFrame([]byte("create")))
		resp, err := tr.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { resp.Body.Close() })
		first := make([]byte, len(rawFrame([]byte("a"))))
		if _, err := io.ReadFull(resp.Body, first); err != nil {
			t.Fatal(err)
		}
		return string(first[grpcFrameHeader:]), resp
	}
	served, resp := watch()
	map[string]*cuttableUpstream{"a": a, "b": b}[served].freeze()
	if _, err := readWithin(resp.Body, 2*time.Second); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	again, _ := watch()
	if again == served || time.Since(began) > 100*time.Millisecond {
		t.Errorf("the next stream was served by %s after %v, want the other endpoint at once", again, time.Since(began))
	}
}
