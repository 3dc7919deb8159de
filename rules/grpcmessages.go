package rules

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

//go:generate go run ./internal/genmessages

// The gRPC status messages that pass ScrubGRPCMessage unchanged. Free text cannot be scrubbed completely (a
// host name, or an address glued to other characters, looks like any other word), so a message from below passes
// only when it is known: one of etcd's own fixed error texts, one of grpc-go's, or one of ours (so that chained
// proxy-proxies pass each other's texts on). Any other message is replaced by a fixed text for its code.
//
// Where the texts come from:
//   - etcdMessages (grpcmessages_etcd.go) is generated from the sources of etcd 3.5, 3.6 and 3.7 (rpctypes, the
//     server's errors, v3election, v3lock, clientv3 and the grpc-proxy): `go generate ./rules`. To follow a new
//     etcd line, add its newest release to releases in internal/genmessages/main.go and run it again.
//   - grpcGoMessages and grpcMessagePatterns are written by hand from grpc-go (v1.83: clientconn.go, stream.go,
//     rpc_util.go, server.go, internal/transport, status.FromContextError for context errors): the fixed texts a
//     client of an etcd member, a grpc-proxy or a proxy-proxy can get. Texts that embed an error or an address
//     ("connection error: desc = ...", "error reading from server: ...") are not listed: they are replaced.
//   - ownMessages are the texts this proxy sends as a gRPC status (rules/ and proxy/); a test in proxy/ checks
//     that every message the forwarder answers with is listed. A new message sent as a gRPC status goes here.

// grpcGoMessages are grpc-go's fixed status texts that reach clients.
var grpcGoMessages = []string{
	// status.FromContextError, used by grpc-go's server for a handler's context error, and by clients.
	"context canceled",
	"context deadline exceeded",
	// Client connection and transport (a grpc-proxy's clientv3 passes these on).
	"grpc: the client connection is closing",
	"grpc: the SubConn is closing",
	"the provided transport is no longer valid to use",
	"transport is closing",
	"the connection is draining",
	"the stream is rejected because server is draining the connection",
	"server closed the stream without sending trailers",
	"keepalive ping failed to receive ACK within timeout",
	"received goaway and there are no active streams",
	"no active streams left to process while draining",
	"client disconnected",
	"SubConn state is not Ready",
	// Framing and protocol.
	"grpc: compressed flag set with identity or empty encoding",
	"grpc: no decompressor available for compressed payload",
	"transport: SendHeader called multiple times",
	"transport: trying to send header list size larger than the limit set by peer",
	"transport: cannot send secure credentials on an insecure connection",
	"no host or :authority header present",
	"a HEADERS frame cannot appear in the middle of a stream",
	"peer header list size exceeded limit",
	"SendMsg called after CloseSend",
	"cardinality violation: received no response message from non-server-streaming RPC",
	"cardinality violation: expected <EOF> for non server-streaming RPCs, but received another message",
	"cardinality violation: received no request message from non-client-streaming RPC",
	"cardinality violation: received multiple request messages for non-client-streaming RPC",
}

// raftMessages are the raft library's errors that etcd passes to clients as they are (a proposal dropped while a
// member stops or has no leader: code Unknown). The generator reads etcd's modules, not raft's.
var raftMessages = []string{
	"raft proposal dropped", // raft.ErrProposalDropped
	"raft: stopped",         // raft.ErrStopped
}

// grpcMessagePatterns are grpc-go's texts with a variable part that cannot name a host: sizes, and HTTP/2 error
// code names.
var grpcMessagePatterns = []*regexp.Regexp{
	regexp.MustCompile(`^(grpc: )?(received|trying to send) message larger than max \(\d{1,20} vs\. \d{1,20}\)$`),
	regexp.MustCompile(`^grpc: received message larger than max length allowed on current machine \(\d{1,20} vs\. \d{1,20}\)$`),
	regexp.MustCompile(`^grpc: message after decompression larger than max \(\d{1,20} vs\. \d{1,20}\)$`),
	regexp.MustCompile(`^grpc: received message after decompression larger than max \d{1,20}$`),
	regexp.MustCompile(`^grpc: message too large \(\d{1,20} bytes\)$`),
	regexp.MustCompile(`^stream terminated by RST_STREAM with error code: [A-Z_]{1,32}$`),
}

// ownMessages are the texts the proxy itself answers gRPC calls with: the rules' (Loop, ReadOnly, Members) and
// the forwarder's (proxy/: forwarder.go handleError and classify, drain.go, bounds.go). Tests on both sides check
// that each answer is listed.
var ownMessages = []string{
	msgLoop,
	msgReadOnly,
	memberChangeRejected,
	moveLeaderRejected,
	msgSnapshotHash, msgSnapshotBroken, msgSnapshotMalformed, msgSnapshotRewrite, msgSnapshotSpool, // snapshot.go
	TransportFailure,
	"etcd-proxy-proxy: shutting down; reconnect",
	"etcd-proxy-proxy: request larger than --max-request-bytes",
	"etcd-proxy-proxy: the upstream does not serve gRPC (HTTP/2); etcd's v2 proxy relays only the v2 API",
	"etcd-proxy-proxy: TLS handshake with the upstream failed",
	"etcd-proxy-proxy: no upstream endpoint available",
	"etcd-proxy-proxy: upstream timed out",
	"etcd-proxy-proxy: unable to get a response from the upstream",
	"etcd-proxy-proxy: upstream response header too large",
	"etcd-proxy-proxy: the upstream connection was lost; retry", // proxy/streams.go
	"etcd-proxy-proxy: this client has no upstream identity (--upstream-identity=strict): " +
		"present a certificate whose common name has a pair in --upstream-cert-dir", // proxy/identity.go
}

// ownPatterns are our texts with a number in them.
var ownPatterns = []*regexp.Regexp{
	regexp.MustCompile(`^etcd-proxy-proxy: request larger than --max-request-bytes \(\d{1,20} bytes\)$`),
	regexp.MustCompile(`^` + regexp.QuoteMeta(msgSnapshotTooLarge) + ` \(\d{1,20} bytes\)$`),
	regexp.MustCompile(`^etcd-proxy-proxy: upstream answer larger than the method allows \(\d{1,20} bytes\)$`), // proxy/grpccore.go
}

// ruleMessages are our texts that name a rule: they pass for the rules of the default chain.
var ruleMessages = []string{
	"etcd-proxy-proxy: upstream response too large to rewrite (rule %s)",
	"etcd-proxy-proxy: rule %s could not handle the upstream response",
	"etcd-proxy-proxy: rule %s could not handle the call", // proxy/grpccore.go: a message rule's error that is not a status
}

// grpcCodeNames are the names of the gRPC status codes (google.golang.org/grpc/codes), by number.
var grpcCodeNames = [...]string{"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
	"AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
	"Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"}

// WithheldMessage is the text that replaces a status message from below that is not known, for its code.
func WithheldMessage(code int) string {
	name := "code " + strconv.Itoa(code)
	if code >= 0 && code < len(grpcCodeNames) {
		name = grpcCodeNames[code]
	}
	return "etcd-proxy-proxy: upstream error (" + name + "); message withheld"
}

// withheldPattern is WithheldMessage of any code: a proxy-proxy above passes it on.
var withheldPattern = regexp.MustCompile(`^etcd-proxy-proxy: upstream error \((?:` + strings.Join(grpcCodeNames[:], "|") +
	`|code \d{1,10})\); message withheld$`)

// knownGRPCMessages holds every fixed text that passes.
var knownGRPCMessages = func() map[string]bool {
	known := make(map[string]bool, len(etcdMessages)+len(grpcGoMessages)+len(ownMessages)+40)
	for _, list := range [][]string{etcdMessages, raftMessages, grpcGoMessages, ownMessages, encryptMessages} {
		for _, m := range list {
			known[m] = true
		}
	}
	for _, r := range Default(Options{}) {
		for _, format := range ruleMessages {
			known[fmt.Sprintf(format, r.Name())] = true
		}
	}
	return known
}()

// KnownGRPCMessage reports whether a status message passes ScrubGRPCMessage unchanged.
func KnownGRPCMessage(msg string) bool {
	if msg == "" || knownGRPCMessages[msg] || withheldPattern.MatchString(msg) {
		return true
	}
	for _, list := range [][]*regexp.Regexp{grpcMessagePatterns, ownPatterns} {
		for _, p := range list {
			if p.MatchString(msg) {
				return true
			}
		}
	}
	return false
}
