package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
)

// readCounter counts the bytes the proxy read from an upstream.
type readCounter struct {
	net.Conn
	n *atomic.Int64
}

func (c readCounter) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.n.Add(int64(n))
	return n, err
}

// endlessHeader is an upstream whose answer's header goes on for size bytes before it ends.
func endlessHeader(t *testing.T, tls bool, size int) *httptest.Server {
	t.Helper()
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, bw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = bw.WriteString("HTTP/1.1 200 OK\r\nX-Endless: ")
		chunk := []byte(strings.Repeat("a", 32<<10))
		for sent := 0; sent < size; sent += len(chunk) {
			if _, err := bw.Write(chunk); err != nil {
				return
			}
		}
		_, _ = bw.WriteString("\r\nContent-Length: 2\r\n\r\nok")
		_ = bw.Flush()
	})
	srv := httptest.NewUnstartedServer(h)
	if tls {
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	return srv
}

// An upstream's status line and header are read up to --max-upstream-header-bytes, then the client gets 502, on the
// lean HTTP/1.1 path and through http.Transport (TLS upstreams) alike; other requests are served as before.
func TestUpstreamHeaderBounded(t *testing.T) {
	t.Parallel()
	const limit = 64 << 10
	for _, useTLS := range []bool{false, true} {
		name := map[bool]string{false: "http", true: "https"}[useTLS]
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			hostile := endlessHeader(t, useTLS, 1<<20)
			good := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.WriteString(w, "fine")
			}))
			if useTLS {
				good.StartTLS()
			} else {
				good.Start()
			}
			t.Cleanup(good.Close)
			cfg := Config{Upstreams: []string{hostile.URL}, MaxUpstreamHeaderBytes: limit}
			cfg.UpstreamTLS.InsecureSkipVerify = true
			f, err := NewForwarder(&cfg, defaultRules(), quiet)
			if err != nil {
				t.Fatal(err)
			}
			var read atomic.Int64
			dial, dialTCP := f.h1.dial, f.dialTCP
			f.h1.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := dial(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return readCounter{c, &read}, nil
			}
			f.dialTCP = func(ctx context.Context, network, addr string) (net.Conn, error) {
				c, err := dialTCP(ctx, network, addr)
				if err != nil {
					return nil, err
				}
				return readCounter{c, &read}, nil
			}
			srv := httptest.NewServer(f)
			t.Cleanup(func() { srv.Close(); f.Close() })

			resp, body := get(t, http.MethodGet, srv.URL+"/v2/keys/a", nil)
			msg := etcdError(t, resp, body, http.StatusBadGateway)
			if !strings.Contains(msg, "header too large") {
				t.Errorf("message %q does not say the upstream's header was too large", msg)
			}
			if n := read.Load(); n > limit+64<<10 {
				t.Errorf("the proxy read %d bytes of a header bounded at %d", n, limit)
			}

			// The forwarder still serves: the same transports toward a well-behaved upstream.
			u, err := url.Parse(good.URL)
			if err != nil {
				t.Fatal(err)
			}
			f.endpoints.set([]*url.URL{u})
			if resp, body := get(t, http.MethodGet, srv.URL+"/v2/keys/a", nil); resp.StatusCode != http.StatusOK || string(body) != "fine" {
				t.Errorf("after the hostile answer: %d %q", resp.StatusCode, body)
			}
		})
	}
}
