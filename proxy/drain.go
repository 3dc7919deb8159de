package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strings"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// errShuttingDown is the cause of a stream ended by Server.Shutdown.
var errShuttingDown = errors.New("etcd-proxy-proxy is shutting down")

// msgShuttingDown is what a client whose stream was ended by a shutdown reads.
const msgShuttingDown = "etcd-proxy-proxy: shutting down; reconnect"

// streamKey carries the client's ResponseWriter of a stream that a shutdown may end.
type streamKey struct{}

// drainable reports the requests that last as long as the client wants — watches, lease keep-alives, election
// observers, v2 long polls — which a graceful shutdown ends at once instead of waiting for them. A snapshot
// is a long request too, but it ends by itself.
func drainable(r *http.Request) bool {
	_, method, stream := classifyRequest(r)
	return stream && !strings.Contains(strings.ToLower(method), "snapshot")
}

// drainStream ties r to the forwarder's drain: when Shutdown starts, the request toward the upstream is
// cancelled with errShuttingDown, and the client gets a clean end (drainedBody, handleError).
func (f *Forwarder) drainStream(w http.ResponseWriter, r *http.Request) (*http.Request, func()) {
	ctx, cancel := context.WithCancelCause(r.Context())
	stop := context.AfterFunc(f.drain, func() { cancel(errShuttingDown) })
	ctx = context.WithValue(ctx, streamKey{}, w)
	return r.WithContext(ctx), func() { stop(); cancel(nil) }
}

// drained reports whether the request was ended by a shutdown.
func drained(r *http.Request) bool { return errors.Is(context.Cause(r.Context()), errShuttingDown) }

// endOnDrain makes the streamed answer of a drainable request end cleanly when a shutdown cancels it: the body
// ends (a v2 stream watch gets its last chunk), and a gRPC stream gets Unavailable, which clients retry.
func endOnDrain(resp *http.Response) {
	w, ok := resp.Request.Context().Value(streamKey{}).(http.ResponseWriter)
	if !ok {
		return
	}
	resp.Body = &drainedBody{ReadCloser: resp.Body, req: resp.Request, w: w}
}

type drainedBody struct {
	io.ReadCloser
	req *http.Request
	w   http.ResponseWriter
}

func (b *drainedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF && drained(b.req) {
		if rules.IsGRPC(b.req) {
			h := b.w.Header()
			h.Set(http.TrailerPrefix+rules.GRPCStatusHeader, "14")
			h.Set(http.TrailerPrefix+rules.GRPCMessageHeader, msgShuttingDown)
		}
		return n, io.EOF
	}
	return n, err
}
