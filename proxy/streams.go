package proxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"google.golang.org/grpc"
)

// Streams whose upstream goes away end for the client (contract rule 6): a gRPC stream with Unavailable and
// msgUpstreamLost (grpccore.go), a v2 long poll or stream watch with the end of its response (or 502 before its
// headers). etcd's clients re-establish them by themselves, to the proxy, which picks an available endpoint;
// resuming a watch inside the proxy belongs with watch fan-out, which will hold one upstream watch per key range.
//
// What keeps a stream open after its upstream connection is gone is a connection that stops answering without
// closing (a stopped process, a host gone): HTTP/1.1 has no ping, and grpc-go pings no more often than every 10 s.
// liveChecks asks the endpoint of such streams (or their gRPC connection) every --upstream-keepalive-time and
// ends them when no answer comes within --upstream-keepalive-timeout.

// msgUpstreamLost is what a client reads when its stream ended because the upstream connection under it was lost.
const msgUpstreamLost = "etcd-proxy-proxy: the upstream connection was lost; retry"

// errUpstreamLost is the cause of a stream ended because its upstream stopped answering (liveChecks).
var errUpstreamLost = errors.New("the upstream of a stream stopped answering")

// Defaults of the upstream keep-alive: HTTP/2 pings (gRPC, and TLS upstreams that speak HTTP/2), and the
// liveness checks of HTTP/1.1 streams.
const (
	DefaultUpstreamKeepAliveTime    = 30 * time.Second
	DefaultUpstreamKeepAliveTimeout = 15 * time.Second
)

// lost reports whether r was ended because its upstream stopped answering.
func lost(r *http.Request) bool { return errors.Is(context.Cause(r.Context()), errUpstreamLost) }

// upstreamLost ends a stream whose upstream went away: the endpoint is avoided for --proxy-failure-wait (the
// probe brings it back sooner), so that the client's new stream goes elsewhere — unless only the stream's own
// read timed out (--proxy-read-timeout), which says nothing about the endpoint. The first stream to find the
// endpoint gone logs a warning, the others (a member may have carried thousands) only at debug level.
func (st *streamState) upstreamLost(r *http.Request, err error) {
	if st.f == nil {
		return
	}
	e := st.endpoint()
	var nerr net.Error
	if !lost(r) && errors.As(err, &nerr) && nerr.Timeout() {
		e = nil // only its own read timed out
	}
	st.f.lostStream(r.Context(), e, err, "method", r.Method, "path", r.URL.Path)
}

// lostStream records a stream ended because its upstream connection was lost: its endpoint e (nil: not to be
// blamed) is avoided for --proxy-failure-wait, and the stream is counted and logged — a warning for the first
// stream to find the endpoint gone, debug for the others (a member may have carried thousands).
func (f *Forwarder) lostStream(ctx context.Context, e *endpoint, err error, attrs ...any) {
	first := true
	if e != nil {
		first = e.available(time.Now().UnixNano())
		f.endpoints.failed(e)
	}
	if f.streamLost != nil {
		f.streamLost()
	}
	level := slog.LevelDebug
	if first {
		level = slog.LevelWarn
	}
	f.log.Log(ctx, level, "stream ended: its upstream connection was lost", append(attrs, "err", err)...)
}

// useEndpoint records the endpoint a stream's attempt goes to and, for streams without HTTP/2 pings, has its
// liveness checked until the stream ends or goes elsewhere.
func (st *streamState) useEndpoint(e *endpoint, check bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.unwatch != nil {
		st.unwatch()
		st.unwatch = nil
	}
	st.ep = e
	if check && st.f != nil && st.f.live != nil && st.cancel != nil {
		st.unwatch = st.f.live.watch(e, st)
	}
}

func (st *streamState) endpoint() *endpoint {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.ep
}

// end stops the liveness checks of a finished stream.
func (st *streamState) end() {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.unwatch != nil {
		st.unwatch()
		st.unwatch = nil
	}
}

// liveChecks checks the endpoints of HTTP/1.1 streams (v2 long polls and stream watches): one check per
// endpoint every interval, shared by all its streams, and only while it has some. A check is GET /version,
// which every etcd, stock proxy and proxy-proxy answers; any answer will do. None within timeout ends every
// stream of the endpoint.
type liveChecks struct {
	f                 *Forwarder
	interval, timeout time.Duration
	mu                sync.Mutex
	streams           map[liveTarget]map[*streamState]struct{}
}

// liveTarget is what a check asks: an endpoint over HTTP/1.1, or one upstream gRPC connection (cc set) — grpc-go
// pings no more often than every 10 s, and a stream must end within --upstream-keepalive-time and -timeout.
type liveTarget struct {
	e  *endpoint
	cc *grpc.ClientConn
}

func newLiveChecks(f *Forwarder, interval, timeout time.Duration) *liveChecks {
	if interval <= 0 {
		return nil
	}
	return &liveChecks{f: f, interval: interval, timeout: timeout, streams: map[liveTarget]map[*streamState]struct{}{}}
}

// watch adds st to e's streams and returns what removes it.
func (l *liveChecks) watch(e *endpoint, st *streamState) func() {
	return l.watchTarget(liveTarget{e: e}, st)
}

// watchTarget adds st to the streams of a target and returns what removes it.
func (l *liveChecks) watchTarget(e liveTarget, st *streamState) func() {
	l.mu.Lock()
	set, ok := l.streams[e]
	if !ok {
		set = map[*streamState]struct{}{}
		l.streams[e] = set
		go l.run(e)
	}
	set[st] = struct{}{}
	l.mu.Unlock()
	return func() {
		l.mu.Lock()
		delete(set, st)
		l.mu.Unlock()
	}
}

// run checks e until it has no stream left.
func (l *liveChecks) run(e liveTarget) {
	t := time.NewTicker(l.interval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-l.f.drain.Done():
			l.mu.Lock()
			delete(l.streams, e)
			l.mu.Unlock()
			return
		}
		l.mu.Lock()
		if len(l.streams[e]) == 0 {
			delete(l.streams, e)
			l.mu.Unlock()
			return
		}
		l.mu.Unlock()
		err := l.check(e)
		if err == nil {
			continue
		}
		l.mu.Lock()
		var ended []*streamState
		for st := range l.streams[e] {
			ended = append(ended, st)
		}
		l.mu.Unlock()
		if len(ended) > 0 {
			l.f.log.Warn("upstream endpoint stopped answering: its streams end", "streams", len(ended), "err", err)
		}
		for _, st := range ended {
			st.cancel(errUpstreamLost)
		}
	}
}

func (l *liveChecks) check(t liveTarget) error {
	ctx, cancel := context.WithTimeout(l.f.drain, l.timeout)
	defer cancel()
	if t.cc != nil {
		return checkGRPC(ctx, t.cc)
	}
	e := t.e
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, e.url.Scheme+"://"+e.url.Host+"/version", nil)
	if err != nil {
		return err
	}
	resp, err := l.f.transportFor(req).RoundTrip(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	return resp.Body.Close()
}
