package proxy

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/net/http2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
)

// splitPKI is a CA, a server certificate for 127.0.0.1 and a client certificate for "alice", in memory and as
// PEM files (for curl). The harness has the same, but it imports this package.
type splitPKI struct {
	pool                       *x509.CertPool
	server, client             tls.Certificate
	caFile, certFile, keyFile  string // the client's files
	serverConfig, clientConfig *tls.Config
}

func newSplitPKI(t testing.TB) *splitPKI {
	t.Helper()
	dir := t.TempDir()
	newKey := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	caKey := newKey()
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "split-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, cn string, usage x509.ExtKeyUsage) (tls.Certificate, []byte, []byte) {
		key := newKey()
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, key.Public(), caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
		keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
		c, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		return c, certPEM, keyPEM
	}
	p := &splitPKI{pool: x509.NewCertPool()}
	p.pool.AddCert(ca)
	p.server, _, _ = issue(2, "server", x509.ExtKeyUsageServerAuth)
	var certPEM, keyPEM []byte
	p.client, certPEM, keyPEM = issue(3, "alice", x509.ExtKeyUsageClientAuth)
	p.caFile, p.certFile, p.keyFile = filepath.Join(dir, "ca.crt"), filepath.Join(dir, "alice.crt"), filepath.Join(dir, "alice.key")
	for f, b := range map[string][]byte{
		p.caFile:   pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		p.certFile: certPEM, p.keyFile: keyPEM,
	} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	p.serverConfig = &tls.Config{
		MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{p.server},
		ClientCAs: p.pool, ClientAuth: tls.RequireAndVerifyClientCert,
	}
	p.clientConfig = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: p.pool, Certificates: []tls.Certificate{p.client}}
	return p
}

// splitRig is a split on a loopback port with the three servers behind it: a grpc.Server with the health service
// (an interceptor records the client certificate's common name), an http.Server on HTTP1() and serveHTTP2 on
// HTTP2(), whose handler answers with the protocol, whether r.TLS is set and the client certificate's name.
type splitRig struct {
	addr   string
	pki    *splitPKI // nil: plain
	split  *connSplit
	grpcCN atomic.Value // string: the common name grpc-go's AuthInfo had on the last call
}

func startSplit(t testing.TB, withTLS bool, handshakeTimeout time.Duration) *splitRig {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &splitRig{addr: l.Addr().String()}
	var tlsConfig *tls.Config
	if withTLS {
		r.pki = newSplitPKI(t)
		tlsConfig = r.pki.serverConfig
	}
	r.split = newConnSplit(l, tlsConfig, handshakeTimeout, nil)
	r.grpcCN.Store("")

	gs := newHealthServer(grpcServerCreds(), &r.grpcCN)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		cn := "none"
		if req.TLS != nil && len(req.TLS.PeerCertificates) > 0 {
			cn = req.TLS.PeerCertificates[0].Subject.CommonName
		}
		fmt.Fprintf(w, "%s %s tls=%t cn=%s", req.URL.Path, req.Proto, req.TLS != nil, cn)
	})}

	errs := make(chan error, 4)
	go func() { errs <- r.split.Serve() }()
	go func() { errs <- gs.Serve(r.split.GRPC()) }()
	go func() { errs <- srv.Serve(r.split.HTTP1()) }()
	go func() { errs <- serveHTTP2(r.split.HTTP2(), srv) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		gs.Stop()
		if err := r.split.Close(); err != nil {
			t.Errorf("split Close: %v", err)
		}
		for range 4 {
			select {
			case err := <-errs:
				// grpc.ErrServerStopped: Stop came before the goroutine called Serve.
				if err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, net.ErrClosed) &&
					!errors.Is(err, grpc.ErrServerStopped) {
					t.Errorf("serve: %v", err)
				}
			case <-ctx.Done():
				t.Fatal("a server did not return after Close")
			}
		}
	})
	return r
}

// newHealthServer is a grpc.Server with the health service; an interceptor stores the common name of the client
// certificate grpc-go's AuthInfo holds ("none" without one) into cn.
func newHealthServer(creds credentials.TransportCredentials, cn *atomic.Value) *grpc.Server {
	gs := grpc.NewServer(grpc.Creds(creds),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			name := "none"
			if p, ok := peer.FromContext(ctx); ok {
				if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
					name = ti.State.PeerCertificates[0].Subject.CommonName
				}
			}
			cn.Store(name)
			return h(ctx, req)
		}))
	healthpb.RegisterHealthServer(gs, health.NewServer())
	return gs
}

func (r *splitRig) scheme() string {
	if r.pki != nil {
		return "https"
	}
	return "http"
}

// wantCN is what the servers must report as the client's certificate name.
func (r *splitRig) wantCN() string {
	if r.pki != nil {
		return "alice"
	}
	return "none"
}

// dial is a gRPC client of the rig, with the client certificate on TLS.
func (r *splitRig) dial(t testing.TB) *grpc.ClientConn {
	t.Helper()
	creds := insecure.NewCredentials()
	if r.pki != nil {
		creds = credentials.NewTLS(r.pki.clientConfig)
	}
	cc, err := grpc.NewClient(r.addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	return cc
}

func (r *splitRig) grpcCheck(t testing.TB) {
	t.Helper()
	cc := r.dial(t)
	defer cc.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	res, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatalf("gRPC health check: %v", err)
	}
	if res.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gRPC health: %v", res.Status)
	}
	if got := r.grpcCN.Load(); got != r.wantCN() {
		t.Fatalf("grpc.Server saw client certificate %q, want %q", got, r.wantCN())
	}
}

// get makes n GET requests on one http.Client and asserts each answer and that they shared a connection (an
// HTTP/2 server that rejects the connection after the first request, as http2.Server does when it sees the
// acknowledgement of the sniff's SETTINGS, makes the client dial again).
func (r *splitRig) get(t testing.TB, h2 bool, n int) { r.request(t, h2, n, "") }

// request is get, or a POST with contentType when that is not empty.
func (r *splitRig) request(t testing.TB, h2 bool, n int, contentType string) {
	t.Helper()
	var dials atomic.Int32
	tr := &http.Transport{
		TLSClientConfig: nil, ForceAttemptHTTP2: h2,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
	}
	defer tr.CloseIdleConnections()
	tr.Protocols = new(http.Protocols)
	proto := "HTTP/1.1"
	switch {
	case h2:
		proto = "HTTP/2.0"
		tr.Protocols.SetHTTP2(true)
		tr.Protocols.SetUnencryptedHTTP2(r.pki == nil)
	default:
		tr.Protocols.SetHTTP1(true)
	}
	if r.pki != nil {
		tr.TLSClientConfig = r.pki.clientConfig.Clone()
	}
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	want := fmt.Sprintf("/v2/keys %s tls=%t cn=%s", proto, r.pki != nil, r.wantCN())
	for i := range n {
		req, err := http.NewRequest(http.MethodGet, r.scheme()+"://"+r.addr+"/v2/keys", nil)
		if err != nil {
			t.Fatal(err)
		}
		if contentType != "" {
			req.Method = http.MethodPost
			req.Header.Set("Content-Type", contentType)
		}
		res, err := c.Do(req)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		b, err := io.ReadAll(res.Body)
		res.Body.Close()
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		if res.StatusCode != http.StatusOK || string(b) != want {
			t.Fatalf("request %d: %d %q, want 200 %q", i, res.StatusCode, b, want)
		}
	}
	// Not "exactly one": once in some hundred runs under -race Go's client dialled a second connection for a
	// sequential request (not reproduced since); with the bug every request needs its own.
	if got := dials.Load(); n > 1 && int(got) >= n {
		t.Fatalf("%d requests took %d connections, want them to share", n, got)
	}
}

func TestConnSplitRoutes(t *testing.T) {
	t.Parallel()
	for _, withTLS := range []bool{false, true} {
		t.Run(fmt.Sprintf("tls=%t", withTLS), func(t *testing.T) {
			t.Parallel()
			r := startSplit(t, withTLS, time.Minute)
			// A client that sends nothing holds its own goroutine, not the accept loop: every request below
			// waits at most 10 s.
			silent, err := net.Dial("tcp", r.addr)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { silent.Close() })
			t.Run("grpc", func(t *testing.T) {
				t.Parallel()
				r.grpcCheck(t)
			})
			t.Run("http1", func(t *testing.T) {
				t.Parallel()
				r.get(t, false, 2)
			})
			t.Run("http2", func(t *testing.T) {
				t.Parallel()
				r.get(t, true, 3)
			})
			t.Run("grpc-web", func(t *testing.T) {
				t.Parallel()
				r.request(t, true, 1, "application/grpc-web") // not gRPC to grpc.Server
			})
			t.Run("curl", func(t *testing.T) {
				t.Parallel()
				if _, err := exec.LookPath("curl"); err != nil {
					t.Skip("no curl")
				}
				args := []string{"-sS", "--max-time", "10", "--http2-prior-knowledge"}
				if r.pki != nil {
					args = []string{"-sS", "--max-time", "10", "--http2", "-k", "--cert", r.pki.certFile, "--key", r.pki.keyFile}
				}
				var stderr bytes.Buffer
				cmd := exec.Command("curl", append(args, "-v", r.scheme()+"://"+r.addr+"/v2/keys")...)
				cmd.Stderr = &stderr
				out, err := cmd.Output()
				want := fmt.Sprintf("/v2/keys HTTP/2.0 tls=%t cn=%s", r.pki != nil, r.wantCN())
				if err != nil || string(out) != want {
					t.Fatalf("curl: %v: %q, want %q\n%s", err, out, want, stderr.Bytes())
				}
			})
		})
	}
}

// serveHTTP2 applies srv.ConnContext to each connection (which has the TLS state), and srv.Shutdown sends GOAWAY
// to its connections and closes its listener, so serveHTTP2 returns once they have ended.
func TestServeHTTP2(t *testing.T) {
	t.Parallel()
	pki := newSplitPKI(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := newConnSplit(l, pki.serverConfig, 5*time.Second, nil)
	go func() { _ = s.Serve() }()
	t.Cleanup(func() { _ = s.Close() })
	type connKey struct{}
	const concurrent = 300
	var streams atomic.Int32
	allIn := make(chan struct{})
	srv := &http.Server{
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			cs, ok := c.(interface{ ConnectionState() tls.ConnectionState })
			return context.WithValue(ctx, connKey{}, ok && cs.ConnectionState().HandshakeComplete)
		},
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/wait" {
				if streams.Add(1) == concurrent {
					close(allIn)
				}
				select {
				case <-allIn:
				case <-r.Context().Done():
				}
			}
			fmt.Fprintf(w, "conn TLS=%v", r.Context().Value(connKey{}))
		}),
	}
	served := make(chan error, 1)
	go func() { served <- serveHTTP2(s.HTTP2(), srv) }()

	var dials atomic.Int32
	tr := &http.Transport{
		TLSClientConfig: pki.clientConfig.Clone(), ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		},
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	get := func(path string) error {
		res, err := client.Get("https://" + l.Addr().String() + path)
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.ProtoMajor != 2 || string(b) != "conn TLS=true" {
			return fmt.Errorf("%s %q, want HTTP/2 %q", res.Proto, b, "conn TLS=true")
		}
		return nil
	}
	if err := get("/"); err != nil {
		t.Fatal(err)
	}
	// More concurrent streams than Go's default 250, all on the one connection.
	errs := make(chan error, concurrent)
	for range concurrent {
		go func() { errs <- get("/wait") }()
	}
	for range concurrent {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := dials.Load(); n != 1 {
		t.Fatalf("%d concurrent requests took %d connections, want 1", concurrent, n)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-served: // the client's idle connection is still in tr: only the GOAWAY ends it
		if !errors.Is(err, http.ErrServerClosed) {
			t.Fatalf("serveHTTP2: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("serveHTTP2 still serving after srv.Shutdown")
	}
}

func TestIsGRPCContentType(t *testing.T) {
	t.Parallel()
	for v, want := range map[string]bool{
		"application/grpc": true, "application/grpc+proto": true, "application/grpc;charset=utf-8": true,
		"application/grpc-web": false, "application/grpc-web+proto": false, "application/json": false, "": false,
		"application/grp": false,
	} {
		if got := isGRPCContentType(v); got != want {
			t.Errorf("isGRPCContentType(%q) = %t, want %t", v, got, want)
		}
	}
}

// readUntilClosed reads c until it is closed by the server and returns how long that took; it fails the test if
// the server keeps it open for limit.
func readUntilClosed(t *testing.T, c net.Conn, limit time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	if err := c.SetReadDeadline(start.Add(limit)); err != nil {
		t.Fatal(err)
	}
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %v", limit)
	}
	return time.Since(start)
}

// A client that sends nothing, or stops before proving it speaks HTTP/2, is dropped after the handshake timeout.
func TestConnSplitDropsSilentClients(t *testing.T) {
	t.Parallel()
	const timeout = 300 * time.Millisecond
	for _, withTLS := range []bool{false, true} {
		r := startSplit(t, withTLS, timeout)
		for name, send := range map[string]string{"nothing": "", "half a preface": http2.ClientPreface[:10]} {
			t.Run(fmt.Sprintf("tls=%t/%s", withTLS, name), func(t *testing.T) {
				t.Parallel()
				c, err := net.Dial("tcp", r.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if withTLS && send != "" {
					tc := tls.Client(c, &tls.Config{ServerName: "127.0.0.1", RootCAs: r.pki.pool, Certificates: r.pki.clientConfig.Certificates, NextProtos: []string{"h2"}})
					if err := tc.Handshake(); err != nil {
						t.Fatal(err)
					}
					c = tc
				}
				if _, err := io.WriteString(c, send); err != nil {
					t.Fatal(err)
				}
				if d := readUntilClosed(t, c, 10*timeout); d < timeout/2 {
					t.Fatalf("dropped after %v, before the timeout %v", d, timeout)
				}
			})
		}
	}
}

// A gRPC channel connected ahead of its first call is not dropped after the handshake timeout: once it has sent
// its preface and SETTINGS, the split waits for its first request as the servers would.
func TestConnSplitKeepsIdleGRPCChannel(t *testing.T) {
	t.Parallel()
	const timeout = 200 * time.Millisecond
	for _, withTLS := range []bool{false, true} {
		t.Run(fmt.Sprintf("tls=%t", withTLS), func(t *testing.T) {
			t.Parallel()
			r := startSplit(t, withTLS, timeout)
			cc := r.dial(t)
			defer cc.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			cc.Connect()
			for s := cc.GetState(); s != connectivity.Ready; s = cc.GetState() {
				if !cc.WaitForStateChange(ctx, s) {
					t.Fatalf("channel not ready: %v", s)
				}
			}
			idle, cancelIdle := context.WithTimeout(ctx, 5*timeout)
			defer cancelIdle()
			if cc.WaitForStateChange(idle, connectivity.Ready) {
				t.Fatalf("idle channel went %v within %v", cc.GetState(), 5*timeout)
			}
			if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// Hostile starts neither hang nor crash the split, and the split still serves afterwards.
func TestConnSplitHostileStarts(t *testing.T) {
	t.Parallel()
	frame := func(typ http2.FrameType, flags http2.Flags, stream byte, payload ...byte) []byte {
		n := len(payload)
		if typ == http2.FrameHeaders && n == 0 {
			n = 1<<24 - 1 // announced, not sent
		}
		return append([]byte{byte(n >> 16), byte(n >> 8), byte(n), byte(typ), byte(flags), 0, 0, 0, stream}, payload...)
	}
	start := func(frames ...[]byte) []byte {
		return bytes.Join(append([][]byte{[]byte(http2.ClientPreface), frame(http2.FrameSettings, 0, 0)}, frames...), nil)
	}
	ping := frame(http2.FramePing, 0, 0, make([]byte, 8)...)
	cases := map[string][]byte{
		// On plain listeners to HTTP1(), where http.Server answers 400; on TLS (h2 negotiated) dropped.
		"garbage":     append(bytes.Repeat([]byte("x"), 1000), "\r\n\r\n"...),
		"huge header": start(frame(http2.FrameHeaders, http2.FlagHeadersEndHeaders, 1)),
		"no headers":  start(bytes.Repeat(ping, sniffMaxBytes/len(ping)+10)),
		"bad hpack":   start(frame(http2.FrameHeaders, http2.FlagHeadersEndHeaders, 1, 0xff, 0xff, 0xff, 0xff)),
	}
	for _, withTLS := range []bool{false, true} {
		r := startSplit(t, withTLS, 5*time.Second)
		for name, send := range cases {
			t.Run(fmt.Sprintf("tls=%t/%s", withTLS, name), func(t *testing.T) {
				t.Parallel()
				c, err := net.Dial("tcp", r.addr)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				if withTLS {
					tc := tls.Client(c, &tls.Config{ServerName: "127.0.0.1", RootCAs: r.pki.pool, Certificates: r.pki.clientConfig.Certificates, NextProtos: []string{"h2"}})
					if err := tc.Handshake(); err != nil {
						t.Fatal(err)
					}
					c = tc
				}
				go func() { _, _ = c.Write(send) }() // the server may stop reading and close: the write may fail
				readUntilClosed(t, c, 5*time.Second)
				r.grpcCheck(t)
			})
		}
	}
}

// Close ends Serve, the three listeners and the connections in flight; closing the listener ends Serve too.
func TestConnSplitClose(t *testing.T) {
	t.Parallel()
	t.Run("Close", func(t *testing.T) {
		t.Parallel()
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := newConnSplit(l, nil, time.Minute, nil)
		served := make(chan error, 1)
		go func() { served <- s.Serve() }()
		silent, err := net.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer silent.Close()
		accepted := make(chan error, 3)
		for _, sl := range []net.Listener{s.GRPC(), s.HTTP2(), s.HTTP1()} {
			go func() { _, err := sl.Accept(); accepted <- err }()
		}
		waitFor(t, func() bool { s.mu.Lock(); defer s.mu.Unlock(); return len(s.inFlight) == 1 })
		if err := s.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case err := <-served:
			if err != nil {
				t.Fatalf("Serve after Close: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Serve did not return after Close")
		}
		for range 3 {
			if err := <-accepted; !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Accept after Close: %v", err)
			}
		}
		readUntilClosed(t, silent, 5*time.Second)
	})
	t.Run("listener closed", func(t *testing.T) {
		t.Parallel()
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := newConnSplit(l, nil, time.Minute, nil)
		served := make(chan error, 1)
		go func() { served <- s.Serve() }()
		l.Close()
		select {
		case err := <-served:
			if !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Serve after the listener closed: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("Serve did not return after the listener closed")
		}
		if _, err := s.HTTP1().Accept(); !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Accept after the listener closed: %v", err)
		}
	})
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 5s")
		}
	}
}

// Every goroutine of the split and of serveHTTP2 ends with Close and Shutdown. Not parallel: goleak sees the
// whole process.
func TestConnSplitNoLeak(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	var inFlight net.Conn // still being handshaken when the split closes
	t.Run("run", func(t *testing.T) {
		r := startSplit(t, true, time.Minute)
		r.grpcCheck(t)
		r.get(t, true, 1)
		r.get(t, false, 1)
		var err error
		if inFlight, err = net.Dial("tcp", r.addr); err != nil {
			t.Fatal(err)
		}
		waitFor(t, func() bool { r.split.mu.Lock(); defer r.split.mu.Unlock(); return len(r.split.inFlight) == 1 })
	})
	if inFlight != nil {
		readUntilClosed(t, inFlight, 5*time.Second)
		inFlight.Close()
	}
}

// BenchmarkSplitUnary measures a gRPC unary call (health Check) on one connection through the split against
// grpc.Server serving the listener itself, plain and TLS: what the split costs every call.
func BenchmarkSplitUnary(b *testing.B) { benchSplit(b, false) }

// BenchmarkSplitConnect measures a new connection and its first call, split against direct: what the sniff (one
// more goroutine, a SETTINGS frame, the bytes replayed) costs every connection.
func BenchmarkSplitConnect(b *testing.B) { benchSplit(b, true) }

func benchSplit(b *testing.B, connectEachCall bool) {
	for _, withTLS := range []bool{false, true} {
		for _, via := range []string{"direct", "split"} {
			b.Run(fmt.Sprintf("tls=%t/%s", withTLS, via), func(b *testing.B) {
				var addr string
				var pki *splitPKI
				if via == "split" {
					r := startSplit(b, withTLS, 5*time.Second)
					addr, pki = r.addr, r.pki
				} else {
					l, err := net.Listen("tcp", "127.0.0.1:0")
					if err != nil {
						b.Fatal(err)
					}
					creds := insecure.NewCredentials()
					if withTLS {
						pki = newSplitPKI(b)
						creds = credentials.NewTLS(pki.serverConfig)
					}
					gs := newHealthServer(creds, new(atomic.Value)) // the same server as the split's
					go func() { _ = gs.Serve(l) }()
					b.Cleanup(gs.Stop)
					addr = l.Addr().String()
				}
				creds := insecure.NewCredentials()
				if pki != nil {
					creds = credentials.NewTLS(pki.clientConfig)
				}
				ctx := context.Background()
				call := func(cc *grpc.ClientConn) {
					if _, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
						b.Fatal(err)
					}
				}
				dial := func() *grpc.ClientConn {
					cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
					if err != nil {
						b.Fatal(err)
					}
					return cc
				}
				cc := dial()
				defer cc.Close()
				call(cc)
				b.ReportAllocs()
				b.ResetTimer()
				for b.Loop() {
					if connectEachCall {
						c := dial()
						call(c)
						c.Close()
					} else {
						call(cc)
					}
				}
			})
		}
	}
}
