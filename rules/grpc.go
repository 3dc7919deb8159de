package rules

import (
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
)

// gRPC as the HTTP half sees it: the wire names and a trailers-only answer, for the proxy's own answers to gRPC
// calls that reach its HTTP side. The calls themselves never go through the HTTP rules: the proxy's gRPC core
// serves them, with the message rules (message.go).

// gRPC wire names.
const (
	GRPCContentType   = "application/grpc"
	GRPCStatusHeader  = "Grpc-Status"
	GRPCMessageHeader = "Grpc-Message"
)

// gRPC status codes used here (google.golang.org/grpc/codes).
const (
	CodeUnknown            = 2
	CodeDeadlineExceeded   = 4
	CodePermissionDenied   = 7
	CodeResourceExhausted  = 8
	CodeFailedPrecondition = 9
	CodeInternal           = 13
	CodeUnavailable        = 14
)

// IsGRPC reports whether req is a gRPC call.
func IsGRPC(req *http.Request) bool {
	return req.ProtoMajor == 2 && strings.HasPrefix(req.Header.Get("Content-Type"), GRPCContentType)
}

// GRPCReply answers a gRPC call with a status and no message (a trailers-only response).
func GRPCReply(req *http.Request, code int, message string) *http.Response {
	resp := JSONResponse(req, http.StatusOK, nil)
	SetGRPCStatus(resp.Header, code, message)
	resp.Header.Del("Content-Length")
	// Known to be empty: with an unknown length (-1) httputil.ReverseProxy starts a flush timer that fires at
	// once and can send the headers before the handler ends, splitting the trailers-only answer into headers
	// and an empty end of stream ("server closed the stream without sending trailers").
	resp.ContentLength = 0
	resp.Proto, resp.ProtoMajor, resp.ProtoMinor = "HTTP/2.0", 2, 0
	return resp
}

// SetGRPCStatus writes a trailers-only gRPC status into h.
func SetGRPCStatus(h http.Header, code int, message string) {
	h.Set("Content-Type", GRPCContentType)
	h.Set(GRPCStatusHeader, strconv.Itoa(code))
	h.Set(GRPCMessageHeader, encodeGRPCMessage(message))
}

// encodeGRPCMessage percent-encodes as the gRPC spec asks for Grpc-Message.
func encodeGRPCMessage(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= ' ' && c <= '~' && c != '%' {
			b.WriteByte(c)
		} else {
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
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
