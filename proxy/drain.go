package proxy

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"sync"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// errShuttingDown is the cause of a stream ended by Server.Shutdown.
var errShuttingDown = errors.New("etcd-proxy-proxy is shutting down")

// msgShuttingDown is what a client whose stream was ended by a shutdown reads.
const msgShuttingDown = "etcd-proxy-proxy: shutting down; reconnect"

// streamKey carries the streamState of a request that a shutdown may end.
type streamKey struct{}

// streamState is what ending a stream cleanly needs: the client's ResponseWriter, for the trailers, and the
// request body's limiter, to tell a message over the limit from a broken upstream; and what ending it when its
// upstream goes away needs (streams.go).
type streamState struct {
	w      http.ResponseWriter
	limit  *grpcLimitBody // nil but for gRPC
	f      *Forwarder
	in     io.Closer               // the client's body, when the transport may close it (closableBody)
	cancel context.CancelCauseFunc // ends the request toward the upstream

	mu      sync.Mutex
	ep      *endpoint // where the last attempt went
	unwatch func()    // stops the liveness checks of ep; nil when none
}

// drainable reports the requests that last as long as the client wants — watches, lease keep-alives, election
// observers, v2 long polls — and the calls that wait as long (v3 Lock and Campaign), which a graceful shutdown
// ends at once instead of waiting for them. A snapshot is long too, but it ends by itself.
func drainable(r *http.Request) bool {
	_, method, stream := classifyRequest(r)
	if stream {
		return !snapshots[method]
	}
	return waiters[method]
}

// snapshots and waiters are method labels of classifyRequest.
var (
	snapshots = map[string]bool{"etcdserverpb.Maintenance/Snapshot": true, "/v3/maintenance/snapshot": true,
		"/v3beta/maintenance/snapshot": true}
	waiters = map[string]bool{"v3lockpb.Lock/Lock": true, "v3electionpb.Election/Campaign": true,
		"/v3/lock/lock": true, "/v3beta/lock/lock": true, "/v3/election/campaign": true, "/v3beta/election/campaign": true}
)

// drainStream ties r to the forwarder's drain: when Shutdown starts, the request toward the upstream is
// cancelled with errShuttingDown, and the client gets a clean end (drainedBody, handleError).
func (f *Forwarder) drainStream(w http.ResponseWriter, r *http.Request) (*http.Request, func()) {
	ctx, cancel := context.WithCancelCause(r.Context())
	stop := context.AfterFunc(f.drain, func() { cancel(errShuttingDown) })
	st := &streamState{w: w, f: f, in: closableBody(r), cancel: cancel}
	st.limit, _ = r.Body.(*grpcLimitBody)
	ctx = context.WithValue(ctx, streamKey{}, st)
	return r.WithContext(ctx), func() { stop(); st.end(); cancel(nil) }
}

// drained reports whether the request was ended by a shutdown.
func drained(r *http.Request) bool { return errors.Is(context.Cause(r.Context()), errShuttingDown) }

// endStreamCleanly makes the streamed answer of a drainable request end cleanly when the proxy ends it: on a
// shutdown the body ends (a v2 stream watch gets its last chunk) and a gRPC stream gets Unavailable, which
// clients retry; a gRPC message over --max-request-bytes ends the stream with ResourceExhausted; when the
// upstream connection is lost, the same as on a shutdown, with msgUpstreamLost (streams.go).
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
		b.trailers(rules.CodeUnavailable, msgShuttingDown)
	case b.st.limit != nil && b.st.limit.exceeded.Load():
		b.trailers(rules.CodeResourceExhausted, msgTooLarge)
	case b.req.Context().Err() == nil || lost(b.req): // not the client that went away: the upstream
		b.st.upstreamLost(b.req, err)
		b.trailers(rules.CodeUnavailable, msgUpstreamLost)
	default:
		return n, err
	}
	return n, io.EOF
}

func (b *drainedBody) trailers(code int, msg string) {
	if !rules.IsGRPC(b.req) {
		return
	}
	h := b.st.w.Header()
	h.Set(http.TrailerPrefix+rules.GRPCStatusHeader, strconv.Itoa(code))
	h.Set(http.TrailerPrefix+rules.GRPCMessageHeader, msg)
}
