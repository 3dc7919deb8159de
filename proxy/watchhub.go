package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// Watch fan-out. Identical watches of the proxy's clients share one upstream watch (a watchGroup): same key
// range and options, same identity and request metadata (the token, hasleader), so each sees what it would see
// directly. A group keeps the upstream's responses in a log; each client watch has a cursor into it and a
// revision from which its events start. The log keeps the last --watch-history responses: a watch that starts
// at a revision the log still covers joins it, and a client that falls behind the log (a slow reader) or starts
// before it gets an upstream watch of its own from its next revision (a private group, which waits for its reader
// as a member waits for a slow watcher) until it has caught up with the shared one, then goes back to it.
//
// When the upstream of a group fails, the group resumes on another endpoint from the revision after the last one
// it has seen, and its clients see nothing of it. Only when no endpoint takes it within the resume time do the
// client streams that have a watch in the group end with Unavailable, as a stream without fan-out would (clients
// resume from their last revision).
//
// Written here rather than with clientv3 (which etcd's grpc-proxy uses): clientv3's watcher decodes every
// message, buffers without bound per watcher, and hides the upstream's progress answers and compaction behind its
// own resume logic, which are the very things to get right.

// watchMethod is the method whose calls the hub serves.
const watchMethod = "/etcdserverpb.Watch/Watch"

// requireLeader is clientv3's WithRequireLeader metadata: a member without a leader ends the stream.
const requireLeader = "hasleader"

// progressTimeout: a progress request to a member that has watchers still catching up is dropped by etcd 3.5
// (3.6 defers it); one not answered within this is sent again.
const progressTimeout = time.Second

type watchHub struct {
	c       *grpcCore
	history int
	// catchUps counts the slow clients' watches being caught up by upstream watches of their own; past
	// catchUpLimit, one more is cancelled.
	catchUps     atomic.Int64
	catchUpLimit int64
	wait         time.Duration // how long a group tries to resume before its clients' streams end
	m            *watchMetrics

	mu     sync.Mutex
	groups map[groupKey]*watchGroup
}

func newWatchHub(c *grpcCore, history, catchUpLimit int, wait time.Duration, m *watchMetrics) *watchHub {
	return &watchHub{c: c, history: max(history, 1), catchUpLimit: int64(catchUpLimit), wait: wait, m: m,
		groups: map[groupKey]*watchGroup{}}
}

// groupKey is what watches must have in common to share an upstream watch.
type groupKey struct {
	id             *upstreamIdentity
	md             string // the request metadata that goes up, canonical
	key, end       string
	filters        string
	prevKV, notify bool
}

func keyOf(id *upstreamIdentity, md metadata.MD, r *pb.WatchCreateRequest) groupKey {
	k := groupKey{id: id, key: string(r.Key), end: string(r.RangeEnd), prevKV: r.PrevKv, notify: r.ProgressNotify}
	for _, f := range r.Filters {
		k.filters += f.String() + ","
	}
	names := make([]string, 0, len(md))
	for n := range md {
		names = append(names, n)
	}
	slices.Sort(names)
	var b strings.Builder
	for _, n := range names {
		for _, v := range md[n] {
			b.WriteString(n)
			b.WriteByte(0)
			b.WriteString(v)
			b.WriteByte(0)
		}
	}
	k.md = b.String()
	return k
}

// entry kinds of a group's log.
const (
	entryCreated  = iota // the upstream's created answer (Canceled: refused)
	entryEvents          // events
	entryProgress        // a progress notification (gen > 0: the answer to a progress request)
	entryEnd             // the upstream watch ended: compacted, cancelled, or failed (err)
)

type watchEntry struct {
	kind int
	resp *pb.WatchResponse // as the upstream sent it
	rev  int64             // every event up to rev is in the log up to here
	gen  uint64            // entryProgress: the progress request it answers
	err  error             // entryEnd: the status ending the streams of its watchers (nil: resp says)
}

// watchGroup is one upstream watch and the client watches it serves.
type watchGroup struct {
	hub    *watchHub
	key    groupKey
	shared bool // in hub.groups; a private group serves one client watch and waits for it
	slow   bool // a private group catching up a slow client (hub.catchUps counts it)
	md     metadata.MD
	id     *upstreamIdentity
	req    pb.WatchCreateRequest // the create request of the upstream watch (start_revision: the first)
	cancel context.CancelFunc
	// clientLeader: its clients asked for a leader; leaderless: no endpoint has one, and the upstream watch is
	// made without asking (for clients that did not ask). The group's goroutine's own.
	clientLeader, leaderless bool

	mu       sync.Mutex
	space    *sync.Cond    // private groups: signalled when the reader took entries
	live     chan struct{} // closed once the upstream answered the create (or the group ended)
	answered bool          // live is closed
	log      []*watchEntry
	first    uint64 // sequence number of log[0]
	base     int64  // the log holds every event after base; -1 until the upstream created the watch
	rev      int64  // every event up to rev has been received
	header   *pb.ResponseHeader
	created  int64 // the revision of the upstream's created answer
	ended    bool
	sessions map[*watchSession]int // watches per session
	// progress requests: wanted counts the clients' requests, sent is wanted when the last one went up
	wanted, sent uint64
	inFlight     bool
	cs           grpc.ClientStream // the current upstream stream, for progress requests; nil between attempts
	sendMu       sync.Mutex
}

// join adds w, a watch of s starting at rev (0: now), setting its cursor and first revision; false when the
// group cannot serve it (it has passed rev, it has ended, or it would give a watch from now older events).
func (g *watchGroup) join(s *watchSession, w *clientWatch, rev int64) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ended {
		return false
	}
	switch {
	case g.base < 0: // not created yet: from its start
		if rev == 0 && g.req.StartRevision != 0 { // it may start in the future, or end compacted
			return false
		}
		if rev != 0 && (g.req.StartRevision == 0 || rev < g.req.StartRevision) {
			return false
		}
		w.cursor, w.next, w.created = g.first, rev, false
	case rev == 0:
		// From now: only a group that has had everything up to its creation and whose upstream stream is up, not
		// one the member is still catching up from an earlier start (its old events are not this watch's, and it
		// may end compacted), one being resumed, nor one that starts in the future (it has nothing before its
		// start).
		if g.rev < g.created || g.req.StartRevision-1 > g.created || g.cs == nil {
			return false
		}
		w.cursor, w.next, w.rev, w.created = g.first+uint64(len(g.log)), g.rev+1, g.rev, true
	case rev-1 < g.base:
		return false
	default:
		i := 0
		for i < len(g.log) && g.log[i].rev < rev {
			i++
		}
		w.cursor, w.next, w.rev, w.created = g.first+uint64(i), rev, min(rev-1, g.rev), true // it has seen nothing yet
	}
	g.sessions[s]++
	return true
}

// leave removes a watch of s; the group's upstream watch ends with its last client watch.
func (g *watchGroup) leave(s *watchSession) {
	g.mu.Lock()
	if g.sessions[s]--; g.sessions[s] <= 0 {
		delete(g.sessions, s)
	}
	last := len(g.sessions) == 0
	if last {
		g.ended = true
		g.space.Broadcast()
	}
	g.mu.Unlock()
	if last {
		g.hub.drop(g)
		if g.cancel != nil {
			g.cancel()
		}
	}
}

// append adds entries to the log and tells the sessions. A shared group keeps the last hub.history entries; a
// private one waits until its reader has taken the oldest.
func (g *watchGroup) append(ctx context.Context, es ...*watchEntry) {
	g.mu.Lock()
	if !g.shared {
		for len(g.log) >= g.hub.history && !g.ended && ctx.Err() == nil {
			g.space.Wait()
		}
	}
	for _, e := range es {
		if (e.kind == entryCreated || e.kind == entryEnd) && !g.answered {
			g.answered = true
			close(g.live)
		}
		g.log = append(g.log, e)
		if e.kind == entryCreated && !e.resp.Canceled && g.base < 0 {
			g.base, g.created = e.rev, e.resp.Header.GetRevision()
		}
		g.rev = max(g.rev, e.rev)
		if e.resp != nil && e.resp.Header != nil {
			g.header = e.resp.Header
		}
		if e.kind == entryEnd {
			g.ended = true
		}
	}
	if g.shared && len(g.log) > g.hub.history {
		n := len(g.log) - g.hub.history
		g.base = g.log[n-1].rev
		clear(g.log[:n])
		g.log = g.log[n:]
		g.first += uint64(n)
	}
	sessions := make([]*watchSession, 0, len(g.sessions))
	for s := range g.sessions {
		sessions = append(sessions, s)
	}
	ended := g.ended
	g.mu.Unlock()
	if ended {
		g.hub.drop(g)
	}
	for _, s := range sessions {
		s.ready(g)
	}
}

// read returns the entries from cursor on, or ok false when the log no longer has them.
func (g *watchGroup) read(cursor uint64) ([]*watchEntry, bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if cursor < g.first {
		return nil, false
	}
	return g.log[cursor-g.first:], true
}

// taken tells a private group that its reader has the entries before cursor.
func (g *watchGroup) taken(cursor uint64) {
	g.mu.Lock()
	if n := int(cursor - g.first); n > 0 && n <= len(g.log) {
		clear(g.log[:n])
		g.log = g.log[n:]
		g.first = cursor
		g.space.Signal()
	}
	g.mu.Unlock()
}

// requestProgress asks the upstream for a progress notification and returns the generation whose answer will
// say so.
func (g *watchGroup) requestProgress() uint64 {
	g.mu.Lock()
	g.wanted++
	gen := g.wanted
	cs, next, send := g.nextProgress()
	g.mu.Unlock()
	if send {
		g.sendProgress(cs, next)
	}
	return gen
}

// nextProgress, with g.mu held, marks a progress request to go up when clients wait for one and none is in
// flight: the stream, and the generation its answer will be.
func (g *watchGroup) nextProgress() (grpc.ClientStream, uint64, bool) {
	if g.inFlight || g.cs == nil || g.wanted <= g.sent {
		return nil, 0, false
	}
	g.inFlight, g.sent = true, g.wanted
	return g.cs, g.sent, true
}

func (g *watchGroup) sendProgress(cs grpc.ClientStream, gen uint64) {
	g.sendMu.Lock()
	_ = cs.SendMsg(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_ProgressRequest{ProgressRequest: &pb.WatchProgressRequest{}}})
	g.sendMu.Unlock()
	time.AfterFunc(progressTimeout, func() {
		g.mu.Lock()
		var (
			next  uint64
			again bool
		)
		if g.inFlight && g.sent == gen && g.cs == cs && !g.ended { // no answer: asked again
			g.inFlight, g.sent = false, 0
			cs, next, again = g.nextProgress()
		}
		g.mu.Unlock()
		if again {
			g.sendProgress(cs, next)
		}
	})
}

// progressAnswered is the upstream's answer to the progress request in flight: the generation it answers. The
// next request goes up if clients asked meanwhile.
func (g *watchGroup) progressAnswered() (gen uint64) {
	g.mu.Lock()
	gen = g.sent
	g.inFlight = false
	cs, next, send := g.nextProgress()
	g.mu.Unlock()
	if send {
		g.sendProgress(cs, next)
	}
	return gen
}

// group returns the shared group of k that can serve a watch from rev, making one when there is none.
func (h *watchHub) group(s *watchSession, w *clientWatch, k groupKey, req *pb.WatchCreateRequest) {
	shared := !req.Fragment // fragments depend on each client's message size; such watches are not shared
	if shared {
		h.mu.Lock()
		g := h.groups[k]
		if g != nil && g.join(s, w, req.StartRevision) {
			h.mu.Unlock()
			w.g = g
			return
		}
		if g == nil || g.isEnded() || req.StartRevision == 0 {
			g = h.newGroup(s, k, req, true)
			h.groups[k] = g
			g.join(s, w, req.StartRevision)
			h.mu.Unlock()
			w.g = g
			g.start()
			return
		}
		h.mu.Unlock()
	}
	g := h.newGroup(s, k, req, false)
	g.join(s, w, req.StartRevision)
	w.g = g
	g.start()
	if shared {
		h.m.caughtUp()
	}
}

func (h *watchHub) newGroup(s *watchSession, k groupKey, req *pb.WatchCreateRequest, shared bool) *watchGroup {
	g := &watchGroup{hub: h, key: k, shared: shared, md: s.call.md.Copy(), id: s.call.id, base: -1,
		sessions: map[*watchSession]int{}}
	g.clientLeader = len(g.md.Get(requireLeader)) > 0
	g.md.Set(requireLeader, "true") // a partitioned member must not stall everyone sharing it
	g.req = pb.WatchCreateRequest{Key: req.Key, RangeEnd: req.RangeEnd, StartRevision: req.StartRevision,
		ProgressNotify: req.ProgressNotify, Filters: req.Filters, PrevKv: req.PrevKv, Fragment: req.Fragment}
	g.space = sync.NewCond(&g.mu)
	g.live = make(chan struct{})
	return g
}

// drop takes an ended shared group out of use.
func (h *watchHub) drop(g *watchGroup) {
	if !g.shared {
		return
	}
	h.mu.Lock()
	if h.groups[g.key] == g {
		delete(h.groups, g.key)
	}
	h.mu.Unlock()
}

// rejoin moves a private watch that has caught up to the shared group of its key, when that group's log covers
// its next revision.
func (h *watchHub) rejoin(s *watchSession, w *clientWatch) *watchGroup {
	h.mu.Lock()
	defer h.mu.Unlock()
	g := h.groups[w.g.key]
	if g == nil {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ended || g.base < 0 || w.next-1 < g.base {
		return nil
	}
	i := 0
	for i < len(g.log) && g.log[i].rev < w.next {
		i++
	}
	w.cursor = g.first + uint64(i)
	g.sessions[s]++
	return g
}

// firstRev is the revision the group's upstream watch was created at.
func (g *watchGroup) firstRev() int64 {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.created
}

func (g *watchGroup) isEnded() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.ended
}

// start runs the group's upstream watch; called once, when the group is made.
func (g *watchGroup) start() {
	ctx, cancel := context.WithCancel(g.hub.c.f.drain)
	g.cancel = cancel
	g.hub.m.upstreamWatch(1)
	go func() {
		defer g.hub.m.upstreamWatch(-1)
		if g.slow {
			defer g.hub.catchUps.Add(-1)
		}
		g.run(ctx)
	}()
}

// run keeps the group's upstream watch: on the endpoints in the policy's order, resumed from the revision
// after the last seen when its stream fails, until its last client watch leaves or no endpoint takes it within
// hub.wait.
func (g *watchGroup) run(ctx context.Context) {
	c := g.hub.c
	var failedSince time.Time
	redialled := false
	for ctx.Err() == nil {
		eps := c.f.endpoints.order(nil)
		progressed := false
		var last error
		noLeader := 0
		for _, e := range eps {
			got, err := g.attempt(ctx, e)
			if ctx.Err() != nil || errors.Is(err, errGroupDone) {
				return
			}
			c.f.endpoints.failed(e)
			last = err
			if got { // it ran there: resumed at once, on the endpoints in their new order
				progressed, failedSince, redialled, g.leaderless = true, time.Time{}, false, false
				g.hub.m.resumed()
				c.f.log.Debug("shared watch resumes on another endpoint", "err", err)
				break
			}
			if isNoLeader(err) {
				noLeader++
			}
		}
		if progressed {
			continue
		}
		if noLeader > 0 && noLeader == len(eps) {
			// No endpoint has a leader. Clients that asked for one get etcd's answer at once; for the others
			// the watch is made without asking, as a member serves them (from what it has).
			if g.clientLeader || g.leaderless {
				g.append(ctx, &watchEntry{kind: entryEnd, rev: g.rev, err: rpctypes.ErrGRPCNoLeader})
				return
			}
			g.leaderless = true
			continue
		}
		if failedSince.IsZero() {
			failedSince = time.Now()
		}
		if len(eps) > 0 && !redialled {
			redialled = true
			if c.redial(ctx, eps, g.id) {
				continue
			}
		}
		if time.Since(failedSince) >= g.hub.wait || len(eps) == 0 {
			c.f.log.Warn("watch could not be resumed on any upstream endpoint: its client streams end", "err", last)
			g.append(ctx, &watchEntry{kind: entryEnd, rev: g.rev, err: status.Error(codes.Unavailable, msgUpstreamLost)})
			return
		}
		t := time.NewTimer(100 * time.Millisecond)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// scrubCancelReason is a cancel reason from below as a client may see it: known, as a status message
// (rules.ScrubGRPCMessage), or withheld. etcd writes some as a whole gRPC error ("rpc error: code = PermissionDenied
// desc = etcdserver: permission denied"): those pass when their message is known.
func scrubCancelReason(r string) string {
	if rest, ok := strings.CutPrefix(r, "rpc error: code = "); ok {
		if code, msg, ok := strings.Cut(rest, " desc = "); ok && !strings.Contains(code, " ") && rules.KnownGRPCMessage(msg) {
			return r
		}
	}
	return rules.ScrubGRPCMessage(int(codes.Canceled), r)
}

// errGroupDone: the group's upstream watch ended for good (compacted, cancelled); its entry is in the log.
var errGroupDone = errors.New("watch ended")

// isNoLeader reports etcd's answer to a stream that asked for a leader (hasleader) on a member without one.
func isNoLeader(err error) bool {
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.Unavailable && st.Message() == noLeaderMessage
}

var noLeaderMessage = status.Convert(rpctypes.ErrGRPCNoLeader).Message()

// attempt runs the upstream watch on e until it fails; got reports that it was created there.
func (g *watchGroup) attempt(ctx context.Context, e *endpoint) (got bool, err error) {
	c := g.hub.c
	cc, err := c.conn(e, g.id)
	if err != nil {
		return false, err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	at := &attempt{}
	md := g.md
	if g.leaderless {
		md = md.Copy()
		md.Delete(requireLeader)
	}
	cs, err := cc.NewStream(metadata.NewOutgoingContext(context.WithValue(ctx, attemptKey{}, at), md), streamDesc, watchMethod)
	if err != nil {
		return false, err
	}
	defer func() {
		// The upstream's own status (not a lost connection): Unavailable (no leader, stopping) is tried on the next
		// endpoint; any other (an invalid token, say) is the answer, for every client of the watch.
		if err != nil && at.ended.Load() && status.Code(err) != codes.Unavailable && ctx.Err() == nil {
			g.append(ctx, &watchEntry{kind: entryEnd, rev: g.rev, err: scrubbed(err)})
			err = errGroupDone
		}
	}()
	if c.f.live != nil {
		defer c.f.live.watchTarget(liveTarget{e: e, cc: cc}, &streamState{f: c.f, cancel: cancel})()
	}
	g.mu.Lock()
	req := g.req
	resuming := g.base >= 0
	if resuming {
		req.StartRevision = g.rev + 1
	}
	g.mu.Unlock()
	if err := cs.SendMsg(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &req}}); err != nil {
		return false, err
	}
	defer func() {
		g.mu.Lock()
		if g.inFlight { // lost with the stream: asked again once the watch is resumed
			g.sent, g.inFlight = 0, false
		}
		g.cs = nil
		g.mu.Unlock()
	}()
	fragmenting := false // the last response was a fragment: the next one belongs to its revision
	for {
		resp := new(pb.WatchResponse)
		if err := cs.RecvMsg(resp); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return got, err
		}
		// A cancel reason from below passes only when it is known, as statuses do (rules.ScrubGRPCMessage): an
		// upstream of another kind may say anything there, an address included.
		if resp.CancelReason != "" {
			resp.CancelReason = scrubCancelReason(resp.CancelReason)
		}
		switch {
		case resp.Created:
			if resp.Canceled {
				// Refused (permissions, a bad start revision): nothing to resume.
				g.append(ctx, &watchEntry{kind: entryCreated, resp: resp, rev: g.rev}, &watchEntry{kind: entryEnd, resp: resp, rev: g.rev})
				return got, errGroupDone
			}
			got = true
			g.mu.Lock()
			g.cs = cs
			pcs, gen, again := g.nextProgress() // progress requests that waited for the watch
			g.mu.Unlock()
			if again {
				g.sendProgress(pcs, gen)
			}
			if !resuming {
				rev := resp.Header.GetRevision()
				if req.StartRevision > 0 {
					rev = req.StartRevision - 1
				}
				g.append(ctx, &watchEntry{kind: entryCreated, resp: resp, rev: rev})
			}
		case resp.Canceled || resp.CompactRevision != 0:
			g.append(ctx, &watchEntry{kind: entryEnd, resp: resp, rev: g.rev})
			return got, errGroupDone
		case len(resp.Events) == 0 && !resp.Fragment && !fragmenting:
			var gen uint64
			if resp.WatchId == -1 {
				gen = g.progressAnswered()
			}
			g.append(ctx, &watchEntry{kind: entryProgress, resp: resp, rev: max(g.rev, resp.Header.GetRevision()), gen: gen})
		default:
			// Events, passed on as they come: a fragment is not held for the rest of its revision (the log's bound
			// is the only buffer), and only the last one says the revision is complete.
			rev := g.rev
			if n := len(resp.Events); n > 0 && !resp.Fragment {
				rev = max(g.rev, resp.Events[n-1].Kv.ModRevision)
			}
			fragmenting = resp.Fragment
			g.append(ctx, &watchEntry{kind: entryEvents, resp: resp, rev: rev})
		}
	}
}

// watchSession is one client's Watch stream. Its reader only queues the client's requests; everything else —
// the watches, their moves between groups, the answers — is done by the call's own goroutine (flush), so the
// watches need no lock.
type watchSession struct {
	hub  *watchHub
	call *serverCall
	s    rules.Stream
	wake chan struct{}
	room chan struct{} // the reader may queue more requests

	mu     sync.Mutex
	reqs   []*pb.WatchRequest
	groups map[*watchGroup]bool // groups with entries the session may not have read
	end    error

	// the call goroutine's own
	watches  map[int64]*clientWatch
	byGroup  map[*watchGroup]map[*clientWatch]bool
	nextID   int64
	progress []progressWait
}

// clientWatch is one watch of a client.
type clientWatch struct {
	id      int64
	g       *watchGroup
	cursor  uint64
	next    int64 // its events start here
	rev     int64 // it has seen every event up to rev
	created bool  // its created answer went out
	zero    bool  // created with start revision 0: from the upstream's revision when created
	at      int64 // > 0: the revision its created answer carries (a watch from now moved before it went out)
	gen     uint64
}

// progressWait is a client's progress request waiting for its watches' groups to answer.
type progressWait struct{ need map[*watchGroup]uint64 }

func (s *watchSession) ready(g *watchGroup) {
	s.mu.Lock()
	s.groups[g] = true
	s.mu.Unlock()
	s.poke()
}

func (s *watchSession) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// serve runs a client's Watch stream.
func (h *watchHub) serve(call *serverCall, st rules.Stream) error {
	s := &watchSession{hub: h, call: call, s: st, wake: make(chan struct{}, 1), room: make(chan struct{}, 1),
		groups: map[*watchGroup]bool{}, watches: map[int64]*clientWatch{}, byGroup: map[*watchGroup]map[*clientWatch]bool{}}
	ctx := call.ctx
	go s.recv()
	defer s.close()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.wake:
		}
		if err := s.flush(ctx); err != nil && !errors.Is(err, errClientDone) {
			return err
		} // the client closed its side: its watches go on until it goes, as a member's do (recvLoop, Watch)
	}
}

// errClientDone: the client closed its side of the stream.
var errClientDone = errors.New("client done")

// maxQueuedRequests bounds the client's requests read ahead of the session: past it the reader waits until the
// session takes them, and flow control holds the client, as a member's recvLoop waits on its control channel
// while its sendLoop cannot send.
const maxQueuedRequests = 64

// recv queues the client's requests.
func (s *watchSession) recv() {
	for {
		m, err := s.s.RecvMsg()
		if err == nil {
			req, ok := m.(*pb.WatchRequest)
			if ok {
				s.mu.Lock()
				s.reqs = append(s.reqs, req)
				full := len(s.reqs) >= maxQueuedRequests
				s.mu.Unlock()
				s.poke()
				if full {
					select {
					case <-s.room:
					case <-s.call.ctx.Done():
						return
					}
				}
				continue
			}
			freeMsg(m)
			err = status.Error(codes.Internal, "etcd-proxy-proxy: a rule changed a watch request into another type")
		}
		if errors.Is(err, io.EOF) {
			err = errClientDone
		}
		s.mu.Lock()
		if s.end == nil {
			s.end = err
		}
		s.mu.Unlock()
		s.poke()
		return
	}
}

// flush does what waits: the client's requests in order, then each watch's entries.
func (s *watchSession) flush(ctx context.Context) error {
	for ctx.Err() == nil {
		s.mu.Lock()
		reqs, end := s.reqs, s.end
		s.reqs = nil
		if len(reqs) > 0 {
			select {
			case s.room <- struct{}{}:
			default:
			}
		}
		var groups []*watchGroup
		for g := range s.groups {
			groups = append(groups, g)
		}
		clear(s.groups)
		s.mu.Unlock()
		if len(reqs) == 0 && len(groups) == 0 {
			return end
		}
		for _, req := range reqs {
			if err := s.handle(ctx, req); err != nil {
				return err
			}
		}
		for _, g := range groups {
			for w := range s.byGroup[g] {
				if err := s.flushWatch(ctx, w); err != nil {
					return err
				}
			}
		}
		if err := s.answerProgress(); err != nil {
			return err
		}
	}
	return ctx.Err()
}

func (s *watchSession) send(r *pb.WatchResponse) error {
	if err := s.s.SendMsg(r); err != nil {
		return &localError{err}
	}
	return nil
}

func (s *watchSession) handle(ctx context.Context, req *pb.WatchRequest) error {
	switch u := req.RequestUnion.(type) {
	case *pb.WatchRequest_CreateRequest:
		if u.CreateRequest != nil {
			return s.create(ctx, u.CreateRequest)
		}
	case *pb.WatchRequest_CancelRequest:
		if u.CancelRequest != nil {
			return s.cancel(u.CancelRequest.WatchId)
		}
	case *pb.WatchRequest_ProgressRequest:
		if u.ProgressRequest != nil {
			s.requestProgress()
		}
	}
	return nil // anything else is ignored, as etcd ignores it
}

// create adds a watch as etcd's serverWatchStream does: the same IDs, the same refusals.
func (s *watchSession) create(ctx context.Context, r *pb.WatchCreateRequest) error {
	if len(r.Key) == 0 {
		r.Key = []byte{0} // the smallest key, as etcd reads it
	}
	refuse := func(reason string) error {
		return s.send(&pb.WatchResponse{Header: &pb.ResponseHeader{}, WatchId: -1, Created: true, Canceled: true,
			CancelReason: reason})
	}
	if r.StartRevision < 0 {
		return refuse(rpctypes.ErrCompacted.Error())
	}
	id := r.WatchId
	if id == 0 {
		for s.watches[s.nextID] != nil {
			s.nextID++
		}
		id = s.nextID
		s.nextID++
	} else if s.watches[id] != nil {
		return refuse("mvcc: duplicate watch ID provided on the WatchStream")
	}
	w := &clientWatch{id: id, zero: r.StartRevision == 0}
	s.hub.group(s, w, keyOf(s.call.id, s.call.md, r), r)
	s.add(w)
	s.hub.m.clientWatch(1)
	if !w.created {
		// The group's upstream watch is being created: its answer is this watch's, and the answers to creates go
		// out in their order (clients match them so), so the next request waits for it.
		select {
		case <-w.g.live:
		case <-ctx.Done():
			return ctx.Err()
		}
		err := s.flushWatch(ctx, w)
		if !w.created && r.WatchId == 0 && s.watches[id] == nil {
			s.nextID = id // refused: a member numbers only the watches it creates
		}
		return err
	}
	h := w.g.headerAt()
	if w.zero {
		h.Revision = w.rev // the revision it joined at (the group may have moved on since): its events come after
	}
	if err := s.send(&pb.WatchResponse{Header: h, WatchId: id, Created: true}); err != nil {
		return err
	}
	s.mu.Lock()
	s.groups[w.g] = true // what it has to read already
	s.mu.Unlock()
	return nil
}

func (s *watchSession) add(w *clientWatch) {
	s.watches[w.id] = w
	set := s.byGroup[w.g]
	if set == nil {
		set = map[*clientWatch]bool{}
		s.byGroup[w.g] = set
	}
	set[w] = true
}

// remove takes w out of the session and its group.
func (s *watchSession) remove(w *clientWatch) {
	delete(s.watches, w.id)
	s.unindex(w)
	w.g.leave(s)
	s.hub.m.clientWatch(-1)
}

func (s *watchSession) unindex(w *clientWatch) {
	if set := s.byGroup[w.g]; set != nil {
		delete(set, w)
		if len(set) == 0 {
			delete(s.byGroup, w.g)
		}
	}
}

// move puts w in group ng (joined already), leaving its old group.
func (s *watchSession) move(w *clientWatch, ng *watchGroup) {
	old := w.g
	s.unindex(w)
	w.g = ng
	s.add(w)
	old.leave(s)
	// Generations are the group's own: a progress request waiting for the old group waits for an answer of the
	// new one now, asked for after the move (the other watches of the old group still wait for its answer).
	w.gen = 0
	for _, pw := range s.progress {
		if _, ok := pw.need[old]; ok {
			pw.need[ng] = ng.requestProgress()
		}
	}
	s.mu.Lock()
	s.groups[ng] = true
	s.mu.Unlock()
}

// cancel cancels a watch of the client; an unknown ID is ignored, as etcd ignores it.
func (s *watchSession) cancel(id int64) error {
	w := s.watches[id]
	if w == nil {
		return nil
	}
	hdr := w.g.headerAt()
	s.remove(w)
	return s.send(&pb.WatchResponse{Header: hdr, WatchId: id, Canceled: true})
}

// headerAt is the group's last response header, at the revision it has seen everything up to (at least the
// revision of its creation: a group catching up from an earlier revision has not seen it yet).
func (g *watchGroup) headerAt() *pb.ResponseHeader {
	g.mu.Lock()
	defer g.mu.Unlock()
	h := &pb.ResponseHeader{}
	if g.header != nil {
		*h = *g.header
	}
	h.Revision = max(g.rev, g.created, 0) // not below the member's revision when it created the upstream watch
	return h
}

// requestProgress asks every group of the client's watches for a progress notification; the answer goes out
// when each of those watches has read its group's answer (answerProgress).
func (s *watchSession) requestProgress() {
	if len(s.byGroup) == 0 {
		return // no watch: a member answers nothing either (RequestProgressAll over no watcher)
	}
	pw := progressWait{need: map[*watchGroup]uint64{}}
	for g := range s.byGroup {
		pw.need[g] = g.requestProgress()
	}
	s.progress = append(s.progress, pw)
}

// flushWatch sends w what its group has that it has not had yet.
func (s *watchSession) flushWatch(ctx context.Context, w *clientWatch) error {
	for ctx.Err() == nil {
		g := w.g
		es, ok := g.read(w.cursor)
		if !ok { // fallen behind the shared log
			if gone, err := s.catchUp(w, true); gone || err != nil {
				return err
			}
			continue
		}
		if len(es) == 0 {
			if !g.shared && w.created && !g.req.Fragment {
				if ng := s.hub.rejoin(s, w); ng != nil {
					s.move(w, ng)
					continue
				}
			}
			return nil
		}
		moved := false
		for _, e := range es {
			if e.kind == entryEnd && e.err == nil && e.resp != nil && e.resp.CompactRevision != 0 &&
				w.next >= e.resp.CompactRevision {
				// The group's upstream watch, from an earlier revision than this one's, was compacted: a member
				// cancels only a watch whose next revision is below the compaction, so this one goes on.
				if _, err := s.catchUp(w, false); err != nil {
					return err
				}
				moved = true
				break
			}
			w.cursor++
			r, err := w.apply(e)
			if err != nil {
				return err
			}
			if r == nil {
				continue
			}
			if err := s.send(r); err != nil {
				return err
			}
			if r.Canceled {
				s.remove(w)
				return nil
			}
		}
		if !moved && !g.shared {
			g.taken(w.cursor)
		}
	}
	return ctx.Err()
}

// catchUp moves w to an upstream watch of its own from its next revision, until it has caught up with the
// shared one: it fell behind its group's log, or its group ended where w goes on. A slow client's watch (slow)
// is cancelled instead when --watch-catch-up-limit watches are being caught up: gone reports that.
func (s *watchSession) catchUp(w *clientWatch, slow bool) (gone bool, err error) {
	g := w.g
	if !w.created && w.zero { // its created answer went with the log: from the group's first revision
		w.next, w.zero = g.firstRev()+1, false
		w.at = w.next - 1 // and its answer says so, not the revision of the upstream watch it moves to
	}
	h := s.hub
	if slow && h.catchUps.Add(1) > h.catchUpLimit {
		h.catchUps.Add(-1)
		h.m.slowCancel()
		hdr := g.headerAt()
		s.remove(w)
		return true, s.send(&pb.WatchResponse{Header: hdr, WatchId: w.id, Canceled: true, CancelReason: fmt.Sprintf(
			"etcd-proxy-proxy: the client fell behind the watch and too many are catching up; watch again from revision %d", w.next)})
	}
	ng := s.hub.newGroup(s, g.key, &g.req, false)
	ng.slow = slow
	ng.req.StartRevision = w.next
	created := w.created
	ng.join(s, w, w.next)
	w.created = created
	s.move(w, ng)
	ng.start()
	s.hub.m.caughtUp()
	return false, nil
}

// apply is what one log entry means for the watch: the answer to send (nil: none), or the error ending the
// client's stream.
func (w *clientWatch) apply(e *watchEntry) (*pb.WatchResponse, error) {
	r := e.resp
	switch e.kind {
	case entryCreated:
		if r.Canceled {
			if w.created {
				return &pb.WatchResponse{Header: r.Header, WatchId: w.id, Canceled: true, CancelReason: r.CancelReason}, nil
			}
			return &pb.WatchResponse{Header: r.Header, WatchId: -1, Created: true, Canceled: true, CancelReason: r.CancelReason}, nil
		}
		w.rev = max(w.rev, e.rev)
		if w.created {
			return nil, nil
		}
		w.created = true
		if w.zero {
			w.next = r.Header.GetRevision() + 1
		}
		h := r.Header
		if w.at > 0 {
			h = &pb.ResponseHeader{}
			if r.Header != nil {
				*h = *r.Header
			}
			h.Revision = w.at
		}
		return &pb.WatchResponse{Header: h, WatchId: w.id, Created: true}, nil
	case entryEvents:
		evs := r.Events
		if len(evs) > 0 && evs[0].Kv.ModRevision < w.next {
			evs = slices.DeleteFunc(slices.Clone(evs), func(ev *mvccpb.Event) bool { return ev.Kv.ModRevision < w.next })
		}
		w.rev = max(w.rev, e.rev)
		w.next = max(w.next, e.rev+1)
		if len(evs) == 0 && !r.Fragment {
			return nil, nil
		}
		return &pb.WatchResponse{Header: r.Header, WatchId: w.id, Events: evs, Fragment: r.Fragment}, nil
	case entryProgress:
		w.rev = max(w.rev, e.rev)
		w.next = max(w.next, e.rev+1)
		w.gen = max(w.gen, e.gen)
		if r.WatchId != -1 { // a periodic notification (progress_notify)
			return &pb.WatchResponse{Header: r.Header, WatchId: w.id}, nil
		}
		return nil, nil
	case entryEnd:
		if e.err != nil {
			return nil, e.err
		}
		return &pb.WatchResponse{Header: r.Header, WatchId: w.id, Canceled: true, CompactRevision: r.CompactRevision,
			CancelReason: r.CancelReason}, nil
	}
	return nil, nil
}

// answerProgress sends the answers to the client's progress requests whose groups have all answered: the
// revision every watch of the stream has seen everything up to.
func (s *watchSession) answerProgress() error {
	for len(s.progress) > 0 {
		pw := s.progress[0]
		var rev int64 = -1
		var g *watchGroup
		for _, w := range s.watches {
			if need, ok := pw.need[w.g]; ok && w.gen < need {
				return nil // not yet
			}
			if w.created && (rev < 0 || w.rev < rev) {
				rev, g = w.rev, w.g
			}
		}
		s.progress = s.progress[1:]
		h := &pb.ResponseHeader{}
		if g != nil {
			h = g.headerAt()
		}
		h.Revision = max(rev, 0)
		if err := s.send(&pb.WatchResponse{Header: h, WatchId: -1}); err != nil {
			return err
		}
	}
	return nil
}

// close takes the session's watches out of their groups.
func (s *watchSession) close() {
	for _, w := range s.watches {
		s.remove(w)
	}
}

// watchMetrics count the fan-out; nil: no metrics.
type watchMetrics struct {
	clientWatches, upstreamWatches atomic.Int64
	resumes, catchUps, slowCancels prometheus.Counter
}

func newWatchMetrics(m *metrics) *watchMetrics {
	if m == nil {
		return nil
	}
	w := &watchMetrics{}
	opts := func(name, help string) prometheus.Opts {
		return prometheus.Opts{Namespace: MetricsNamespace, Name: name, Help: help}
	}
	w.resumes = prometheus.NewCounter(prometheus.CounterOpts(opts("watch_resumes_total",
		"Shared upstream watches resumed on another endpoint after theirs failed, unseen by their clients.")))
	w.catchUps = prometheus.NewCounter(prometheus.CounterOpts(opts("watch_catch_ups_total",
		"Client watches served by an upstream watch of their own until they caught up: started before the shared watch's history, or fell behind it (slow clients).")))
	w.slowCancels = prometheus.NewCounter(prometheus.CounterOpts(opts("watch_slow_cancels_total",
		"Client watches cancelled because their client fell behind while --watch-catch-up-limit watches were being caught up.")))
	m.reg.MustRegister(w.resumes, w.catchUps, w.slowCancels,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts(opts("watch_client_watches",
			"Open client watches (watch IDs) served by the watch fan-out.")),
			func() float64 { return float64(w.clientWatches.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts(opts("watch_upstream_watches",
			"Upstream watches of the watch fan-out (each on its own stream).")),
			func() float64 { return float64(w.upstreamWatches.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts(opts("watch_coalescing_ratio",
			"Client watches per upstream watch (0 when there is none).")),
			func() float64 {
				if u := w.upstreamWatches.Load(); u > 0 {
					return float64(w.clientWatches.Load()) / float64(u)
				}
				return 0
			}))
	return w
}

func (w *watchMetrics) clientWatch(d int64) {
	if w != nil {
		w.clientWatches.Add(d)
	}
}

func (w *watchMetrics) upstreamWatch(d int64) {
	if w != nil {
		w.upstreamWatches.Add(d)
	}
}

func (w *watchMetrics) resumed() {
	if w != nil {
		w.resumes.Inc()
	}
}

func (w *watchMetrics) slowCancel() {
	if w != nil {
		w.slowCancels.Inc()
	}
}

func (w *watchMetrics) caughtUp() {
	if w != nil {
		w.catchUps.Inc()
	}
}
