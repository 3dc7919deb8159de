package rules

import (
	"log/slog"
	"net/http"
	"slices"
	"strings"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

// ViaHeader carries the instance IDs of the proxy-proxies a request has passed, so that a proxy that sees its own
// ID knows it is in a loop. It is an end-to-end request header: stock proxies forward it untouched.
const ViaHeader = "X-Etcd-Proxy-Proxy-Via"

// The texts of Loop and ReadOnly, in both halves.
const (
	msgLoop     = "etcd-proxy-proxy: request loop detected (this proxy is its own upstream)"
	msgReadOnly = "etcd-proxy-proxy: read-only proxy"
)

// Options configure the default chain.
type Options struct {
	// Self is the member every membership view shows.
	Self Self
	// Instance identifies this running proxy in ViaHeader; it must differ between processes (random).
	Instance string
	// ForwardMemberChanges forwards membership changes instead of rejecting them.
	ForwardMemberChanges bool
	// ReadOnly answers every HTTP request but GET and HEAD with 501, and every gRPC call that could change
	// something with PermissionDenied.
	ReadOnly bool
	// SnapshotSpoolDir is where snapshots are spooled to be rewritten; empty means os.TempDir().
	SnapshotSpoolDir string
	// MaxSnapshotBytes bounds a snapshot from the upstream; zero means DefaultMaxSnapshotBytes.
	MaxSnapshotBytes int64
	// EncryptPrefixes are the key prefixes whose values Encrypt encrypts with EncryptionKeys; none: off.
	EncryptPrefixes []string
	EncryptionKeys  *crypt.Keyring
	// EncryptionResources, when set, replace EncryptPrefixes and EncryptionKeys (--encryption-config).
	EncryptionResources []EncryptResource
	// EncryptionMaxRequestBytes is the upstream's --max-request-bytes; zero means DefaultEncryptMaxRequestBytes.
	EncryptionMaxRequestBytes int64
	// Log receives what rules log; nil means slog.Default().
	Log *slog.Logger
}

// Default is the default chain, the one place its order is written down. Requests see it top to bottom,
// responses bottom to top. It serves both halves: the HTTP rules (v2, and what else comes over HTTP) and the
// message rules (gRPC, and the JSON gateway, which the proxy serves through its gRPC path) — the rules that
// implement MessageRule, in the same order. Statuses from below are scrubbed by the gRPC core itself
// (ScrubGRPCMessage) where they come in, so every rule sees them clean.
func Default(o Options) []Rule {
	return []Rule{
		&Loop{Instance: o.Instance},    // first: a looping request must reach nothing else, not even the upstream
		&ReadOnly{Enabled: o.ReadOnly}, // before any rule that could answer a write
		&Hidden{},                      // debug and proxy-config endpoints of the hops below reveal their addresses
		&Members{Self: o.Self, Forward: o.ForwardMemberChanges}, // membership views answered with ourselves
		&Machines{Self: o.Self},                                 // /v2/machines, the oldest membership view
		&Stats{Self: o.Self},                                    // /v2/stats/self and /leader name a member and its leader
		snapshotRule(o),                                         // the database in a snapshot names every member
		encryptRule(o),                                          // near the upstream: every rule above sees plaintext values
		&Headers{},                                              // last on the way up, so its response side runs first and every rule sees clean headers
	}
}

// Loop answers 508 Loop Detected (gRPC: FailedPrecondition) when a request already carries this proxy's
// instance ID (gRPC: in the x-etcd-proxy-proxy-via metadata), and adds the ID otherwise.
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
			return Reply(req, http.StatusLoopDetected, msgLoop), nil
		}
	}
	req.Header.Add(ViaHeader, l.Instance)
	return nil, nil
}

// ReadOnly answers 501 Not Implemented to every request but GET and HEAD, as etcd's readonly proxy does, and
// PermissionDenied to every gRPC call that could change something (the methods not marked ReadOnly in the
// table of etcd's methods, api.go, and every method etcd does not serve).
type ReadOnly struct {
	Passthrough
	// Enabled switches the rule on.
	Enabled bool
}

// Name implements Rule.
func (*ReadOnly) Name() string { return "readonly" }

// Request implements Rule.
func (r *ReadOnly) Request(req *http.Request) (*http.Response, error) {
	if !r.Enabled || req.Method == http.MethodGet || req.Method == http.MethodHead {
		return nil, nil
	}
	return Reply(req, http.StatusNotImplemented, msgReadOnly), nil
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
