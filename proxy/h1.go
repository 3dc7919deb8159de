package proxy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// h1Transport sends HTTP/1.1 requests to plain-HTTP upstreams on pooled connections, from the calling goroutine:
// it writes the request and reads the response itself. http.Transport hands every request to a write goroutine
// and every response from a read goroutine of its connection; on a proxy that does little else, those handoffs
// are a large part of the cost of a request (bench/: the profile of v2 GET at c=64).
//
// What it does not do, it leaves to http.Transport (see usable): TLS, HTTP/2, protocol upgrades.
//
// Measured against http.Transport alone once the v3 core was on grpc-go (2026-11-28, 2 cores, loaded machine,
// load average 7–18; epp-bench -only "v2 GET c=64", 3 alternating pairs of runs, 2 rounds of 2 s each): proxy
// CPU per request 67/75/68 µs with it, 89/83/79 µs without; 1.08/0.90/1.33× the stock v2 proxy with it,
// 0.88/0.97/1.01× without; a chain of two 151/167/157 µs against 190/192/184 µs. About 14 µs (16 %) per
// request: it stays.
type h1Transport struct {
	dial         func(ctx context.Context, network, addr string) (net.Conn, error)
	writeTimeout time.Duration // per request write; 0 means none
	readTimeout  time.Duration // per read of an answer; 0 means none
	maxIdle      int           // idle connections kept per upstream
	// maxHeader bounds the bytes read from the upstream until an answer's header has ended; 0 means no bound.
	// http.ReadResponse reads a status line or header line to its end whatever its length, so an upstream
	// that never ends one would grow the proxy without bound.
	maxHeader int64

	mu   sync.Mutex
	idle map[string][]*h1Conn // by host:port, most recently used last
}

type h1Conn struct {
	net.Conn
	br          *bufio.Reader
	bw          *bufio.Writer
	key         string
	readTimeout time.Duration
	aborted     atomic.Bool // the request was cancelled: no read may wait again
	// headerLeft is what may still be read before the answer's header ends; negative while no header is read.
	headerLeft int64
}

// errUpstreamHeaderTooLarge: the upstream's status line and headers passed --max-upstream-header-bytes.
var errUpstreamHeaderTooLarge = errors.New("upstream response header too large")

// Read bounds each read by the read timeout, if any. abort and Read order their deadline and flag so that a
// cancellation is never overwritten by the next read's deadline.
func (pc *h1Conn) Read(b []byte) (int, error) {
	if pc.readTimeout > 0 {
		_ = pc.Conn.SetReadDeadline(time.Now().Add(pc.readTimeout))
		if pc.aborted.Load() {
			return 0, os.ErrDeadlineExceeded
		}
	}
	if pc.headerLeft < 0 {
		return pc.Conn.Read(b)
	}
	if pc.headerLeft == 0 {
		return 0, errUpstreamHeaderTooLarge
	}
	if int64(len(b)) > pc.headerLeft {
		b = b[:pc.headerLeft]
	}
	n, err := pc.Conn.Read(b)
	pc.headerLeft -= int64(n)
	return n, err
}

func (pc *h1Conn) abort() {
	pc.aborted.Store(true)
	_ = pc.SetDeadline(time.Unix(1, 0))
}

// usable reports whether req can go through h1Transport.
func (t *h1Transport) usable(req *http.Request) bool {
	return req.URL.Scheme == "http" && req.Header.Get("Upgrade") == ""
}

// errStaleConn marks a failure on a reused connection before any byte of the answer: the upstream closed it
// while it was idle.
var errStaleConn = errors.New("reused upstream connection closed")

func (t *h1Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.roundTrip(req, true)
	if errors.Is(err, errStaleConn) && replayable(req) {
		// Nothing of the answer came back, and the request reads without changing anything: sending it again
		// on a new connection is safe. A write is never sent twice.
		return t.roundTrip(req, false)
	}
	return resp, err
}

// replayable: no body to lose and a method that changes nothing, as http.Transport decides it.
func replayable(req *http.Request) bool {
	if req.Body != nil && req.Body != http.NoBody {
		return false
	}
	switch req.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return false
}

func (t *h1Transport) roundTrip(req *http.Request, mayReuse bool) (*http.Response, error) {
	ctx := req.Context()
	var pc *h1Conn
	if mayReuse {
		// A read that meets a connection the upstream closed is sent again on a new one (RoundTrip), so only
		// a write pays for checking the connection first.
		pc = t.getIdle(req.URL.Host, !replayable(req))
	}
	reused := pc != nil
	if pc == nil {
		c, err := t.dial(ctx, "tcp", req.URL.Host)
		if err != nil {
			return nil, err
		}
		pc = &h1Conn{Conn: c, bw: bufio.NewWriterSize(c, 4<<10), key: req.URL.Host, readTimeout: t.readTimeout,
			headerLeft: -1}
		pc.br = bufio.NewReaderSize(pc, 4<<10)
	}
	// A cancelled request (the client went away, a watch ended) interrupts whatever this connection is
	// blocked on; the connection is then closed, not reused.
	stop := context.AfterFunc(ctx, pc.abort)
	fail := func(err error) (*http.Response, error) {
		stop()
		_ = pc.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, err
	}
	// A request with a body may block on a slow upstream; headers alone fit in the socket buffer.
	bounded := t.writeTimeout > 0 && req.Body != nil && req.Body != http.NoBody
	if bounded {
		_ = pc.SetWriteDeadline(time.Now().Add(t.writeTimeout))
	}
	err := req.Write(pc.bw)
	if err == nil {
		err = pc.bw.Flush()
	}
	if err != nil {
		if reused && pc.br.Buffered() == 0 {
			err = errors.Join(errStaleConn, err)
		}
		return fail(err)
	}
	if bounded {
		_ = pc.SetWriteDeadline(time.Time{})
	}
	for {
		if t.maxHeader > 0 {
			// What the reader holds already belongs to this answer and counts against the bound too.
			pc.headerLeft = max(t.maxHeader-int64(pc.br.Buffered()), 0)
		}
		resp, err := http.ReadResponse(pc.br, req)
		pc.headerLeft = -1
		if err != nil {
			if reused && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)) {
				err = errors.Join(errStaleConn, err)
			}
			return fail(err)
		}
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			continue // 100 Continue and friends: the real answer follows
		}
		keep := !resp.Close && !req.Close && resp.StatusCode != http.StatusSwitchingProtocols
		resp.Body = &h1Body{ReadCloser: resp.Body, pc: pc, t: t, keep: keep, stop: stop}
		return resp, nil
	}
}

// h1Body returns the connection to the pool when the answer has been read to its end, and closes it otherwise.
type h1Body struct {
	io.ReadCloser
	pc   *h1Conn
	t    *h1Transport
	keep bool
	stop func() bool
	done bool
}

func (b *h1Body) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.release(true)
	} else if err != nil {
		b.release(false)
	}
	return n, err
}

func (b *h1Body) Close() error {
	err := b.ReadCloser.Close() // drains nothing for a body not read to its end: release closes the connection
	b.release(false)
	return err
}

func (b *h1Body) release(atEOF bool) {
	if b.done {
		return
	}
	b.done = true
	if b.stop() && atEOF && b.keep && b.pc.br.Buffered() == 0 {
		if b.pc.readTimeout > 0 {
			_ = b.pc.SetReadDeadline(time.Time{}) // idle: alive() must not find the last read's deadline passed
		}
		b.t.putIdle(b.pc)
		return
	}
	_ = b.pc.Close()
}

// getIdle takes the most recently used idle connection to key; with check, only one that is still open.
func (t *h1Transport) getIdle(key string, check bool) *h1Conn {
	for {
		t.mu.Lock()
		conns := t.idle[key]
		if len(conns) == 0 {
			t.mu.Unlock()
			return nil
		}
		pc := conns[len(conns)-1]
		t.idle[key] = conns[:len(conns)-1]
		t.mu.Unlock()
		if !check || alive(pc.Conn) {
			return pc
		}
		_ = pc.Close()
	}
}

func (t *h1Transport) putIdle(pc *h1Conn) {
	t.mu.Lock()
	if t.idle == nil {
		t.idle = map[string][]*h1Conn{}
	}
	if len(t.idle[pc.key]) < t.maxIdle {
		t.idle[pc.key] = append(t.idle[pc.key], pc)
		pc = nil
	}
	t.mu.Unlock()
	if pc != nil {
		_ = pc.Close()
	}
}

// closeIdleTo closes the pooled connections to one upstream host:port.
func (t *h1Transport) closeIdleTo(key string) {
	t.mu.Lock()
	conns := t.idle[key]
	delete(t.idle, key)
	t.mu.Unlock()
	for _, pc := range conns {
		_ = pc.Close()
	}
}

// CloseIdleConnections closes every pooled connection.
func (t *h1Transport) CloseIdleConnections() {
	t.mu.Lock()
	idle := t.idle
	t.idle = nil
	t.mu.Unlock()
	for _, conns := range idle {
		for _, pc := range conns {
			_ = pc.Close()
		}
	}
}
