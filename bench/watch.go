package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// openers is how many watches are being opened at once.
const openers = 64

// watchResult is one watcher row: N watches held open through one fresh proxy-proxy.
type watchResult struct {
	kind      string // "v3 watch streams", "v2 long polls"
	n         int
	opened    int
	delivered int // watches that got the event written after all were open
	baseKiB   int64
	heldKiB   int64
	peakKiB   int64
	openTime  time.Duration
	errs      []string
	// coalesced watchers only
	deliveries       []time.Duration // from each write to its delivery to the last watcher of its key
	upstreamWatchers int             // the member's count of watchers while they were open
}

func (w *watchResult) perWatcherKiB() float64 {
	if w.opened == 0 {
		return 0
	}
	return float64(w.heldKiB-w.baseKiB) / float64(w.opened)
}

func (w *watchResult) addErr(format string, a ...any) {
	if len(w.errs) < 5 {
		w.errs = append(w.errs, fmt.Sprintf(format, a...))
	}
}

// measureRSS waits for the proxy to settle and reads its RSS and peak.
func measureRSS(pid int, settle time.Duration) (rss, hwm int64, err error) {
	time.Sleep(settle)
	if rss, err = statusKiB(pid, "VmRSS"); err != nil {
		return 0, 0, err
	}
	hwm, err = statusKiB(pid, "VmHWM")
	return rss, hwm, err
}

// watchV3 opens n gRPC Watch streams (one watcher each, on one connection) through pp, measures its RSS, then
// writes the watched key on the member and checks every stream gets the event.
func watchV3(ctx context.Context, pp *proc, ppAddr, memberAddr string, n int, settle time.Duration) (*watchResult, error) {
	r := &watchResult{kind: "v3 watch streams", n: n}
	for _, a := range []string{ppAddr, memberAddr} {
		if err := checkLoopback(a); err != nil {
			return nil, err
		}
	}
	var err error
	if r.baseKiB, _, err = measureRSS(pp.pid(), settle); err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(ppAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel() // ends every stream
	key := []byte("epp-bench/watched3")
	streams := make([]pb.Watch_WatchClient, n)
	var next atomic.Int64
	var mu sync.Mutex
	var wg sync.WaitGroup
	t0 := time.Now()
	for range openers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			watch := pb.NewWatchClient(conn)
			for i := int(next.Add(1) - 1); i < n && ctx.Err() == nil; i = int(next.Add(1) - 1) {
				s, err := watch.Watch(ctx)
				if err == nil {
					err = s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
						CreateRequest: &pb.WatchCreateRequest{Key: key}}})
				}
				var resp *pb.WatchResponse
				if err == nil {
					resp, err = s.Recv()
				}
				mu.Lock()
				switch {
				case err != nil:
					r.addErr("stream %d: %v", i, err)
				case !resp.Created:
					r.addErr("stream %d: not created", i)
				default:
					streams[i] = s
					r.opened++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	r.openTime = time.Since(t0)
	if err := ctx.Err(); err != nil {
		return r, err
	}
	if r.heldKiB, r.peakKiB, err = measureRSS(pp.pid(), settle); err != nil {
		return nil, err
	}

	mconn, err := grpc.NewClient(memberAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer mconn.Close()
	if _, err := pb.NewKVClient(mconn).Put(ctx, &pb.PutRequest{Key: key, Value: []byte("changed")}); err != nil {
		return nil, fmt.Errorf("v3 watch: writing the watched key: %w", err)
	}
	var delivered atomic.Int64
	dctx, dcancel := context.WithTimeout(ctx, 60*time.Second)
	defer dcancel()
	for _, s := range streams {
		if s == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for dctx.Err() == nil {
				resp, err := s.Recv()
				if err != nil {
					mu.Lock()
					r.addErr("receiving the event: %v", err)
					mu.Unlock()
					return
				}
				if len(resp.Events) > 0 {
					delivered.Add(1)
					return
				}
			}
		}()
	}
	go func() { <-dctx.Done(); cancel() }() // a stream still waiting after the deadline is given up
	wg.Wait()
	r.delivered = int(delivered.Load())
	return r, nil
}

// watchV2 opens n v2 long polls (GET ?wait=true, one connection each) through pp, measures its RSS, then
// writes the watched key on the member and checks every poll returns the event.
func watchV2(ctx context.Context, pp *proc, ppURL, memberURL string, n int, settle time.Duration) (*watchResult, error) {
	r := &watchResult{kind: "v2 long polls", n: n}
	for _, a := range []string{ppURL, memberURL} {
		if err := checkLoopback(a); err != nil {
			return nil, err
		}
	}
	var err error
	if r.baseKiB, _, err = measureRSS(pp.pid(), settle); err != nil {
		return nil, err
	}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if err := checkLoopback(addr); err != nil {
				return nil, err
			}
			return (&net.Dialer{Timeout: 5 * time.Second}).DialContext(ctx, network, addr)
		},
		MaxIdleConnsPerHost: 1,
		DisableCompression:  true,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	const path = "/v2/keys/epp-bench/watched?wait=true"
	var (
		mu        sync.Mutex
		open      sync.WaitGroup // one per poll until its headers arrived (or it failed)
		done      sync.WaitGroup // one per poll until its body ended
		delivered atomic.Int64
		sem       = make(chan struct{}, openers)
	)
	t0 := time.Now()
	for i := range n {
		open.Add(1)
		done.Add(1)
		sem <- struct{}{}
		go func() {
			defer done.Done()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, ppURL+path, nil)
			resp, err := client.Do(req)
			<-sem
			if err == nil && resp.StatusCode != http.StatusOK {
				resp.Body.Close()
				err = fmt.Errorf("status %s", resp.Status)
			}
			mu.Lock()
			if err != nil {
				r.addErr("poll %d: %v", i, err)
			} else {
				r.opened++
			}
			mu.Unlock()
			open.Done()
			if err != nil {
				return
			}
			defer resp.Body.Close()
			b, err := io.ReadAll(resp.Body)
			if err == nil && strings.Contains(string(b), `"action":"set"`) {
				delivered.Add(1)
			} else if ctx.Err() == nil {
				mu.Lock()
				r.addErr("poll %d: event: %v %.80s", i, err, b)
				mu.Unlock()
			}
		}()
	}
	open.Wait()
	r.openTime = time.Since(t0)
	if err := ctx.Err(); err != nil {
		return r, err
	}
	if r.heldKiB, r.peakKiB, err = measureRSS(pp.pid(), settle); err != nil {
		return nil, err
	}
	req, _ := http.NewRequestWithContext(ctx, http.MethodPut, memberURL+"/v2/keys/epp-bench/watched",
		strings.NewReader("value=changed"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("v2 watch: writing the watched key: %w", err)
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return nil, fmt.Errorf("v2 watch: writing the watched key: %s", resp.Status)
	}
	finished := make(chan struct{})
	go func() { done.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(60 * time.Second):
		cancel()
		<-finished
	}
	r.delivered = int(delivered.Load())
	return r, nil
}

// Coalesced watchers: watch IDs over coalescedStreams streams on coalescedConns connections, on coalescedKeys
// keys (issue 14's target row).
const (
	coalescedConns   = 10
	coalescedStreams = 100
	coalescedKeys    = 10
	coalescedWrites  = 2 * coalescedKeys
)

// watchCoalesced opens n watches of coalescedKeys keys through pp, measures its RSS and the member's count of
// watchers, then writes each key twice on the member, one write at a time, and times each write to its
// delivery to the last of the watchers of its key.
func watchCoalesced(ctx context.Context, pp *proc, ppAddr, memberAddr string, n int, settle time.Duration) (*watchResult, error) {
	r := &watchResult{kind: "v3 coalesced watchers", n: n}
	for _, a := range []string{ppAddr, memberAddr} {
		if err := checkLoopback(a); err != nil {
			return nil, err
		}
	}
	var err error
	if r.baseKiB, _, err = measureRSS(pp.pid(), settle); err != nil {
		return nil, err
	}
	before := memberWatchers(ctx, "http://"+memberAddr) // watches of earlier rows may still be going away
	ctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel() // ends every stream
	var conns []*grpc.ClientConn
	for range coalescedConns {
		c, err := grpc.NewClient(ppAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return nil, err
		}
		defer c.Close()
		conns = append(conns, c)
	}
	key := func(i int) []byte { return fmt.Appendf(nil, "epp-bench/coalesced/%d", i%coalescedKeys) }
	streams := make([]pb.Watch_WatchClient, coalescedStreams)
	var mu sync.Mutex
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := range coalescedStreams {
		wg.Go(func() {
			per := n/coalescedStreams + min(1, max(0, n%coalescedStreams-i))
			s, err := pb.NewWatchClient(conns[i%coalescedConns]).Watch(ctx)
			for j := 0; j < per && err == nil; j++ {
				err = s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
					CreateRequest: &pb.WatchCreateRequest{Key: key(i + j*coalescedStreams)}}})
			}
			opened := 0
			for ; opened < per && err == nil; opened++ {
				var resp *pb.WatchResponse
				if resp, err = s.Recv(); err == nil && !resp.Created {
					err = fmt.Errorf("not created: %v", resp)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			r.opened += opened
			if err != nil {
				r.addErr("stream %d: %v", i, err)
				return
			}
			streams[i] = s
		})
	}
	wg.Wait()
	r.openTime = time.Since(t0)
	if err := ctx.Err(); err != nil {
		return r, err
	}
	if r.heldKiB, r.peakKiB, err = measureRSS(pp.pid(), settle); err != nil {
		return nil, err
	}
	if after := memberWatchers(ctx, "http://"+memberAddr); after >= 0 && before >= 0 {
		r.upstreamWatchers = after - before
	}

	// Deliveries per revision; each stream's reader counts its watchers' events.
	var (
		dmu      sync.Mutex
		count    = map[int64]int{}
		lastAt   = map[int64]time.Time{}
		received = make([]int, coalescedStreams) // events per stream
		arrived  = make(chan int64, coalescedWrites)
	)
	perKey := n / coalescedKeys
	for i, s := range streams {
		if s == nil {
			continue
		}
		wg.Go(func() {
			for {
				resp, err := s.Recv()
				if err != nil {
					return
				}
				now := time.Now()
				dmu.Lock()
				for _, ev := range resp.Events {
					rev := ev.Kv.ModRevision
					received[i]++
					count[rev]++
					lastAt[rev] = now
					if count[rev] == perKey {
						arrived <- rev
					}
				}
				dmu.Unlock()
			}
		})
	}
	mconn, err := grpc.NewClient(memberAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer mconn.Close()
	kv := pb.NewKVClient(mconn)
	for w := range coalescedWrites {
		began := time.Now()
		resp, err := kv.Put(ctx, &pb.PutRequest{Key: key(w), Value: []byte("changed")})
		if err != nil {
			return nil, fmt.Errorf("coalesced watchers: writing a watched key: %w", err)
		}
		timeout := time.NewTimer(30 * time.Second)
	wait:
		for {
			select {
			case rev := <-arrived:
				if rev == resp.Header.Revision {
					break wait
				}
			case <-timeout.C:
				dmu.Lock()
				got := count[resp.Header.Revision]
				dmu.Unlock()
				r.addErr("write %d: delivered to %d of %d watchers within 30s", w, got, perKey)
				break wait
			}
		}
		timeout.Stop()
		dmu.Lock()
		if at, ok := lastAt[resp.Header.Revision]; ok {
			r.deliveries = append(r.deliveries, at.Sub(began))
		}
		dmu.Unlock()
	}
	cancel()
	wg.Wait()
	// A watcher got every event when its stream got all of its watchers' events.
	for i := range streams {
		per := n/coalescedStreams + min(1, max(0, n%coalescedStreams-i))
		if received[i] >= per*coalescedWrites/coalescedKeys {
			r.delivered += per
		}
	}
	return r, nil
}

// memberWatchers is the member's own count of watchers (etcd_debugging_mvcc_watcher_total); -1 when unknown.
func memberWatchers(ctx context.Context, memberURL string) int {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, memberURL+"/metrics", nil)
	if err != nil {
		return -1
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(l, "etcd_debugging_mvcc_watcher_total "); ok {
			var n float64
			if _, err := fmt.Sscan(v, &n); err == nil {
				return int(n)
			}
		}
	}
	return -1
}
