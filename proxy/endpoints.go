package proxy

import (
	"context"
	"net"
	"net/url"
	"slices"
	"sync/atomic"
	"time"
)

// endpoint is one upstream URL and what is known of its health.
type endpoint struct {
	url *url.URL
	// probeOK is what the background probe last found (true until it has looked).
	probeOK atomic.Bool
	// failedUntil (Unix nanoseconds): a request could not reach it, so new requests avoid it until then
	// (--proxy-failure-wait) or until the probe finds it healthy again.
	failedUntil atomic.Int64
}

func newEndpoint(u *url.URL) *endpoint {
	e := &endpoint{url: u}
	e.probeOK.Store(true)
	return e
}

func (e *endpoint) available(now int64) bool {
	return e.probeOK.Load() && now >= e.failedUntil.Load()
}

// endpointSet is the current list of upstream endpoints (--upstream, or what discovery found) and the policy
// that spreads requests over them.
//
// The policy is connection affinity: each client connection is pinned to one available endpoint, new
// connections are assigned round-robin, and a connection moves only when its endpoint stops being available.
// Many clients on a host spread over the members, while one client's requests — a gRPC client multiplexes all
// of them on one connection — see one member, as they would connected to it directly: its serializable reads
// and v2 reads without quorum never go back in time, and its watches and leases stay on the member that has
// them.
type endpointSet struct {
	list        atomic.Pointer[[]*endpoint]
	next        atomic.Uint32
	failureWait time.Duration
	// removed, if set, is told the endpoints that set dropped (their idle connections can go).
	removed func([]*url.URL)
	// troubled, if set, is told that an endpoint was found unreachable — by a request or by the probe — so
	// that discovery looks again at once: its member may have come back on other URLs (discovery.go).
	troubled func()
}

func newEndpointSet(urls []*url.URL, failureWait time.Duration) *endpointSet {
	s := &endpointSet{failureWait: failureWait}
	s.set(urls)
	return s
}

// current is the list in preference order (empty until discovery found one); callers must not change it.
func (s *endpointSet) current() []*endpoint {
	if p := s.list.Load(); p != nil {
		return *p
	}
	return nil
}

// someURL is an endpoint's URL for the parts of a request every endpoint shares (ReverseProxy's SetURL); send
// sets the endpoint's own.
func (s *endpointSet) someURL() *url.URL {
	if eps := s.current(); len(eps) > 0 {
		return eps[0].url
	}
	return &url.URL{Scheme: "http", Host: "upstream.invalid"}
}

// set replaces the list; an endpoint that stays keeps what is known of its health. An empty list is ignored:
// serving on with the last endpoints known beats refusing everything.
func (s *endpointSet) set(urls []*url.URL) (changed bool) {
	if len(urls) == 0 {
		return false
	}
	var old []*endpoint
	if p := s.list.Load(); p != nil {
		old = *p
	}
	list := make([]*endpoint, 0, len(urls))
	for _, u := range urls {
		i := slices.IndexFunc(old, func(e *endpoint) bool { return e.url.String() == u.String() })
		if i >= 0 {
			list = append(list, old[i])
		} else {
			list = append(list, newEndpoint(u))
		}
	}
	if slices.Equal(list, old) {
		return false
	}
	s.list.Store(&list)
	var gone []*url.URL
	for _, e := range old {
		if !slices.Contains(list, e) {
			gone = append(gone, e.url)
		}
	}
	if len(gone) > 0 && s.removed != nil {
		s.removed(gone)
	}
	return true
}

// failed marks e as unreachable for the failure wait.
func (s *endpointSet) failed(e *endpoint) {
	e.failedUntil.Store(time.Now().Add(s.failureWait).UnixNano())
	s.trouble()
}

// trouble tells troubled, if set, that an endpoint was found unreachable.
func (s *endpointSet) trouble() {
	if s.troubled != nil {
		s.troubled()
	}
}

// order returns the endpoints in the order a request tries them: the connection's pinned endpoint if it is
// available, else the next available one round-robin; then the other available ones; then, as a last resort
// (nothing is known to be reachable), the unavailable ones. It allocates only the returned slice.
func (s *endpointSet) order(aff *affinity) []*endpoint {
	eps := s.current()
	if len(eps) <= 1 {
		return eps // nothing to choose
	}
	now := time.Now().UnixNano()
	first := -1
	if aff != nil {
		if p := aff.ep.Load(); p != nil && p.available(now) {
			first = slices.Index(eps, p)
		}
	}
	if first < 0 {
		start := int(s.next.Add(1)) % len(eps)
		for i := range eps {
			if j := (start + i) % len(eps); eps[j].available(now) {
				first = j
				break
			}
		}
		if first < 0 {
			first = start
		}
		if aff != nil {
			aff.ep.Store(eps[first])
		}
	}
	out := make([]*endpoint, 0, len(eps))
	out = append(out, eps[first])
	for _, want := range []bool{true, false} {
		for i := 1; i < len(eps); i++ {
			if e := eps[(first+i)%len(eps)]; e.available(now) == want {
				out = append(out, e)
			}
		}
	}
	return out
}

// affinity is the endpoint a client connection is pinned to; every request of the connection shares it.
type affinity struct{ ep atomic.Pointer[endpoint] }

type affinityKey struct{}

// withAffinity is an http.Server ConnContext: it gives every client connection its own affinity.
func withAffinity(ctx context.Context, _ net.Conn) context.Context {
	return context.WithValue(ctx, affinityKey{}, new(affinity))
}

func affinityOf(ctx context.Context) *affinity {
	a, _ := ctx.Value(affinityKey{}).(*affinity)
	return a
}
