package proxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// connCounting is an upstream that counts the connections it accepted and can close its idle ones.
func connCounting(t *testing.T, h http.HandlerFunc) (*httptest.Server, *atomic.Int64) {
	t.Helper()
	var conns atomic.Int64
	srv := httptest.NewUnstartedServer(h)
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv, &conns
}

func TestH1ReusesConnections(t *testing.T) {
	t.Parallel()
	up, conns := connCounting(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") })
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	for i := 0; i < 20; i++ {
		if resp, body := get(t, http.MethodGet, base+"/v2/keys/a", nil); resp.StatusCode != 200 || string(body) != "ok" {
			t.Fatalf("request %d: %d %q", i, resp.StatusCode, body)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("20 sequential requests used %d upstream connections, want 1", n)
	}
}

// An upstream that closed its idle connections (a restart, an idle timeout) must not cost a request: reads go
// out on a new connection, and a write that may have reached it is never sent twice.
func TestH1StaleIdleConnection(t *testing.T) {
	t.Parallel()
	var writes atomic.Int64
	up, conns := connCounting(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			writes.Add(1)
		}
		io.WriteString(w, "ok")
	})
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	for _, method := range []string{http.MethodGet, http.MethodPut} {
		get(t, http.MethodGet, base+"/v2/keys/a", nil) // leaves an idle upstream connection
		up.CloseClientConnections()                    // the upstream drops it
		var body io.Reader
		if method == http.MethodPut {
			body = strings.NewReader("value=1")
		}
		resp, b := get(t, method, base+"/v2/keys/a", body)
		if resp.StatusCode != http.StatusOK || string(b) != "ok" {
			t.Errorf("%s after the upstream closed the idle connection: %d %q", method, resp.StatusCode, b)
		}
	}
	if n := writes.Load(); n != 1 {
		t.Errorf("the upstream applied the PUT %d times, want 1", n)
	}
	if n := conns.Load(); n < 3 {
		t.Errorf("%d upstream connections, want a new one after each close", n)
	}
}

// A client that leaves a long poll ends the upstream request too: the upstream handler sees its context end.
func TestH1CancelledLongPoll(t *testing.T) {
	t.Parallel()
	gone := make(chan struct{})
	up, _ := connCounting(t, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusOK)
		w.(http.Flusher).Flush()
		<-r.Context().Done()
		close(gone)
	})
	base := startForwarder(t, Config{Upstreams: []string{up.URL}}, defaultRules())
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, base+"/v2/keys/a?wait=true", nil)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	resp.Body.Close()
	select {
	case <-gone:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream request outlived the client's by 5 s")
	}
}
