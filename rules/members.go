package rules

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
)

// Paths of etcd's membership views.
const (
	membersPath  = "/v2/members"
	leaderPath   = "/v2/members/leader"
	machinesPath = "/v2/machines"
)

// v2Member is etcd's v2 member JSON (etcdserver/api/v2http/httptypes.Member): the lower-case keys every client
// parses.
type v2Member struct {
	ID         string   `json:"id"`
	Name       string   `json:"name"`
	PeerURLs   []string `json:"peerURLs"`
	ClientURLs []string `json:"clientURLs"`
}

func (s Self) v2() v2Member {
	return v2Member{ID: s.IDString(), Name: s.Name, PeerURLs: []string{}, ClientURLs: s.ClientURLs}
}

// Members answers every membership view with Self: GET /v2/members, /v2/members/leader, and the v3 Cluster
// service's member lists (the JSON gateway's too: it is served by the proxy through the same gRPC path) and
// Maintenance.Status. The request still goes upstream, so the answer carries the upstream's cluster ID header and fails
// when the upstream does. Membership changes are rejected unless Forward is set; forwarded, their answers have the
// member URLs replaced so that no upstream address leaks.
type Members struct {
	Self Self
	// Forward sends member add/update/remove/promote and leadership transfers upstream; false answers them with
	// 403 (gRPC PermissionDenied).
	Forward bool
}

// Name implements Rule.
func (*Members) Name() string { return "members" }

// isMembersPath reports whether path is /v2/members or below it.
func isMembersPath(path string) bool {
	rest, ok := strings.CutPrefix(path, membersPath)
	return ok && (rest == "" || rest[0] == '/')
}

// memberChangeRejected is the answer to a membership change when Forward is off.
const memberChangeRejected = "etcd-proxy-proxy: membership changes are not forwarded (start the proxy with --forward-member-changes to allow them)"

// moveLeaderRejected is the answer to a leadership transfer when Forward is off.
const moveLeaderRejected = "etcd-proxy-proxy: leadership transfers are not forwarded: the members are hidden behind the proxy (start the proxy with --forward-member-changes to allow them)"

// Request implements Rule.
func (m *Members) Request(req *http.Request) (*http.Response, error) {
	if !isMembersPath(req.URL.Path) {
		return nil, nil
	}
	if req.Method != http.MethodGet && req.Method != http.MethodHead && !m.Forward {
		return Reply(req, http.StatusForbidden, memberChangeRejected), nil
	}
	// Bodies we rewrite must come back unencoded.
	req.Header.Del("Accept-Encoding")
	return nil, nil
}

// Response implements Rule.
func (m *Members) Response(resp *http.Response) (BodyFunc, error) {
	req := resp.Request
	if req == nil || resp.StatusCode/100 != 2 || req.Method == http.MethodHead {
		return nil, nil
	}
	path := strings.TrimSuffix(req.URL.Path, "/")
	switch {
	case path == membersPath && req.Method == http.MethodGet:
		return m.v2List, nil
	case path == leaderPath && req.Method == http.MethodGet:
		return m.v2Leader, nil
	case isMembersPath(path):
		return m.v2Change, nil
	}
	return nil, nil
}

func (m *Members) v2List([]byte) ([]byte, error) {
	return marshalLine(struct {
		Members []v2Member `json:"members"`
	}{[]v2Member{m.Self.v2()}})
}

func (m *Members) v2Leader([]byte) ([]byte, error) { return marshalLine(m.Self.v2()) }

// v2Change keeps the ID and name of the member an add/update answered with and hides its URLs.
func (m *Members) v2Change(body []byte) ([]byte, error) {
	if len(strings.TrimSpace(string(body))) == 0 {
		return body, nil // 204 No Content of a remove or update
	}
	var got v2Member
	if err := json.Unmarshal(body, &got); err != nil {
		return nil, fmt.Errorf("decoding a member change answer: %w", err)
	}
	got.PeerURLs, got.ClientURLs = []string{}, []string{}
	return marshalLine(got)
}

// Machines answers GET /v2/machines with the advertise URLs, formatted as etcd does (", "-separated text).
type Machines struct {
	Passthrough
	Self Self
}

// Name implements Rule.
func (*Machines) Name() string { return "machines" }

// Request implements Rule: the body it rewrites must come back unencoded.
func (*Machines) Request(req *http.Request) (*http.Response, error) {
	if strings.TrimSuffix(req.URL.Path, "/") == machinesPath {
		req.Header.Del("Accept-Encoding")
	}
	return nil, nil
}

// Response implements Rule.
func (m *Machines) Response(resp *http.Response) (BodyFunc, error) {
	if req := resp.Request; req == nil || req.Method != http.MethodGet || resp.StatusCode != http.StatusOK ||
		strings.TrimSuffix(req.URL.Path, "/") != machinesPath {
		return nil, nil
	}
	return func([]byte) ([]byte, error) { return []byte(strings.Join(m.Self.ClientURLs, ", ")), nil }, nil
}

func marshalLine(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	return append(b, '\n'), err
}

var (
	_ Rule = (*Members)(nil)
	_ Rule = (*Machines)(nil)
)
