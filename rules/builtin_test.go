package rules

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// answer decodes an etcd-style error reply and checks its status; it fails the test when the rule did not reply.
func answer(t *testing.T, resp *http.Response, wantStatus int) string {
	t.Helper()
	if resp == nil {
		t.Fatalf("no reply, want %d", wantStatus)
	}
	if resp.StatusCode != wantStatus {
		t.Errorf("status = %d, want %d", resp.StatusCode, wantStatus)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("Content-Type = %q, want application/json", ct)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.ContentLength != int64(len(b)) || resp.Header.Get("Content-Length") != strconv.Itoa(len(b)) {
		t.Errorf("Content-Length %d / %q does not match a body of %d bytes", resp.ContentLength,
			resp.Header.Get("Content-Length"), len(b))
	}
	var e Error
	if err := json.Unmarshal(b, &e); err != nil || e.Message == "" {
		t.Errorf("body %q is not {\"message\": ...}: %v", b, err)
	}
	return e.Message
}

func TestLoop(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		instance  string
		via       []string // ViaHeader values on the incoming request
		wantReply bool
		wantVia   []string // ViaHeader values forwarded when the rule does not reply
	}{
		{name: "first hop adds its ID", instance: "aaa", wantVia: []string{"aaa"}},
		{name: "other proxies' IDs are kept", instance: "aaa", via: []string{"bbb, ccc"}, wantVia: []string{"bbb, ccc", "aaa"}},
		{name: "own ID in a list", instance: "aaa", via: []string{"bbb, aaa,ccc"}, wantReply: true},
		{name: "own ID in a second header", instance: "aaa", via: []string{"bbb", "aaa"}, wantReply: true},
		{name: "a prefix of the ID is not the ID", instance: "aaa", via: []string{"aaaa", "aa"}, wantVia: []string{"aaaa", "aa", "aaa"}},
		{name: "empty instance disables", instance: "", via: []string{""}, wantVia: []string{""}},
		{name: "empty instance adds nothing", instance: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			req := httptest.NewRequest(http.MethodGet, "/v2/keys/a", nil)
			for _, v := range tt.via {
				req.Header.Add(ViaHeader, v)
			}
			reply, err := (&Loop{Instance: tt.instance}).Request(req)
			if err != nil {
				t.Fatal(err)
			}
			if tt.wantReply {
				if msg := answer(t, reply, http.StatusLoopDetected); !strings.Contains(msg, "loop") {
					t.Errorf("message %q does not say loop", msg)
				}
				return
			}
			if reply != nil {
				t.Fatalf("unexpected reply %d", reply.StatusCode)
			}
			if got := req.Header.Values(ViaHeader); !slices.Equal(got, tt.wantVia) {
				t.Errorf("%s = %q, want %q", ViaHeader, got, tt.wantVia)
			}
		})
	}
}

func TestReadOnly(t *testing.T) {
	t.Parallel()
	methods := []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodDelete,
		http.MethodPatch, http.MethodOptions}
	for _, enabled := range []bool{false, true} {
		for _, m := range methods {
			t.Run(m+map[bool]string{false: "/disabled", true: "/enabled"}[enabled], func(t *testing.T) {
				t.Parallel()
				reply, err := (&ReadOnly{Enabled: enabled}).Request(httptest.NewRequest(m, "/v2/keys/a", nil))
				if err != nil {
					t.Fatal(err)
				}
				if !enabled || m == http.MethodGet || m == http.MethodHead {
					if reply != nil {
						t.Fatalf("unexpected reply %d", reply.StatusCode)
					}
					return
				}
				answer(t, reply, http.StatusNotImplemented)
			})
		}
	}
}

func TestHidden(t *testing.T) {
	t.Parallel()
	tests := []struct {
		path   string
		hidden bool
	}{
		{"/debug/vars", true},
		{"/debug/pprof/goroutine", true},
		{"/debug/", true},
		{"/debug", true},
		{"/v2/config/local/proxy", true},
		{"/v2/config/local/", true},
		{"/v2/config/local", true},
		{"/debugger", false},
		{"/v2/keys/debug/vars", false},
		{"/v2/config", false},
		{"/v2/config/localhost", false},
		{"/v2/keys/a", false},
		{"/version", false},
		{"/metrics", false},
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			t.Parallel()
			reply, err := (&Hidden{}).Request(httptest.NewRequest(http.MethodGet, tt.path, nil))
			if err != nil {
				t.Fatal(err)
			}
			if !tt.hidden {
				if reply != nil {
					t.Fatalf("unexpected reply %d", reply.StatusCode)
				}
				return
			}
			answer(t, reply, http.StatusNotFound)
		})
	}
}

func TestHeaders(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   http.Header
		want http.Header
	}{
		{
			name: "repeated CORS header collapses",
			in:   http.Header{"Access-Control-Allow-Origin": {"*", "*"}, "Access-Control-Allow-Methods": {"GET", "GET", "POST"}},
			want: http.Header{"Access-Control-Allow-Origin": {"*"}, "Access-Control-Allow-Methods": {"GET", "POST"}},
		},
		{
			name: "distinct values keep their order",
			in:   http.Header{"X-A": {"b", "a", "b", "c", "a"}},
			want: http.Header{"X-A": {"b", "a", "c"}},
		},
		{
			name: "multi-valued headers stay",
			in: http.Header{"Set-Cookie": {"a=1", "a=1"}, "Vary": {"Origin", "Origin"}, "Warning": {"x", "x"},
				"Www-Authenticate": {"Basic", "Basic"}},
			want: http.Header{"Set-Cookie": {"a=1", "a=1"}, "Vary": {"Origin", "Origin"}, "Warning": {"x", "x"},
				"Www-Authenticate": {"Basic", "Basic"}},
		},
		{
			name: "single values untouched",
			in:   http.Header{"Content-Type": {"application/json"}, "X-Etcd-Cluster-Id": {"cdf818194e3a8c32"}},
			want: http.Header{"Content-Type": {"application/json"}, "X-Etcd-Cluster-Id": {"cdf818194e3a8c32"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			resp := &http.Response{StatusCode: http.StatusOK, Header: tt.in}
			fn, err := (&Headers{}).Response(resp)
			if err != nil || fn != nil {
				t.Fatalf("Response = %v, %v; want no body claim and no error", fn != nil, err)
			}
			if len(resp.Header) != len(tt.want) {
				t.Errorf("headers = %q, want %q", resp.Header, tt.want)
			}
			for k, want := range tt.want {
				if got := resp.Header[k]; !slices.Equal(got, want) {
					t.Errorf("%s = %q, want %q", k, got, want)
				}
			}
		})
	}
}

func TestDefaultOrder(t *testing.T) {
	t.Parallel()
	var names []string
	for _, r := range Default(Options{Instance: "x"}) {
		names = append(names, r.Name())
	}
	want := []string{"loop", "readonly", "hidden", "members", "machines", "stats", "snapshot", "encrypt", "headers"}
	if !slices.Equal(names, want) {
		t.Errorf("default chain = %q, want %q", names, want)
	}
}

func TestReply(t *testing.T) {
	t.Parallel()
	req := httptest.NewRequest(http.MethodGet, "/x", nil)
	resp := Reply(req, http.StatusTeapot, `quote " and <tag>`)
	if resp.Request != req {
		t.Error("Reply does not carry the request")
	}
	if msg := answer(t, resp, http.StatusTeapot); msg != `quote " and <tag>` {
		t.Errorf("message = %q", msg)
	}
}
