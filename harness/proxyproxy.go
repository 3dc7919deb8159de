package harness

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
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
	Server   *proxy.Server
	Config   proxy.Config
	Endpoint Endpoint
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
	opts := append([]proxy.Option{proxy.WithLogger(logger), proxy.WithListener(u, l)}, h.Options...)
	srv, err := proxy.New(cfg, opts...)
	if err != nil {
		_ = l.Close()
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if err := srv.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	e.Defer(name, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(ctx)
	})
	e.Register(l.Addr().String(), name)
	e.Register(srv.Self().IDString(), name+"-id")
	if err := waitHTTP(ctx, u+"/version", ep.TLS, anyStatus); err != nil {
		return nil, fmt.Errorf("%s: not serving: %w", name, err)
	}
	e.logf("harness: %s up at %s in front of %s", name, u, below.Name)
	return &ProxyProxy{Server: srv, Config: cfg, Endpoint: ep}, nil
}

type logfWriter func(format string, args ...any)

func (w logfWriter) Write(p []byte) (int, error) {
	w("%s", p)
	return len(p), nil
}

var _ Hop = ProxyProxyHop{}
