package proxy

import (
	"context"
	"errors"
	"flag"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestSafeQuery(t *testing.T) {
	t.Parallel()
	tests := []struct{ path, raw, want string }{
		{"/v2/keys/a", "", ""},
		{"/v2/keys/a", "wait=true&recursive=true&waitIndex=7", "wait=true&recursive=true&waitIndex=7"},
		{"/v2/keys/a", "value=s3cret&prevValue=old&ttl=5", "value=REDACTED&prevValue=REDACTED&ttl=5"},
		{"/v2/keys/a", "token=abc&flag", "token=REDACTED&flag"},
		{"/v2/auth/users/root", "password=pw", ""},
		{"/v2/authx", "a=b", ""},
	}
	for _, tt := range tests {
		if got := safeQuery(tt.path, tt.raw); got != tt.want {
			t.Errorf("safeQuery(%q, %q) = %q, want %q", tt.path, tt.raw, got, tt.want)
		}
	}
}

func TestErrorReason(t *testing.T) {
	t.Parallel()
	req := httptest.NewRequest(http.MethodGet, "/v2/keys", nil)
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	dial := &net.OpError{Op: "dial", Err: errors.New("refused")}
	tests := []struct {
		r    *http.Request
		err  error
		want string
	}{
		{req, &noEndpointError{dial}, reasonNoEndpoint},
		{req, &ruleError{"members", errors.New("x")}, reasonRule},
		{req, context.DeadlineExceeded, reasonTimeout},
		{req, errors.New("tls: bad certificate"), reasonTLS},
		{req, errors.New("EOF"), reasonSendFailed},
		{req.WithContext(gone), context.Canceled, reasonClientGone},
	}
	for _, tt := range tests {
		if got := errorReason(tt.r, tt.err); got != tt.want {
			t.Errorf("errorReason(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

func TestClassifyRequest(t *testing.T) {
	t.Parallel()
	tests := []struct {
		r           *http.Request
		api, method string
		stream      bool
	}{
		{httptest.NewRequest(http.MethodPost, "/v3/kv/put", nil), apiV3JSON, "/v3/kv/put", false},
		{httptest.NewRequest(http.MethodPost, "/v3beta/watch", nil), apiV3JSON, "/v3beta/watch", true},
		{httptest.NewRequest(http.MethodPost, "/v3/random/"+strings.Repeat("x", 10), nil), apiV3JSON, "other", false},
		{httptest.NewRequest(http.MethodGet, "/v2/keys/a?wait=true", nil), apiV2, "GET", true},
		{httptest.NewRequest("BREW", "/v2/keys/a", nil), apiV2, "other", false},
		{httptest.NewRequest(http.MethodGet, "/version", nil), apiOther, "GET", false},
	}
	for _, tt := range tests {
		c := classifyRequest(tt.r)
		api, method, stream := c.api, c.method, c.stream
		if api != tt.api || method != tt.method || stream != tt.stream {
			t.Errorf("%s %s: (%q, %q, %v), want (%q, %q, %v)", tt.r.Method, tt.r.URL, api, method, stream, tt.api, tt.method, tt.stream)
		}
	}
	if got := code(404); got != "404" {
		t.Errorf("code = %q", got)
	}
}

func TestOpsFlags(t *testing.T) {
	t.Parallel()
	var c Config
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	c.AddFlags(fs)
	if c.UpstreamHealthInterval != DefaultUpstreamHealthInterval || c.CertReloadInterval != DefaultCertReloadInterval {
		t.Errorf("defaults: %v %v", c.UpstreamHealthInterval, c.CertReloadInterval)
	}
	err := fs.Parse([]string{"--upstream", "http://127.0.0.1:1", "--listen-client-urls", "http://127.0.0.1:2379",
		"--listen-metrics-urls", "http://127.0.0.1:2379,https://127.0.0.1:2381", "--upstream-health-check", "ping",
		"--upstream-health-interval", "0", "--cert-reload-interval", "250ms", "--access-log"})
	if err != nil {
		t.Fatal(err)
	}
	if c.UpstreamHealthInterval >= 0 || c.healthInterval() >= 0 || c.CertReloadInterval != 250*time.Millisecond || !c.AccessLog {
		t.Errorf("parsed: %+v", c.OpsConfig)
	}
	if err := fs.Set("cert-reload-interval", "5"); err == nil {
		t.Error("a duration without unit was accepted")
	}
	err = c.Validate()
	for _, want := range []string{"is also a client URL", `--upstream-health-check "ping"`, "an https metrics URL needs --cert-file"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Validate = %v, want %q", err, want)
		}
	}
}

// BenchmarkInstrumented measures what metrics cost a request: 0 allocations once the label values of a kind of
// request are resolved (go test -run '^$' -bench Instrumented ./proxy).
func BenchmarkInstrumented(b *testing.B) {
	m := newMetrics(func() float64 { return 1 })
	h := &instrumented{next: func(w http.ResponseWriter, _ *http.Request, _ requestClass) { w.WriteHeader(200) }, m: m}
	r := httptest.NewRequest(http.MethodPost, "/etcdserverpb.KV/Range", nil)
	r.ProtoMajor, r.Header = 2, http.Header{"Content-Type": {"application/grpc"}}
	w := httptest.NewRecorder()
	w.Header().Set("Grpc-Status", "0")
	b.ReportAllocs()
	for b.Loop() {
		h.ServeHTTP(w, r)
	}
}
