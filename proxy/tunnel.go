package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// Schemes of --upstream-via: how an upstream that cannot be dialled directly is reached.
const (
	// ViaHTTPConnect is HTTP CONNECT through a proxy spoken to in plain HTTP.
	ViaHTTPConnect = "http-connect"
	// ViaHTTPSConnect is HTTP CONNECT through a proxy spoken to over TLS (the tunnel TLS files): konnectivity's
	// http-connect mode, or any CONNECT proxy on TLS.
	ViaHTTPSConnect = "https-connect"
	// ViaKonnectivity is a konnectivity server's gRPC mode (apiserver-network-proxy), TLS (mTLS) with the tunnel
	// files: an agent on the far side dials the upstream.
	ViaKonnectivity = "konnectivity"
)

// TunnelConfig is how upstream connections are made when the upstream cannot be dialled directly: every one of
// them (v2, gRPC, probes, discovery) goes through the same tunnel; TLS toward etcd runs end to end inside it.
type TunnelConfig struct {
	// UpstreamVia is the tunnel: http-connect://HOST:PORT, https-connect://HOST:PORT (optionally with
	// USER:PASSWORD@ for Proxy-Authorization) or konnectivity://HOST:PORT. Empty means upstreams are dialled
	// directly.
	UpstreamVia string
	// UpstreamViaAuthFile holds USER:PASSWORD for the CONNECT proxy's Proxy-Authorization (basic), kept off the
	// command line. Empty means the URL's user info, if any.
	UpstreamViaAuthFile string
	// TunnelTLS is the TLS toward the tunnel (https-connect, konnectivity): the CA that verifies it (empty: the
	// system roots) and our client certificate (empty: none). InsecureSkipVerify is not offered.
	TunnelTLS TLSInfo
	// TunnelListen is where our agents connect (https://HOST:PORT, tunnelserver.go) when upstreams are named
	// through one (--upstream tunnel://AGENT-ID/URL); TunnelTLS is then its certificate and the CA that verifies
	// the agents' client certificates. Empty means none.
	TunnelListen string
}

func (t *TunnelConfig) addFlags(fs *flag.FlagSet) {
	t.addViaFlags(fs)
	fs.StringVar(&t.TunnelListen, "tunnel-listen", "", "accept our agents here, https://HOST:PORT (mTLS with the --tunnel-* files); upstreams are then named through one: --upstream tunnel://AGENT-ID/http(s)://HOST:PORT")
}

func (t *TunnelConfig) addViaFlags(fs *flag.FlagSet) {
	fs.StringVar(&t.UpstreamVia, "upstream-via", "", "reach every upstream through this tunnel: http-connect://[USER:PASSWORD@]HOST:PORT, https-connect://[USER:PASSWORD@]HOST:PORT (HTTP CONNECT), konnectivity://HOST:PORT (a konnectivity server's gRPC mode); TLS toward etcd still runs end to end")
	fs.StringVar(&t.UpstreamViaAuthFile, "upstream-via-auth-file", "", "file holding USER:PASSWORD for the CONNECT proxy's Proxy-Authorization (instead of the URL's)")
	fs.StringVar(&t.TunnelTLS.CAFile, "tunnel-ca-file", "", "verify the tunnel's certificate (https-connect, konnectivity) with this CA bundle (default: the system roots); with --tunnel-listen: verify the agents' client certificates (required)")
	fs.StringVar(&t.TunnelTLS.CertFile, "tunnel-cert-file", "", "client certificate presented to the tunnel (https-connect, konnectivity); with --tunnel-listen: its certificate (required)")
	fs.StringVar(&t.TunnelTLS.KeyFile, "tunnel-key-file", "", "key of --tunnel-cert-file")
}

func (t *TunnelConfig) validate(upstreams []string, add func(format string, args ...any)) {
	t.validateListen(upstreams, add) // tunnelserver.go
	tlsFiles := t.TunnelTLS.CAFile != "" || t.TunnelTLS.CertFile != "" || t.TunnelTLS.KeyFile != ""
	if (t.TunnelTLS.CertFile == "") != (t.TunnelTLS.KeyFile == "") {
		add("--tunnel-cert-file and --tunnel-key-file go together")
	}
	for name, path := range map[string]string{"--tunnel-ca-file": t.TunnelTLS.CAFile,
		"--tunnel-cert-file": t.TunnelTLS.CertFile, "--tunnel-key-file": t.TunnelTLS.KeyFile,
		"--upstream-via-auth-file": t.UpstreamViaAuthFile} {
		if path == "" {
			continue
		}
		if _, err := os.Stat(path); err != nil {
			add("%s: %v", name, errors.Unwrap(err))
		}
	}
	if t.UpstreamVia == "" {
		if tlsFiles && t.TunnelListen == "" {
			add("--tunnel-ca-file, --tunnel-cert-file and --tunnel-key-file need --upstream-via or --tunnel-listen")
		}
		if t.UpstreamViaAuthFile != "" {
			add("--upstream-via-auth-file needs --upstream-via")
		}
		return
	}
	u, err := url.Parse(t.UpstreamVia)
	if err != nil {
		add("--upstream-via: %v", errors.Unwrap(err))
		return
	}
	switch u.Scheme {
	case ViaHTTPConnect:
		if tlsFiles {
			add("--upstream-via %s:// speaks plain HTTP to the proxy: the --tunnel-* files need https-connect:// or konnectivity://", u.Scheme)
		}
	case ViaHTTPSConnect:
	case ViaKonnectivity:
		if u.User != nil || t.UpstreamViaAuthFile != "" {
			add("--upstream-via %s:// authenticates with --tunnel-cert-file: no user, no --upstream-via-auth-file", u.Scheme)
		}
	default:
		add("--upstream-via: scheme must be %s, %s or %s", ViaHTTPConnect, ViaHTTPSConnect, ViaKonnectivity)
	}
	if _, _, err := net.SplitHostPort(u.Host); err != nil {
		add("--upstream-via: want %s://HOST:PORT", u.Scheme)
	}
	if u.Path != "" && u.Path != "/" || u.RawQuery != "" {
		add("--upstream-via: must not have a path or query")
	}
	if u.User != nil && t.UpstreamViaAuthFile != "" && u.Scheme != ViaKonnectivity {
		add("--upstream-via has a user and --upstream-via-auth-file is set: give one")
	}
}

// ViaDialer is the tunnel of --upstream-via for a command that dials the upstreams itself (rewrap), built by the
// proxy's own code: AddFlags registers --upstream-via, --upstream-via-auth-file and the --tunnel-* files (not
// --tunnel-listen), Validate reports their problems, Dial dials through the tunnel.
type ViaDialer struct {
	cfg TunnelConfig
	d   *tunnelDialer
}

// AddFlags registers the tunnel's flags on fs.
func (v *ViaDialer) AddFlags(fs *flag.FlagSet) { v.cfg.addViaFlags(fs) }

// Validate reports every problem of the tunnel's flags.
func (v *ViaDialer) Validate() []error {
	var errs []error
	v.cfg.validate(nil, func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) })
	return errs
}

// Open builds the dialer: false without --upstream-via (dial directly). Each dial is bounded by timeout. Close
// releases it.
func (v *ViaDialer) Open(timeout time.Duration) (bool, error) {
	var err error
	v.d, err = newTunnelDialer(&v.cfg, &net.Dialer{Timeout: timeout, KeepAlive: 30 * time.Second}, timeout)
	return v.d != nil, err
}

// Dial opens a connection to addr (host:port) through the tunnel; Open must have returned true.
func (v *ViaDialer) Dial(ctx context.Context, addr string) (net.Conn, error) {
	return v.d.dial(ctx, addr)
}

// Close releases the tunnel (a konnectivity server's gRPC connection).
func (v *ViaDialer) Close() {
	if v.d != nil {
		v.d.close()
	}
}

// tunnelError marks a failure of the tunnel itself (the CONNECT proxy or the konnectivity server refused, or could
// not reach the upstream): nothing of a request was sent. Its text names no upstream.
type tunnelError struct{ err error }

func (e *tunnelError) Error() string { return "upstream tunnel: " + e.err.Error() }
func (e *tunnelError) Unwrap() error { return e.err }

// Timeout reports a tunnel that did not answer within the dial timeout (net.Error).
func (e *tunnelError) Timeout() bool {
	var ne net.Error
	return errors.Is(e.err, context.DeadlineExceeded) || errors.As(e.err, &ne) && ne.Timeout()
}

// Temporary implements net.Error.
func (e *tunnelError) Temporary() bool { return false }

// dialFailed wraps a tunnel failure as a failed dial: unreached, so the request may go to another endpoint.
func dialFailed(err error) error { return &net.OpError{Op: "dial", Net: "tcp", Err: &tunnelError{err}} }

// tunnelDialer is the dialer of --upstream-via: it replaces net.Dialer in the forwarder's one dialer (dialTCP), so
// that every upstream connection goes through it. close releases what it holds.
type tunnelDialer struct {
	dial  func(ctx context.Context, addr string) (net.Conn, error)
	close func()
}

// newTunnelDialer builds the dialer of cfg.UpstreamVia; nil without one. Each dial, from the first byte toward the
// tunnel to the tunnel's answer, is bounded by timeout (--proxy-dial-timeout).
func newTunnelDialer(cfg *TunnelConfig, base *net.Dialer, timeout time.Duration) (*tunnelDialer, error) {
	if cfg.UpstreamVia == "" {
		return nil, nil
	}
	u, err := url.Parse(cfg.UpstreamVia)
	if err != nil {
		return nil, fmt.Errorf("--upstream-via: %w", err)
	}
	var tc *tls.Config
	if u.Scheme != ViaHTTPConnect {
		if tc, err = tunnelClientTLS(cfg.TunnelTLS, u.Hostname()); err != nil {
			return nil, err
		}
	}
	var d *tunnelDialer
	switch u.Scheme {
	case ViaHTTPConnect, ViaHTTPSConnect:
		c := &connectDialer{proxy: u.Host, base: base, tls: tc}
		if c.auth, err = proxyAuth(u, cfg.UpstreamViaAuthFile); err != nil {
			return nil, err
		}
		d = &tunnelDialer{dial: c.dial, close: func() {}}
	case ViaKonnectivity:
		if d, err = newKonnectivityDialer(u.Host, base, tc); err != nil {
			return nil, fmt.Errorf("--upstream-via: %w", err)
		}
	default:
		return nil, fmt.Errorf("--upstream-via: unknown scheme %q", u.Scheme)
	}
	d.dial = boundedDial(d.dial, timeout)
	return d, nil
}

// boundedDial is dial with each dial bounded by timeout (--proxy-dial-timeout) and its failure a failed dial
// (dialFailed): for --upstream-via's dialers and --tunnel-listen's.
func boundedDial(dial func(context.Context, string) (net.Conn, error), timeout time.Duration) func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		c, err := dial(ctx, addr)
		if err != nil {
			return nil, dialFailed(err)
		}
		return c, nil
	}
}

// tunnelClientTLS is the TLS toward the tunnel, verified against its host name.
func tunnelClientTLS(t TLSInfo, serverName string) (*tls.Config, error) {
	st, err := loadUpstream(t)
	if err != nil {
		return nil, fmt.Errorf("tunnel TLS: %w", err)
	}
	return upstreamConfig(TLSInfo{}, st, serverName, nil), nil
}

// proxyAuth is the Proxy-Authorization header value: basic, from the auth file or the URL's user info; "" for none.
func proxyAuth(u *url.URL, file string) (string, error) {
	var userpass string
	switch {
	case file != "":
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("--upstream-via-auth-file: %w", err)
		}
		userpass = strings.TrimSpace(string(b))
		if !strings.Contains(userpass, ":") {
			return "", errors.New("--upstream-via-auth-file: want USER:PASSWORD")
		}
	case u.User != nil:
		pass, _ := u.User.Password()
		userpass = u.User.Username() + ":" + pass
	default:
		return "", nil
	}
	return "Basic " + base64.StdEncoding.EncodeToString([]byte(userpass)), nil
}

// connectDialer opens a connection through an HTTP CONNECT proxy. Written here because neither net/http (its
// Proxy field serves only http.Transport; the gRPC core and the HTTP/1.1 path dial for themselves) nor
// golang.org/x/net/proxy (SOCKS5 only) gives a dial function for CONNECT; it is one request and one response.
type connectDialer struct {
	proxy string      // host:port of the CONNECT proxy
	base  *net.Dialer // the TCP dialer toward it
	tls   *tls.Config // TLS toward the proxy (https-connect); nil for plain HTTP
	auth  string      // Proxy-Authorization value; "" for none
}

func (d *connectDialer) dial(ctx context.Context, addr string) (_ net.Conn, err error) {
	raw, err := d.base.DialContext(ctx, "tcp", d.proxy)
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			_ = raw.Close()
		}
	}()
	// The whole exchange is bounded by ctx: its deadline on the connection, and a cancellation closes it.
	if dl, ok := ctx.Deadline(); ok {
		_ = raw.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = raw.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	conn := raw
	if d.tls != nil {
		tc := tls.Client(raw, d.tls)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("TLS handshake with the CONNECT proxy: %w", err)
		}
		conn = tc
	}
	req := &http.Request{Method: http.MethodConnect, URL: &url.URL{Opaque: addr}, Host: addr, Header: http.Header{}}
	if d.auth != "" {
		req.Header.Set("Proxy-Authorization", d.auth)
	}
	if err := req.Write(conn); err != nil {
		return nil, fmt.Errorf("CONNECT request: %w", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		return nil, fmt.Errorf("CONNECT response: %w", err)
	}
	_ = resp.Body.Close() // a 2xx answer to CONNECT has no body; another one's is not read
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("the CONNECT proxy refused: %s", resp.Status)
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if !stop() {
		return nil, context.Cause(ctx)
	}
	_ = raw.SetDeadline(time.Time{})
	if br.Buffered() > 0 { // the upstream spoke first (etcd does not): keep what was read ahead
		return &readAheadConn{Conn: conn, r: br}, nil
	}
	return conn, nil
}

// readAheadConn is a connection whose first bytes were already read into r.
type readAheadConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *readAheadConn) Read(b []byte) (int, error) {
	if c.r.Buffered() > 0 {
		return c.r.Read(b)
	}
	return c.Conn.Read(b)
}
