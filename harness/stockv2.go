package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver"
	"go.etcd.io/etcd/server/v3/etcdserver/api/etcdhttp"
	"go.etcd.io/etcd/server/v3/proxy/httpproxy"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// The stock v2 proxy's defaults (etcdmain/config.go newConfig).
const (
	stockFailureWait     = 5000 * time.Millisecond
	stockRefreshInterval = 30000 * time.Millisecond
	stockDialTimeout     = 1000 * time.Millisecond
	stockWriteTimeout    = 5000 * time.Millisecond
	stockReadTimeout     = 0
)

type stockConfig struct {
	tls      bool
	readonly bool
}

// WithReadonly wraps the stock v2 proxy's handler in httpproxy.NewReadonlyHandler (etcd --proxy=readonly).
func WithReadonly() StockOption { return stockOptionFunc(func(c *stockConfig) { c.readonly = true }) }

// StockProxy is etcd's v2 proxy (server/proxy/httpproxy) running in this process.
type StockProxy struct {
	// Name is the placeholder of the proxy's address ("stock-v2").
	Name string
	// URL is the proxy's client URL.
	URL string
	// TLS is what a client presents and trusts; zero when plain.
	TLS TLSFiles

	srv *http.Server
	log *lockedWriter
	tr  []*http.Transport
}

// StartStockV2Proxy starts etcd's v2 proxy in front of c, wired as etcdmain.startProxy does in v3.5.35.
//
// It runs in this process rather than as `etcd --proxy=on` so that the demo is one process; the wiring is the
// same: transport.NewTimeoutTransport with the client TLS toward the members, falling back to the peer TLS when
// the client TLS is empty (one TLS identity for both sides), etcdserver.GetClusterFromRemotePeers over the peer
// URLs with the peer transport, httpproxy.NewHandler with the stock failure-wait, refresh and dial timeouts, CORS
// "*", a mux with /metrics and "/" → the handler. Differences: the listener is pre-opened on 127.0.0.1:0, the
// cluster file is not written, and a serve error stops the proxy instead of exiting the process. The handler's
// refresh goroutine cannot be stopped (httpproxy has no Close); it outlives Close.
func (e *Env) StartStockV2Proxy(ctx context.Context, c *Cluster, opts ...StockOption) (*StockProxy, error) {
	var cfg stockConfig
	for _, o := range opts {
		o.applyStock(&cfg)
	}
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	name := e.nextName("stock-v2")
	p := &StockProxy{Name: name}

	// The etcd flags this corresponds to: --client-cert-file etc. (listener and toward members) and
	// --peer-*-file (toward the members' peer URLs, and toward their client URLs when the client TLS is empty).
	var clientTLS, peerTLS transport.TLSInfo
	if cfg.tls {
		f, err := e.PKI.Cluster.Issue(name) // both usages: server to clients, client to members
		if err != nil {
			return nil, err
		}
		clientTLS = f.TLSInfo()
		clientTLS.ClientCertAuth = true
		p.TLS = c.TLS
		if p.TLS.IsZero() { // plain members: clients still need a Cluster-CA certificate for the proxy
			if p.TLS, err = e.PKI.Cluster.Issue(name+"-client", ClientAuth()); err != nil {
				return nil, err
			}
		}
	}
	if !c.TLS.IsZero() {
		f, err := e.PKI.Cluster.Issue(name + "-peer")
		if err != nil {
			return nil, err
		}
		peerTLS = f.TLSInfo()
	}

	logPath := filepath.Join(e.Dir, name+".log")
	lw, err := newLockedWriter(logPath)
	if err != nil {
		return nil, err
	}
	p.log = lw
	lg := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(lw), zap.InfoLevel))

	towardMembers := clientTLS
	if towardMembers.Empty() {
		// Support old proxy behavior of defaulting to PeerTLSInfo for both client and peer connections.
		towardMembers = peerTLS
	}
	pt, err := transport.NewTimeoutTransport(towardMembers, stockDialTimeout, stockReadTimeout, stockWriteTimeout)
	if err != nil {
		lw.Close()
		return nil, fmt.Errorf("harness: %s transport toward members: %w", name, err)
	}
	pt.MaxIdleConnsPerHost = httpproxy.DefaultMaxIdleConnsPerHost
	tr, err := transport.NewTimeoutTransport(peerTLS, stockDialTimeout, stockReadTimeout, stockWriteTimeout)
	if err != nil {
		lw.Close()
		return nil, fmt.Errorf("harness: %s peer transport: %w", name, err)
	}

	var mu sync.Mutex
	peerURLs := c.PeerURLs()
	uf := func() []string {
		mu.Lock()
		defer mu.Unlock()
		gcls, gerr := etcdserver.GetClusterFromRemotePeers(lg, peerURLs, tr)
		if gerr != nil {
			lg.Warn("failed to get cluster from remote peers", zap.Strings("peer-urls", peerURLs), zap.Error(gerr))
			return []string{}
		}
		peerURLs = gcls.PeerURLs()
		return gcls.ClientURLs()
	}
	p.tr = []*http.Transport{pt, tr}
	ph := httpproxy.NewHandler(lg, pt, uf, stockFailureWait, stockRefreshInterval)
	ph = embed.WrapCORS(map[string]struct{}{"*": {}}, ph)
	if cfg.readonly {
		ph = httpproxy.NewReadonlyHandler(ph)
	}

	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		lw.Close()
		return nil, fmt.Errorf("harness: %s listen: %w", name, err)
	}
	scheme := "http"
	if cfg.tls {
		scheme = "https"
		if l, err = transport.NewTLSListener(l, &clientTLS); err != nil {
			lw.Close()
			return nil, fmt.Errorf("harness: %s TLS listener: %w", name, err)
		}
	}
	p.URL = fmt.Sprintf("%s://%s", scheme, l.Addr())
	mux := http.NewServeMux()
	etcdhttp.HandleMetrics(mux) // v2 proxy just uses the same port
	mux.Handle("/", ph)
	p.srv = &http.Server{Handler: mux, ErrorLog: zap.NewStdLog(lg)}
	go func() {
		if err := p.srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			lg.Error("done serving", zap.Error(err))
		}
	}()
	e.Defer(name, p.Close)
	e.Register(l.Addr().String(), name)

	if err := waitHTTP(ctx, p.URL+"/version", p.TLS, statusOK); err != nil {
		return nil, fmt.Errorf("harness: %s not serving (log %s): %w", name, logPath, err)
	}
	e.logf("harness: %s serving on %s", name, p.URL)
	return p, nil
}

// Endpoint is how a client reaches the proxy.
func (p *StockProxy) Endpoint() Endpoint {
	return Endpoint{Name: p.Name, URLs: []string{p.URL}, TLS: p.TLS}
}

// Close stops serving and closes open connections.
func (p *StockProxy) Close() error {
	err := p.srv.Close()
	for _, t := range p.tr {
		t.CloseIdleConnections()
	}
	p.log.Close()
	return err
}

// Readiness by the status of GET /version: a 200, or any answer at all (a part whose own HTTP works while the
// layer below serves none, as etcd's grpc-proxy does).
var (
	statusOK  = func(code int) bool { return code == http.StatusOK }
	anyStatus = func(int) bool { return true }
)

// waitHTTP polls GET url until its status satisfies ok, or ctx ends.
func waitHTTP(ctx context.Context, url string, tf TLSFiles, ok func(status int) bool) error {
	tc, err := tf.ClientConfig()
	if err != nil {
		return err
	}
	cl := &http.Client{Transport: &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true}, Timeout: 2 * time.Second}
	defer cl.CloseIdleConnections()
	var last error
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		resp, err := cl.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if ok(resp.StatusCode) {
				return nil
			}
			err = fmt.Errorf("GET %s: %s", url, resp.Status)
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// lockedWriter is a log file that turns into a sink once closed, so that goroutines that outlive a part can
// still log.
type lockedWriter struct {
	mu sync.Mutex
	f  *os.File
}

func newLockedWriter(path string) (*lockedWriter, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("harness: open log: %w", err)
	}
	return &lockedWriter{f: f}, nil
}

func (w *lockedWriter) Write(b []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return len(b), nil
	}
	return w.f.Write(b)
}

func (w *lockedWriter) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.f == nil {
		return nil
	}
	err := w.f.Close()
	w.f = nil
	return err
}
