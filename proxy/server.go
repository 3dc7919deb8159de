package proxy

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"sync"

	"github.com/hashicorp/go-multierror"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// Server serves the client API on every listen URL and forwards it through the rule chain.
type Server struct {
	cfg       Config
	self      rules.Self
	forwarder *Forwarder
	log       *slog.Logger
	listeners map[string]net.Listener // by listen URL; pre-opened ones come from WithListener
	servers   []*http.Server
	splits    []*connSplit // one per listener: TLS, then HTTP/1.1, HTTP/2 or gRPC (listen.go)
	// encryption reloads --encryption-config (encryption.go); nil without one.
	encryption *encryptionReloader
	// buildRules, when set by WithRules, turns the default chain into the one served.
	buildRules func(defaults []rules.Rule, self rules.Self) []rules.Rule
	urls       []string
	wg         sync.WaitGroup
	errs       chan error
	ops        *ops        // metrics, readiness, certificate reload, metrics listeners (health.go)
	discovery  *discoverer // nil unless --discovery-srv or --discover-members (discovery.go)
}

// Option configures a Server beyond its Config.
type Option func(*Server) error

// WithLogger sets the logger; the default writes text to stderr.
func WithLogger(l *slog.Logger) Option {
	return func(s *Server) error { s.log = l; return nil }
}

// WithListener serves listenURL (one of Config.ListenClientURLs) on l instead of opening it, so a caller can
// pick a free port first and advertise it.
func WithListener(listenURL string, l net.Listener) Option {
	return func(s *Server) error {
		if l == nil {
			return errors.New("WithListener: nil listener")
		}
		s.listeners[listenURL] = l
		return nil
	}
}

// WithRules replaces the default rule chain (rules.Default); extra rules are built with s.Self().
func WithRules(build func(defaults []rules.Rule, self rules.Self) []rules.Rule) Option {
	return func(s *Server) error { s.buildRules = build; return nil }
}

// New validates cfg and builds the server; Start opens the listeners.
func New(cfg Config, opts ...Option) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg.ListenClientURLs, cfg.AdvertiseClientURLs = cfg.listenURLs(), cfg.advertiseURLs()
	if cfg.Name == "" {
		cfg.Name = DefaultName
	}
	s := &Server{cfg: cfg, listeners: map[string]net.Listener{}, log: slog.New(slog.NewTextHandler(os.Stderr, nil))}
	for _, o := range opts {
		if err := o(s); err != nil {
			return nil, err
		}
	}
	if err := s.initOps(); err != nil { // health.go
		return nil, err
	}
	s.self = rules.NewSelf(cfg.Name, cfg.AdvertiseClientURLs)
	var (
		keys      *crypt.Keyring
		resources []rules.EncryptResource
		errs      []error
	)
	switch {
	case cfg.EncryptionConfig != "":
		resources, _, errs = loadEncryptionConfig(cfg.EncryptionConfig)
	case len(cfg.EncryptPrefixes) > 0:
		keys, errs = cfg.encryptionKeyring()
	}
	if errs != nil { // changed since Validate read them
		return nil, errors.Join(errs...)
	}
	rs := rules.Default(rules.Options{
		Self: s.self, Instance: newInstanceID(), ForwardMemberChanges: cfg.ForwardMemberChanges, ReadOnly: cfg.ReadOnly,
		SnapshotSpoolDir: cfg.SnapshotSpoolDir, MaxSnapshotBytes: cfg.MaxSnapshotBytes, Log: s.log,
		EncryptPrefixes: cfg.EncryptPrefixes, EncryptionKeys: keys, EncryptionResources: resources,
		EncryptionMaxRequestBytes: cfg.EncryptionMaxRequestBytes,
	})
	if s.buildRules != nil {
		rs = s.buildRules(rs, s.self)
	}
	if e := encryptRuleOf(rs); e != nil {
		s.ops.m.reg.MustRegister(encryptionCollector{rule: e})
		if cfg.EncryptionConfig != "" {
			s.encryption = &encryptionReloader{file: cfg.EncryptionConfig, rule: e, log: s.log}
			_ = s.encryption.reload(false) // read just above: this takes the stamps of its files
		}
	}
	rs = s.ops.m.countRules(rs) // etcd_proxy_proxy_rule_actions_total
	fwd, err := newForwarder(&s.cfg, rs, s.log, forwarderOps{m: s.ops.m, access: s.ops.access,
		upstreamTLS: s.ops.certs.upstreamTLS()})
	if err != nil {
		return nil, err
	}
	s.forwarder = fwd
	s.attachOps(fwd) // reloadable upstream identities, the upstream probe
	return s, nil
}

// Self is the member this server presents in membership views.
func (s *Server) Self() rules.Self { return s.self }

// Start opens every listener and serves in the background. It fails, closing what it opened, when one cannot
// be opened.
func (s *Server) Start() error {
	if err := s.discoverFirst(); err != nil { // discovery.go: the first endpoints, before anything is served
		_ = s.Close()
		return err
	}
	var serverTLS *tls.Config
	if s.cfg.ListenerTLS.CertFile != "" {
		var err error
		// Reloadable: every handshake takes the certificates loaded last (reload.go).
		if serverTLS, err = s.ops.certs.startListener(s.cfg.ListenerTLS); err != nil {
			_ = s.Close()
			return fmt.Errorf("listener TLS: %w", err)
		}
	}
	s.errs = make(chan error, 2*len(s.cfg.ListenClientURLs))
	for _, raw := range s.cfg.ListenClientURLs {
		l, u, err := s.listen(raw)
		if err != nil {
			_ = s.Close()
			return err
		}
		srv := &http.Server{
			Handler:           s.handler(), // the forwarder, counted and access-logged (metrics.go)
			ReadHeaderTimeout: s.cfg.readHeaderTimeout(),
			IdleTimeout:       s.cfg.idleTimeout(),
			MaxHeaderBytes:    int(s.cfg.maxHeaderBytes()),
			ConnContext:       withAffinity, // each client connection is pinned to one upstream (endpoints.go)
			ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		}
		// Every listener serves what an etcd client port serves — HTTP/1.1, HTTP/2 (ALPN h2 on TLS, h2c with
		// prior knowledge on plain TCP) and gRPC — split by connection (listen.go): TLS is terminated once, HTTP/1.1
		// goes to srv, HTTP/2 to srv's handler over x/net's server, gRPC to the gRPC core's grpc.Server.
		srv.Protocols = new(http.Protocols)
		srv.Protocols.SetHTTP1(true)
		var tlsConfig *tls.Config
		if u.Scheme == "https" {
			tlsConfig = serverTLS.Clone()
		}
		split := newConnSplit(s.countBytes(l), tlsConfig, s.cfg.readHeaderTimeout(), s.log) // byte counts: metrics.go
		s.servers = append(s.servers, srv)
		s.splits = append(s.splits, split)
		s.urls = append(s.urls, u.Scheme+"://"+l.Addr().String())
		fail := func(err error) {
			s.ops.failed.Store(true) // /readyz
			s.errs <- fmt.Errorf("serving %s: %w", raw, err)
		}
		s.wg.Add(4)
		go func() {
			defer s.wg.Done()
			if err := split.Serve(); err != nil && !errors.Is(err, net.ErrClosed) {
				fail(err)
			}
		}()
		go func() {
			defer s.wg.Done()
			if err := srv.Serve(split.HTTP1()); err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
				fail(err)
			}
		}()
		go func() {
			defer s.wg.Done()
			_ = serveHTTP2(split.HTTP2(), srv) // ends with srv.Shutdown, or when the split closes
		}()
		go func() {
			defer s.wg.Done()
			_ = s.forwarder.core.srv.Serve(split.GRPC()) // ends with the gRPC server's stop
		}()
		s.log.Info("listening", "url", raw, "addr", l.Addr().String())
	}
	if err := s.startOps(); err != nil { // metrics listeners, probe, certificate poller (health.go)
		_ = s.Close()
		return err
	}
	return nil
}

// listen returns the listener of a listen URL: the one handed in with WithListener, or a new one.
func (s *Server) listen(raw string) (net.Listener, *url.URL, error) {
	u, _ := url.Parse(raw) // validated
	if l, ok := s.listeners[raw]; ok {
		return l, u, nil
	}
	l, err := net.Listen("tcp", u.Host)
	if err != nil {
		return nil, nil, fmt.Errorf("listening on %s: %w", raw, err)
	}
	s.listeners[raw] = l
	return l, u, nil
}

// URLs are the URLs actually listened on (with the ports chosen for :0).
func (s *Server) URLs() []string { return s.urls }

// Errors delivers a listener that stopped serving.
func (s *Server) Errors() <-chan error { return s.errs }

// Shutdown stops accepting, ends open streams cleanly at once (watches, keep-alives and observers get
// Unavailable, v2 long polls a 503 or the end of their stream: clients reconnect), waits for in-flight requests
// until ctx ends, then closes what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	var errs *multierror.Error
	s.ops.stopping.Store(true) // /readyz says so while requests drain
	s.forwarder.startDrain(errShuttingDown)
	// All at once: a listener still draining a watch must not keep the others accepting.
	var (
		mu sync.Mutex
		wg sync.WaitGroup
	)
	for _, srv := range s.servers {
		wg.Go(func() {
			if err := srv.Shutdown(ctx); err != nil {
				mu.Lock()
				errs = multierror.Append(errs, err, srv.Close())
				mu.Unlock()
			}
		})
	}
	wg.Go(func() { // gRPC: its calls end as the HTTP requests do; at the deadline the rest are cut
		srv := s.forwarder.core.srv
		done := make(chan struct{})
		go func() { srv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			srv.Stop()
			<-done
		}
	})
	wg.Wait()
	for _, sp := range s.splits {
		errs = multierror.Append(errs, sp.Close())
	}
	s.wg.Wait()
	errs = multierror.Append(errs, s.stopOps())
	s.forwarder.Close()
	return errs.ErrorOrNil()
}

// Close stops at once, dropping open requests and watches.
func (s *Server) Close() error {
	var errs *multierror.Error
	for _, srv := range s.servers {
		errs = multierror.Append(errs, srv.Close())
	}
	if s.forwarder != nil {
		s.forwarder.core.srv.Stop()
	}
	for _, sp := range s.splits {
		errs = multierror.Append(errs, sp.Close())
	}
	for _, l := range s.listeners { // also those opened or handed in but not served yet
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = multierror.Append(errs, err)
		}
	}
	s.wg.Wait()
	errs = multierror.Append(errs, s.stopOps())
	if s.forwarder != nil {
		s.forwarder.Close()
	}
	return errs.ErrorOrNil()
}

func newInstanceID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
