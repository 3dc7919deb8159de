package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"sync"
)

// errShuttingDown is the cause of a stream ended by Server.Shutdown.
var errShuttingDown = errors.New("etcd-proxy-proxy is shutting down")

// msgShuttingDown is what a client whose stream was ended by a shutdown reads.
const msgShuttingDown = "etcd-proxy-proxy: shutting down; reconnect"

// streamKey carries the streamState of a request that a shutdown may end.
type streamKey struct{}

// streamState is what ending a stream cleanly needs, and what ending it when its upstream goes away needs
// (streams.go).
type streamState struct {
	f      *Forwarder
	cancel context.CancelCauseFunc // ends the request toward the upstream

	mu      sync.Mutex
	ep      *endpoint // where the last attempt went
	unwatch func()    // stops the liveness checks of ep; nil when none
}

// drainable reports the v2 requests that last as long as the client wants — long polls and stream watches —
// which a graceful shutdown ends at once instead of waiting for them. gRPC calls (and the JSON gateway's, which
// are gRPC calls inside) are ended by the gRPC core (rules.Method.Long).
func (c requestClass) drainable() bool { return c.api == apiV2 && c.stream }

// drainStream ties r to the forwarder's drain: when Shutdown starts, the request toward the upstream is
// cancelled with errShuttingDown, and the client gets a clean end (drainedBody, handleError).
func (f *Forwarder) drainStream(w http.ResponseWriter, r *http.Request) (*http.Request, func()) {
	ctx, cancel := context.WithCancelCause(r.Context())
	stop := context.AfterFunc(f.drain, func() { cancel(errShuttingDown) })
	st := &streamState{f: f, cancel: cancel}
	ctx = context.WithValue(ctx, streamKey{}, st)
	return r.WithContext(ctx), func() { stop(); st.end(); cancel(nil) }
}

// drained reports whether the request was ended by a shutdown.
func drained(r *http.Request) bool { return errors.Is(context.Cause(r.Context()), errShuttingDown) }

// endStreamCleanly makes the streamed answer of a drainable request end cleanly when the proxy ends it: on a
// shutdown, or when the upstream connection is lost (streams.go), the body ends (a v2 stream watch gets its
// last chunk).
func endStreamCleanly(resp *http.Response) {
	st, ok := resp.Request.Context().Value(streamKey{}).(*streamState)
	if !ok {
		return
	}
	resp.Body = &drainedBody{ReadCloser: resp.Body, req: resp.Request, st: st}
}

type drainedBody struct {
	io.ReadCloser
	req *http.Request
	st  *streamState
}

func (b *drainedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == nil || err == io.EOF {
		return n, err
	}
	switch {
	case drained(b.req):
	case b.req.Context().Err() == nil || lost(b.req): // not the client that went away: the upstream
		b.st.upstreamLost(b.req, err)
	default:
		return n, err
	}
	return n, io.EOF
}
