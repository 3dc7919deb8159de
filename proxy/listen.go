package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

// The connection split: one client listener, three servers. etcd serves gRPC on TLS listeners through
// grpc.Server.ServeHTTP (net/http's HTTP/2 server under grpc-go's, slow) and sends every h2c connection to gRPC.
// Here TLS is terminated once, by the split, and each connection goes where its protocol is spoken natively:
//
//	TLS, ALPN "http/1.1" or none       → HTTP1(), the *tls.Conn itself (http.Server sets r.TLS)
//	TLS "h2", or plain with the preface → first HEADERS' content-type application/grpc[+;…] → GRPC(), else HTTP2()
//	plain, anything else                → HTTP1()
//
// The sniff is written here rather than taken from github.com/soheilhy/cmux (which etcd uses), because its
// HTTP2MatchHeaderFieldPrefixSendSettings (the matcher the split needs: grpc-go clients send no request before the
// server's SETTINGS) fails the HTTP/2 half of the split: the client acknowledges the empty SETTINGS frame it sends,
// and x/net's http2.Server closes a connection that acknowledges more SETTINGS than it sent ("ack_mystery"); nghttp2
// (curl) hangs up when the server's SETTINGS_NO_RFC7540_PRIORITIES changes from that empty frame's 0 to 1. Its
// http2.Framer allocates a frame's announced length, up to 16 MiB, before reading it; it cannot tell "not gRPC"
// from "read failed"; its prefix match takes application/grpc-web for gRPC; and cmux.Close neither closes the
// connections being sniffed nor waits for them, while closing one of its listeners closes the root listener.

const (
	// sniffMaxBytes bounds what one connection may send before its first request's header block ends: gRPC and
	// HTTP/2 clients send a few hundred bytes.
	sniffMaxBytes = 64 << 10
	// sniffMaxFrame is HTTP/2's initial SETTINGS_MAX_FRAME_SIZE: a client may not send more in one frame before
	// the server raises it, and the split's SETTINGS frame does not.
	sniffMaxFrame = 16 << 10
	// frameHeaderLen is the length of an HTTP/2 frame header.
	frameHeaderLen = 9
	// grpcContentType is the content-type of gRPC requests (see isGRPCContentType).
	grpcContentType = "application/grpc"
)

// connSplit takes one client listener and hands each accepted connection to the server that speaks its protocol.
// Connections are handshaken (TLS) and sniffed in their own goroutines, so a slow client never blocks Accept;
// both steps together must end within the handshake timeout, except that an HTTP/2 client, once it has sent the
// preface and its SETTINGS, may wait as long as it likes before its first request (a gRPC channel connected
// ahead of use does: dropping it would only make it reconnect, misrouting it would fail its calls).
type connSplit struct {
	l                net.Listener
	tlsConfig        *tls.Config
	handshakeTimeout time.Duration
	log              *slog.Logger

	grpc, http2, http1 *chanListener

	done      chan struct{} // closed by Close
	closeOnce sync.Once
	wg        sync.WaitGroup // per-connection goroutines, waited for by Serve

	mu       sync.Mutex
	closed   bool
	inFlight map[net.Conn]struct{} // raw connections being handshaken, sniffed or delivered
	h2Conns  map[net.Conn]struct{} // connections handed to HTTP2(): no server can close them (see Close)
}

// newConnSplit returns a split of l. tlsConfig nil: l is a plain listener; otherwise the split terminates TLS with
// it, offering h2 and http/1.1 (NextProtos is set on a clone; a configuration from GetConfigForClient must offer
// them itself, as loadListener's does). handshakeTimeout bounds the TLS handshake and the sniff (see connSplit);
// it must be positive. log gets failed handshakes and sniffs at debug level; nil logs nothing.
func newConnSplit(l net.Listener, tlsConfig *tls.Config, handshakeTimeout time.Duration, log *slog.Logger) *connSplit {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if tlsConfig != nil {
		tlsConfig = tlsConfig.Clone()
		tlsConfig.NextProtos = []string{http2.NextProtoTLS, "http/1.1"}
	}
	s := &connSplit{
		l:                l,
		tlsConfig:        tlsConfig,
		handshakeTimeout: handshakeTimeout,
		log:              log,
		done:             make(chan struct{}),
		inFlight:         map[net.Conn]struct{}{},
		h2Conns:          map[net.Conn]struct{}{},
	}
	s.grpc, s.http2, s.http1 = s.newChanListener(), s.newChanListener(), s.newChanListener()
	return s
}

// GRPC is the listener of HTTP/2 connections whose first request has a gRPC content-type. Serve it with a
// grpc.Server built with grpcServerCreds.
func (s *connSplit) GRPC() net.Listener { return s.grpc }

// HTTP2 is the listener of the other HTTP/2 connections (h2 by ALPN, or h2c with prior knowledge). On TLS its
// connections implement ConnectionState() tls.ConnectionState. Serve it with serveHTTP2.
func (s *connSplit) HTTP2() net.Listener { return s.http2 }

// HTTP1 is the listener of HTTP/1.x connections; on TLS they are the *tls.Conn themselves, so an http.Server
// serving it sets r.TLS.
func (s *connSplit) HTTP1() net.Listener { return s.http1 }

// Serve accepts connections from l until l is closed (then it closes the split) or Close is called, and returns
// once every connection in flight has been delivered or closed: nil after Close, the accept error otherwise.
func (s *connSplit) Serve() error {
	defer s.wg.Wait()
	var backoff time.Duration
	for {
		raw, err := s.l.Accept()
		if err != nil {
			select {
			case <-s.done:
				return nil
			default:
			}
			// Out of file descriptors or a connection reset before Accept: transient, as net/http treats them.
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ECONNABORTED) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed; retrying", "error", err, "delay", backoff)
				select {
				case <-time.After(backoff):
					continue
				case <-s.done:
					return nil
				}
			}
			s.Close()
			return fmt.Errorf("split: accept: %w", err)
		}
		backoff = 0
		if !s.track(raw, s.inFlight) {
			raw.Close()
			continue
		}
		s.wg.Add(1)
		go s.handle(raw)
	}
}

// Close closes l, the three listeners, every connection in flight and every connection handed to HTTP2() (their
// server, serveHTTP2, has no Close of its own: call this after srv.Shutdown). Connections handed to GRPC() and
// HTTP1() are their servers' to close. Close does not wait for Serve to return.
func (s *connSplit) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.done)
		err = s.l.Close()
		s.mu.Lock()
		s.closed = true
		conns := make([]net.Conn, 0, len(s.inFlight)+len(s.h2Conns))
		for c := range s.inFlight {
			conns = append(conns, c)
		}
		for c := range s.h2Conns {
			conns = append(conns, c)
		}
		s.mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (s *connSplit) track(c net.Conn, set map[net.Conn]struct{}) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	set[c] = struct{}{}
	return true
}

func (s *connSplit) untrack(c net.Conn, set map[net.Conn]struct{}) {
	s.mu.Lock()
	delete(set, c)
	s.mu.Unlock()
}

// handle handshakes and sniffs one accepted connection and delivers it to its listener.
func (s *connSplit) handle(raw net.Conn) {
	defer s.wg.Done()
	defer s.untrack(raw, s.inFlight)
	drop := func(msg string, err error) {
		s.log.Debug(msg, "remote", raw.RemoteAddr().String(), "error", err)
		raw.Close()
	}
	if err := raw.SetDeadline(time.Now().Add(s.handshakeTimeout)); err != nil {
		drop("split: set deadline", err)
		return
	}
	var (
		conn net.Conn = raw
		tc   *tls.Conn
	)
	if s.tlsConfig != nil {
		tc = tls.Server(raw, s.tlsConfig)
		if err := tc.Handshake(); err != nil {
			drop("split: TLS handshake failed", err)
			return
		}
		if tc.ConnectionState().NegotiatedProtocol != http2.NextProtoTLS {
			if err := raw.SetDeadline(time.Time{}); err != nil {
				drop("split: clear deadline", err)
				return
			}
			s.deliver(s.http1, tc)
			return
		}
		conn = tc
	}

	sn := &sniffer{conn: conn, raw: raw, r: io.LimitedReader{R: conn, N: sniffMaxBytes}}
	h2, err := sn.preface()
	if err != nil {
		drop("split: no request", err)
		return
	}
	if !h2 {
		if tc != nil {
			drop("split: h2 negotiated but no HTTP/2 preface", nil)
			return
		}
		if err := raw.SetDeadline(time.Time{}); err != nil {
			drop("split: clear deadline", err)
			return
		}
		s.deliver(s.http1, sn.replay())
		return
	}
	isGRPC, err := sn.firstHeaders()
	if err != nil {
		drop("split: HTTP/2 connection ended before its first request", err)
		return
	}
	if err := raw.SetDeadline(time.Time{}); err != nil {
		drop("split: clear deadline", err)
		return
	}
	var out net.Conn = sn.replay()
	if !isGRPC {
		// The client acknowledges the SETTINGS the sniff sent; the HTTP/2 server must not see that ACK.
		out = &dropSettingsAck{Conn: out, br: bufio.NewReaderSize(out, 4<<10), skip: len(http2.ClientPreface)}
		tracked := &untrackOnClose{Conn: out}
		tracked.untrack = func() { s.untrack(tracked, s.h2Conns) }
		if !s.track(tracked, s.h2Conns) {
			out.Close()
			return
		}
		out = tracked
	}
	if tc != nil {
		out = &tlsStateConn{Conn: out, tc: tc}
	}
	if isGRPC {
		s.deliver(s.grpc, out)
	} else {
		s.deliver(s.http2, out)
	}
}

// deliver hands c to l's Accept, or closes it if l or the split is closed first.
func (s *connSplit) deliver(l *chanListener, c net.Conn) {
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	case <-s.done:
		c.Close()
	}
}

// sniffer reads the start of one connection, keeping what it read for the server that gets the connection.
type sniffer struct {
	conn net.Conn // the connection (the *tls.Conn on TLS)
	raw  net.Conn // the accepted connection, for deadlines
	r    io.LimitedReader
	buf  []byte // everything read so far
}

func (sn *sniffer) Read(p []byte) (int, error) {
	n, err := sn.r.Read(p)
	sn.buf = append(sn.buf, p[:n]...)
	if err == io.EOF && sn.r.N <= 0 {
		err = fmt.Errorf("split: more than %d bytes before the first request", sniffMaxBytes)
	}
	return n, err
}

// preface reads until the bytes read either are HTTP/2's client preface or differ from it. The comparison stops at
// the first byte that differs, so a short HTTP/1.0 request is not held waiting for 24 bytes.
func (sn *sniffer) preface() (bool, error) {
	var b [len(http2.ClientPreface)]byte
	for n := 0; n < len(b); {
		m, err := sn.Read(b[n:])
		n += m
		if string(b[:n]) != http2.ClientPreface[:n] {
			return false, nil
		}
		if err != nil {
			return false, err
		}
	}
	return true, nil
}

// firstHeaders reads HTTP/2 frames up to the end of the first header block and reports whether its content-type
// starts with application/grpc. It answers the client's first SETTINGS with a SETTINGS frame, as
// cmux.HTTP2MatchHeaderFieldPrefixSendSettings does: grpc-go clients send no request before they have it. From
// then on the client has proved it speaks HTTP/2 and the handshake deadline no longer applies.
func (sn *sniffer) firstHeaders() (bool, error) {
	fr := http2.NewFramer(sn.conn, sn)
	fr.SetMaxReadFrameSize(sniffMaxFrame)
	isGRPC := false
	dec := hpack.NewDecoder(4<<10, func(f hpack.HeaderField) {
		if f.Name == "content-type" && isGRPCContentType(f.Value) {
			isGRPC = true
		}
	})
	dec.SetMaxStringLength(sniffMaxFrame)
	sentSettings := false
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return false, err
		}
		var block []byte
		var end bool
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if f.IsAck() || sentSettings {
				continue
			}
			// SETTINGS_NO_RFC7540_PRIORITIES may not change once sent (RFC 9218; nghttp2, so curl, hangs up), and
			// x/net's http2.Server sends 1: say so from the start. grpc-go's server does not send it, which is no change.
			if err := fr.WriteSettings(http2.Setting{ID: http2.SettingNoRFC7540Priorities, Val: 1}); err != nil {
				return false, err
			}
			sentSettings = true
			if err := sn.raw.SetDeadline(time.Time{}); err != nil {
				return false, err
			}
			continue
		case *http2.HeadersFrame:
			block, end = f.HeaderBlockFragment(), f.HeadersEnded()
		case *http2.ContinuationFrame:
			block, end = f.HeaderBlockFragment(), f.HeadersEnded()
		default:
			continue
		}
		if _, err := dec.Write(block); err != nil {
			return false, err
		}
		if end {
			return isGRPC, dec.Close()
		}
	}
}

// isGRPCContentType applies grpc-go's rule: application/grpc, alone or followed by "+" or ";" (a codec or
// parameters). cmux's prefix match also takes application/grpc-web, which grpc.Server refuses.
func isGRPCContentType(v string) bool {
	rest, ok := strings.CutPrefix(v, grpcContentType)
	return ok && (rest == "" || rest[0] == '+' || rest[0] == ';')
}

// replay returns the connection with the sniffed bytes put back in front.
func (sn *sniffer) replay() net.Conn { return &replayConn{Conn: sn.conn, pending: sn.buf} }

// replayConn returns the bytes a sniff read before reading the connection again. Like any net.Conn it is read by
// one goroutine at a time.
type replayConn struct {
	net.Conn
	pending []byte
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		if len(c.pending) == 0 {
			c.pending = nil
		}
		return n, nil
	}
	return c.Conn.Read(p)
}

// dropSettingsAck removes the first SETTINGS ACK from a client's HTTP/2 stream: it acknowledges the SETTINGS the
// sniff sent, and x/net's http2.Server closes a connection that acknowledges more SETTINGS than it sent. Frames
// pass through whole until then; after it, reads go straight to the connection.
type dropSettingsAck struct {
	net.Conn
	br   *bufio.Reader // nil once the ACK is dropped and the buffer drained
	skip int           // bytes of the preface or of the current frame still to pass through
	done bool
}

func (c *dropSettingsAck) Read(p []byte) (int, error) {
	for !c.done && c.skip == 0 {
		h, err := c.br.Peek(frameHeaderLen)
		if err != nil {
			return 0, err
		}
		length := int(h[0])<<16 | int(h[1])<<8 | int(h[2])
		if http2.FrameType(h[3]) == http2.FrameSettings && http2.Flags(h[4]).Has(http2.FlagSettingsAck) && length == 0 {
			if _, err := c.br.Discard(frameHeaderLen); err != nil {
				return 0, err
			}
			c.done = true
			break
		}
		c.skip = frameHeaderLen + length
	}
	if c.done {
		if c.br == nil {
			return c.Conn.Read(p)
		}
		if c.br.Buffered() == 0 {
			c.br = nil
			return c.Conn.Read(p)
		}
		return c.br.Read(p)
	}
	if len(p) > c.skip {
		p = p[:c.skip]
	}
	n, err := c.br.Read(p)
	c.skip -= n
	return n, err
}

// tlsStateConn gives a sniffed TLS connection back its ConnectionState, which http2.Server (r.TLS) and
// grpcServerCreds (the client certificate) look for.
type tlsStateConn struct {
	net.Conn
	tc *tls.Conn
}

func (c *tlsStateConn) ConnectionState() tls.ConnectionState { return c.tc.ConnectionState() }

// untrackOnClose tells the split when a connection handed to HTTP2() is closed by its server.
type untrackOnClose struct {
	net.Conn
	once    sync.Once
	untrack func()
}

func (c *untrackOnClose) Close() error {
	c.once.Do(c.untrack)
	return c.Conn.Close()
}

// chanListener is one of the split's three listeners: Accept takes the connections the split delivers. Closing it
// stops its deliveries only (a server's Stop or Shutdown closes the listener it serves, and must not stop the
// other servers of the split).
type chanListener struct {
	split     *connSplit
	conns     chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func (s *connSplit) newChanListener() *chanListener {
	return &chanListener{split: s, conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
	case <-l.split.done:
	}
	return nil, fmt.Errorf("split: accept: %w", net.ErrClosed)
}

func (l *chanListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

func (l *chanListener) Addr() net.Addr { return l.split.l.Addr() }

// splitCreds are the grpc.Server's transport credentials on a split: the split has terminated TLS already.
type splitCreds struct{}

// grpcServerCreds returns the transport credentials for the grpc.Server serving the GRPC() of splits, plain and
// TLS alike. ServerHandshake does no handshake: a connection of a TLS listener carries its TLS state
// (tlsStateConn), which it hands grpc-go (peer.FromContext(ctx).AuthInfo is a credentials.TLSInfo with the
// client's certificate); another one gets insecure's AuthInfo.
func grpcServerCreds() credentials.TransportCredentials { return splitCreds{} }

func (splitCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	cs, ok := conn.(interface{ ConnectionState() tls.ConnectionState })
	if !ok {
		return insecure.NewCredentials().ServerHandshake(conn)
	}
	return conn, credentials.TLSInfo{
		State:          cs.ConnectionState(),
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity},
	}, nil
}

func (splitCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("split: server-side credentials used by a client")
}

func (splitCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}

func (c splitCreds) Clone() credentials.TransportCredentials { return c }

// OverrideServerName is required by the interface and means nothing on a server.
func (splitCreds) OverrideServerName(string) error { return nil }

// serveHTTP2 serves the connections of a split's HTTP2() with x/net's http2.Server, configured from srv: its
// Handler, ErrorLog, timeouts and HTTP2 settings, its BaseContext and ConnContext (applied here per connection:
// ServeConn does not call them), and at most 1<<20 concurrent streams per connection (etcd's limit; Go's default
// 250 is not). srv.Shutdown sends GOAWAY to these connections and closes l; serveHTTP2 then returns once they have
// ended (srv.Shutdown does not wait for them: wait for serveHTTP2, and close the split to end them at once). It
// returns http.ErrServerClosed when l is closed, or srv.BaseContext's or ConnContext's failure.
func serveHTTP2(l net.Listener, srv *http.Server) error {
	idle := srv.IdleTimeout
	if idle == 0 {
		idle = srv.ReadTimeout // as http2.ConfigureServer does
	}
	// x/net's http2.Server is deprecated in favour of http.Server, which cannot serve a connection whose first
	// bytes were read already (the sniff) nor a TLS one that is not a *tls.Conn; ServeConn still works on Go 1.27,
	// where x/net wraps net/http's HTTP/2.
	//lint:ignore SA1019 see above
	h2 := &http2.Server{MaxConcurrentStreams: 1 << 20, IdleTimeout: idle}
	// ConfigureServer registers the GOAWAY on a server's Shutdown, but also writes its TLSConfig and TLSNextProto:
	// a race with srv.Serve already running. Give it a server of its own and shut that one down with srv.
	hook := &http.Server{}
	//lint:ignore SA1019 see above
	if err := http2.ConfigureServer(hook, h2); err != nil {
		return fmt.Errorf("split: configure HTTP/2: %w", err)
	}
	srv.RegisterOnShutdown(func() {
		_ = hook.Shutdown(context.Background()) // no listeners or connections: runs the GOAWAY hook and returns
		l.Close()
	})
	base := context.Background()
	if srv.BaseContext != nil {
		if base = srv.BaseContext(l); base == nil {
			return errors.New("split: srv.BaseContext returned a nil context")
		}
	}

	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return http.ErrServerClosed
			}
			return err
		}
		ctx := base
		if srv.ConnContext != nil {
			if ctx = srv.ConnContext(ctx, c); ctx == nil {
				c.Close()
				return errors.New("split: srv.ConnContext returned a nil context")
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close() // ServeConn leaves it open when the preface is bad
			//lint:ignore SA1019 see above
			h2.ServeConn(c, &http2.ServeConnOpts{Context: ctx, BaseConfig: srv, Handler: srv.Handler})
		}()
	}
}

// Interface guards.
var (
	_ net.Listener                     = (*chanListener)(nil)
	_ credentials.TransportCredentials = splitCreds{}
)
