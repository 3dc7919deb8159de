package proxy

import (
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
)

func TestNames(t *testing.T) {
	t.Parallel()
	needles := []string{"10.9.9.9:2379", "10.9.9.9", "etcd-2.cluster.internal:2379", "etcd-2.cluster.internal", "127.0.0.1:2379"}
	tests := []struct {
		s    string
		want bool
	}{
		{"member etcd-2.cluster.internal unreachable", true},
		{"x10.9.9.9:2379y", true},
		{"member_10.9.9.9:2379_down", true},
		{"leader is 10.9.9.9 port 2379", true},
		{"<http://127.0.0.1:2379/v2/keys>; rel=next", true},
		{"http://127.0.0.1:23790/", false},    // another port
		{"110.9.9.9", false},                  // another address
		{"etcd-2.cluster.internalx", false},   // another name
		{"xetcd-2.cluster.internal", false},   // another name
		{"Basic realm=\"etcd\"", false},       // no needle
		{"etcd-2.cluster.internal.", true},    // the name, then a full stop
		{"[etcd-2.cluster.internal]:1", true}, // brackets end it
	}
	for _, tt := range tests {
		if got := names(tt.s, needles); got != tt.want {
			t.Errorf("names(%q) = %v, want %v", tt.s, got, tt.want)
		}
	}
	if got, want := replaceNames("dial 10.9.9.9:2379 and 10.9.9.9, not 10.9.9.90", needles), "dial <upstream> and <upstream>, not 10.9.9.90"; got != want {
		t.Errorf("replaceNames = %q, want %q", got, want)
	}
}

// A hop below that is not etcd names its address in headers and error texts: every header naming a known upstream
// (the endpoint as given, localhost:PORT, and the address it resolved to, 127.0.0.1:PORT) is dropped, and the
// "message" of a small v2 error is rewritten while its "cause" (the client's key) stays as it is.
func TestUpstreamNamesScrubbed(t *testing.T) {
	t.Parallel()
	var addr string // 127.0.0.1:PORT of the upstream
	up, _ := counting(t, func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Location", "http://"+addr+r.URL.Path)
		h.Set("Link", "<http://"+addr+"/v2/keys/b>; rel=next")
		h.Set("Refresh", "0; url=http://localhost:"+port(addr)+"/")
		h.Set("Www-Authenticate", `Basic realm="`+addr+`"`)
		h.Set("X-Served-By", "backend "+addr)
		h.Set("X-Not-It", addr+"0") // another port
		h.Set("X-Etcd-Index", "7")
		h.Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusNotFound)
		io.WriteString(w, `{"errorCode":100,"message":"Key not found on `+addr+`","cause":"/`+addr+`","index":7}`+"\n")
	})
	addr = up.Listener.Addr().String()
	base := startForwarder(t, Config{Upstreams: []string{"http://localhost:" + port(addr)}}, defaultRules())
	resp, body := get(t, http.MethodGet, base+"/v2/keys/a", nil)
	for _, k := range []string{"Content-Location", "Link", "Refresh", "Www-Authenticate", "X-Served-By"} {
		if v := resp.Header.Get(k); v != "" {
			t.Errorf("%s: %s names the upstream", k, v)
		}
	}
	for k, want := range map[string]string{"X-Not-It": addr + "0", "X-Etcd-Index": "7"} {
		if got := resp.Header.Get(k); got != want {
			t.Errorf("%s = %q, want %q (it names no upstream)", k, got, want)
		}
	}
	var e struct {
		ErrorCode int
		Message   string
		Cause     string
		Index     int
	}
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("%v: %q", err, body)
	}
	if resp.StatusCode != http.StatusNotFound || e.ErrorCode != 100 || e.Message != "Key not found on <upstream>" ||
		e.Cause != "/"+addr || e.Index != 7 {
		t.Errorf("error answer = %d %q; want 404, the message scrubbed and the cause (the client's key) kept", resp.StatusCode, body)
	}
}

func port(hostport string) string {
	_, p, _ := net.SplitHostPort(hostport)
	return p
}

// BenchmarkScrubUpstream is the cost scrubUpstream adds to every answer: etcd's v2 GET headers, three endpoints.
func BenchmarkScrubUpstream(b *testing.B) {
	var urls []*url.URL
	for _, h := range []string{"10.0.0.1:2379", "10.0.0.2:2379", "etcd-2.cluster.internal:2379"} {
		urls = append(urls, &url.URL{Scheme: "http", Host: h})
	}
	f := &Forwarder{endpoints: newEndpointSet(urls, 0)}
	f.known = &knownAddrs{endpoints: f.endpoints}
	req := httptest.NewRequest(http.MethodGet, "/v2/keys/a", nil)
	header := http.Header{"Content-Type": {"application/json"}, "X-Etcd-Cluster-Id": {"cdf818194e3a8c32"},
		"X-Etcd-Index": {"12"}, "X-Raft-Index": {"40"}, "X-Raft-Term": {"2"}, "Date": {"Sat, 28 Nov 2026 07:42:31 GMT"}}
	resp := &http.Response{StatusCode: http.StatusOK, Header: header, Request: req, ContentLength: 90}
	b.ReportAllocs()
	for b.Loop() {
		f.scrubUpstream(resp)
	}
}
