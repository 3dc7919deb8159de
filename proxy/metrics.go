package proxy

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc/codes"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// MetricsNamespace prefixes every metric of the proxy.
const MetricsNamespace = "etcd_proxy_proxy"

// Values of the api label.
const (
	apiGRPC   = "grpc"    // v3 gRPC
	apiV3JSON = "v3-json" // v3 JSON gateway (/v3/...)
	apiV2     = "v2"      // /v2/...
	apiOther  = "other"   // /version, /health, /metrics and anything else
)

// Values of the reason label of etcd_proxy_proxy_errors_total.
const (
	reasonNoEndpoint     = "no_endpoint"      // no upstream endpoint could be connected to (503)
	reasonTimeout        = "timeout"          // the upstream did not answer in time (504)
	reasonTLS            = "tls"              // the TLS handshake with the upstream failed (502)
	reasonSendFailed     = "send_failed"      // the request could not be sent or no response came back (502)
	reasonRule           = "rule"             // a rule failed on the request or on the response (502)
	reasonResponseFailed = "response_failed"  // the response broke off while it was being copied to the client
	reasonClientGone     = "client_gone"      // the client went away before the answer (nothing is sent)
	reasonTooLarge       = "too_large"        // the request was over --max-request-bytes (413)
	reasonShutdown       = "shutdown"         // a stream ended by a graceful shutdown
	reasonBadRequest     = "bad_request"      // the client's request body was malformed (400)
	reasonStreamLost     = "stream_lost"      // a stream ended because its upstream connection was lost
	reasonAnswerTooLarge = "answer_too_large" // an upstream answer was over its method's bound (rules.SmallAnswerBytes)
	reasonTunnel         = "tunnel"           // the tunnel of --upstream-via refused or failed the connection (502)
)

func init() {
	for i := range httpCodes {
		httpCodes[i] = strconv.Itoa(i)
	}
}

// gatewayPaths are the v3 JSON gateway's paths (both prefixes); any other path counts as "other" so that a client
// cannot grow the label set. The value says whether the call is a stream that lives as long as the client wants.
var gatewayPaths = func() map[string]bool {
	m := map[string]bool{}
	for _, p := range strings.Fields(`kv/range kv/put kv/deleterange kv/txn kv/compaction watch* lease/grant
		lease/revoke kv/lease/revoke lease/keepalive* lease/timetolive kv/lease/timetolive lease/leases
		kv/lease/leases cluster/member/add cluster/member/remove cluster/member/update cluster/member/list
		cluster/member/promote maintenance/alarm maintenance/status maintenance/defragment maintenance/hash
		maintenance/snapshot* maintenance/transfer-leadership maintenance/downgrade auth/enable auth/disable
		auth/status auth/authenticate auth/user/add auth/user/get auth/user/list auth/user/delete
		auth/user/changepw auth/user/grant auth/user/revoke auth/role/add auth/role/get auth/role/list
		auth/role/delete auth/role/grant auth/role/revoke lock/lock lock/unlock election/campaign
		election/proclaim election/leader election/observe* election/resign`) {
		name, stream := strings.CutSuffix(p, "*")
		m["/v3/"+name] = stream
		m["/v3beta/"+name] = stream
	}
	return m
}()

// httpMethods are the HTTP methods counted by name; others are "other".
var httpMethods = []string{"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}

// httpCodes are the status codes as label values, resolved once.
var httpCodes [600]string

// grpcCodes are the gRPC status codes by number, as their names.
var grpcCodes = [...]string{"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
	"AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
	"Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"}

// metrics are one Server's Prometheus metrics, in a registry of its own (tests run many servers in a process).
type metrics struct {
	reg *prometheus.Registry

	requests     *prometheus.CounterVec
	duration     *prometheus.HistogramVec
	streams      *prometheus.GaugeVec
	errors       *prometheus.CounterVec
	received     prometheus.Counter
	sent         prometheus.Counter
	upstream     *prometheus.GaugeVec
	probeFails   *prometheus.CounterVec
	ruleActions  *prometheus.CounterVec
	certReloads  *prometheus.CounterVec
	certNotAfter *prometheus.GaugeVec
	tunnelDials  *prometheus.CounterVec
	tunnelAgents prometheus.Gauge
	tunnelConns  prometheus.Gauge

	errs map[string]prometheus.Counter // by reason, resolved once

	mu     sync.RWMutex
	series map[seriesKey]*series          // resolved children per (api, method, code)
	gauges map[[2]string]prometheus.Gauge // resolved active_streams children per (api, method)
}

// seriesKey picks the children of one kind of request; method and code are the label values themselves (the
// strings of the tables above, so building a key allocates nothing).
type seriesKey struct{ api, method, code string }

// series are the resolved children of one seriesKey.
type series struct {
	requests prometheus.Counter
	duration prometheus.Observer // nil for streams: their lifetime is not a latency
}

func newMetrics(ready func() float64) *metrics {
	m := &metrics{reg: prometheus.NewRegistry(), series: map[seriesKey]*series{},
		gauges: map[[2]string]prometheus.Gauge{}, errs: map[string]prometheus.Counter{}}
	opts := func(name, help string) prometheus.Opts {
		return prometheus.Opts{Namespace: MetricsNamespace, Name: name, Help: help}
	}
	m.requests = prometheus.NewCounterVec(prometheus.CounterOpts(opts("requests_total",
		"Client requests handled, by API (grpc, v3-json, v2, other), method (HTTP method, or the gRPC method) and code (HTTP status, or gRPC code name).")),
		[]string{"api", "method", "code"})
	m.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: MetricsNamespace, Name: "request_duration_seconds",
		Help:    "Time from receiving a client request to the end of its answer, streams (watches, keep-alives) excluded.",
		Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
	}, []string{"api", "method"})
	m.streams = prometheus.NewGaugeVec(prometheus.GaugeOpts(opts("active_streams",
		"Open long-lived requests: v3 watch, lease keep-alive, election observe and snapshot streams, v2 watches.")),
		[]string{"api", "method"})
	m.errors = prometheus.NewCounterVec(prometheus.CounterOpts(opts("errors_total",
		"Requests the proxy failed, by reason: no_endpoint, timeout, tls, send_failed, rule, response_failed, client_gone.")),
		[]string{"reason"})
	m.received = prometheus.NewCounter(prometheus.CounterOpts(opts("client_received_bytes_total",
		"Bytes read from client connections (TLS and HTTP framing included).")))
	m.sent = prometheus.NewCounter(prometheus.CounterOpts(opts("client_sent_bytes_total",
		"Bytes written to client connections (TLS and HTTP framing included).")))
	m.upstream = prometheus.NewGaugeVec(prometheus.GaugeOpts(opts("upstream_healthy",
		"1 when the last probe of the upstream endpoint succeeded. endpoint is its position in --upstream (0 first), never its address.")),
		[]string{"endpoint"})
	m.probeFails = prometheus.NewCounterVec(prometheus.CounterOpts(opts("upstream_probe_failures_total",
		"Failed probes of the upstream endpoint, by position in --upstream.")), []string{"endpoint"})
	m.tunnelDials = prometheus.NewCounterVec(prometheus.CounterOpts(opts("tunnel_dials_total",
		"Upstream connections opened through the tunnel of --upstream-via or an agent of --tunnel-listen, by result (ok, failed).")), []string{"result"})
	m.tunnelAgents = prometheus.NewGauge(prometheus.GaugeOpts(opts("tunnel_agents_connected",
		"Agents connected to --tunnel-listen (control streams open).")))
	m.tunnelConns = prometheus.NewGauge(prometheus.GaugeOpts(opts("tunnel_connections",
		"Upstream connections open through the tunnel of --upstream-via or an agent of --tunnel-listen.")))
	m.ruleActions = prometheus.NewCounterVec(prometheus.CounterOpts(opts("rule_actions_total",
		"Times a rule answered a request itself (action=answered) or claimed a response body to rewrite it (action=claimed).")),
		[]string{"rule", "action"})
	m.certReloads = prometheus.NewCounterVec(prometheus.CounterOpts(opts("cert_reloads_total",
		"Certificate reloads by side (listener, upstream, upstream-identities) and result (success, failure: the previous certificates stay).")),
		[]string{"side", "result"})
	m.certNotAfter = prometheus.NewGaugeVec(prometheus.GaugeOpts(opts("cert_not_after_timestamp_seconds",
		"Expiry (NotAfter, Unix time) of the certificate in use, by side (listener, upstream; upstream-identities: the earliest of --upstream-cert-dir).")), []string{"side"})
	readyGauge := prometheus.NewGaugeFunc(prometheus.GaugeOpts(opts("ready", "1 when /readyz answers ready.")), ready)
	m.reg.MustRegister(m.requests, m.duration, m.streams, m.errors, m.received, m.sent, m.upstream, m.probeFails,
		m.ruleActions, m.certReloads, m.certNotAfter, m.tunnelDials, m.tunnelAgents, m.tunnelConns, readyGauge,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, r := range []string{reasonNoEndpoint, reasonTimeout, reasonTLS, reasonSendFailed, reasonRule,
		reasonResponseFailed, reasonClientGone, reasonTooLarge, reasonShutdown, reasonBadRequest,
		reasonStreamLost, reasonAnswerTooLarge, reasonTunnel} {
		m.errs[r] = m.errors.WithLabelValues(r) // present at 0 from the start, so rate() sees the first error
	}
	return m
}

// get returns the resolved children of k, creating them the first time.
func (m *metrics) get(k seriesKey, stream bool) *series {
	m.mu.RLock()
	s := m.series[k]
	m.mu.RUnlock()
	if s != nil {
		return s
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if s = m.series[k]; s == nil {
		s = &series{requests: m.requests.WithLabelValues(k.api, k.method, k.code)}
		if !stream {
			s.duration = m.duration.WithLabelValues(k.api, k.method)
		}
		m.series[k] = s
	}
	return s
}

// gauge returns the resolved active_streams child of (api, method), creating it the first time.
func (m *metrics) gauge(api, method string) prometheus.Gauge {
	k := [2]string{api, method}
	m.mu.RLock()
	g := m.gauges[k]
	m.mu.RUnlock()
	if g != nil {
		return g
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if g = m.gauges[k]; g == nil {
		g = m.streams.WithLabelValues(api, method)
		m.gauges[k] = g
	}
	return g
}

// requestClass is what the proxy knows of a client request from its method, path and query: decided once per
// request (classifyRequest), for the metrics' labels and for the forwarder's choices.
type requestClass struct {
	api, method string // the api and method labels
	// stream: the request lasts as long as the client wants (a v2 long poll or stream watch, a gateway watch or
	// keep-alive).
	stream bool
	// watch: a long poll (wait=true, on any path): its headers go out at once.
	watch bool
}

// classifyRequest classifies r.
func classifyRequest(r *http.Request) requestClass {
	path := r.URL.Path
	c := requestClass{watch: isWatch(r)}
	switch {
	case isGatewayPath(path):
		c.api, c.method = apiV3JSON, apiOther
		if s, ok := gatewayPaths[path]; ok {
			c.method, c.stream = path, s
		}
		return c
	case strings.HasPrefix(path, "/v2/"):
		c.api, c.stream = apiV2, c.watch
	default:
		c.api = apiOther
	}
	c.method = apiOther
	for _, m := range httpMethods {
		if r.Method == m {
			c.method = m
			break
		}
	}
	return c
}

// code is the label value of a finished HTTP request: its status.
func code(status int) string {
	if status <= 0 || status >= len(httpCodes) {
		return apiOther
	}
	return httpCodes[status]
}

// errorReason maps a failure handed to the forwarder's ErrorHandler to a reason label: a client that went
// away, or what classify decides.
func errorReason(r *http.Request, err error) string {
	switch {
	case drained(r):
		return reasonShutdown
	case exceeded(r, err):
		return reasonTooLarge
	case malformed(r):
		return reasonBadRequest
	}
	if r.Context().Err() != nil && errors.Is(err, context.Canceled) {
		return reasonClientGone
	}
	_, _, reason := classify(err)
	return reason
}

// countErrors wraps the forwarder's one ErrorHandler so that every failure is counted by reason before it is
// answered. A nil m counts nothing.
func (m *metrics) countErrors(handle func(http.ResponseWriter, *http.Request, error)) func(http.ResponseWriter, *http.Request, error) {
	if m == nil {
		return handle
	}
	return func(w http.ResponseWriter, r *http.Request, err error) {
		if !lost(r) { // counted by streamLost
			m.errs[errorReason(r, err)].Inc()
		}
		handle(w, r, err)
	}
}

// countError counts a failure of the gRPC core by reason. A nil m counts nothing.
func (m *metrics) countError(reason string) {
	if m != nil {
		m.errs[reason].Inc()
	}
}

// observeGRPC is the gRPC core's observer: it counts, times and (with the access log on) logs every call. Nil
// when m is.
func (m *metrics) observeGRPC(access *accessLogger) func(call *serverCall) func(codes.Code) {
	if m == nil {
		return nil
	}
	return func(call *serverCall) func(codes.Code) {
		start := time.Now()
		x := call.chain.m
		method, stream := apiOther, false
		if rules.LookupMethod(x.Name) == x { // any other counts as "other": a client cannot grow the label set
			method, stream = x.Name[1:], x.IsStream()
		}
		var gauge prometheus.Gauge
		if stream {
			gauge = m.gauge(apiGRPC, method)
			gauge.Inc()
		}
		return func(code codes.Code) {
			if gauge != nil {
				gauge.Dec()
			}
			elapsed := time.Since(start)
			label := "Unknown"
			if int(code) < len(grpcCodes) {
				label = grpcCodes[code]
			}
			s := m.get(seriesKey{apiGRPC, method, label}, stream)
			s.requests.Inc()
			if s.duration != nil {
				s.duration.Observe(elapsed.Seconds())
			}
			if access != nil {
				access.logCall(call, label, elapsed)
			}
		}
	}
}

// countedRule counts the requests a rule answers and the responses it claims. Name, and anything else of the
// rule, is the rule's own.
type countedRule struct {
	rules.Rule
	answered, claimed prometheus.Counter
}

func (r *countedRule) Request(req *http.Request) (*http.Response, error) {
	resp, err := r.Rule.Request(req)
	if resp != nil {
		r.answered.Inc()
	}
	return resp, err
}

func (r *countedRule) Response(resp *http.Response) (rules.BodyFunc, error) {
	fn, err := r.Rule.Response(resp)
	if fn != nil {
		r.claimed.Inc()
	}
	return fn, err
}

// Claim implements rules.MessageRule for the rules that have a message half.
func (r *countedRule) Claim(m *rules.Method) rules.Claim {
	if mr, ok := r.Rule.(rules.MessageRule); ok {
		return mr.Claim(m)
	}
	return rules.ClaimNone
}

// Serve implements rules.MessageRule: a call the rule answers without calling next counts as answered, one
// whose messages it claimed and passed on as claimed.
func (r *countedRule) Serve(s rules.Stream, next rules.Handler) error {
	mr := r.Rule.(rules.MessageRule)
	called := false
	err := mr.Serve(s, func(s rules.Stream) error { called = true; return next(s) })
	switch {
	case !called:
		r.answered.Inc()
	case mr.Claim(s.Method()) == rules.ClaimMessages:
		r.claimed.Inc()
	}
	return err
}

// countRules wraps every rule of the chain with its pre-resolved counters.
func (m *metrics) countRules(rs []rules.Rule) []rules.Rule {
	out := make([]rules.Rule, len(rs))
	for i, r := range rs {
		out[i] = &countedRule{Rule: r,
			answered: m.ruleActions.WithLabelValues(r.Name(), "answered"),
			claimed:  m.ruleActions.WithLabelValues(r.Name(), "claimed")}
	}
	return out
}

// countingListener counts the bytes of every accepted connection into the client byte counters.
type countingListener struct {
	net.Listener
	m *metrics
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, m: l.m}, nil
}

type countingConn struct {
	net.Conn
	m *metrics
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 {
		c.m.received.Add(float64(n))
	}
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 {
		c.m.sent.Add(float64(n))
	}
	return n, err
}

// statusRecorder remembers the status and the body bytes of an answer. It is pooled: one per request in flight.
type statusRecorder struct {
	http.ResponseWriter
	status int
	bytes  int64
}

var statusRecorders = sync.Pool{New: func() any { return new(statusRecorder) }}

func (r *statusRecorder) WriteHeader(code int) {
	if r.status == 0 && code >= 200 { // 1xx are informational: the final status comes later
		r.status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	r.bytes += int64(n)
	return n, err
}

// Flush, Hijack and Unwrap keep what the wrapped writer can do: ReverseProxy and the gRPC gateway flush
// streams, the gateway's websockets hijack, http.ResponseController unwraps.
func (r *statusRecorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (r *statusRecorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	h, ok := r.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, http.ErrNotSupported
	}
	if r.status == 0 {
		r.status = http.StatusSwitchingProtocols
	}
	return h.Hijack()
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// instrumented counts, times and (with the access log on) logs every client request around next, which gets
// the request's class with it (the forwarder's serve).
type instrumented struct {
	next      func(w http.ResponseWriter, r *http.Request, c requestClass)
	m         *metrics
	accessLog *accessLogger // nil: off
}

func (h *instrumented) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if rules.IsGRPC(r) {
		h.next(w, r, requestClass{}) // the gRPC core counts its calls (observeGRPC)
		return
	}
	start := time.Now()
	class := classifyRequest(r)
	api, method, stream := class.api, class.method, class.stream
	rec := statusRecorders.Get().(*statusRecorder)
	*rec = statusRecorder{ResponseWriter: w}
	var gauge prometheus.Gauge
	if stream {
		gauge = h.m.gauge(api, method)
		gauge.Inc()
	}
	defer func() {
		v := recover()
		if v == http.ErrAbortHandler { //nolint:errorlint // ReverseProxy panics with this very value
			h.m.errs[reasonResponseFailed].Inc()
		}
		if gauge != nil {
			gauge.Dec()
		}
		elapsed := time.Since(start)
		c := code(rec.status)
		s := h.m.get(seriesKey{api, method, c}, stream)
		s.requests.Inc()
		if s.duration != nil {
			s.duration.Observe(elapsed.Seconds())
		}
		if h.accessLog != nil {
			h.accessLog.log(r, rec.status, c, api, elapsed, rec.bytes)
		}
		*rec = statusRecorder{}
		statusRecorders.Put(rec)
		if v != nil {
			panic(v)
		}
	}()
	h.next(rec, r, class)
}
