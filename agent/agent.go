// Package agent is the far end of a dial-back tunnel: it connects out to konnectivity servers
// (AgentService.Connect, the stock server's agent protocol) or to proxy-proxies' --tunnel-listen (our own
// protocol: one gRPC stream per connection, proxy/tunnelserver.go) and opens, for the proxies on the servers' side, the
// upstream connections they cannot dial themselves — only to the destinations it is allowed.
package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-multierror"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	konnectivity "sigs.k8s.io/apiserver-network-proxy/konnectivity-client/proto/client"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// Defaults of Config.
const (
	DefaultMaxPendingDials = 64
	DefaultDialTimeout     = 5 * time.Second
	// minBackoff and maxBackoff bound the wait before a lost or refused server connection is tried again.
	minBackoff = 100 * time.Millisecond
	maxBackoff = 10 * time.Second
)

// SchemeKonnectivity is the scheme of a konnectivity server's agent port; SchemeProxyProxy of a proxy-proxy's
// --tunnel-listen (our own protocol, tunnel.go).
const (
	SchemeKonnectivity = "konnectivity"
	SchemeProxyProxy   = "https"
)

// Config is the agent's configuration. It owns its flags (AddFlags); Validate reports every problem at once.
type Config struct {
	// Servers are the tunnel servers, konnectivity://HOST:PORT or https://HOST:PORT (a proxy-proxy's --tunnel-listen) each; the agent keeps a connection to every one
	// (no server count to guess). Required.
	Servers []string
	// ID is the agent ID the servers know it by; empty means the host name.
	ID string
	// Identifiers are the agent identifiers (URL-encoded, as the stock agent's: host=m1&host=m2) a server's
	// destHost strategy routes by; empty means none.
	Identifiers string
	// Allow is the list of host:port destinations the agent dials, matched exactly against the requested
	// address before any name resolution; every other destination is refused. Required.
	Allow []string
	// CAFile verifies the servers' certificates (empty: the system roots); CertFile and KeyFile are the agent's
	// client certificate (empty: none).
	CAFile, CertFile, KeyFile string
	// MaxPendingDials bounds the dials under way at once, over all servers; more are refused at once. Zero means
	// DefaultMaxPendingDials.
	MaxPendingDials int
	// DialTimeout bounds a dial of a destination. Zero means DefaultDialTimeout.
	DialTimeout time.Duration
}

// AddFlags registers the agent's flags on fs.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	if c.MaxPendingDials == 0 {
		c.MaxPendingDials = DefaultMaxPendingDials
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	fs.Var(proxy.ListFlag(&c.Servers), "tunnel-server", "tunnel servers to connect to, comma-separated: konnectivity://HOST:PORT (a konnectivity server's agent port) or https://HOST:PORT (a proxy-proxy's --tunnel-listen); a connection is kept to each (required)")
	fs.StringVar(&c.ID, "agent-id", "", "the agent ID the servers know this agent by (default: the host name)")
	fs.StringVar(&c.Identifiers, "agent-identifiers", "", "agent identifiers, URL-encoded as the stock agent's (host=m1&host=m2), for a server's destHost strategy")
	fs.Var(proxy.ListFlag(&c.Allow), "allow", "host:port destinations this agent dials, comma-separated, matched exactly before any name resolution; every other one is refused (required)")
	fs.StringVar(&c.CAFile, "tunnel-ca-file", "", "verify the tunnel servers' certificates with this CA bundle (default: the system roots)")
	fs.StringVar(&c.CertFile, "tunnel-cert-file", "", "client certificate presented to the tunnel servers")
	fs.StringVar(&c.KeyFile, "tunnel-key-file", "", "key of --tunnel-cert-file")
	fs.IntVar(&c.MaxPendingDials, "max-pending-dials", c.MaxPendingDials, "dials under way at once, over all servers; more are refused at once")
	fs.DurationVar(&c.DialTimeout, "dial-timeout", c.DialTimeout, "how long a dial of a destination may take")
}

// Validate reports every problem of the configuration at once.
func (c *Config) Validate() error {
	var errs *multierror.Error
	add := func(format string, args ...any) { errs = multierror.Append(errs, fmt.Errorf(format, args...)) }
	if len(c.Servers) == 0 {
		add("--tunnel-server is required")
	}
	for _, s := range c.Servers {
		if _, err := serverAddr(s); err != nil {
			add("--tunnel-server %q: %v", s, err)
		}
	}
	if len(c.Allow) == 0 {
		add("--allow is required: the destinations this agent may dial")
	}
	for _, a := range c.Allow {
		if host, port, err := net.SplitHostPort(a); err != nil || host == "" || port == "" {
			add("--allow %q: want host:port", a)
		}
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		add("--tunnel-cert-file and --tunnel-key-file go together")
	}
	for name, path := range map[string]string{"--tunnel-ca-file": c.CAFile, "--tunnel-cert-file": c.CertFile,
		"--tunnel-key-file": c.KeyFile} {
		if path == "" {
			continue
		}
		if _, err := os.Stat(path); err != nil {
			add("%s: %v", name, errors.Unwrap(err))
		}
	}
	if c.MaxPendingDials < 0 {
		add("--max-pending-dials: must not be negative")
	}
	if c.DialTimeout < 0 {
		add("--dial-timeout: must not be negative")
	}
	if _, err := url.ParseQuery(c.Identifiers); err != nil {
		add("--agent-identifiers: %v", err)
	}
	if errs == nil {
		return nil
	}
	return errs
}

// serverAddr is the host:port of a konnectivity://HOST:PORT or https://HOST:PORT server URL.
func serverAddr(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil {
		return "", errors.Unwrap(err)
	}
	if u.Scheme != SchemeKonnectivity && u.Scheme != SchemeProxyProxy {
		return "", fmt.Errorf("scheme must be %s or %s", SchemeKonnectivity, SchemeProxyProxy)
	}
	if _, _, err := net.SplitHostPort(u.Host); err != nil || u.Path != "" && u.Path != "/" {
		return "", fmt.Errorf("want %s://HOST:PORT", u.Scheme)
	}
	return u.Host, nil
}

// Agent keeps a connection to every server and serves their dial requests.
type Agent struct {
	cfg     Config
	log     *slog.Logger
	tls     *tls.Config
	allow   map[string]bool
	pending chan struct{} // one token per dial under way (MaxPendingDials)
}

// New checks cfg and loads its certificates.
func New(cfg Config, log *slog.Logger) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if log == nil {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	if cfg.ID == "" {
		cfg.ID, _ = os.Hostname()
	}
	if cfg.MaxPendingDials == 0 {
		cfg.MaxPendingDials = DefaultMaxPendingDials
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	a := &Agent{cfg: cfg, log: log, allow: map[string]bool{}, pending: make(chan struct{}, cfg.MaxPendingDials),
		tls: &tls.Config{MinVersion: tls.VersionTLS12}}
	for _, d := range cfg.Allow {
		a.allow[d] = true
	}
	if cfg.CAFile != "" {
		b, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("tunnel CA: %w", err)
		}
		a.tls.RootCAs = x509.NewCertPool()
		if !a.tls.RootCAs.AppendCertsFromPEM(b) {
			return nil, fmt.Errorf("tunnel CA: no certificate in %s", cfg.CAFile)
		}
	}
	if cfg.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("tunnel certificate: %w", err)
		}
		a.tls.Certificates = []tls.Certificate{cert}
	}
	return a, nil
}

// Run serves every server until ctx ends, reconnecting with backoff; it returns when every connection and every
// dialled destination is closed.
func (a *Agent) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for _, s := range a.cfg.Servers {
		addr, _ := serverAddr(s) // validated
		session := a.session
		if strings.HasPrefix(s, SchemeProxyProxy+"://") {
			session = a.tunnelSession // tunnel.go
		}
		wg.Go(func() { a.keep(ctx, addr, session) })
	}
	wg.Wait()
}

// keep keeps a connection to one server: after a session ends it waits a backoff (reset by a session that got
// as far as the server's answer), doubled up to maxBackoff, with jitter.
func (a *Agent) keep(ctx context.Context, addr string, session func(context.Context, string) (bool, error)) {
	backoff := minBackoff
	for ctx.Err() == nil {
		connected, err := session(ctx, addr)
		if ctx.Err() != nil {
			return
		}
		if connected {
			backoff = minBackoff
		}
		a.log.Warn("tunnel server connection ended", "server", addr, "err", err, "retry_in", backoff)
		t := time.NewTimer(backoff/2 + rand.N(backoff/2+1))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// client is a connection to the server at addr, mTLS, with keepalives: both protocols' sessions use it.
func (a *Agent) client(addr string) (*grpc.ClientConn, error) {
	return grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(a.tls)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}))
}

// connectDesc is AgentService.Connect: the konnectivity server's agent RPC, a bidirectional stream of the client
// proto's Packets. Its proto (in the server module, whose Kubernetes dependencies stay out of ours) declares no
// package, hence the path.
var connectDesc = &grpc.StreamDesc{StreamName: "Connect", ServerStreams: true, ClientStreams: true}

const connectMethod = "/AgentService/Connect"

// session is one connection to a server: it serves dial requests until the stream ends, then closes every
// destination connection it opened.
func (a *Agent) session(ctx context.Context, addr string) (connected bool, err error) {
	cc, err := a.client(addr)
	if err != nil {
		return false, err
	}
	defer cc.Close()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sctx = metadata.AppendToOutgoingContext(sctx, "agentID", a.cfg.ID, "agentIdentifiers", a.cfg.Identifiers)
	stream, err := cc.NewStream(sctx, connectDesc, connectMethod)
	if err != nil {
		return false, err
	}
	if _, err := stream.Header(); err != nil { // the server's serverID/serverCount: it accepted us
		return false, err
	}
	a.log.Info("connected to tunnel server", "server", addr)
	s := &session{a: a, stream: stream, ctx: sctx, conns: map[int64]*destConn{}, dials: map[int64]context.CancelFunc{}}
	defer s.closeAll()
	for {
		pkt := new(konnectivity.Packet)
		if err := stream.RecvMsg(pkt); err != nil {
			return true, err
		}
		s.handle(pkt)
	}
}

// session is the state of one server connection.
type session struct {
	a      *Agent
	stream grpc.ClientStream
	ctx    context.Context
	sendMu sync.Mutex // SendMsg is not safe for concurrent use
	mu     sync.Mutex
	nextID int64
	conns  map[int64]*destConn          // connect ID → destination connection
	dials  map[int64]context.CancelFunc // dial ID (the request's random) → its cancel, while under way
	wg     sync.WaitGroup
	closed bool
}

func (s *session) send(p *konnectivity.Packet) error {
	s.sendMu.Lock()
	defer s.sendMu.Unlock()
	return s.stream.SendMsg(p)
}

func (s *session) handle(pkt *konnectivity.Packet) {
	switch pkt.Type {
	case konnectivity.PacketType_DIAL_REQ:
		s.dial(pkt.GetDialRequest())
	case konnectivity.PacketType_DIAL_CLS: // the frontend gave up on a dial under way
		s.mu.Lock()
		cancel := s.dials[pkt.GetCloseDial().GetRandom()]
		s.mu.Unlock()
		if cancel != nil {
			cancel()
		}
	case konnectivity.PacketType_DATA:
		d := pkt.GetData()
		s.mu.Lock()
		c := s.conns[d.GetConnectID()]
		s.mu.Unlock()
		if c == nil {
			_ = s.send(closeRsp(d.GetConnectID(), "unknown connection"))
			return
		}
		c.write(d.GetData())
	case konnectivity.PacketType_CLOSE_REQ:
		id := pkt.GetCloseRequest().GetConnectID()
		s.mu.Lock()
		c := s.conns[id]
		s.mu.Unlock()
		if c == nil {
			_ = s.send(closeRsp(id, "unknown connection"))
			return
		}
		c.close()
	}
}

func closeRsp(id int64, msg string) *konnectivity.Packet {
	return &konnectivity.Packet{Type: konnectivity.PacketType_CLOSE_RSP,
		Payload: &konnectivity.Packet_CloseResponse{CloseResponse: &konnectivity.CloseResponse{ConnectID: id, Error: msg}}}
}

func dialRsp(random, id int64, msg string) *konnectivity.Packet {
	return &konnectivity.Packet{Type: konnectivity.PacketType_DIAL_RSP,
		Payload: &konnectivity.Packet_DialResponse{DialResponse: &konnectivity.DialResponse{Random: random, ConnectID: id, Error: msg}}}
}

// dial serves a DIAL_REQ: refused unless the address is allowed (as given, before any resolution) and a pending
// slot is free; otherwise dialled in the background, answered with DIAL_RSP, then relayed.
func (s *session) dial(req *konnectivity.DialRequest) {
	random, addr := req.GetRandom(), req.GetAddress()
	if req.GetProtocol() != "tcp" || !s.a.allow[addr] {
		s.a.log.Warn("dial refused: destination not allowed", "address", addr, "protocol", req.GetProtocol())
		_ = s.send(dialRsp(random, 0, "destination not allowed"))
		return
	}
	select {
	case s.a.pending <- struct{}{}:
	default:
		s.a.log.Warn("dial refused: too many pending dials", "address", addr, "max", cap(s.a.pending))
		_ = s.send(dialRsp(random, 0, "too many pending dials"))
		return
	}
	ctx, cancel := context.WithTimeout(s.ctx, s.a.cfg.DialTimeout)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		cancel()
		<-s.a.pending
		return
	}
	s.dials[random] = cancel
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", addr)
		<-s.a.pending
		cancel()
		var c *destConn
		s.mu.Lock()
		delete(s.dials, random)
		if err == nil && !s.closed { // registered under the lock closeAll takes: it closes c, or c is not made
			s.nextID++
			c = &destConn{s: s, id: s.nextID, conn: conn, in: make(chan []byte, 64), done: make(chan struct{})}
			s.conns[c.id] = c
		}
		s.mu.Unlock()
		if err != nil {
			s.a.log.Warn("dial failed", "address", addr, "err", err)
			_ = s.send(dialRsp(random, 0, "dial failed"))
			return
		}
		if c == nil { // the session ended meanwhile
			_ = conn.Close()
			return
		}
		id := c.id
		if err := s.send(dialRsp(random, id, "")); err != nil {
			c.close()
			return
		}
		s.wg.Add(2)
		go c.pumpOut()
		go c.pumpIn()
	}()
}

// closeAll ends the session's connections and waits for their goroutines.
func (s *session) closeAll() {
	s.mu.Lock()
	s.closed = true
	for _, cancel := range s.dials {
		cancel()
	}
	conns := make([]*destConn, 0, len(s.conns))
	for _, c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.close()
	}
	s.wg.Wait()
}

// destConn is a dialled destination. Data from the server goes through in (a writer goroutine, so that a slow
// destination does not stop the session's reads until its buffer is full); data from the destination goes out as
// DATA packets; a close from either side sends one CLOSE_RSP.
type destConn struct {
	s    *session
	id   int64
	conn net.Conn
	in   chan []byte
	once sync.Once
	done chan struct{}
}

func (c *destConn) write(b []byte) {
	select {
	case c.in <- b:
	case <-c.done:
	}
}

// pumpIn writes what the server sent to the destination.
func (c *destConn) pumpIn() {
	defer c.s.wg.Done()
	for {
		select {
		case b := <-c.in:
			if _, err := c.conn.Write(b); err != nil {
				c.close()
				return
			}
		case <-c.done:
			return
		}
	}
}

// pumpOut sends what the destination sends, until it closes.
func (c *destConn) pumpOut() {
	defer c.s.wg.Done()
	buf := make([]byte, 32<<10)
	for {
		n, err := c.conn.Read(buf)
		if n > 0 {
			data := &konnectivity.Packet{Type: konnectivity.PacketType_DATA, Payload: &konnectivity.Packet_Data{
				Data: &konnectivity.Data{ConnectID: c.id, Data: buf[:n]}}} // SendMsg encodes before it returns
			if c.s.send(data) != nil {
				c.close()
				return
			}
		}
		if err != nil {
			c.close()
			return
		}
	}
}

// close closes the destination connection and tells the server, once.
func (c *destConn) close() {
	c.once.Do(func() {
		close(c.done)
		_ = c.conn.Close()
		c.s.mu.Lock()
		delete(c.s.conns, c.id)
		closed := c.s.closed
		c.s.mu.Unlock()
		if !closed {
			_ = c.s.send(closeRsp(c.id, ""))
		}
	})
}
