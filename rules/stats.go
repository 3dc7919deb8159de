package rules

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// Paths of etcd's v2 stats views that describe a member.
const (
	statsSelfPath   = "/v2/stats/self"
	statsLeaderPath = "/v2/stats/leader"
)

// Stats makes the v2 stats views agree with the membership views: the proxy is the one member, and the leader.
// /v2/stats/self names the proxy (name, ID, state StateLeader, leaderInfo.leader its own ID) and keeps the counters
// and times of the member that answered; only the fields etcd's own answer has are kept, so nothing else that
// member wrote reaches the client. /v2/stats/leader answers, as a one-member cluster's leader does, the proxy as
// leader with no followers, whichever member the request reached: a follower's 403 "not current leader" included.
// The request still goes upstream, so both fail when the upstream does.
type Stats struct {
	Passthrough
	Self Self
}

// Name implements Rule.
func (*Stats) Name() string { return "stats" }

func statsPath(req *http.Request) string {
	if req.Method != http.MethodGet {
		return ""
	}
	switch p := strings.TrimSuffix(req.URL.Path, "/"); p {
	case statsSelfPath, statsLeaderPath:
		return p
	}
	return ""
}

// Request implements Rule: the bodies it rewrites must come back unencoded.
func (*Stats) Request(req *http.Request) (*http.Response, error) {
	if statsPath(req) != "" {
		req.Header.Del("Accept-Encoding")
	}
	return nil, nil
}

// Response implements Rule.
func (s *Stats) Response(resp *http.Response) (BodyFunc, error) {
	if resp.Request == nil {
		return nil, nil
	}
	switch statsPath(resp.Request) {
	case statsSelfPath:
		if resp.StatusCode == http.StatusOK {
			return s.self, nil
		}
	case statsLeaderPath:
		// 403 is a follower's "not current leader": through the proxy there is no other member to ask.
		if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusForbidden {
			resp.StatusCode, resp.Status = http.StatusOK, "200 OK"
			resp.Header.Set("Content-Type", "application/json")
			return s.leader, nil
		}
	}
	return nil, nil
}

// v2ServerStats is etcd's /v2/stats/self (etcdserver/api/v2stats serverStats): the fields it has, nothing else.
type v2ServerStats struct {
	Name       string    `json:"name"`
	ID         string    `json:"id"`
	State      string    `json:"state"`
	StartTime  time.Time `json:"startTime"`
	LeaderInfo struct {
		Leader    string    `json:"leader"`
		Uptime    string    `json:"uptime"`
		StartTime time.Time `json:"startTime"`
	} `json:"leaderInfo"`
	RecvAppendRequestCnt uint64  `json:"recvAppendRequestCnt"`
	RecvPkgRate          float64 `json:"recvPkgRate,omitempty"`
	RecvBandwidthRate    float64 `json:"recvBandwidthRate,omitempty"`
	SendAppendRequestCnt uint64  `json:"sendAppendRequestCnt"`
	SendPkgRate          float64 `json:"sendPkgRate,omitempty"`
	SendBandwidthRate    float64 `json:"sendBandwidthRate,omitempty"`
}

func (s *Stats) self(body []byte) ([]byte, error) {
	var st v2ServerStats
	if err := json.Unmarshal(body, &st); err != nil {
		return nil, fmt.Errorf("decoding /v2/stats/self: %w", err)
	}
	st.Name, st.ID, st.State = s.Self.Name, s.Self.IDString(), "StateLeader"
	st.LeaderInfo.Leader = s.Self.IDString()
	return json.Marshal(&st) // etcd writes it without a newline
}

func (s *Stats) leader([]byte) ([]byte, error) {
	return json.Marshal(struct {
		Leader    string              `json:"leader"`
		Followers map[string]struct{} `json:"followers"`
	}{s.Self.IDString(), map[string]struct{}{}})
}

var _ Rule = (*Stats)(nil)
