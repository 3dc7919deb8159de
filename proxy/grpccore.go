package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/url"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	_ "google.golang.org/grpc/encoding/gzip" // clients may compress their messages, as etcd accepts
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
)

// grpcCore serves v3 gRPC on grpc-go's own transport, both sides: a grpc.Server whose unknown-service handler
// takes every method, and one multiplexed grpc.ClientConn per upstream endpoint and upstream identity. Messages
// pass as the bytes they came as (the frame codec), and are decoded only for the methods a message rule claims.
type grpcCore struct {
	f     *Forwarder
	srv   *grpc.Server
	rules []rules.MessageRule
	// chains: per method etcd serves, the rules that claim it; methods nobody serves are looked up per call.
	chains map[string]*methodChain
	conns  sync.Map // connKey → *grpc.ClientConn
	dials  sync.Map // *grpc.ClientConn → *dialState
	mu     sync.Mutex
	closed bool

	dialOpts []grpc.DialOption
	// observe, if set, is told of every call as it starts and returns what is told how it ended (metrics and
	// the access log).
	observe func(c *serverCall) func(code codes.Code)
	m       *metrics  // nil: no metrics
	hub     *watchHub // the watch fan-out; nil: off (--watch-fan-out=false)
}

// Server-side keep-alive enforcement as etcd's (--grpc-keepalive-min-time): grpc-go's default (5 minutes) would
// send GOAWAY to clients that ping every 30 s (etcd's clients) or less.
const grpcMinPingInterval = 5 * time.Second

func newGRPCCore(f *Forwarder, cfg *Config, rs []rules.Rule, ops forwarderOps) *grpcCore {
	c := &grpcCore{f: f, chains: map[string]*methodChain{}, m: ops.m, observe: ops.m.observeGRPC(ops.access)}
	for _, r := range rs {
		if mr, ok := r.(rules.MessageRule); ok {
			c.rules = append(c.rules, mr)
		}
	}
	if !cfg.NoWatchFanOut {
		c.hub = newWatchHub(c, orDefault(cfg.WatchHistory, DefaultWatchHistory),
			max(cfg.failureWait(), 2*f.dialTimeout), newWatchMetrics(ops.m))
	}
	for _, m := range rules.Methods() {
		c.chains[m.Name] = c.chainOf(m)
	}
	c.srv = grpc.NewServer(
		grpc.UnknownServiceHandler(c.handle),
		grpc.ForceServerCodecV2(frameCodec{}),
		grpc.Creds(grpcServerCreds()), // TLS is terminated by the split (listen.go)
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: grpcMinPingInterval, PermitWithoutStream: true}),
		// As etcd: requests up to --max-request-bytes and gRPC's overhead are read, and RecvMsg answers those
		// over the limit as etcd does; grpc-go refuses a larger one from its length prefix, before reading it.
		grpc.MaxRecvMsgSize(int(min(f.maxRequestBytes+grpcOverheadBytes, math.MaxInt32))),
		grpc.MaxSendMsgSize(math.MaxInt32),
		grpc.MaxConcurrentStreams(math.MaxUint32),
		grpc.StatsHandler(connTagger{}),
		grpc.WaitForHandlers(true),
		// Calls run on goroutines that stay: a new goroutine per call grows its stack on every call (7 % of the
		// proxy's CPU under v3 Range load). Long calls (watches) occupy a worker; past the workers, grpc-go
		// starts a goroutine as it would without them.
		grpc.NumStreamWorkers(uint32(4*runtime.GOMAXPROCS(0))),
	)
	pingAfter, pingTimeout := cfg.upstreamKeepAlive()
	opts := []grpc.DialOption{
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32), grpc.MaxCallSendMsgSize(math.MaxInt32),
			grpc.ForceCodecV2(frameCodec{})),
		// An endpoint that failed is tried again within --proxy-failure-wait, not grpc-go's two minutes.
		grpc.WithConnectParams(grpc.ConnectParams{MinConnectTimeout: f.dialTimeout, Backoff: backoff.Config{
			BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: max(cfg.failureWait(), time.Second)}}),
		grpc.WithStatsHandler(attemptStats{}),
		grpc.WithIdleTimeout(5 * time.Minute), // a connection without calls is closed (and made again when needed)
	}
	if pingAfter > 0 {
		// grpc-go pings no more often than every 10 s; etcd's members accept one every 5 s. Only while calls are
		// open: a member counts pings on an idle connection as abuse.
		opts = append(opts, grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: pingAfter, Timeout: pingTimeout}))
	}
	c.dialOpts = opts
	return c
}

// grpcOverheadBytes is what etcd's gRPC server reads beyond --max-request-bytes (v3rpc grpcOverheadBytes): a
// request is checked against the limit once it is read, and the slack lets that answer be etcd's.
const grpcOverheadBytes = 512 << 10

// methodChain is what runs for one method: the rules that claim it, and whether its messages are decoded.
type methodChain struct {
	m      *rules.Method
	rules  []rules.MessageRule
	decode bool
	// opts are the call options toward the upstream: the bound of a method's answers when they are small
	// (rules.Method.SmallAnswers); grpc-go checks it against each message's length prefix before reading it.
	opts []grpc.CallOption
	// maxRequest bounds each request message (--max-request-bytes); zero: only grpc-go's server limit.
	maxRequest int
}

func (c *grpcCore) chainOf(m *rules.Method) *methodChain {
	mc := &methodChain{m: m, decode: c.hub != nil && m.Name == watchMethod} // the fan-out reads watch requests
	if !m.ReadOnly {
		// etcd checks the size of the requests it proposes to raft (the writes), and reads only at its gRPC
		// limit: a read's message is answered by grpc-go's limit alone here too.
		mc.maxRequest = int(c.f.maxRequestBytes)
	}
	if m.SmallAnswers {
		mc.opts = []grpc.CallOption{grpc.MaxCallRecvMsgSize(rules.SmallAnswerBytes)}
	}
	for _, r := range c.rules {
		switch r.Claim(m) {
		case rules.ClaimMessages:
			mc.decode = m.NewRequest != nil
			mc.rules = append(mc.rules, r)
		case rules.ClaimCall:
			mc.rules = append(mc.rules, r)
		}
	}
	return mc
}

// chainFor returns the chain of a method; one etcd does not serve is relayed as a bidirectional stream.
func (c *grpcCore) chainFor(name string) *methodChain {
	if mc, ok := c.chains[name]; ok {
		return mc
	}
	return c.chainOf(&rules.Method{Name: name, ClientStream: true, ServerStream: true})
}

// serverCall is a call from a client: the base Stream of the message rules.
type serverCall struct {
	ctx    context.Context // the call's, ended by a shutdown too for long calls
	client context.Context // the client's: ended when it went away
	ss     grpc.ServerStream
	chain  *methodChain
	md     metadata.MD
	id     *upstreamIdentity
	header bool // the upstream's response header has been passed on
}

func (s *serverCall) Context() context.Context { return s.ctx }
func (s *serverCall) Method() *rules.Method    { return s.chain.m }
func (s *serverCall) Header() metadata.MD      { return s.md }

func (s *serverCall) RecvMsg() (any, error) {
	var m any = new(frame)
	if s.chain.decode {
		m = s.chain.m.NewRequest()
	}
	if err := s.ss.RecvMsg(m); err != nil {
		if status.Code(err) == codes.ResourceExhausted { // over the server's limit: grpc-go's own answer
			return nil, &requestTooLargeError{status.Convert(err)}
		}
		return nil, err
	}
	if limit := s.chain.maxRequest; limit > 0 && msgSize(m) > limit {
		freeMsg(m)
		return nil, &requestTooLargeError{status.Convert(rpctypes.ErrGRPCRequestTooLarge)}
	}
	return m, nil
}

// msgSize is the encoded size of a request: a frame's length, or a decoded message's.
func msgSize(m any) int {
	switch m := m.(type) {
	case *frame:
		return m.data.Len()
	case rules.Message:
		return m.Size()
	}
	return 0
}

// requestTooLargeError: a request message was over --max-request-bytes. A write's is answered as etcd answers
// it ("etcdserver: request is too large", which clientv3 turns into rpctypes.ErrRequestTooLarge); one past the
// gRPC server's limit with grpc-go's ResourceExhausted, as by etcd's.
type requestTooLargeError struct{ st *status.Status }

func (e *requestTooLargeError) Error() string              { return e.st.Message() }
func (e *requestTooLargeError) GRPCStatus() *status.Status { return e.st }
func (e *requestTooLargeError) Is(target error) bool       { return target == errRequestTooLarge }

func (s *serverCall) SendMsg(m any) error {
	err := s.ss.SendMsg(m)
	freeMsg(m)
	return err
}

func (s *serverCall) newResponse() any {
	if s.chain.decode {
		return s.chain.m.NewResponse()
	}
	return new(frame)
}

// handle serves every call: the rules that claim the method, then the upstream.
func (c *grpcCore) handle(_ any, ss grpc.ServerStream) error {
	name, _ := grpc.MethodFromServerStream(ss)
	call := &serverCall{ctx: ss.Context(), client: ss.Context(), ss: ss, chain: c.chainFor(name)}
	var observed func(codes.Code)
	if c.observe != nil {
		observed = c.observe(call)
	}
	if call.chain.m.Long { // a graceful shutdown ends it at once (drain.go)
		ctx, cancel := context.WithCancelCause(call.ctx)
		stop := context.AfterFunc(c.f.drain, func() { cancel(errShuttingDown) })
		defer func() { stop(); cancel(nil) }()
		call.ctx = ctx
	}
	in, _ := metadata.FromIncomingContext(call.ctx)
	call.md = upstreamMetadata(in)
	var err error
	if call.id, err = c.identify(call.ctx, in); err == nil {
		err = c.serve(call, call, 0)
	}
	st := c.finish(call, err)
	if observed != nil {
		observed(st.Code())
	}
	return st.Err()
}

// serve runs the rules of the call from the i-th on, and at their end the upstream.
func (c *grpcCore) serve(call *serverCall, s rules.Stream, i int) error {
	if i == len(call.chain.rules) {
		return c.forward(call, s)
	}
	r := call.chain.rules[i]
	err := r.Serve(s, func(s rules.Stream) error { return c.serve(call, s, i+1) })
	if _, ok := status.FromError(err); !ok && err != nil && !errors.Is(err, io.EOF) {
		return &ruleError{Rule: r.Name(), Err: err}
	}
	return err
}

// forward sends the call to the upstream endpoints in the policy's order (endpoints.go), moving on to the next
// when nothing of it can have reached the previous one, or when it changes nothing (Method.Retryable). A call
// that may have been delivered is never sent again.
func (c *grpcCore) forward(call *serverCall, s rules.Stream) error {
	m := call.chain.m
	if c.hub != nil && m.Name == watchMethod {
		return c.hub.serve(call, s)
	}
	ctx := call.ctx
	eps := c.f.endpoints.order(affinityOf(ctx))
	if len(eps) == 0 {
		return &noEndpointError{errors.New("no upstream endpoint known")}
	}
	unary := !m.ClientStream && !m.ServerStream
	var req any
	if unary {
		var err error
		if req, err = s.RecvMsg(); err != nil {
			return err
		}
		defer freeMsg(req)
	}
	var (
		last    error
		retried bool // every endpoint was unreachable once, and their connections were dialled again
	)
	for i := 0; i < len(eps); i++ {
		e := eps[i]
		cc, err := c.conn(e, call.id)
		if err != nil {
			return err
		}
		at := &attempt{}
		actx := metadata.NewOutgoingContext(context.WithValue(ctx, attemptKey{}, at), call.md)
		if unary {
			err = c.unary(call, s, cc, actx, req)
		} else {
			err = c.stream(call, s, e, cc, actx, at)
		}
		switch {
		case err == nil || ctx.Err() != nil || errors.Is(err, errLocal):
			if err == nil && i > 0 {
				if aff := affinityOf(ctx); aff != nil {
					aff.ep.Store(e) // the connection follows the endpoint that answered
				}
			}
			return err
		case errors.As(err, new(*answerTooLargeError)):
			c.f.log.Warn("upstream answer over the method's bound: refused", "method", m.Name, "err", errors.Unwrap(err))
			return err
		case at.ended.Load(): // the upstream's own status: the rules before see it scrubbed
			return scrubbed(err)
		case !at.sent.Load():
			c.f.endpoints.failed(e)
			last = err
			if i == len(eps)-1 && !retried && c.redial(ctx, eps, call.id) {
				// Nothing was sent anywhere, and an endpoint is reachable again (a member back from a restart
				// while its connection waited out grpc-go's reconnect backoff): once more from the first.
				retried, i = true, -1
			}
			continue
		case unary && m.Retryable:
			last = err
			continue
		case !unary:
			c.f.lostStream(call.ctx, e, err, "method", m.Name) // streams.go
			return status.Error(codes.Unavailable, msgUpstreamLost)
		}
		// Sent, and not to be sent again: the client decides.
		c.f.endpoints.failed(e)
		c.f.log.Warn("request failed", "method", m.Name, "err", err)
		return status.Error(codes.Unavailable, msgNoResponse)
	}
	return &noEndpointError{last}
}

// redial makes the connections to eps whose last dial found nothing listening dial again at once, and reports
// whether one of them is ready within --proxy-dial-timeout. A call that found no endpoint reachable comes here
// once: grpc-go fails calls at once on a connection waiting out its reconnect backoff, so a member back from a
// restart would be refused for up to --proxy-failure-wait (what the robustness suite's kill scenarios found).
// Connections that reached a server that then failed them (an HTTP/1-only upstream, a frozen one) are not dialled
// again here: that would only make the call wait.
func (c *grpcCore) redial(ctx context.Context, eps []*endpoint, id *upstreamIdentity) bool {
	ctx, cancel := context.WithTimeout(ctx, c.f.dialTimeout)
	defer cancel()
	results := make(chan bool, len(eps))
	n := 0
	for _, e := range eps {
		cc, err := c.conn(e, id)
		if err != nil {
			continue
		}
		v, ok := c.dials.Load(cc)
		if !ok {
			continue
		}
		ds := v.(*dialState)
		if _, refused := ds.next(); !refused {
			continue
		}
		n++
		go func() { results <- ds.redial(ctx, cc) }()
	}
	for range n {
		if <-results {
			return true
		}
	}
	return false
}

// redialPace spaces the dials of a connection whose member is still down while calls wait for it.
const redialPace = 50 * time.Millisecond

// dialState is what the dials of one upstream connection found: whether the last one failed (nothing listened
// there), a channel closed when the next one ends, and the redial under way, which every call that needs the
// connection shares (so calls to a cluster that is down do not multiply its dials).
type dialState struct {
	mu      sync.Mutex
	refused bool
	ended   chan struct{}
	run     *redialRun
}

// redialRun is one redial of a connection: done is closed once ready is known.
type redialRun struct {
	done  chan struct{}
	ready bool
}

func newDialState() *dialState { return &dialState{ended: make(chan struct{})} }

func (d *dialState) done(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.refused = err != nil
	close(d.ended)
	d.ended = make(chan struct{})
}

// next returns the channel closed at the end of the next dial, and whether the last one failed.
func (d *dialState) next() (<-chan struct{}, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ended, d.refused
}

// redial dials cc again at once, and again every redialPace while its dials are refused, until one connects
// (then it waits for the connection to be ready) or ctx ends. A redial already under way is waited for instead.
func (d *dialState) redial(ctx context.Context, cc *grpc.ClientConn) bool {
	d.mu.Lock()
	if r := d.run; r != nil {
		d.mu.Unlock()
		select {
		case <-r.done:
			return r.ready
		case <-ctx.Done():
			return false
		}
	}
	r := &redialRun{done: make(chan struct{})}
	d.run = r
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		d.run = nil
		d.mu.Unlock()
		close(r.done)
	}()
	for {
		next, refused := d.next()
		if !refused {
			r.ready = waitReady(ctx, cc)
			return r.ready
		}
		cc.ResetConnectBackoff()
		cc.Connect()
		select {
		case <-next:
		case <-ctx.Done():
			return false
		}
		if _, refused := d.next(); !refused {
			r.ready = waitReady(ctx, cc)
			return r.ready
		}
		select {
		case <-time.After(redialPace):
		case <-ctx.Done():
			return false
		}
	}
}

// waitReady waits until cc is ready (true) or ctx ends.
func waitReady(ctx context.Context, cc *grpc.ClientConn) bool {
	for st := cc.GetState(); st != connectivity.Ready; st = cc.GetState() {
		if st == connectivity.Shutdown || !cc.WaitForStateChange(ctx, st) {
			return false
		}
	}
	return true
}

// msgNotGRPC answers a call whose upstreams do not speak gRPC.
const msgNotGRPC = "etcd-proxy-proxy: the upstream does not serve gRPC (HTTP/2); etcd's v2 proxy relays only the v2 API"

// msgNoResponse answers a call that reached an upstream which then gave no answer; it is not sent again.
const msgNoResponse = "etcd-proxy-proxy: unable to get a response from the upstream"

// checkGRPC asks an upstream connection whether it is alive: any answer will do (grpc.health.v1 Check, which
// etcd answers without raft, and any other server with a status).
func checkGRPC(ctx context.Context, cc *grpc.ClientConn) error {
	at, resp := &attempt{}, new(frame)
	defer freeMsg(resp)
	err := cc.Invoke(context.WithValue(ctx, attemptKey{}, at), "/grpc.health.v1.Health/Check", &frame{data: mem.BufferSlice{}}, resp)
	if err == nil || at.ended.Load() {
		return nil
	}
	return err
}

// errLocal marks an error of the client's side of a stream (a message over the limit, a rule's error): the
// upstream has nothing to do with it.
var errLocal = errors.New("local")

type localError struct{ err error }

func (e *localError) Error() string   { return e.err.Error() }
func (e *localError) Unwrap() []error { return []error{e.err, errLocal} }
func (e *localError) GRPCStatus() *status.Status {
	if st, ok := status.FromError(e.err); ok {
		return st
	}
	return status.New(codes.Unknown, e.err.Error())
}

func (c *grpcCore) unary(call *serverCall, s rules.Stream, cc *grpc.ClientConn, ctx context.Context, req any) error {
	resp := call.newResponse()
	var hdr, tr metadata.MD
	err := cc.Invoke(ctx, call.chain.m.Name, req, resp, append(call.chain.opts[:len(call.chain.opts):len(call.chain.opts)],
		grpc.Header(&hdr), grpc.Trailer(&tr))...)
	at, _ := ctx.Value(attemptKey{}).(*attempt)
	if err != nil && !at.ended.Load() {
		freeMsg(resp)
		return answerTooLarge(call, err)
	}
	c.passHeader(call, hdr)
	call.ss.SetTrailer(c.scrubMetadata(tr))
	if err != nil {
		freeMsg(resp)
		return err
	}
	if err := s.SendMsg(resp); err != nil {
		return &localError{err}
	}
	return nil
}

// streamDesc opens any call as a bidirectional stream: the server stream's messages say what it is.
var streamDesc = &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}

func (c *grpcCore) stream(call *serverCall, s rules.Stream, e *endpoint, cc *grpc.ClientConn, ctx context.Context, at *attempt) error {
	ctx, cancelCause := context.WithCancelCause(ctx)
	cancel := func() { cancelCause(nil) }
	defer cancel()
	cs, err := cc.NewStream(ctx, streamDesc, call.chain.m.Name, call.chain.opts...)
	if err != nil {
		return err
	}
	if c.f.live != nil && call.chain.m.ServerStream { // its upstream connection is checked while it is open
		defer c.f.live.watchTarget(liveTarget{e: e, cc: cc}, &streamState{f: c.f, cancel: cancelCause})()
	}
	// The client's messages go up in their own goroutine; an error of the client's side ends the call.
	var clientErr atomic.Pointer[error]
	go func() {
		for {
			msg, err := s.RecvMsg()
			if errors.Is(err, io.EOF) {
				_ = cs.CloseSend()
				return
			}
			if err != nil {
				clientErr.Store(&err)
				cancel()
				return
			}
			err = cs.SendMsg(msg)
			freeMsg(msg)
			if err != nil {
				return // the upstream's side ended: RecvMsg below says why
			}
		}
	}()
	for {
		msg := call.newResponse()
		err := cs.RecvMsg(msg)
		if !call.header {
			if hdr, herr := cs.Header(); herr == nil {
				c.passHeader(call, hdr)
			}
		}
		if err != nil {
			freeMsg(msg)
			if p := clientErr.Load(); p != nil {
				return &localError{*p}
			}
			if errors.Is(err, io.EOF) {
				call.ss.SetTrailer(c.scrubMetadata(cs.Trailer()))
				return nil
			}
			if errors.Is(context.Cause(ctx), errUpstreamLost) {
				return errUpstreamLost // the liveness check found the connection dead
			}
			if at.ended.Load() {
				call.ss.SetTrailer(c.scrubMetadata(cs.Trailer()))
				return err
			}
			return answerTooLarge(call, err)
		}
		if err := s.SendMsg(msg); err != nil {
			return &localError{err}
		}
	}
}

// answerTooLargeError: an answer of the upstream was over its method's bound (rules.SmallAnswerBytes). grpc-go
// refused it from its 5-byte length prefix, before reading (or allocating) the message; the call to the upstream
// is reset, its connection stays.
type answerTooLargeError struct{ err error }

// msgAnswerTooLarge is what a client whose call got an upstream answer over the method's bound reads.
const msgAnswerTooLarge = "etcd-proxy-proxy: upstream answer larger than the method allows"

// Error is the client's text (a status wrapped in another error gets its message from Error); err is for the log.
func (e *answerTooLargeError) Error() string {
	return fmt.Sprintf("%s (%d bytes)", msgAnswerTooLarge, rules.SmallAnswerBytes)
}
func (e *answerTooLargeError) Unwrap() error { return e.err }
func (e *answerTooLargeError) GRPCStatus() *status.Status {
	return status.New(codes.ResourceExhausted, e.Error())
}

// answerTooLarge is err, an error of a call to the upstream that is not the upstream's own status, as an
// answerTooLargeError when it is grpc-go's refusal of a message over the call's receive bound.
func answerTooLarge(call *serverCall, err error) error {
	if call.chain.m.SmallAnswers && status.Code(err) == codes.ResourceExhausted {
		return &answerTooLargeError{err}
	}
	return err
}

// passHeader passes the upstream's response header on, once.
func (c *grpcCore) passHeader(call *serverCall, hdr metadata.MD) {
	call.header = true
	if len(hdr) > 0 {
		_ = call.ss.SetHeader(c.scrubMetadata(hdr))
	}
}

// finish turns the outcome of a call into the status the client gets: the one classification of failures for
// the answer and the metrics. A status passes as it is: a rule's own, or one from below, scrubbed where it came
// in (forward).
func (c *grpcCore) finish(call *serverCall, err error) *status.Status {
	if err == nil {
		return nil
	}
	ctx := call.ctx
	count := c.m.countError
	switch {
	case errors.Is(context.Cause(ctx), errShuttingDown):
		count(reasonShutdown)
		return status.New(codes.Unavailable, msgShuttingDown)
	case ctx.Err() != nil && call.client.Err() != nil:
		count(reasonClientGone)
		return status.FromContextError(ctx.Err()) // nobody reads it
	}
	var (
		re *ruleError
		ne *noEndpointError
		ae *answerTooLargeError
		qe *requestTooLargeError
	)
	switch {
	case errors.As(err, &qe):
		count(reasonTooLarge)
		return qe.st
	case errors.As(err, &ae):
		count(reasonAnswerTooLarge)
		return status.Convert(ae)
	case errors.As(err, &re):
		count(reasonRule)
		c.f.log.Warn("rule failed", "method", call.chain.m.Name, "rule", re.Rule, "err", re.Err)
		return status.New(codes.Internal, "etcd-proxy-proxy: rule "+re.Rule+" could not handle the call")
	case errors.As(err, &ne):
		count(reasonNoEndpoint)
		c.f.log.Warn("request failed", "method", call.chain.m.Name, "err", err)
		if ne.err != nil && strings.Contains(ne.err.Error(), "http2: ") {
			// Only the message depends on the text: an HTTP/1-only upstream (etcd's v2 proxy) answers the
			// HTTP/2 preface with an HTTP/1 error, which grpc-go reports as a broken server preface.
			return status.New(codes.Unavailable, msgNotGRPC)
		}
		return status.New(codes.Unavailable, "etcd-proxy-proxy: no upstream endpoint available")
	}
	st, ok := status.FromError(err)
	if !ok {
		count(reasonSendFailed)
		c.f.log.Warn("request failed", "method", call.chain.m.Name, "err", err)
		return status.New(codes.Unavailable, "etcd-proxy-proxy: unable to get a response from the upstream")
	}
	if errors.Is(err, errLocal) { // grpc-go's own statuses on the client's side
		return status.Convert(scrubbed(err))
	}
	return st // a rule's own, or the upstream's, scrubbed where it came in (forward)
}

// scrubbed is a status from below as a client may see it: its message passes only when known
// (rules.ScrubGRPCMessage), and its details never (what they may hold cannot be checked).
func scrubbed(err error) error {
	st := status.Convert(err)
	return status.Error(st.Code(), rules.ScrubGRPCMessage(int(st.Code()), st.Message()))
}

// identify returns the upstream identity of a call (--upstream-cert-dir), or the refusal when there is none
// and --upstream-identity=strict. The gateway's calls carry their client's CN in identityMetadata, believed
// from the gateway's in-memory connection only; the entry never goes upstream.
func (c *grpcCore) identify(ctx context.Context, in metadata.MD) (*upstreamIdentity, error) {
	if c.f.ids == nil {
		return nil, nil
	}
	var cn string
	if fromGatewayConn(ctx) {
		if v := in.Get(identityMetadata); len(v) > 0 {
			cn = v[0]
		}
	} else if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok {
			cn = verifiedCNOf(&ti.State)
		}
	}
	id := c.f.ids.lookup(cn)
	if id == nil && c.f.ids.strict {
		c.f.log.Debug("no upstream identity for the client: refused", "cn", cn)
		return nil, status.Error(codes.PermissionDenied, msgNoIdentity)
	}
	return id, nil
}

// fromGatewayConn reports a call that came over the JSON gateway's in-memory connection.
func fromGatewayConn(ctx context.Context) bool {
	p, ok := peer.FromContext(ctx)
	return ok && p.Addr != nil && p.Addr.Network() == "pipe"
}

// upstreamMetadata is the request metadata that goes up: the client's, less what grpc-go sets for each hop and
// what the proxy keeps for itself.
func upstreamMetadata(in metadata.MD) metadata.MD {
	out := make(metadata.MD, len(in))
	for k, v := range in {
		switch {
		case strings.HasPrefix(k, ":"), strings.HasPrefix(k, "grpc-"), k == "content-type", k == "user-agent",
			k == "te", k == "connection", k == identityMetadata:
			continue
		}
		out[k] = v
	}
	return out
}

// scrubMetadata is response metadata from below as a client may see it: no grpc-go internals, and no entry
// whose value names an upstream address.
func (c *grpcCore) scrubMetadata(md metadata.MD) metadata.MD {
	if len(md) == 0 {
		return nil
	}
	needles := c.f.known.needles()
	out := make(metadata.MD, len(md))
	for k, vs := range md {
		if strings.HasPrefix(k, ":") || strings.HasPrefix(k, "grpc-") || hopHeaders[k] {
			continue
		}
		for _, v := range vs {
			if !names(v, needles) {
				out[k] = append(out[k], v)
			}
		}
	}
	return out
}

// hopHeaders describe one hop's HTTP/2 message, not the call: an upstream served by net/http (a fake, an older
// proxy) sends Content-Length and Date, and a Content-Length passed on would cut the client's answer short.
var hopHeaders = map[string]bool{"content-type": true, "content-length": true, "date": true, "connection": true,
	"te": true, "trailer": true, "transfer-encoding": true, "keep-alive": true, "upgrade": true, "server": true}

// connKey picks the upstream connection of an endpoint and identity.
type connKey struct {
	scheme, host string
	id           *upstreamIdentity
}

// conn returns the connection to an endpoint with an identity, made on first use.
func (c *grpcCore) conn(e *endpoint, id *upstreamIdentity) (*grpc.ClientConn, error) {
	k := connKey{e.url.Scheme, e.url.Host, id}
	if cc, ok := c.conns.Load(k); ok {
		return cc.(*grpc.ClientConn), nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, status.Error(codes.Unavailable, msgShuttingDown)
	}
	if cc, ok := c.conns.Load(k); ok {
		return cc.(*grpc.ClientConn), nil
	}
	var creds credentials.TransportCredentials = insecure.NewCredentials()
	if e.url.Scheme == "https" {
		creds = &upstreamCreds{f: c.f}
		if id != nil {
			creds.(*upstreamCreds).as = id.cert
		}
	}
	ds := newDialState()
	cc, err := grpc.NewClient("passthrough:///"+e.url.Host, append(c.dialOpts, grpc.WithTransportCredentials(creds),
		// The one dialer of upstream connections (a tunnel later replaces it); TLS goes on top in upstreamCreds.
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			conn, err := c.f.dialTCP(ctx, "tcp", addr)
			ds.done(err)
			return conn, err
		}))...)
	if err != nil {
		return nil, fmt.Errorf("upstream connection: %w", err)
	}
	c.conns.Store(k, cc)
	c.dials.Store(cc, ds)
	if id != nil {
		// A reload that removes or replaces the identity takes the connection out of use; calls still open on it
		// finish there (never with another identity), and it closes once it is idle.
		id.mu.Lock()
		id.retire = append(id.retire, func() {
			c.conns.Delete(k)
			c.dials.Delete(cc)
			go closeWhenIdle(cc)
		})
		id.mu.Unlock()
	}
	return cc, nil
}

// closeWhenIdle closes a connection taken out of use once its last call has ended (grpc-go's idle timeout).
func closeWhenIdle(cc *grpc.ClientConn) {
	ctx := context.Background()
	for s := cc.GetState(); s != connectivity.Idle && s != connectivity.Shutdown; s = cc.GetState() {
		cc.WaitForStateChange(ctx, s)
	}
	_ = cc.Close()
}

// dropConns closes the connections to endpoints discovery dropped.
func (c *grpcCore) dropConns(gone []*url.URL) {
	c.conns.Range(func(k, v any) bool {
		for _, u := range gone {
			if key := k.(connKey); key.host == u.Host && key.scheme == u.Scheme {
				c.conns.Delete(k)
				c.dials.Delete(v)
				_ = v.(*grpc.ClientConn).Close()
			}
		}
		return true
	})
}

// close closes every upstream connection; calls still open fail.
func (c *grpcCore) close() {
	c.mu.Lock()
	c.closed = true
	c.mu.Unlock()
	c.conns.Range(func(k, v any) bool {
		c.conns.Delete(k)
		_ = v.(*grpc.ClientConn).Close()
		return true
	})
}

// attempt is what the client stats handler saw of one attempt of a call: whether its headers went toward the
// upstream (it may have been delivered), and whether the upstream ended it with a status of its own.
type attempt struct{ sent, ended atomic.Bool }

type attemptKey struct{}

// attemptStats is the upstream connections' stats.Handler: it tells "never sent" and "the upstream answered"
// from what grpc-go did, not from an error's text.
type attemptStats struct{}

func (attemptStats) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (attemptStats) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (attemptStats) HandleConn(context.Context, stats.ConnStats) {}

func (attemptStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	at, _ := ctx.Value(attemptKey{}).(*attempt)
	if at == nil {
		return
	}
	switch s.(type) {
	case *stats.OutHeader:
		at.sent.Store(true)
	case *stats.InTrailer: // a trailers-only answer too
		at.ended.Store(true)
	}
}

// connTagger is the server's stats.Handler: it gives every client connection its own endpoint affinity
// (endpoints.go), but the gateway's in-memory one, whose calls spread over the endpoints one by one.
type connTagger struct{}

func (connTagger) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	if info.RemoteAddr != nil && info.RemoteAddr.Network() == "pipe" {
		return ctx
	}
	return context.WithValue(ctx, affinityKey{}, new(affinity))
}
func (connTagger) HandleConn(context.Context, stats.ConnStats)                     {}
func (connTagger) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (connTagger) HandleRPC(context.Context, stats.RPCStats)                       {}

// frame is a message relayed as the bytes it came as.
type frame struct{ data mem.BufferSlice }

// freeMsg returns a relayed frame's buffers to grpc-go's pool.
func freeMsg(m any) {
	if f, ok := m.(*frame); ok && f.data != nil {
		f.data.Free()
		f.data = nil
	}
}

// frameCodec is the codec of both sides: frames pass as they are, etcd's messages (for the methods a rule
// claims) are encoded and decoded with their generated code.
type frameCodec struct{}

func (frameCodec) Name() string { return "proto" }

func (frameCodec) Marshal(v any) (mem.BufferSlice, error) {
	switch m := v.(type) {
	case *frame:
		m.data.Ref() // grpc-go frees what it is given; the frame keeps its own reference
		return m.data, nil
	case rules.Message:
		b, err := m.Marshal()
		if err != nil {
			return nil, err
		}
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	return nil, fmt.Errorf("cannot encode a %T", v)
}

func (frameCodec) Unmarshal(data mem.BufferSlice, v any) error {
	switch m := v.(type) {
	case *frame:
		data.Ref()
		m.data = data
		return nil
	case rules.Message:
		return m.Unmarshal(data.Materialize())
	}
	return fmt.Errorf("cannot decode into a %T", v)
}

// upstreamCreds put TLS on upstream connections: verified against the host dialled, with the TLS configuration
// loaded last (reload.go), presenting an upstream identity's certificate when as is set. A failed handshake is a
// handshakeError: nothing of a call was sent.
type upstreamCreds struct {
	f  *Forwarder
	as *tls.Certificate
}

func (u *upstreamCreds) ClientHandshake(ctx context.Context, authority string, raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	host, _, err := net.SplitHostPort(authority)
	if err != nil {
		host = authority
	}
	tc := u.f.upstreamTLS(host, []string{"h2"})
	if u.as != nil {
		tc.Certificates = []tls.Certificate{*u.as}
	}
	hctx, cancel := context.WithTimeout(ctx, u.f.dialTimeout)
	defer cancel()
	conn := tls.Client(raw, tc)
	if err := conn.HandshakeContext(hctx); err != nil {
		_ = raw.Close()
		return nil, nil, &handshakeError{err}
	}
	return conn, credentials.TLSInfo{State: conn.ConnectionState(),
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.PrivacyAndIntegrity}}, nil
}

func (u *upstreamCreds) ServerHandshake(net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("client credentials")
}
func (u *upstreamCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "tls"}
}
func (u *upstreamCreds) Clone() credentials.TransportCredentials {
	c := *u
	return &c
}
func (u *upstreamCreds) OverrideServerName(string) error { return nil }
