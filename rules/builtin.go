package rules

import (
	"log/slog"
	"net/http"
	"slices"
	"strings"
)

// ViaHeader carries the instance IDs of the proxy-proxies a request has passed, so that a proxy that sees its own
// ID knows it is in a loop. It is an end-to-end request header: stock proxies forward it untouched.
const ViaHeader = "X-Etcd-Proxy-Proxy-Via"

// Options configure the default chain.
type Options struct {
	// Self is the member every membership view shows.
	Self Self
	// Instance identifies this running proxy in ViaHeader; it must differ between processes (random).
	Instance string
	// ForwardMemberChanges forwards membership changes instead of rejecting them.
	ForwardMemberChanges bool
	// ReadOnly answers every request but GET and HEAD with 501.
	ReadOnly bool
	// SnapshotSpoolDir is where snapshots are spooled to be rewritten; empty means os.TempDir().
	SnapshotSpoolDir string
	// MaxSnapshotBytes bounds a snapshot from the upstream; zero means DefaultMaxSnapshotBytes.
	MaxSnapshotBytes int64
	// Log receives what rules log; nil means slog.Default().
	Log *slog.Logger
}

// Default is the default chain, the one place its order is written down. Requests see it top to bottom, responses bottom to top.
func Default(o Options) []Rule {
	return []Rule{
		&Loop{Instance: o.Instance},    // first: a looping request must reach nothing else, not even the upstream
		&ReadOnly{Enabled: o.ReadOnly}, // before any rule that could answer a write
		&Hidden{},                      // debug and proxy-config endpoints of the hops below reveal their addresses
		&Members{Self: o.Self, Forward: o.ForwardMemberChanges}, // membership views answered with ourselves
		&Machines{Self: o.Self},                                 // /v2/machines, the oldest membership view
		&Stats{Self: o.Self},                                    // /v2/stats/self and /leader name a member and its leader
		snapshotRule(o),                                         // the database in a snapshot names every member; before GRPCStatus: its status is set after the upstream's is scrubbed
		&GRPCStatus{},                                           // gRPC status messages of the hops below name their addresses
		&Headers{},                                              // last on the way up, so its response side runs first and every rule sees clean headers
	}
}

// Loop answers 508 Loop Detected (gRPC: FailedPrecondition) when a request already carries this proxy's
// instance ID, and adds the ID otherwise.
type Loop struct {
	Passthrough
	// Instance is this process's ID; empty disables the rule.
	Instance string
}

// Name implements Rule.
func (*Loop) Name() string { return "loop" }

// Request implements Rule.
func (l *Loop) Request(req *http.Request) (*http.Response, error) {
	if l.Instance == "" {
		return nil, nil
	}
	for _, v := range req.Header.Values(ViaHeader) {
		for id := range strings.SplitSeq(v, ",") {
			if strings.TrimSpace(id) != l.Instance {
				continue
			}
			const msg = "etcd-proxy-proxy: request loop detected (this proxy is its own upstream)"
			if IsGRPC(req) {
				return GRPCReply(req, CodeFailedPrecondition, msg), nil
			}
			return Reply(req, http.StatusLoopDetected, msg), nil
		}
	}
	req.Header.Add(ViaHeader, l.Instance)
	return nil, nil
}

// ReadOnly answers 501 Not Implemented to every request but GET and HEAD, as etcd's readonly proxy does, and
// PermissionDenied to every gRPC call that could change something.
type ReadOnly struct {
	Passthrough
	// Enabled switches the rule on.
	Enabled bool
}

// Name implements Rule.
func (*ReadOnly) Name() string { return "readonly" }

// readOnlyMethods are the gRPC calls that change nothing.
var readOnlyMethods = map[string]bool{
	"/etcdserverpb.KV/Range":              true,
	"/etcdserverpb.Watch/Watch":           true,
	"/etcdserverpb.Lease/LeaseTimeToLive": true,
	"/etcdserverpb.Lease/LeaseLeases":     true,
	"/etcdserverpb.Cluster/MemberList":    true,
	"/etcdserverpb.Maintenance/Status":    true,
	"/etcdserverpb.Maintenance/Hash":      true,
	"/etcdserverpb.Maintenance/HashKV":    true,
	"/etcdserverpb.Maintenance/Snapshot":  true,
	"/etcdserverpb.Auth/Authenticate":     true,
	"/etcdserverpb.Auth/UserGet":          true,
	"/etcdserverpb.Auth/UserList":         true,
	"/etcdserverpb.Auth/RoleGet":          true,
	"/etcdserverpb.Auth/RoleList":         true,
	"/etcdserverpb.Auth/AuthStatus":       true,
	"/v3electionpb.Election/Leader":       true,
	"/v3electionpb.Election/Observe":      true,
	"/grpc.health.v1.Health/Check":        true,
	"/grpc.health.v1.Health/Watch":        true,
}

// Request implements Rule.
func (r *ReadOnly) Request(req *http.Request) (*http.Response, error) {
	switch {
	case !r.Enabled:
		return nil, nil
	case IsGRPC(req):
		if readOnlyMethods[req.URL.Path] {
			return nil, nil
		}
		return GRPCReply(req, CodePermissionDenied, "etcd-proxy-proxy: read-only proxy"), nil
	case req.Method == http.MethodGet || req.Method == http.MethodHead:
		return nil, nil
	}
	return Reply(req, http.StatusNotImplemented, "etcd-proxy-proxy: read-only proxy"), nil
}

// Hidden answers 404 for the endpoints that describe a hop rather than the cluster: /debug/ (a member's or a
// stock proxy's command line and listen addresses) and /v2/config/local/ (the stock proxy's member endpoints).
type Hidden struct{ Passthrough }

// Name implements Rule.
func (*Hidden) Name() string { return "hidden" }

// hiddenPrefixes are the paths Hidden does not forward.
var hiddenPrefixes = []string{"/debug/", "/v2/config/local/"}

// Request implements Rule.
func (*Hidden) Request(req *http.Request) (*http.Response, error) {
	for _, p := range hiddenPrefixes {
		if strings.HasPrefix(req.URL.Path, p) || req.URL.Path+"/" == p {
			return Reply(req, http.StatusNotFound, "etcd-proxy-proxy: "+req.URL.Path+" is not forwarded"), nil
		}
	}
	return nil, nil
}

// Headers collapses a header that stacked hops repeated with the same value (CORS headers added by a stock
// proxy and by the member behind it) into one.
type Headers struct{ Passthrough }

// Name implements Rule.
func (*Headers) Name() string { return "headers" }

// multiValued are headers whose repeated values are meaningful and stay as they are.
var multiValued = map[string]bool{"Set-Cookie": true, "Warning": true, "Www-Authenticate": true, "Vary": true}

// Response implements Rule.
func (*Headers) Response(resp *http.Response) (BodyFunc, error) {
	for k, vs := range resp.Header {
		if len(vs) < 2 || multiValued[k] {
			continue
		}
		out := vs[:1]
		for _, v := range vs[1:] {
			if !slices.Contains(out, v) {
				out = append(out, v)
			}
		}
		resp.Header[k] = out
	}
	return nil, nil
}

var (
	_ Rule = (*Loop)(nil)
	_ Rule = (*ReadOnly)(nil)
	_ Rule = (*Hidden)(nil)
	_ Rule = (*Headers)(nil)
)
