package rules

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
)

var testSelf = NewSelf("pp", []string{"http://pp.example:2379", "https://pp.example:2380"})

// upstreamAddr stands for an upstream member's address: it must never come out of a rewritten body.
const upstreamAddr = "10.9.8.7:23"

// jsonEqual compares two JSON documents by value.
func jsonEqual(t *testing.T, got []byte, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("result %q is not JSON: %v", got, err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("bad want %q: %v", want, err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Errorf("body = %s\nwant   %s", got, want)
	}
}

func TestMembersRequest(t *testing.T) {
	t.Parallel()
	tests := []struct {
		method, path string
		change       bool // a membership change: 403 unless forwarded
		membership   bool // Accept-Encoding is dropped so that the answer can be rewritten
	}{
		{method: "GET", path: "/v2/members", membership: true},
		{method: "GET", path: "/v2/members/", membership: true},
		{method: "HEAD", path: "/v2/members", membership: true},
		{method: "GET", path: "/v2/members/leader", membership: true},
		{method: "POST", path: "/v2/members", change: true, membership: true},
		{method: "POST", path: "/v2/members/", change: true, membership: true},
		{method: "PUT", path: "/v2/members/8e9e05c52164694d", change: true, membership: true},
		{method: "DELETE", path: "/v2/members/8e9e05c52164694d", change: true, membership: true},
		{method: "POST", path: "/v2/members/8e9e05c52164694d/promote", change: true, membership: true},
		{method: "POST", path: "/v2/membersx"},
		{method: "PUT", path: "/v2/keys/v2/members"},
		{method: "POST", path: "/v3/kv/put"},
	}
	for _, forward := range []bool{false, true} {
		for _, tt := range tests {
			name := tt.method + " " + tt.path + map[bool]string{false: " rejected", true: " forwarded"}[forward]
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				req := httptest.NewRequest(tt.method, tt.path, nil)
				req.Header.Set("Accept-Encoding", "gzip")
				reply, err := (&Members{Self: testSelf, Forward: forward}).Request(req)
				if err != nil {
					t.Fatal(err)
				}
				if tt.change && !forward {
					if msg := answer(t, reply, http.StatusForbidden); !strings.Contains(msg, "--forward-member-changes") {
						t.Errorf("message %q does not name the flag that allows changes", msg)
					}
					return
				}
				if reply != nil {
					t.Fatalf("unexpected reply %d", reply.StatusCode)
				}
				if got := req.Header.Get("Accept-Encoding") == ""; got != tt.membership {
					t.Errorf("Accept-Encoding dropped = %v, want %v", got, tt.membership)
				}
			})
		}
	}
}

func TestMembersResponse(t *testing.T) {
	t.Parallel()
	self := `{"id":"` + testSelf.IDString() + `","name":"pp","peerURLs":[],"clientURLs":["http://pp.example:2379","https://pp.example:2380"]}`
	tests := []struct {
		name         string
		method, path string
		status       int
		body         string // the upstream's answer
		claim        bool
		want         string // the rewritten body, JSON, when claimed
		wantErr      bool
	}{
		{
			name: "v2 list", method: "GET", path: "/v2/members", status: 200, claim: true,
			body: `{"members":[{"id":"8e9e05c52164694d","name":"m1","peerURLs":["http://` + upstreamAddr + `80"],"clientURLs":["http://` + upstreamAddr + `79"]},` +
				`{"id":"91bc3c398fb3c146","name":"m2","peerURLs":["http://10.0.0.2:2380"],"clientURLs":["http://10.0.0.2:2379"]}]}`,
			want: `{"members":[` + self + `]}`,
		},
		{
			name: "v2 list, trailing slash", method: "GET", path: "/v2/members/", status: 200, claim: true,
			body: `{"members":[]}`, want: `{"members":[` + self + `]}`,
		},
		{
			name: "v2 leader", method: "GET", path: "/v2/members/leader", status: 200, claim: true,
			body: `{"id":"8e9e05c52164694d","name":"m1","peerURLs":["http://` + upstreamAddr + `80"],"clientURLs":["http://` + upstreamAddr + `79"]}`,
			want: self,
		},
		{
			name: "v2 leader unknown is passed on", method: "GET", path: "/v2/members/leader", status: 503,
			body: `{"message":"During election"}`,
		},
		{name: "v2 list HEAD", method: "HEAD", path: "/v2/members", status: 200},
		{name: "v2 list failure is passed on", method: "GET", path: "/v2/members", status: 500, body: `{"message":"x"}`},
		{
			name: "v2 forwarded add", method: "POST", path: "/v2/members", status: 201, claim: true,
			body: `{"id":"3777296169cbb01c","name":"","peerURLs":["http://` + upstreamAddr + `80"],"clientURLs":[]}`,
			want: `{"id":"3777296169cbb01c","name":"","peerURLs":[],"clientURLs":[]}`,
		},
		{
			name: "v2 forwarded remove: no content", method: "DELETE", path: "/v2/members/3777296169cbb01c", status: 204,
			claim: true, body: "", want: "",
		},
		{
			name: "v2 forwarded change, broken answer", method: "POST", path: "/v2/members", status: 201, claim: true,
			body: `{"id":`, wantErr: true,
		},
		{
			name: "v2 forwarded add rejected upstream is passed on", method: "POST", path: "/v2/members", status: 409,
			body: `{"message":"membership: peerURL exists"}`,
		},
		{name: "keys untouched", method: "GET", path: "/v2/keys/v2/members", status: 200, body: `{}`},
		{name: "v3 kv untouched", method: "POST", path: "/v3/kv/range", status: 200, body: `{}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			resp := &http.Response{StatusCode: tt.status, Header: http.Header{},
				Request: httptest.NewRequest(tt.method, tt.path, nil)}
			fn, err := (&Members{Self: testSelf, Forward: true}).Response(resp)
			if err != nil {
				t.Fatal(err)
			}
			if (fn != nil) != tt.claim {
				t.Fatalf("claims the body = %v, want %v", fn != nil, tt.claim)
			}
			if fn == nil {
				return
			}
			got, err := fn([]byte(tt.body))
			if tt.wantErr {
				if err == nil {
					t.Fatalf("no error for %q, got %q", tt.body, got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(got), upstreamAddr) {
				t.Errorf("rewritten body leaks the upstream address: %s", got)
			}
			if tt.want == "" {
				if len(got) != 0 {
					t.Errorf("body = %q, want empty", got)
				}
				return
			}
			jsonEqual(t, got, tt.want)
		})
	}
}

func TestMachines(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name         string
		method, path string
		status       int
		claim        bool
	}{
		{name: "GET", method: "GET", path: "/v2/machines", status: 200, claim: true},
		{name: "trailing slash", method: "GET", path: "/v2/machines/", status: 200, claim: true},
		{name: "HEAD", method: "HEAD", path: "/v2/machines", status: 200},
		{name: "error passed on", method: "GET", path: "/v2/machines", status: 500},
		{name: "other path", method: "GET", path: "/v2/machinesx", status: 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			resp := &http.Response{StatusCode: tt.status, Header: http.Header{},
				Request: httptest.NewRequest(tt.method, tt.path, nil)}
			fn, err := (&Machines{Self: testSelf}).Response(resp)
			if err != nil {
				t.Fatal(err)
			}
			if (fn != nil) != tt.claim {
				t.Fatalf("claims the body = %v, want %v", fn != nil, tt.claim)
			}
			if fn == nil {
				return
			}
			got, err := fn([]byte("http://" + upstreamAddr + "79, http://10.0.0.2:2379"))
			if err != nil {
				t.Fatal(err)
			}
			if want := "http://pp.example:2379, https://pp.example:2380"; string(got) != want {
				t.Errorf("body = %q, want %q", got, want)
			}
		})
	}
}

func TestStats(t *testing.T) {
	t.Parallel()
	self := `{"name":"member-1","id":"ebbbd8b9f726f1cd","state":"StateFollower","startTime":"2026-11-28T07:42:31Z",` +
		`"leaderInfo":{"leader":"189e68c1dbbdc70","uptime":"10ms","startTime":"2026-11-28T07:42:31Z"},` +
		`"recvAppendRequestCnt":9,"recvPkgRate":10.5,"sendAppendRequestCnt":0,"extra":"http://10.0.0.2:2379"}`
	id := testSelf.IDString()
	tests := []struct {
		name   string
		path   string
		status int
		body   string
		want   string // "" when the rule leaves the answer alone
	}{
		{name: "self", path: "/v2/stats/self", status: 200, body: self,
			want: `{"name":"` + testSelf.Name + `","id":"` + id + `","state":"StateLeader","startTime":"2026-11-28T07:42:31Z",` +
				`"leaderInfo":{"leader":"` + id + `","uptime":"10ms","startTime":"2026-11-28T07:42:31Z"},` +
				`"recvAppendRequestCnt":9,"recvPkgRate":10.5,"sendAppendRequestCnt":0}`},
		{name: "leader on the leader", path: "/v2/stats/leader", status: 200,
			body: `{"leader":"189e68c1dbbdc70","followers":{"ebbbd8b9f726f1cd":{}}}`, want: `{"leader":"` + id + `","followers":{}}`},
		{name: "leader on a follower", path: "/v2/stats/leader", status: 403, body: `{"message":"not current leader"}`,
			want: `{"leader":"` + id + `","followers":{}}`},
		{name: "upstream failure passed on", path: "/v2/stats/self", status: 503},
		{name: "store untouched", path: "/v2/stats/store", status: 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			resp := &http.Response{StatusCode: tt.status, Header: http.Header{}, Request: httptest.NewRequest("GET", tt.path, nil)}
			fn, err := (&Stats{Self: testSelf}).Response(resp)
			if err != nil {
				t.Fatal(err)
			}
			if (fn != nil) != (tt.want != "") {
				t.Fatalf("claims the body = %v, want %v", fn != nil, tt.want != "")
			}
			if fn == nil {
				return
			}
			if resp.StatusCode != http.StatusOK {
				t.Errorf("status = %d, want 200", resp.StatusCode)
			}
			got, err := fn([]byte(tt.body))
			if err != nil {
				t.Fatal(err)
			}
			jsonEqual(t, got, tt.want)
		})
	}
}
