package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// Forwarder is an httputil.ReverseProxy whose Rewrite runs the request side of the rule chain, whose
// ModifyResponse runs the response side, and whose one ErrorHandler answers every failure in etcd's style.
type Forwarder struct {
	rp        httputil.ReverseProxy
	chain     chain
	endpoints *endpointSet
	known     *knownAddrs     // what names an upstream, taken out of answers (scrub.go)
	h1        *h1Transport    // plain-HTTP upstreams, HTTP/1.1 (h1.go)
	transport *http.Transport // TLS upstreams: HTTP/1.1, or HTTP/2 where TLS negotiates it; upgrades
	core      *grpcCore       // v3 gRPC, on grpc-go's transport (grpccore.go)
	gateway   *gateway        // the v3 JSON gateway, calling the gRPC core in memory
	// maxRequestBytes bounds a request body, or each message of a gRPC call.
	maxRequestBytes int64
	// drain is cancelled, with errShuttingDown, when the server shuts down: open streams end (drain.go).
	drain      context.Context
	startDrain context.CancelCauseFunc
	// dialTCP opens a connection to an upstream, with the write timeout; dialTLS puts TLS on top. Every upstream
	// connection is made by it: v2, gRPC, the JSON gateway's calls, probes, discovery.
	dialTCP func(ctx context.Context, network, addr string) (net.Conn, error)
	// tunnel is the dialer of --upstream-via under dialTCP (tunnel.go); nil when upstreams are dialled directly.
	tunnel *tunnelDialer
	// tunnelServer is --tunnel-listen (tunnelserver.go): our agents connect to it; nil without.
	tunnelServer *tunnelServer
	// upstreamTLS is the TLS configuration of a handshake with host: from the files as NewForwarder found them,
	// then, with the operations side, the ones reloaded last (reload.go useUpstreamTLS).
	upstreamTLS func(host string, protos []string) *tls.Config
	// dialTimeout bounds a connection attempt and a TLS handshake (dialTLS).
	dialTimeout time.Duration
	// ids are the per-client upstream identities of --upstream-cert-dir (identity.go); nil without one.
	ids *identities
	// live checks the endpoints of HTTP/1.1 streams (streams.go); nil when --upstream-keepalive-time is 0.
	live *liveChecks
	// streamLost, if set, is told of every stream ended because its upstream connection was lost (metrics).
	streamLost func()
	log        *slog.Logger
}

// exchangeKey carries the answer of a rule that replied (or failed) from Rewrite to the transport and
// ModifyResponse; requests that no rule answers carry nothing.
type exchangeKey struct{}

type exchange struct {
	reply *http.Response
	err   error
	n     int // rules whose response side runs
}

// forwarderOps is what the operations side gives a forwarder as it is built (nothing is wired in afterwards):
// the metrics and access log it reports to, and the source of upstream TLS configurations (reload.go). A nil
// field is an operation left out.
type forwarderOps struct {
	m      *metrics
	access *accessLogger
	// upstreamTLS, if set, makes every upstream handshake take the certificates loaded last.
	upstreamTLS func(host string, protos []string) *tls.Config
}

// NewForwarder builds the forwarder toward cfg.Upstreams with the given rules.
func NewForwarder(cfg *Config, rs []rules.Rule, log *slog.Logger) (*Forwarder, error) {
	return newForwarder(cfg, rs, log, forwarderOps{})
}

func newForwarder(cfg *Config, rs []rules.Rule, log *slog.Logger, ops forwarderOps) (*Forwarder, error) {
	if log == nil {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	f := &Forwarder{chain: chain{rules: rs, maxBody: cfg.MaxRuleBody}, log: log, maxRequestBytes: cfg.maxRequestBytes()}
	f.drain, f.startDrain = context.WithCancelCause(context.Background())
	var urls []*url.URL
	for _, s := range cfg.Upstreams {
		u, err := parseUpstream(s) // tunnel://AGENT-ID/URL is URL (tunnelserver.go)
		if err != nil {
			return nil, fmt.Errorf("upstream %q: %w", s, err)
		}
		urls = append(urls, u)
	}
	if len(urls) == 0 && cfg.DiscoverySRV == "" {
		return nil, errors.New("no upstream")
	}
	f.endpoints = newEndpointSet(urls, cfg.failureWait())
	f.known = &knownAddrs{endpoints: f.endpoints}
	f.endpoints.removed = func(gone []*url.URL) { // discovery dropped them: their pooled connections go too
		for _, u := range gone {
			f.h1.closeIdleTo(u.Host)
		}
		f.core.dropConns(gone)
	}
	// The files as they are now; with the operations side, reload.go's reloaded ones (ops.upstreamTLS).
	upTLS, err := loadUpstream(cfg.UpstreamTLS)
	if err != nil {
		return nil, fmt.Errorf("upstream TLS: %w", err)
	}
	dialTimeout := cfg.DialTimeout
	if dialTimeout <= 0 {
		dialTimeout = DefaultDialTimeout
	}
	f.dialTimeout = dialTimeout
	if f.ids, err = newIdentities(cfg, log); err != nil {
		return nil, err
	}
	dialer := &net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}
	// HTTP/2 health checks of upstream connections: a ping after pingAfter of silence, the connection closed when
	// no answer comes within pingTimeout; the same for the streams of HTTP/1.1 connections (streams.go).
	pingAfter, pingTimeout := cfg.upstreamKeepAlive()
	f.live = newLiveChecks(f, pingAfter, pingTimeout)
	writeTimeout, readTimeout := cfg.WriteTimeout, cfg.ReadTimeout
	// The one dialer of upstream connections: net.Dialer, or the tunnel of --upstream-via (tunnel.go).
	dialRaw := dialer.DialContext
	if f.tunnel, err = newTunnelDialer(&cfg.TunnelConfig, dialer, dialTimeout); err != nil {
		return nil, err
	}
	var agents func(float64)
	if ops.m != nil {
		agents = ops.m.tunnelAgents.Add
	}
	if f.tunnelServer, err = newTunnelServer(cfg, log, agents); err != nil {
		return nil, err
	}
	if f.tunnelServer != nil { // a dialer like --upstream-via's, and reached through the same code below
		f.tunnel = &tunnelDialer{close: f.tunnelServer.close, dial: boundedDial(f.tunnelServer.dial, dialTimeout)}
	}
	if f.tunnel != nil {
		var ok, failed func() // the tunnel's dials by result (metrics)
		if ops.m != nil {
			ok, failed = ops.m.tunnelDials.WithLabelValues("ok").Inc, ops.m.tunnelDials.WithLabelValues("failed").Inc
		}
		dialRaw = func(ctx context.Context, _, addr string) (net.Conn, error) {
			c, err := f.tunnel.dial(ctx, addr)
			switch {
			case ops.m == nil:
			case err != nil:
				failed()
			default:
				ok()
				ops.m.tunnelConns.Inc()
				c = &countedConn{Conn: c, gauge: ops.m.tunnelConns}
			}
			return c, err
		}
	}
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dialRaw(ctx, network, addr)
		if err == nil {
			f.known.dialled(c)
		}
		return c, err
	}
	f.dialTCP = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := dial(ctx, network, addr)
		if err != nil || writeTimeout <= 0 {
			return c, err
		}
		return &writeTimeoutConn{Conn: c, timeout: writeTimeout}, nil
	}
	f.transport = &http.Transport{
		DialContext:       f.dialTCP,
		ForceAttemptHTTP2: true,
		// Enough idle connections for c=64 load: the default 2 per host turns it into a reconnect storm.
		MaxIdleConns:        0,
		MaxIdleConnsPerHost: 1024,
		IdleConnTimeout:     90 * time.Second,
		// --proxy-read-timeout, 0 by default: a v2 watch (?wait=true) answers only when something changes. Not
		// a deadline on the connection's reads, as on the HTTP/1.1 path: an HTTP/2 connection carries other
		// requests, and a quiet one would take them all down.
		ResponseHeaderTimeout:  readTimeout,
		MaxResponseHeaderBytes: cfg.maxUpstreamHeaderBytes(),
	}
	f.h1 = &h1Transport{dial: dial, writeTimeout: writeTimeout, readTimeout: readTimeout, maxIdle: 1024,
		maxHeader: cfg.maxUpstreamHeaderBytes()}
	// Every TLS handshake is made here, so that a failed one is known for what it is: nothing was sent.
	f.upstreamTLS = ops.upstreamTLS
	if f.upstreamTLS == nil {
		f.upstreamTLS = func(host string, protos []string) *tls.Config {
			return upstreamConfig(cfg.UpstreamTLS, upTLS, host, protos)
		}
	}
	f.transport.DialTLSContext = f.dialTLS(dialTimeout, []string{"h2", "http/1.1"}, nil)
	// An upstream that vanished without closing (a host gone, a partition) is found by pings, not by the kernel's
	// keep-alive minutes later: watches and unary calls on that connection then fail instead of hanging.
	f.transport.HTTP2 = &http.HTTP2Config{SendPingTimeout: pingAfter, PingTimeout: pingTimeout}
	f.rp = httputil.ReverseProxy{
		Rewrite:        f.rewrite,
		Transport:      roundTripper{f},
		ModifyResponse: f.modifyResponse,
		ErrorHandler:   ops.m.countErrors(f.handleError), // metrics.go
		BufferPool:     bufferPool{},
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelDebug),
	}
	if ops.m != nil {
		f.streamLost = ops.m.errs[reasonStreamLost].Inc
	}
	f.core = newGRPCCore(f, cfg, rs, ops)
	if f.gateway, err = newGateway(f.core.srv); err != nil {
		if f.tunnel != nil {
			f.tunnel.close()
		}
		return nil, err
	}
	return f, nil
}

// ServeHTTP implements http.Handler.
func (f *Forwarder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var c requestClass
	if !rules.IsGRPC(r) {
		c = classifyRequest(r)
	}
	f.serve(w, r, c)
}

// serve serves a client request whose class is c (classifyRequest; zero for a gRPC call).
func (f *Forwarder) serve(w http.ResponseWriter, r *http.Request, c requestClass) {
	if rules.IsGRPC(r) {
		f.core.srv.ServeHTTP(w, r) // a gRPC call that came to the HTTP server (a connection that began with another request)
		return
	}
	r, ok := f.limitRequest(w, r) // bounds.go
	if !ok {
		return
	}
	if c.drainable() { // drain.go; streams.go ends them when their upstream goes
		var done func()
		r, done = f.drainStream(w, r)
		defer done()
	}
	switch {
	case c.api == apiV3JSON:
		f.gateway.handler.ServeHTTP(w, r)
		return
	case c.watch:
		w = &headerFlusher{ResponseWriter: w}
	}
	f.rp.ServeHTTP(w, r)
}

// Close drops idle upstream connections.
func (f *Forwarder) Close() {
	f.gateway.close()
	f.core.srv.Stop()
	f.core.close()
	f.h1.CloseIdleConnections()
	f.transport.CloseIdleConnections()
	f.ids.close()
	if f.tunnel != nil {
		f.tunnel.close()
	}
}

// isWatch reports a v2 long-poll: its answer may be a long time coming, so its headers must go out at once.
func isWatch(r *http.Request) bool {
	if !strings.Contains(r.URL.RawQuery, "wait=") {
		return false
	}
	wait, _ := strconv.ParseBool(r.URL.Query().Get("wait")) // as etcd reads it: 1, t, TRUE, …
	return wait
}

func (f *Forwarder) rewrite(pr *httputil.ProxyRequest) {
	// Append to the client's X-Forwarded-For (ReverseProxy strips it from Out before Rewrite), so that a chain
	// of proxies keeps the whole list.
	if xff := pr.In.Header.Values("X-Forwarded-For"); len(xff) > 0 {
		pr.Out.Header["X-Forwarded-For"] = slices.Clone(xff)
	}
	pr.SetXForwarded()
	// send picks the upstream endpoint; this sets the path and the Host header the way SetURL does.
	pr.SetURL(f.endpoints.someURL())
	if reply := f.identify(pr); reply != nil { // identity.go: the client's upstream identity, or a refusal
		pr.Out = pr.Out.WithContext(context.WithValue(pr.Out.Context(), exchangeKey{}, &exchange{reply: reply}))
		return
	}
	reply, n, err := f.chain.request(pr.Out)
	if reply != nil || err != nil {
		pr.Out = pr.Out.WithContext(context.WithValue(pr.Out.Context(), exchangeKey{}, &exchange{reply, err, n}))
	}
}

// roundTripper answers the requests a rule replied to and sends the others upstream.
type roundTripper struct{ f *Forwarder }

func (rt roundTripper) RoundTrip(req *http.Request) (*http.Response, error) {
	if ex, ok := req.Context().Value(exchangeKey{}).(*exchange); ok {
		if ex.err != nil {
			return nil, ex.err
		}
		// The request that carries the exchange, as a transport would set it: modifyResponse reads from it
		// how many rules' response sides run.
		ex.reply.Request = req
		return ex.reply, nil
	}
	return rt.f.send(req)
}

// send tries the upstream endpoints in the order the policy gives (endpoints.go). It moves on to the next when
// the request cannot have reached the previous one — the dial or the TLS handshake failed, and no byte of the
// body has been read, so the body is intact — or when it may have, but changes nothing there (retryable). A
// write that may have been delivered is never sent again: the client gets the error and decides.
func (f *Forwarder) send(req *http.Request) (*http.Response, error) {
	aff := affinityOf(req.Context())
	eps := f.endpoints.order(aff)
	st, _ := req.Context().Value(streamKey{}).(*streamState)
	var body *retryBody
	if req.Body != nil && req.Body != http.NoBody && len(eps) > 1 {
		body = &retryBody{rc: req.Body}
		body.hold.Store(true)
		req.Body = body
	}
	retry := retryable(req)
	var err error
	for i, e := range eps {
		if i > 0 {
			if req.GetBody != nil {
				b, _ := req.GetBody()
				body = &retryBody{rc: b}
				req.Body = body
			} else if body != nil && body.n.Load() > 0 {
				break // some of it went out: the request may have been received
			} else if body != nil {
				body.attempt()
			}
		}
		req.URL.Scheme, req.URL.Host = e.url.Scheme, e.url.Host
		if st != nil {
			st.useEndpoint(e, true)
		}
		var resp *http.Response
		resp, err = f.transportFor(req).RoundTrip(req)
		if err == nil {
			body.release()
			if aff != nil && i > 0 {
				aff.ep.Store(e) // the connection follows the endpoint that answered
			}
			return resp, nil
		}
		if cerr := req.Context().Err(); cerr != nil {
			return nil, cerr // the client went away (or a shutdown or a lost upstream ended the stream)
		}
		if !unreached(err) {
			if !retry || i == len(eps)-1 {
				return nil, err // the upstream had it, and nobody else will
			}
			continue
		}
		f.endpoints.failed(e)
	}
	body.release()
	if err == nil {
		err = errors.New("no upstream endpoint known")
	}
	return nil, &noEndpointError{err}
}

// retryable reports a request that may be sent to another endpoint even after it may have reached one: it
// changes nothing there. v2 GET and HEAD without wait (a long poll is the client's to restart); v3 Range is the
// gRPC core's (rules.Method.Retryable).
func retryable(req *http.Request) bool {
	return (req.Method == http.MethodGet || req.Method == http.MethodHead) &&
		(req.Body == nil || req.Body == http.NoBody) && !isWatch(req)
}

// transportFor picks the transport of a request: plain HTTP/1.1 takes the lean path (no certificate is
// presented there, whoever the client is), and a client with an upstream identity of its own has a transport of
// its own.
func (f *Forwarder) transportFor(req *http.Request) http.RoundTripper {
	h := f.transport
	if id := identityOf(req.Context()); id != nil {
		h = f.identityTransport(id) // identity.go
	}
	if f.h1.usable(req) {
		return f.h1
	}
	return h
}

func (f *Forwarder) modifyResponse(resp *http.Response) error {
	n := len(f.chain.rules)
	if ex, ok := resp.Request.Context().Value(exchangeKey{}).(*exchange); ok {
		n = ex.n
	}
	if err := f.chain.response(resp, n); err != nil {
		return err
	}
	f.fixLocation(resp)
	f.scrubUpstream(resp)  // scrub.go
	endStreamCleanly(resp) // drain.go
	return nil
}

// fixLocation makes an absolute redirect relative, so that the client stays on the proxy whichever hop below
// named itself, and drops the redirect's body (Go's http.Redirect repeats the URL there).
func (f *Forwarder) fixLocation(resp *http.Response) {
	loc := resp.Header.Get("Location")
	if loc == "" {
		return
	}
	u, err := url.Parse(loc)
	if err != nil {
		resp.Header.Del("Location")
	} else if u.Host == "" && u.Scheme == "" {
		return
	} else {
		u.Scheme, u.Host, u.User = "", "", nil
		if u.Path == "" {
			u.Path = "/"
		}
		resp.Header.Set("Location", u.String())
	}
	_ = resp.Body.Close()
	resp.Body, resp.ContentLength = http.NoBody, 0
	resp.Header.Set("Content-Length", "0")
}

// retryBody is a request body that survives a failed attempt: it counts what the transport read, and while
// held it does not pass Close on (http.Transport closes a request's body even when the dial fails, and
// ReverseProxy's body refuses every read after that). Once an attempt got an answer, or none is left, Close goes
// through again, so that a transport ending a stream still unblocks a Read. So does a Close once the transport
// has begun to read in this attempt: the request went out, it is not sent again, and the HTTP/2 transport waits
// for its Read to return before it reports a connection lost before the answer (streams.go).
type retryBody struct {
	rc      io.ReadCloser
	n       atomic.Int64
	hold    atomic.Bool
	closed  atomic.Bool // Close was called while held, in this attempt
	reading atomic.Bool // the transport has called Read in this attempt
}

// attempt starts an attempt with the body: what the transport did with it in the last one is forgotten.
func (b *retryBody) attempt() {
	b.closed.Store(false)
	b.reading.Store(false)
}

func (b *retryBody) Read(p []byte) (int, error) {
	if !b.reading.Swap(true) && b.closed.Load() {
		_ = b.rc.Close() // a Close raced with this first Read: it must not wait
	}
	n, err := b.rc.Read(p)
	b.n.Add(int64(n))
	return n, err
}

func (b *retryBody) Close() error {
	if b.hold.Load() {
		b.closed.Store(true)
		if !b.reading.Load() {
			return nil
		}
	}
	return b.rc.Close()
}

// release ends the hold; a Close that came while held is passed on now. Nil does nothing.
func (b *retryBody) release() {
	if b == nil || !b.hold.Swap(false) {
		return
	}
	if b.closed.Load() {
		_ = b.rc.Close()
	}
}

// noEndpointError: no upstream endpoint could be reached.
type noEndpointError struct{ err error }

func (e *noEndpointError) Error() string { return "no upstream endpoint available: " + e.err.Error() }
func (e *noEndpointError) Unwrap() error { return e.err }

// dialTLS opens a TLS connection to an upstream, verified against the host it dials (IP addresses too), with
// the TLS configuration loaded last, presenting as instead of its certificate when as is set (identity.go). A
// failed handshake is a handshakeError: nothing of a request was sent.
func (f *Forwarder) dialTLS(timeout time.Duration, protos []string, as *tls.Certificate) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		raw, err := f.dialTCP(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		hctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		tc := f.upstreamTLS(host, protos)
		if as != nil {
			tc.Certificates = []tls.Certificate{*as}
		}
		c := tls.Client(raw, tc)
		if err := c.HandshakeContext(hctx); err != nil {
			_ = raw.Close()
			return nil, &handshakeError{err}
		}
		return c, nil
	}
}

// unreached reports an error that proves the request never reached the upstream: the connection could not be
// made (dial) or secured (TLS handshake).
func unreached(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial" || errors.As(err, new(*handshakeError))
}

// handshakeError is a failed TLS handshake with an upstream: no byte of a request went out.
type handshakeError struct{ err error }

func (e *handshakeError) Error() string { return "TLS handshake: " + e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }

// handleError is the one place failures are answered: status from the kind of failure, a fixed message, never
// the error's own text (it names upstream addresses). The full error goes to the log.
func (f *Forwarder) handleError(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case lost(r): // streams.go: the upstream stopped answering before the stream's headers
		if st, ok := r.Context().Value(streamKey{}).(*streamState); ok {
			st.upstreamLost(r, err)
		}
		writeError(w, http.StatusBadGateway, msgUpstreamLost)
		return
	case drained(r):
		f.log.Debug("stream ended by shutdown", "method", r.Method, "path", r.URL.Path)
		writeError(w, http.StatusServiceUnavailable, msgShuttingDown)
		return
	case exceeded(r, err):
		f.tooLarge(w, r)
		return
	case malformed(r): // bounds.go
		f.log.Debug("malformed request body", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusBadRequest, msgMalformed)
		return
	}
	if r.Context().Err() != nil && errors.Is(err, context.Canceled) {
		// The client went away (nginx's 499): nobody is left to answer.
		f.log.Debug("client gone", "method", r.Method, "path", r.URL.Path, "err", err)
		return
	}
	status, msg, _ := classify(err)
	f.log.Warn("request failed", "method", r.Method, "path", r.URL.Path, "status", status, "err", err)
	writeError(w, status, msg)
}

// classify maps an error to a status, a message that is safe to show a client, and the reason label of
// etcd_proxy_proxy_errors_total: the one place failures are told apart.
func classify(err error) (status int, msg, reason string) {
	var (
		re   *ruleError
		ne   *noEndpointError
		nerr net.Error
	)
	switch {
	case errors.As(err, &re) && errors.Is(err, errBodyTooLarge):
		return http.StatusBadGateway, "etcd-proxy-proxy: upstream response too large to rewrite (rule " + re.Rule + ")", reasonRule
	case errors.As(err, &re):
		return http.StatusBadGateway, "etcd-proxy-proxy: rule " + re.Rule + " could not handle the upstream response", reasonRule
	case isTLSError(err):
		return http.StatusBadGateway, "etcd-proxy-proxy: TLS handshake with the upstream failed", reasonTLS
	case upstreamHeaderTooLarge(err):
		return http.StatusBadGateway, "etcd-proxy-proxy: upstream response header too large", reasonSendFailed
	case errors.As(err, new(*tunnelError)):
		return http.StatusBadGateway, "etcd-proxy-proxy: the tunnel toward the upstream failed", reasonTunnel
	case errors.As(err, &ne):
		return http.StatusServiceUnavailable, "etcd-proxy-proxy: no upstream endpoint available", reasonNoEndpoint
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &nerr) && nerr.Timeout():
		return http.StatusGatewayTimeout, "etcd-proxy-proxy: upstream timed out", reasonTimeout
	default:
		return http.StatusBadGateway, "etcd-proxy-proxy: unable to get a response from the upstream", reasonSendFailed
	}
}

// upstreamHeaderTooLarge reports an answer whose header passed --max-upstream-header-bytes: on the HTTP/1.1 path
// (h1.go), or in http.Transport, which says so only in its text.
func upstreamHeaderTooLarge(err error) bool {
	return errors.Is(err, errUpstreamHeaderTooLarge) || strings.Contains(err.Error(), "server response headers exceeded")
}

func isTLSError(err error) bool {
	var (
		unknownCA x509.UnknownAuthorityError
		hostname  x509.HostnameError
		invalid   x509.CertificateInvalidError
		verify    *tls.CertificateVerificationError
		record    tls.RecordHeaderError
		alert     tls.AlertError
	)
	return errors.As(err, &unknownCA) || errors.As(err, &hostname) || errors.As(err, &invalid) ||
		errors.As(err, &verify) || errors.As(err, &record) || errors.As(err, &alert) ||
		strings.Contains(err.Error(), "tls: ")
}

// writeError writes {"message": msg} with status, as etcd writes its errors.
func writeError(w http.ResponseWriter, status int, msg string) {
	b, _ := json.Marshal(&rules.Error{Message: msg})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// headerFlusher sends a response's headers as soon as they are written when the length is unknown, so a
// long-polling client sees the answer start before the first event.
type headerFlusher struct{ http.ResponseWriter }

func (h *headerFlusher) WriteHeader(code int) {
	h.ResponseWriter.WriteHeader(code)
	if h.Header().Get("Content-Length") == "" {
		_ = http.NewResponseController(h.ResponseWriter).Flush()
	}
}

func (h *headerFlusher) Unwrap() http.ResponseWriter { return h.ResponseWriter }

// Flush lets ReverseProxy flush every write of a streamed answer.
func (h *headerFlusher) Flush() { _ = http.NewResponseController(h.ResponseWriter).Flush() }

// writeTimeoutConn bounds every write toward the upstream, as the stock proxy's --proxy-write-timeout does.
type writeTimeoutConn struct {
	net.Conn
	timeout time.Duration
}

func (c *writeTimeoutConn) Write(b []byte) (int, error) {
	if err := c.Conn.SetWriteDeadline(time.Now().Add(c.timeout)); err != nil {
		return 0, err
	}
	return c.Conn.Write(b)
}

// bufferPool shares ReverseProxy's copy buffers between requests: 4 KiB, since a watch holds its buffer for as
// long as it is open (32 KiB each made 10,000 watches cost 320 MiB of heap).
type bufferPool struct{}

var buffers = sync.Pool{New: func() any { b := make([]byte, 4<<10); return &b }}

func (bufferPool) Get() []byte  { return *buffers.Get().(*[]byte) }
func (bufferPool) Put(b []byte) { buffers.Put(&b) }

// countedConn is a tunnelled upstream connection counted in tunnel_connections until it is closed.
type countedConn struct {
	net.Conn
	gauge prometheus.Gauge
	once  sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(c.gauge.Dec)
	return c.Conn.Close()
}
