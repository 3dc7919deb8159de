package e2e

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
)

// /v2/stats/self and /v2/stats/leader agree with the membership views on every connection, whichever member the
// connection landed on: the proxy is the one member and the leader (python-etcd's client.leader reads
// leaderInfo.leader from /v2/stats/self and looks it up in /v2/members). No member's name or ID is in them.
func TestStatsViews(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, time.Minute)
	s := start(t, ctx, topology{"pp-members", func(tls bool) []harness.Hop { return []harness.Hop{pp(tls)} }}, false)
	base := s.top.URLs[0]
	getJSON := func(c *http.Client, path string, v any) (int, string) {
		t.Helper()
		code, body := do(ctx, c, http.MethodGet, base+path, "")
		if code == http.StatusOK {
			if err := json.Unmarshal([]byte(body), v); err != nil {
				t.Fatalf("GET %s: %v in %q", path, err, body)
			}
		}
		return code, body
	}
	var members struct{ Members []struct{ ID, Name string } }
	if code, body := getJSON(http.DefaultClient, "/v2/members", &members); code != http.StatusOK || len(members.Members) != 1 {
		t.Fatalf("GET /v2/members: %d %s", code, body)
	}
	self := members.Members[0]
	var forbidden []string
	for _, m := range s.run.Cluster.Members {
		forbidden = append(forbidden, m.Name, strconv.FormatUint(m.ID, 16))
	}
	// Each new connection is pinned to the next member in turn: 6 connections reach each member twice.
	for i := range 6 {
		c := &http.Client{Transport: &http.Transport{}}
		var st struct {
			Name, ID, State string
			LeaderInfo      struct{ Leader string }
		}
		code, body := getJSON(c, "/v2/stats/self", &st)
		if code != http.StatusOK || st.Name != self.Name || st.ID != self.ID || st.State != "StateLeader" || st.LeaderInfo.Leader != self.ID {
			t.Errorf("connection %d: GET /v2/stats/self = %d %s; want name %q, id and leader %s, StateLeader", i, code, body, self.Name, self.ID)
		}
		var ld struct {
			Leader    string
			Followers map[string]any
		}
		code2, body2 := getJSON(c, "/v2/stats/leader", &ld)
		if code2 != http.StatusOK || ld.Leader != self.ID || len(ld.Followers) != 0 {
			t.Errorf("connection %d: GET /v2/stats/leader = %d %s; want 200, leader %s, no followers", i, code2, body2, self.ID)
		}
		for _, f := range forbidden {
			if strings.Contains(body, f) || strings.Contains(body2, f) {
				t.Errorf("connection %d: the stats name the member %q:\n%s\n%s", i, f, body, body2)
			}
		}
		c.CloseIdleConnections()
	}
}
