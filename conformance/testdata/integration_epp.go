// The integration framework's proxy hook for etcd-proxy-proxy: the conformance runner copies this file into
// tests/integration of a copy of go.etcd.io/etcd/tests/v3 and builds with -tags cluster_proxy,epp. etcd's own
// cluster_proxy.go wraps each client in process with grpc-proxy adapters; this one starts an etcd-proxy-proxy
// process ($EPP_PROXY_BIN) in front of each member endpoint a client of the framework is given and makes the
// client dial it. Members listen on unix sockets (and their bridges always do), which the proxy does not take as
// upstream: a TCP relay in this process carries its upstream connections to the socket. A proxy lives while a
// client uses it: the last client's Close (or its connection's) stops it and its relay, before the suite's goroutine-leak check.

//go:build cluster_proxy && epp

package integration

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	"go.uber.org/zap"
	"google.golang.org/grpc/connectivity"
)

const ThroughProxy = true

func toGRPC(c *clientv3.Client) grpcAPI {
	return grpcAPI{
		pb.NewClusterClient(c.ActiveConnection()),
		pb.NewKVClient(c.ActiveConnection()),
		pb.NewLeaseClient(c.ActiveConnection()),
		pb.NewWatchClient(c.ActiveConnection()),
		pb.NewMaintenanceClient(c.ActiveConnection()),
		pb.NewAuthClient(c.ActiveConnection()),
		v3lockpb.NewLockClient(c.ActiveConnection()),
		v3electionpb.NewElectionClient(c.ActiveConnection()),
	}
}

func init() {
	newTestClient = func(cfg clientv3.Config) (*clientv3.Client, error) { return newClientV3(cfg, cfg.Logger) }
}

func newClientV3(cfg clientv3.Config, lg *zap.Logger) (*clientv3.Client, error) {
	cfg.Logger = lg
	endpoints := make([]string, len(cfg.Endpoints))
	var held []string
	release := func() {
		for _, ep := range held {
			eppRelease(ep)
		}
	}
	for i, ep := range cfg.Endpoints {
		if !eppProxied(ep) {
			endpoints[i] = ep
			continue
		}
		u, err := eppAcquire(ep, cfg.TLS)
		if err != nil {
			release()
			return nil, err
		}
		held = append(held, ep)
		endpoints[i] = u
	}
	cfg.Endpoints = endpoints
	c, err := clientv3.New(cfg)
	if err != nil {
		release()
		return nil, err
	}
	closer := &eppCloser{Watcher: c.Watcher, release: release}
	c.Watcher = closer
	// A test may close the client's connection alone and drop the client (TestWatchErrConnClosed): the proxies
	// go when the connection does.
	conn := c.ActiveConnection()
	go func() {
		for s := conn.GetState(); s != connectivity.Shutdown; s = conn.GetState() {
			conn.WaitForStateChange(context.Background(), s)
		}
		closer.once.Do(closer.release)
	}()
	return c, nil
}

// eppProxied reports whether a proxy can stand in front of the endpoint: a member's URL, not an address
// without a scheme (a test's deliberately unreachable endpoint, say).
func eppProxied(ep string) bool {
	scheme, addr, ok := strings.Cut(ep, "://")
	_, _, err := net.SplitHostPort(addr)
	return ok && err == nil && (scheme == "unix" || scheme == "unixs" || scheme == "http" || scheme == "https")
}

// eppCloser releases the client's proxies when the client closes (Client.Close closes its Watcher).
type eppCloser struct {
	clientv3.Watcher
	release func()
	once    sync.Once
}

func (c *eppCloser) Close() error {
	err := c.Watcher.Close()
	c.once.Do(c.release)
	return err
}

// eppProxy is an etcd-proxy-proxy in front of one member endpoint, shared by the clients of that endpoint.
type eppProxy struct {
	refs  int
	url   string
	cmd   *exec.Cmd
	relay *eppRelay // nil for a TCP member
}

var (
	eppMu      sync.Mutex
	eppProxies = map[string]*eppProxy{}
)

// eppAcquire returns the URL of the proxy in front of the member endpoint ep, starting it if none runs.
func eppAcquire(ep string, clientTLS *tls.Config) (string, error) {
	eppMu.Lock()
	defer eppMu.Unlock()
	p := eppProxies[ep]
	if p == nil {
		var err error
		if p, err = eppStart(ep, clientTLS); err != nil {
			return "", fmt.Errorf("etcd-proxy-proxy in front of %s: %w", ep, err)
		}
		eppProxies[ep] = p
	}
	p.refs++
	// clientv3 speaks TLS to a unix:// endpoint when it has a TLS configuration, and never to an http:// one: a
	// TLS client of a plain member keeps failing as it does directly (TestTLSGRPCRejectSecureClient).
	if strings.HasPrefix(ep, "unix://") && clientTLS != nil {
		return strings.Replace(p.url, "http://", "https://", 1), nil
	}
	return p.url, nil
}

func eppRelease(ep string) {
	eppMu.Lock()
	defer eppMu.Unlock()
	p := eppProxies[ep]
	if p == nil {
		return
	}
	if p.refs--; p.refs > 0 {
		return
	}
	delete(eppProxies, ep)
	p.stop()
}

func eppStart(ep string, clientTLS *tls.Config) (*eppProxy, error) {
	bin := os.Getenv("EPP_PROXY_BIN")
	if bin == "" {
		return nil, errors.New("EPP_PROXY_BIN: the etcd-proxy-proxy binary is not set")
	}
	scheme, addr, _ := strings.Cut(ep, "://")
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	p := &eppProxy{}
	upstream := addr
	switch scheme {
	case "unix", "unixs":
		// The socket's path is relative to the current folder, as the framework's own bridges dial it (an
		// absolute one may pass the 108 bytes of a socket address).
		if p.relay, err = newEppRelay(addr); err != nil {
			return nil, err
		}
		_, port, _ := net.SplitHostPort(p.relay.l.Addr().String())
		upstream = net.JoinHostPort(host, port) // the host the member's certificate names
	case "http", "https":
	default:
		return nil, fmt.Errorf("endpoint %q: unknown scheme", ep)
	}
	secure := scheme == "unixs" || scheme == "https"
	port, err := eppFreePort()
	if err != nil {
		p.stop()
		return nil, err
	}
	listen := net.JoinHostPort(host, strconv.Itoa(port))
	args := []string{"--name", "epp-" + strconv.Itoa(port), "--shutdown-timeout", "1s", "--upstream-health-interval", "1s"}
	if secure {
		// The member's TLS, mirrored: the listener shows the member's certificate and wants a client
		// certificate if the member does; toward the member the client's certificate of the same fixtures.
		info := eppTLSInfoOf(clientTLS)
		args = append(args,
			"--upstream", "https://"+upstream, "--listen-client-urls", "https://"+listen,
			"--advertise-client-urls", "https://"+listen,
			"--cert-file", info.CertFile, "--key-file", info.KeyFile, "--trusted-ca-file", info.TrustedCAFile,
			"--upstream-ca-file", info.TrustedCAFile)
		if info.ClientCertAuth {
			args = append(args, "--client-cert-auth")
		}
		cert, key := info.CertFile, info.KeyFile
		if info.ClientCertFile != "" {
			cert, key = info.ClientCertFile, info.ClientKeyFile
		}
		args = append(args, "--upstream-cert-file", cert, "--upstream-key-file", key)
	} else {
		args = append(args, "--upstream", "http://"+upstream, "--listen-client-urls", "http://"+listen,
			"--advertise-client-urls", "http://"+listen)
	}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = os.Stderr, os.Stderr // files: no copying goroutines
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		p.cmd = nil
		p.stop()
		return nil, err
	}
	if secure {
		p.url = "https://" + listen
	} else {
		p.url = "http://" + listen
	}
	// Up when its listener takes connections.
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", listen, time.Second)
		if err == nil {
			_ = c.Close()
			return p, nil
		}
		if time.Now().After(deadline) {
			p.stop()
			return nil, fmt.Errorf("not listening on %s after 10 s: %w", listen, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// eppRoot is the tests module's folder, found from the package's folder at start (integration.BeforeTest moves
// into a temporary folder).
var eppRoot, eppRootErr = eppFindRoot()

func eppFindRoot() (string, error) {
	dir, err := os.Getwd()
	for err == nil {
		if _, e := os.Stat(filepath.Join(dir, "fixtures", "ca.crt")); e == nil {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("no fixtures folder above the test's folder")
		}
		dir = parent
	}
	return "", err
}

// eppTLSInfoOf finds the TLS fixtures of the tests module whose certificate the client presents (fixtures/ and
// integration/fixtures-expired/; the packages' own TLSInfo variables name them relative to their folders); the
// member serves the same fixtures. fixtures/server.crt when the client presents none.
func eppTLSInfoOf(clientTLS *tls.Config) transport.TLSInfo {
	root, err := eppRoot, eppRootErr
	info := func(dir, cert string) transport.TLSInfo {
		key := strings.TrimSuffix(cert, ".crt") + ".key.insecure"
		i := transport.TLSInfo{CertFile: filepath.Join(dir, cert), KeyFile: filepath.Join(dir, key),
			TrustedCAFile: filepath.Join(dir, "ca.crt"), ClientCertAuth: true}
		if cert == "client-clientusage.crt" { // the member serves the server-only half of the pair
			i.ClientCertFile, i.ClientKeyFile = i.CertFile, i.KeyFile
			i.CertFile, i.KeyFile = filepath.Join(dir, "server-serverusage.crt"), filepath.Join(dir, "server-serverusage.key.insecure")
		}
		return i
	}
	fallback := info(filepath.Join(root, "fixtures"), "server.crt")
	if err != nil || clientTLS == nil || len(clientTLS.Certificates) == 0 || len(clientTLS.Certificates[0].Certificate) == 0 {
		return fallback
	}
	presented := clientTLS.Certificates[0].Certificate[0]
	for _, dir := range []string{filepath.Join(root, "fixtures"), filepath.Join(root, "integration", "fixtures-expired")} {
		certs, _ := filepath.Glob(filepath.Join(dir, "*.crt"))
		for _, f := range certs {
			pair, err := tls.LoadX509KeyPair(f, strings.TrimSuffix(f, ".crt")+".key.insecure")
			if err == nil && bytes.Equal(pair.Certificate[0], presented) {
				return info(dir, filepath.Base(f))
			}
		}
	}
	return fallback
}

func eppFreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (p *eppProxy) stop() {
	if p.cmd != nil {
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	}
	if p.relay != nil {
		p.relay.close()
	}
}

// eppRelay carries TCP connections to a unix socket, byte for byte (the framework's bridge does the same for
// its unix sockets).
type eppRelay struct {
	l     net.Listener
	to    string
	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func newEppRelay(socket string) (*eppRelay, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &eppRelay{l: l, to: socket, conns: map[net.Conn]struct{}{}}
	r.wg.Add(1)
	go r.accept()
	return r, nil
}

func (r *eppRelay) accept() {
	defer r.wg.Done()
	for {
		in, err := r.l.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("unix", r.to)
		if err != nil {
			_ = in.Close()
			continue
		}
		if !r.track(in, out) {
			return
		}
		r.wg.Add(2)
		go r.pipe(in, out)
		go r.pipe(out, in)
	}
}

func (r *eppRelay) track(conns ...net.Conn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.conns == nil { // closed
		for _, c := range conns {
			_ = c.Close()
		}
		return false
	}
	for _, c := range conns {
		r.conns[c] = struct{}{}
	}
	return true
}

func (r *eppRelay) pipe(dst, src net.Conn) {
	defer r.wg.Done()
	_, _ = io.Copy(dst, src)
	// Either side ending ends both: etcd's clients and servers do not half-close.
	_ = dst.Close()
	_ = src.Close()
}

func (r *eppRelay) close() {
	_ = r.l.Close()
	r.mu.Lock()
	for c := range r.conns {
		_ = c.Close()
	}
	r.conns = nil
	r.mu.Unlock()
	r.wg.Wait()
}
