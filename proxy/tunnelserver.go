package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	konnectivity "sigs.k8s.io/apiserver-network-proxy/konnectivity-client/proto/client"
)

// The dial-back protocol between a proxy-proxy's --tunnel-listen and our agent (agent/tunnel.go), a gRPC service
// of two bidirectional streams of konnectivity-client's Packet (reused: a small, stable message type already
// in our dependencies), written by hand because it is this small. The agent dials; the proxy never can.
//
//   - TunnelControl: the agent opens it (metadata agentID) and keeps it open; while it is, the agent is
//     connected. The proxy sends DIAL_REQ{random, address, "tcp"} on it for every connection it wants, and
//     DIAL_CLS{random} when it gave up waiting. The agent answers a dial it refuses or fails with
//     DIAL_RSP{random, error} on the control stream.
//   - TunnelData: for a dial that succeeded the agent opens a new stream (metadata agentID), whose first message
//     is DIAL_RSP{random}; then DATA packets carry the bytes both ways. One stream per tunnelled connection: HTTP/2
//     flow control per connection, no head-of-line blocking between them. Either side's end of the stream (the
//     agent's CloseSend, the proxy's return) ends the connection.
const (
	tunnelService        = "eppTunnel.Tunnel"
	tunnelControlMethod  = "/" + tunnelService + "/TunnelControl"
	tunnelDataMethod     = "/" + tunnelService + "/TunnelData"
	tunnelAgentIDKey     = "agentid" // gRPC metadata keys are lower case
	tunnelUpstreamScheme = "tunnel"
)

// TunnelServiceDesc is the service of --tunnel-listen, for the agent's client streams too.
var TunnelServiceDesc = grpc.ServiceDesc{
	ServiceName: tunnelService,
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{
		{StreamName: "TunnelControl", Handler: func(srv any, s grpc.ServerStream) error { return srv.(*tunnelServer).control(s) }, ServerStreams: true, ClientStreams: true},
		{StreamName: "TunnelData", Handler: func(srv any, s grpc.ServerStream) error { return srv.(*tunnelServer).data(s) }, ServerStreams: true, ClientStreams: true},
	},
}

// Method paths and metadata of the protocol, for the agent.
const (
	TunnelControlMethod = tunnelControlMethod
	TunnelDataMethod    = tunnelDataMethod
	TunnelAgentIDKey    = tunnelAgentIDKey
)

// splitTunnelUpstream splits tunnel://AGENT-ID/URL into the agent ID and the URL; ok is false for another scheme.
func splitTunnelUpstream(s string) (agent, inner string, ok bool) {
	rest, ok := strings.CutPrefix(s, tunnelUpstreamScheme+"://")
	if !ok {
		return "", "", false
	}
	agent, inner, _ = strings.Cut(rest, "/")
	return agent, inner, true
}

// parseUpstream parses an --upstream: a tunnel:// one is the URL it names through its agent.
func parseUpstream(s string) (*url.URL, error) {
	if _, inner, ok := splitTunnelUpstream(s); ok {
		s = inner
	}
	return url.Parse(s)
}

// validateTunnelUpstreams checks the tunnel:// upstreams and --tunnel-listen together.
func (t *TunnelConfig) validateListen(upstreams []string, add func(format string, args ...any)) {
	tunnelled := 0
	for _, s := range upstreams {
		agent, inner, ok := splitTunnelUpstream(s)
		if !ok {
			continue
		}
		tunnelled++
		if agent == "" {
			add("--upstream %q: want tunnel://AGENT-ID/http(s)://HOST:PORT", s)
		}
		if err := checkURL(inner); err != nil {
			add("--upstream %q: the URL behind the agent: %v", s, err)
		}
	}
	if tunnelled > 0 && tunnelled != len(upstreams) {
		add("--upstream: tunnel:// upstreams and directly dialled ones do not mix")
	}
	if t.TunnelListen == "" {
		if tunnelled > 0 {
			add("--upstream tunnel://… needs --tunnel-listen (where the agents connect)")
		}
		return
	}
	if tunnelled == 0 {
		add("--tunnel-listen needs upstreams named through an agent: --upstream tunnel://AGENT-ID/URL")
	}
	if t.UpstreamVia != "" {
		add("--tunnel-listen and --upstream-via exclude each other: give one")
	}
	if u, err := url.Parse(t.TunnelListen); err != nil || u.Scheme != "https" || u.Path != "" && u.Path != "/" {
		add("--tunnel-listen: want https://HOST:PORT")
	} else if _, _, err := net.SplitHostPort(u.Host); err != nil {
		add("--tunnel-listen: want https://HOST:PORT")
	}
	if t.TunnelTLS.CertFile == "" || t.TunnelTLS.CAFile == "" {
		add("--tunnel-listen needs --tunnel-cert-file, --tunnel-key-file (its certificate) and --tunnel-ca-file (verifying the agents' client certificates)")
	}
}

// tunnelServer is --tunnel-listen: agents connect to it and open, on its asking, the upstream connections the
// tunnel:// upstreams name. It is the dialer of those upstreams.
type tunnelServer struct {
	l      net.Listener
	srv    *grpc.Server
	log    *slog.Logger
	routes map[string]string // upstream host:port → agent ID, from the tunnel:// upstreams
	first  string            // the agent of the first upstream: discovered endpoints go through it
	gauge  func(delta float64)
	wg     sync.WaitGroup

	mu      sync.Mutex
	agents  map[string][]*tunnelAgent // by ID: the connected control streams, the latest last
	pending map[int64]*pendingDial
	nextID  atomic.Int64
}

// tunnelAgent is one connected control stream.
type tunnelAgent struct {
	id     string
	sendMu sync.Mutex
	stream grpc.ServerStream
	gone   chan struct{}
}

func (a *tunnelAgent) send(p *konnectivity.Packet) error {
	a.sendMu.Lock()
	defer a.sendMu.Unlock()
	return a.stream.SendMsg(p)
}

// pendingDial is a dial asked of an agent, until its data stream or its refusal comes.
type pendingDial struct {
	agent *tunnelAgent
	addr  string
	conn  chan net.Conn // the data stream's connection
	err   chan string   // the agent's refusal
}

// newTunnelServer listens on cfg.TunnelListen (mTLS) and serves agents; nil without --tunnel-listen.
func newTunnelServer(cfg *Config, log *slog.Logger, gauge func(float64)) (*tunnelServer, error) {
	if cfg.TunnelListen == "" {
		return nil, nil
	}
	t := &tunnelServer{log: log, routes: map[string]string{}, agents: map[string][]*tunnelAgent{},
		pending: map[int64]*pendingDial{}, gauge: gauge}
	if t.gauge == nil {
		t.gauge = func(float64) {}
	}
	for _, s := range cfg.Upstreams {
		agent, inner, ok := splitTunnelUpstream(s)
		if !ok {
			continue
		}
		u, err := url.Parse(inner)
		if err != nil {
			return nil, fmt.Errorf("upstream %q: %w", s, err)
		}
		if prev, dup := t.routes[u.Host]; dup && prev != agent {
			return nil, fmt.Errorf("upstream %s is named through two agents", u.Host)
		}
		t.routes[u.Host] = agent
		if t.first == "" {
			t.first = agent
		}
	}
	cert, err := tls.LoadX509KeyPair(cfg.TunnelTLS.CertFile, cfg.TunnelTLS.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("--tunnel-cert-file: %w", err)
	}
	ca, err := os.ReadFile(cfg.TunnelTLS.CAFile)
	if err != nil {
		return nil, fmt.Errorf("--tunnel-ca-file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		return nil, fmt.Errorf("--tunnel-ca-file: no certificate in %s", cfg.TunnelTLS.CAFile)
	}
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert,
		MinVersion: tls.VersionTLS12}
	u, _ := url.Parse(cfg.TunnelListen) // validated
	if t.l, err = net.Listen("tcp", u.Host); err != nil {
		return nil, fmt.Errorf("--tunnel-listen: %w", err)
	}
	t.srv = grpc.NewServer(grpc.Creds(credentials.NewTLS(tc)), grpc.WaitForHandlers(true), // close leaves none
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}))
	t.srv.RegisterService(&TunnelServiceDesc, t)
	t.wg.Go(func() { _ = t.srv.Serve(t.l) })
	log.Info("listening for tunnel agents", "url", cfg.TunnelListen, "addr", t.l.Addr().String())
	return t, nil
}

// addr is where agents connect.
func (t *tunnelServer) addr() string { return t.l.Addr().String() }

// close ends every agent's streams and connection.
func (t *tunnelServer) close() {
	t.srv.Stop()
	t.wg.Wait()
}

// agentFor is the connected agent that reaches addr: the agent its tunnel:// upstream names, or the first
// upstream's for an address found by discovery. nil when that agent is not connected.
func (t *tunnelServer) agentFor(addr string) (*tunnelAgent, string) {
	id, ok := t.routes[addr]
	if !ok {
		id = t.first
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if as := t.agents[id]; len(as) > 0 {
		return as[len(as)-1], id
	}
	return nil, id
}

// dial asks addr's agent for a connection and waits for its data stream, until ctx ends (--proxy-dial-timeout).
func (t *tunnelServer) dial(ctx context.Context, addr string) (net.Conn, error) {
	a, id := t.agentFor(addr)
	if a == nil {
		return nil, fmt.Errorf("agent %q is not connected", id)
	}
	random := t.nextID.Add(1)
	p := &pendingDial{agent: a, addr: addr, conn: make(chan net.Conn, 1), err: make(chan string, 1)}
	t.mu.Lock()
	t.pending[random] = p
	t.mu.Unlock()
	abandon := func() {
		t.mu.Lock()
		_, waiting := t.pending[random]
		delete(t.pending, random)
		t.mu.Unlock()
		if !waiting { // its data stream took it meanwhile and hands its connection over at once: close it
			c := <-p.conn
			_ = c.Close()
		}
	}
	req := &konnectivity.Packet{Type: konnectivity.PacketType_DIAL_REQ, Payload: &konnectivity.Packet_DialRequest{
		DialRequest: &konnectivity.DialRequest{Protocol: "tcp", Address: addr, Random: random}}}
	if err := a.send(req); err != nil {
		abandon()
		return nil, fmt.Errorf("agent %q: %w", id, err)
	}
	select {
	case c := <-p.conn:
		return c, nil
	case msg := <-p.err:
		abandon()
		return nil, fmt.Errorf("agent %q refused: %s", id, msg)
	case <-a.gone:
		abandon()
		return nil, fmt.Errorf("agent %q disconnected", id)
	case <-ctx.Done():
		abandon()
		_ = a.send(&konnectivity.Packet{Type: konnectivity.PacketType_DIAL_CLS, Payload: &konnectivity.Packet_CloseDial{
			CloseDial: &konnectivity.CloseDial{Random: random}}})
		return nil, ctx.Err()
	}
}

func agentID(s grpc.ServerStream) string {
	md, _ := metadata.FromIncomingContext(s.Context())
	if v := md.Get(tunnelAgentIDKey); len(v) == 1 {
		return v[0]
	}
	return ""
}

// control serves an agent's control stream: while it is open the agent is connected.
func (t *tunnelServer) control(s grpc.ServerStream) error {
	id := agentID(s)
	if id == "" {
		return status.Error(codes.InvalidArgument, "no agentID")
	}
	_ = s.SendHeader(metadata.MD{}) // the agent knows it is accepted; before any dial can send on the stream
	a := &tunnelAgent{id: id, stream: s, gone: make(chan struct{})}
	t.mu.Lock()
	t.agents[id] = append(t.agents[id], a)
	t.mu.Unlock()
	t.gauge(1)
	t.log.Info("tunnel agent connected", "agent", id)
	defer func() {
		t.mu.Lock()
		as := t.agents[id]
		for i, x := range as {
			if x == a {
				t.agents[id] = append(as[:i:i], as[i+1:]...)
				break
			}
		}
		if len(t.agents[id]) == 0 {
			delete(t.agents, id)
		}
		t.mu.Unlock()
		close(a.gone)
		t.gauge(-1)
		t.log.Info("tunnel agent disconnected", "agent", id)
	}()
	for {
		pkt := new(konnectivity.Packet)
		if err := s.RecvMsg(pkt); err != nil {
			return nil
		}
		if pkt.Type != konnectivity.PacketType_DIAL_RSP {
			continue
		}
		r := pkt.GetDialResponse()
		t.mu.Lock()
		p := t.pending[r.GetRandom()]
		t.mu.Unlock()
		if p != nil && p.agent == a {
			select {
			case p.err <- r.GetError():
			default:
			}
		}
	}
}

// data serves a data stream: it hands the connection to the dial waiting for it and lasts as long as it.
func (t *tunnelServer) data(s grpc.ServerStream) error {
	id := agentID(s)
	first := new(konnectivity.Packet)
	if err := s.RecvMsg(first); err != nil {
		return nil
	}
	random := first.GetDialResponse().GetRandom()
	t.mu.Lock()
	p := t.pending[random]
	if p != nil && p.agent.id == id {
		delete(t.pending, random)
	} else {
		p = nil
	}
	t.mu.Unlock()
	if p == nil { // given up on meanwhile, or not this agent's: the agent closes its destination
		return status.Error(codes.NotFound, "no such dial")
	}
	sc := &streamConn{s: s, done: make(chan struct{})}
	var open sync.WaitGroup
	p.conn <- pipeConn(sc, p.addr, &open) // buffered, and only this stream took p out of pending
	finished := make(chan struct{})
	go func() { open.Wait(); close(finished) }()
	select {
	case <-finished:
		return nil
	case <-sc.done: // the proxy closed it: the agent was sent CLOSE_REQ and ends its side
	}
	// Returning ends the stream; the copying goroutine may still be in RecvMsg, which grpc allows only until the
	// handler returns: wait for the agent's end of the stream, for a while.
	select {
	case <-finished:
	case <-time.After(closeGrace):
	}
	return nil
}

// streamConn is a data stream as a net.Conn for pipeConn: Read takes DATA packets, Write sends them. Close ends
// the handler (and so the stream); the rest of net.Conn is pipeConn's.
type streamConn struct {
	net.Conn // not used: pipeConn calls only Read, Write and Close
	s        grpc.ServerStream
	rest     []byte
	once     sync.Once
	done     chan struct{}
}

func (c *streamConn) Read(b []byte) (int, error) {
	for len(c.rest) == 0 {
		pkt := new(konnectivity.Packet)
		if err := c.s.RecvMsg(pkt); err != nil {
			if errors.Is(err, io.EOF) {
				return 0, io.EOF
			}
			return 0, err
		}
		c.rest = pkt.GetData().GetData()
	}
	n := copy(b, c.rest)
	c.rest = c.rest[n:]
	return n, nil
}

func (c *streamConn) Write(b []byte) (int, error) {
	select {
	case <-c.done:
		return 0, net.ErrClosed
	default:
	}
	if err := c.s.SendMsg(&konnectivity.Packet{Type: konnectivity.PacketType_DATA,
		Payload: &konnectivity.Packet_Data{Data: &konnectivity.Data{Data: b}}}); err != nil {
		return 0, err
	}
	return len(b), nil
}

// Close tells the agent (CLOSE_REQ: it closes the destination and ends its side of the stream) and the handler.
// It is called by the goroutine that writes, after its last Write.
func (c *streamConn) Close() error {
	c.once.Do(func() {
		_ = c.s.SendMsg(&konnectivity.Packet{Type: konnectivity.PacketType_CLOSE_REQ,
			Payload: &konnectivity.Packet_CloseRequest{CloseRequest: &konnectivity.CloseRequest{}}})
		close(c.done)
	})
	return nil
}

// TunnelListenAddr is the address --tunnel-listen is bound to (its port when :0 was asked); "" without one.
func (s *Server) TunnelListenAddr() string {
	if s.forwarder == nil || s.forwarder.tunnelServer == nil {
		return ""
	}
	return s.forwarder.tunnelServer.addr()
}
