package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-multierror"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// ops is the operational side of a Server: metrics, readiness, the upstream probe, certificate reload and the
// metrics listeners. Its hooks in server.go are one line each.
type ops struct {
	m      *metrics
	certs  *certReloader
	probe  *prober // nil when the probe is off
	access *accessLogger

	listening atomic.Bool // every client listener is open
	failed    atomic.Bool // a client listener stopped serving
	stopping  atomic.Bool // Shutdown began

	servers []*http.Server
	urls    []string
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	stop    sync.Once
}

// initOps builds the metrics and loads the upstream certificates (New).
func (s *Server) initOps() error {
	s.ops = &ops{}
	s.ops.m = newMetrics(func() float64 {
		if ok, _ := s.Ready(); ok {
			return 1
		}
		return 0
	})
	if s.cfg.AccessLog {
		s.ops.access = &accessLogger{l: s.log}
	}
	var err error
	s.ops.certs, err = newCertReloader(&s.cfg, s.log, s.ops.m)
	return err
}

// attachOps sets up the operations that watch the forwarder (New, before anything is served): the reloader
// learns its upstream identities, and the probe gets a transport of its own with the forwarder's TLS.
func (s *Server) attachOps(f *Forwarder) {
	s.ops.certs.useIdentities(f) // --upstream-cert-dir reloads with the certificates (identity.go)
	if iv := s.cfg.healthInterval(); iv > 0 {
		s.ops.probe = newProber(f, s.cfg.UpstreamHealthCheck, iv, s.ops.m) // requests avoid unhealthy endpoints
	}
}

// handler is the client API handler with metrics and the access log around it.
func (s *Server) handler() http.Handler {
	return &instrumented{next: s.forwarder.serve, m: s.ops.m, accessLog: s.ops.access}
}

// countBytes counts the client bytes of a listener's connections.
func (s *Server) countBytes(l net.Listener) net.Listener {
	return countingListener{Listener: l, m: s.ops.m}
}

// startOps opens the metrics listeners and starts the probe and the certificate poller (Start, after the client
// listeners are open).
func (s *Server) startOps() error {
	o := s.ops
	ctx, cancel := context.WithCancel(context.Background())
	o.cancel = cancel
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(o.m.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, http.StatusOK, map[string]any{"live": true})
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ok, reason := s.Ready(); !ok {
			writeJSON(w, http.StatusServiceUnavailable, map[string]any{"ready": false, "reason": reason})
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"ready": true})
	})
	for _, raw := range s.cfg.ListenMetricsURLs {
		l, u, err := s.listen(raw)
		if err != nil {
			return err
		}
		srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, IdleTimeout: 5 * time.Minute}
		serve := func() error { return srv.Serve(l) }
		if u.Scheme == "https" {
			c, err := o.certs.startListener(s.cfg.ListenerTLS)
			if err != nil {
				_ = l.Close()
				return fmt.Errorf("metrics listener TLS: %w", err)
			}
			srv.TLSConfig = c
			serve = func() error { return srv.ServeTLS(l, "", "") }
		}
		o.servers = append(o.servers, srv)
		o.urls = append(o.urls, u.Scheme+"://"+l.Addr().String())
		o.wg.Add(1)
		go func() {
			defer o.wg.Done()
			if err := serve(); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error("metrics listener stopped", "url", raw, "err", err)
			}
		}()
		s.log.Info("metrics listening", "url", raw, "addr", l.Addr().String())
	}
	if o.probe != nil {
		o.wg.Add(1)
		go func() { defer o.wg.Done(); o.probe.run(ctx) }()
	}
	if s.discovery != nil {
		o.wg.Add(1)
		go func() { defer o.wg.Done(); s.discovery.run(ctx) }() // discovery.go
	}
	if iv := s.cfg.reloadInterval(); iv > 0 && (len(o.certs.sides) > 0 || o.certs.ids != nil) {
		o.wg.Add(1)
		go func() { defer o.wg.Done(); o.certs.poll(ctx, iv) }()
	}
	if iv := s.cfg.reloadInterval(); iv > 0 && s.encryption != nil {
		o.wg.Add(1)
		go func() { defer o.wg.Done(); s.encryption.poll(ctx, iv) }()
	}
	o.listening.Store(true)
	return nil
}

// stopOps closes the metrics listeners and stops the background work. It is idempotent.
func (s *Server) stopOps() error {
	o := s.ops
	if o == nil {
		return nil
	}
	var errs *multierror.Error
	o.stop.Do(func() {
		o.stopping.Store(true)
		if o.cancel != nil {
			o.cancel()
		}
		for _, srv := range o.servers {
			if err := srv.Close(); err != nil {
				errs = multierror.Append(errs, err)
			}
		}
		o.wg.Wait()
	})
	return errs.ErrorOrNil()
}

// Ready reports whether the server is ready for clients: every client listener open and serving, not shutting
// down, and — unless the probe is off — at least one upstream endpoint healthy at the last probe. The reason
// never names an upstream address.
func (s *Server) Ready() (bool, string) {
	o := s.ops
	switch {
	case o.stopping.Load():
		return false, "shutting down"
	case !o.listening.Load():
		return false, "not listening yet"
	case o.failed.Load():
		return false, "a client listener stopped serving"
	case o.probe == nil:
		return true, ""
	}
	return o.probe.ready()
}

// MetricsURLs are the metrics URLs actually listened on (with the ports chosen for :0).
func (s *Server) MetricsURLs() []string { return s.ops.urls }

// ReloadCertificates re-reads the certificate, key and CA files of both TLS sides now, as SIGHUP does. New
// connections get the new certificates; open ones keep theirs. A side that fails to load keeps its previous
// certificates; the error says why. --encryption-config and its key files are read again too (a failure keeps
// the keys loaded before).
func (s *Server) ReloadCertificates() error {
	err := s.ops.certs.Reload()
	if s.encryption != nil { // --encryption-config and its key files, on the same signal (encryption.go)
		err = errors.Join(err, s.encryption.reload(false))
	}
	return err
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

// prober checks every upstream endpoint in the background.
type prober struct {
	endpoints *endpointSet
	check     string
	interval  time.Duration
	timeout   time.Duration
	client    *http.Client
	dial      func(ctx context.Context, network, addr string) (net.Conn, error) // the forwarder's dialTCP
	probed    atomic.Bool
	noGateway sync.Map // endpoint base URL → time.Time until which it is probed with GET /health alone
	m         *metrics
	shown     int // gauges set by the last round (only the prober's goroutine touches it)
}

func newProber(f *Forwarder, check string, interval time.Duration, m *metrics) *prober {
	// A probe may take as long as the interval (rounds never overlap), at least 1 s, at most 10 s.
	timeout := min(max(interval, time.Second), 10*time.Second)
	p := &prober{endpoints: f.endpoints, check: check, interval: interval, timeout: timeout, m: m, dial: f.dialTCP}
	if p.check == "" {
		p.check = HealthCheckHTTP
	}
	// Its own connection pool, with the upstream TLS (set up in New).
	t := f.transport.Clone()
	t.MaxIdleConnsPerHost = 1
	// HTTP/1.1 only: etcd's grpc-proxy on TLS hands every HTTP/2 connection to its gRPC server, which serves
	// neither the JSON gateway nor /health; members and proxy-proxies serve both on HTTP/1.1.
	t.Protocols = new(http.Protocols)
	t.Protocols.SetHTTP1(true)
	t.DialTLSContext = f.dialTLS(f.dialTimeout, []string{"http/1.1"}, nil)
	p.client = &http.Client{Transport: t, Timeout: timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	return p
}

func (p *prober) run(ctx context.Context) {
	defer p.client.CloseIdleConnections()
	t := time.NewTicker(p.interval)
	defer t.Stop()
	for {
		p.round(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// round probes every endpoint at once and records the results. Metrics label an endpoint by its position in
// the list, never by its address.
func (p *prober) round(ctx context.Context) {
	eps := p.endpoints.current()
	var wg sync.WaitGroup
	for i, e := range eps {
		wg.Go(func() {
			ok := p.probeOne(ctx, e.url) == nil
			if ctx.Err() != nil {
				return // stopping: the result says nothing about the upstream
			}
			e.probeOK.Store(ok)
			label := strconv.Itoa(i)
			if ok {
				e.failedUntil.Store(0) // healthy again: back at once, whatever the failure wait
				p.m.upstream.WithLabelValues(label).Set(1)
			} else {
				p.m.upstream.WithLabelValues(label).Set(0)
				p.m.probeFails.WithLabelValues(label).Inc()
				p.endpoints.trouble()
			}
		})
	}
	wg.Wait()
	for i := len(eps); i < p.shown; i++ { // the list shrank (discovery)
		p.m.upstream.DeleteLabelValues(strconv.Itoa(i))
		p.m.probeFails.DeleteLabelValues(strconv.Itoa(i))
	}
	p.shown = len(eps)
	if ctx.Err() == nil {
		p.probed.Store(true)
	}
}

// The default probe asks each endpoint for Maintenance.Status through the JSON gateway: it reads the member's raft
// state without a raft round trip and writes nothing. etcd's GET /health on a 3.5 member with --enable-v2 puts a
// v2 QGET through raft instead, and those entries in the WAL are "custom v2 content" to etcdutl's v2 deprecation
// check (and to an upgrade to 3.6). Where the answer is not a Status (no gateway: etcd's grpc-proxy answers 404;
// auth on: Status wants a user; a proxy-proxy whose gateway cannot reach below it), GET /health decides.
const (
	statusPath   = "/v3/maintenance/status"
	noLeaderText = "etcdserver: no leader"
	// gatewayRecheck is how long an endpoint that answered 404 for the gateway is probed with GET /health alone
	// before Status is tried again (a member may come back where a grpc-proxy was).
	gatewayRecheck = 10 * time.Minute
)

// errNoStatus is a Status probe that got an answer, but no Status: GET /health decides.
var errNoStatus = errors.New("no Maintenance.Status answer")

func (p *prober) probeOne(ctx context.Context, u *url.URL) error {
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	if p.check == HealthCheckTCP {
		c, err := p.dial(ctx, "tcp", u.Host)
		if err != nil {
			return err
		}
		return c.Close()
	}
	base := u.Scheme + "://" + u.Host
	if until, ok := p.noGateway.Load(base); ok && time.Now().Before(until.(time.Time)) {
		return p.health(ctx, base)
	}
	status, err := p.status(ctx, base)
	if !errors.Is(err, errNoStatus) {
		return err
	}
	if status == http.StatusNotFound {
		p.noGateway.Store(base, time.Now().Add(gatewayRecheck))
	}
	return p.health(ctx, base)
}

// status asks for Maintenance.Status: healthy when the answer names a leader. It returns errNoStatus, with the
// HTTP status, when the endpoint answered with something else than a Status.
func (p *prober) status(ctx context.Context, base string) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+statusPath, strings.NewReader("{}"))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := p.client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return 0, err
	}
	var st struct {
		Header json.RawMessage `json:"header"` // every Status has one
		Leader json.RawMessage `json:"leader"` // a uint64: a string in the gateway's JSON, absent when 0
		Errors []string        `json:"errors"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &st) != nil || len(st.Header) == 0 {
		return resp.StatusCode, errNoStatus
	}
	if l := strings.Trim(string(st.Leader), `"`); l == "" || l == "0" || slices.Contains(st.Errors, noLeaderText) {
		return resp.StatusCode, errors.New("no leader (Maintenance.Status)")
	}
	return resp.StatusCode, nil
}

// health asks for GET /health: healthy is a 200 (etcd answers 503 without a leader).
func (p *prober) health(ctx context.Context, base string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base+"/health", nil)
	if err != nil {
		return err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /health: %s", resp.Status)
	}
	return nil
}

func (p *prober) ready() (bool, string) {
	if !p.probed.Load() {
		return false, "upstream not probed yet"
	}
	eps := p.endpoints.current()
	for _, e := range eps {
		if e.probeOK.Load() {
			return true, ""
		}
	}
	return false, fmt.Sprintf("no upstream endpoint is healthy (0 of %d answered the %s probe)", len(eps), p.check)
}
