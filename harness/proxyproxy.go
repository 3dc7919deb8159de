package harness

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// ProxyProxyHop is an etcd-proxy-proxy, in process, in front of any layer. Its upstream side uses exactly what a
// client of the layer below needs (below.TLS); its listener, with TLS, has a certificate of the Client CA and
// requires client certificates of the Client CA: the two sides share no identity.
type ProxyProxyHop struct {
	// TLS: https listener with client-certificate auth.
	TLS bool
	// Configure, if set, changes the configuration before the proxy starts (flags a test needs).
	Configure func(*proxy.Config)
	// Options are passed to proxy.New (custom rules, a logger).
	Options []proxy.Option
}

// Start implements Hop.
func (h ProxyProxyHop) Start(ctx context.Context, e *Env, below Endpoint, _ *Cluster) (Endpoint, error) {
	p, err := e.StartProxyProxy(ctx, below, h)
	if err != nil {
		return Endpoint{}, err
	}
	return p.Endpoint, nil
}

func (h ProxyProxyHop) String() string { return "proxy-proxy" + tlsSuffix(h.TLS) }

// ProxyProxy is a started etcd-proxy-proxy.
type ProxyProxy struct {
	// Server is the server started last (a stopped one after Stop); Restart replaces it.
	Server *proxy.Server
	// Config is what Server was built from. Restart builds the new server from it, so a test may change it
	// (the upstreams, say) while the proxy is stopped.
	Config   proxy.Config
	Endpoint Endpoint

	env     *Env
	name    string
	listen  string         // the listen URL, whose address Restart binds again
	opts    []proxy.Option // the logger and the hop's options; the listener is added per start
	mu      sync.Mutex
	running bool
}

// StartProxyProxy starts an etcd-proxy-proxy in front of below, on a free loopback port that it also
// advertises. It counts as started when it answers GET /version: with any status, since the layer below may
// serve no HTTP (etcd's grpc-proxy answers 404), and that layer has been waited for already. Its placeholders are pp, pp-2, …
// for its address and pp-id, pp-2-id, … for its member ID.
func (e *Env) StartProxyProxy(ctx context.Context, below Endpoint, h ProxyProxyHop) (*ProxyProxy, error) {
	name := e.nextName("pp")
	ctx, cancel := context.WithTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("%s: listen: %w", name, err)
	}
	scheme := "http"
	if h.TLS {
		scheme = "https"
	}
	u := scheme + "://" + l.Addr().String()
	cfg := proxy.Config{
		Upstreams:           below.URLs,
		UpstreamTLS:         proxy.TLSInfo{CAFile: below.TLS.CAFile, CertFile: below.TLS.CertFile, KeyFile: below.TLS.KeyFile},
		ListenClientURLs:    []string{u},
		AdvertiseClientURLs: []string{u},
	}
	ep := Endpoint{Name: name, URLs: []string{u}}
	if h.TLS {
		server, err := e.PKI.Client.Issue(name, ServerAuth())
		if err != nil {
			_ = l.Close()
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if ep.TLS, err = e.PKI.Client.Issue(name+"-client", ClientAuth()); err != nil {
			_ = l.Close()
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		cfg.ListenerTLS = proxy.TLSInfo{CertFile: server.CertFile, KeyFile: server.KeyFile, CAFile: server.CAFile, ClientCertAuth: true}
	}
	if h.Configure != nil {
		h.Configure(&cfg)
	}
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	if e.Logf != nil {
		logger = slog.New(slog.NewTextHandler(logfWriter(e.logf), &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	p := &ProxyProxy{Config: cfg, Endpoint: ep, env: e, name: name, listen: u,
		opts: append([]proxy.Option{proxy.WithLogger(logger)}, h.Options...)}
	// Registered first, so that a server that started but never answered is stopped too; a no-op until then.
	e.Defer(name, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return p.Stop(ctx)
	})
	if err := p.start(ctx, l); err != nil {
		return nil, err
	}
	e.Register(l.Addr().String(), name)
	e.logf("harness: %s up at %s in front of %s", name, u, below.Name)
	return p, nil
}

// start builds a server from p.Config on l, starts it and waits until it answers GET /version.
func (p *ProxyProxy) start(ctx context.Context, l net.Listener) error {
	srv, err := proxy.New(p.Config, append([]proxy.Option{proxy.WithListener(p.listen, l)}, p.opts...)...)
	if err != nil {
		_ = l.Close()
		return fmt.Errorf("%s: %w", p.name, err)
	}
	if err := srv.Start(); err != nil {
		return fmt.Errorf("%s: %w", p.name, err)
	}
	p.mu.Lock()
	p.Server, p.running = srv, true
	p.mu.Unlock()
	p.env.Register(srv.Self().IDString(), p.name+"-id")
	if err := waitHTTP(ctx, p.listen+"/version", p.Endpoint.TLS, anyStatus); err != nil {
		return fmt.Errorf("%s: not serving: %w", p.name, err)
	}
	return nil
}

// Stop shuts the server down, waiting for open requests until ctx ends; Restart starts it again on the same
// address. Stopping a stopped proxy is a no-op.
func (p *ProxyProxy) Stop(ctx context.Context) error {
	p.mu.Lock()
	srv, running := p.Server, p.running
	p.running = false
	p.mu.Unlock()
	if !running {
		return nil
	}
	if err := srv.Shutdown(ctx); err != nil {
		return fmt.Errorf("%s: shutdown: %w", p.name, err)
	}
	return nil
}

// Restart stops the proxy if it runs, then starts a new server from p.Config on the same address and waits
// until it serves. The Env's teardown stops whichever server runs last.
func (p *ProxyProxy) Restart(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	if err := p.Stop(ctx); err != nil {
		return err
	}
	addr := hostPort(p.listen)
	// Shutdown has closed the old listener; retry the bind for a moment anyway, as Member.Restart does.
	for {
		l, err := net.Listen("tcp", addr)
		if err == nil {
			if err := p.start(ctx, l); err != nil {
				return fmt.Errorf("restart: %w", err)
			}
			p.env.logf("harness: %s restarted at %s", p.name, p.listen)
			return nil
		}
		if !isAddrInUse(err) {
			return fmt.Errorf("%s: restart: listen: %w", p.name, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: restart: %w (last: %v)", p.name, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

type logfWriter func(format string, args ...any)

func (w logfWriter) Write(p []byte) (int, error) {
	w("%s", p)
	return len(p), nil
}

var _ Hop = ProxyProxyHop{}
