package rules

import (
	"net/http"
	"regexp"
	"strings"
)

// gRPC as the HTTP half sees it: the wire names, to tell a gRPC call that reached the HTTP side. The calls
// themselves never go through the HTTP rules: the proxy's gRPC core serves them, with the message rules
// (message.go); and the scrub of status messages from below, which the core applies where they come in.

// gRPC wire names.
const (
	GRPCContentType   = "application/grpc"
	GRPCMessageHeader = "Grpc-Message"
)

// CodeResourceExhausted is the gRPC status of a message over a limit (google.golang.org/grpc/codes).
const CodeResourceExhausted = 8

// IsGRPC reports whether req is a gRPC call.
func IsGRPC(req *http.Request) bool {
	return req.ProtoMajor == 2 && strings.HasPrefix(req.Header.Get("Content-Type"), GRPCContentType)
}

// transportWords mark an error of the connections below the proxy.
var transportWords = regexp.MustCompile(`(?i)\b(lookup|dial|x509|tls|transport|certificate|connection error|connect)\b`)

// TransportFailure replaces a status message about the transport below the proxy.
const TransportFailure = "etcd-proxy-proxy: the connection to the upstream failed below the proxy"

// ScrubGRPCMessage returns the status message a client gets for a status of code with msg from below: msg itself
// when it is known (KnownGRPCMessage), else TransportFailure for an error of the connections below, else
// WithheldMessage(code), or nothing for OK. The proxy's gRPC core passes every status through it. The hops below
// put addresses in statuses: a stock grpc-proxy's Unavailable reads "... dial tcp 10.0.0.1:2379: connect:
// connection refused", a failed name lookup or certificate check names hosts, and an upstream of another kind may
// say anything. Free text cannot be scrubbed completely, so a message passes only when it is known, and any other
// is replaced as a whole. (The core builds the client's status anew from the code and this message: the
// upstream's grpc-status-details-bin, which may hold anything, never passes.)
func ScrubGRPCMessage(code int, msg string) string {
	switch {
	case KnownGRPCMessage(msg):
		return msg
	case transportWords.MatchString(msg):
		return TransportFailure
	}
	if code == 0 {
		return "" // a client ignores the message of OK
	}
	return WithheldMessage(code)
}
