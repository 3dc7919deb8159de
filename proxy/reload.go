package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-multierror"
)

// Sides of the certificate reload, as logged and as the side label of the cert metrics.
const (
	sideListener = "listener"
	sideUpstream = "upstream"
)

// certSide is one TLS side whose files are re-read on SIGHUP and when they change. New connections get what was
// loaded last; open connections keep the certificates they were made with. A reload that fails keeps the
// previous state and logs why.
type certSide struct {
	name  string
	info  TLSInfo
	load  func(TLSInfo) (*tlsState, error)
	state atomic.Pointer[tlsState]

	mu     sync.Mutex // serialises reloads and guards stamps
	stamps []fileStamp
}

// tlsState is what one load of a side's files produced.
type tlsState struct {
	server   *tls.Config       // listener: the whole configuration of a handshake
	cert     *tls.Certificate  // upstream: our client certificate; nil when none is configured
	roots    *x509.CertPool    // upstream: the CA bundle; nil for the system roots
	leaf     *x509.Certificate // the certificate we present, for logs and the expiry gauge; nil when none
	notAfter time.Time
}

// fileStamp is what the poller compares: a change of either means the file was rewritten.
type fileStamp struct {
	modTime time.Time
	size    int64
	err     bool
}

func (s *certSide) files() []string {
	var fs []string
	for _, f := range []string{s.info.CertFile, s.info.KeyFile, s.info.CAFile, s.info.CRLFile} {
		if f != "" {
			fs = append(fs, f)
		}
	}
	return fs
}

func (s *certSide) currentStamps() []fileStamp {
	var st []fileStamp
	for _, f := range s.files() {
		fi, err := os.Stat(f) // follows symlinks: a Kubernetes Secret volume swaps a symlink
		if err != nil {
			st = append(st, fileStamp{err: true})
			continue
		}
		st = append(st, fileStamp{modTime: fi.ModTime(), size: fi.Size()})
	}
	return st
}

// reload re-reads the side's files. With onlyIfChanged it does so only when a file's modification time or
// size moved since the last attempt (an attempt that failed is not retried until the files change again).
func (s *certSide) reload(onlyIfChanged bool) (changed bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	stamps := s.currentStamps()
	if onlyIfChanged && slices.Equal(stamps, s.stamps) {
		return false, nil
	}
	s.stamps = stamps
	st, err := s.load(s.info)
	if err != nil {
		return true, err
	}
	s.state.Store(st)
	return true, nil
}

// loadListener builds a listener side's handshake configuration, with ALPN for HTTP/2 and HTTP/1.1 (the
// configuration returned by GetConfigForClient replaces the server's, NextProtos included).
func loadListener(t TLSInfo) (*tlsState, error) {
	c, err := t.serverConfig()
	if err != nil {
		return nil, err
	}
	c.NextProtos = []string{"h2", "http/1.1"}
	st := &tlsState{server: c}
	st.setLeaf(&c.Certificates[0])
	return st, nil
}

// loadUpstream reads our client certificate and the CA bundle toward the upstream.
func loadUpstream(t TLSInfo) (*tlsState, error) {
	st := &tlsState{}
	if t.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("loading the client certificate: %w", err)
		}
		st.cert = &cert
		st.setLeaf(&cert)
	}
	if t.CAFile != "" {
		pool, err := loadPool(t.CAFile)
		if err != nil {
			return nil, err
		}
		st.roots = pool
	}
	return st, nil
}

func (st *tlsState) setLeaf(c *tls.Certificate) {
	if c.Leaf != nil {
		st.leaf = c.Leaf
	} else if len(c.Certificate) > 0 {
		st.leaf, _ = x509.ParseCertificate(c.Certificate[0])
	}
	if st.leaf != nil {
		st.notAfter = st.leaf.NotAfter
	}
}

// serverTLS is the configuration of the https listeners: every handshake takes the side's latest state.
func (s *certSide) serverTLS() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return s.state.Load().server, nil
		},
	}
}

// clientTLS is the configuration of one new connection toward the upstream host serverName, from the side's
// latest state: crypto/tls then verifies the chain against the reloaded bundle and the certificate against the
// host dialled, IP addresses included.
func (s *certSide) clientTLS(serverName string, nextProtos []string) *tls.Config {
	return upstreamConfig(s.info, s.state.Load(), serverName, nextProtos)
}

// upstreamConfig is the TLS toward the upstream made of one load of its files. An empty serverName lets
// http.Transport fill in the host it dials.
func upstreamConfig(t TLSInfo, st *tlsState, serverName string, nextProtos []string) *tls.Config {
	c := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: serverName, RootCAs: st.roots, NextProtos: nextProtos,
		InsecureSkipVerify: t.InsecureSkipVerify} //nolint:gosec // -k is the user's explicit choice
	if st.cert != nil {
		c.Certificates = []tls.Certificate{*st.cert}
	}
	return c
}

// certReloader owns both sides and the poller.
type certReloader struct {
	log      *slog.Logger
	m        *metrics
	sides    []*certSide // those with files
	listener *certSide   // nil without listener TLS
	upstream *certSide   // nil without upstream TLS files
	ids      *identities // --upstream-cert-dir (identity.go); nil without one
}

// newCertReloader loads the upstream side now; the listener side is loaded by startListener (Start), where a
// broken listener certificate has always been reported.
func newCertReloader(cfg *Config, log *slog.Logger, m *metrics) (*certReloader, error) {
	r := &certReloader{log: log, m: m}
	u := cfg.UpstreamTLS
	if u.CertFile != "" || u.CAFile != "" {
		r.upstream = &certSide{name: sideUpstream, info: u, load: loadUpstream}
		if _, err := r.upstream.reload(false); err != nil {
			return nil, fmt.Errorf("upstream TLS: %w", err)
		}
		r.loaded(r.upstream)
		r.sides = append(r.sides, r.upstream)
	}
	return r, nil
}

// startListener loads the listener side and returns the configuration every https listener serves.
func (r *certReloader) startListener(t TLSInfo) (*tls.Config, error) {
	if r.listener == nil {
		r.listener = &certSide{name: sideListener, info: t, load: loadListener}
		if _, err := r.listener.reload(false); err != nil {
			r.listener = nil
			return nil, err
		}
		r.loaded(r.listener)
		r.sides = append(r.sides, r.listener)
	}
	return r.listener.serverTLS(), nil
}

// upstreamTLS is what makes the forwarder's TLS handshakes (Forwarder.dialTLS, the gRPC core's) use the upstream
// side's latest certificates (a tls.Config's RootCAs cannot be swapped while transports clone it); nil when the
// upstream side has no files.
func (r *certReloader) upstreamTLS() func(host string, protos []string) *tls.Config {
	if r.upstream == nil {
		return nil
	}
	return r.upstream.clientTLS
}

// Reload re-reads every side now (SIGHUP). A side that fails keeps its previous certificates.
func (r *certReloader) Reload() error {
	var errs *multierror.Error
	for _, s := range r.sides {
		if _, err := s.reload(false); err != nil {
			errs = multierror.Append(errs, r.failed(s, err))
			continue
		}
		r.loaded(s)
	}
	if err := r.reloadIdentities(false); err != nil {
		errs = multierror.Append(errs, err)
	}
	return errs.ErrorOrNil()
}

// poll reloads a side whose files changed, every interval, until ctx ends.
func (r *certReloader) poll(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		for _, s := range r.sides {
			changed, err := s.reload(true)
			switch {
			case err != nil:
				_ = r.failed(s, err)
			case changed:
				r.loaded(s)
			}
		}
		_ = r.reloadIdentities(true)
	}
}

func (r *certReloader) loaded(s *certSide) {
	st := s.state.Load()
	r.m.certReloads.WithLabelValues(s.name, "success").Inc()
	attrs := []any{"side", s.name}
	if st.leaf != nil {
		r.m.certNotAfter.WithLabelValues(s.name).Set(float64(st.notAfter.Unix()))
		attrs = append(attrs, "subject", st.leaf.Subject.String(), "serial", st.leaf.SerialNumber.Text(16),
			"not-after", st.notAfter.UTC().Format(time.RFC3339))
	}
	r.log.Info("certificates loaded", attrs...)
}

func (r *certReloader) failed(s *certSide, err error) error {
	r.m.certReloads.WithLabelValues(s.name, "failure").Inc()
	r.log.Error("certificate reload failed; keeping the previous certificates", "side", s.name, "err", err)
	return fmt.Errorf("%s TLS: %w", s.name, err)
}
