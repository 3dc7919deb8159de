package bench

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// The key every request reads or writes, and its value (small, as etcd's own benchmarks use).
const (
	benchKey   = "epp-bench/key"
	benchValue = "0123456789abcdef"
)

// phase is how long and how much one measured segment runs.
type phase struct {
	warmup      time.Duration // requests before the measurement, on the same connections
	duration    time.Duration // measurement bound
	maxRequests int64         // measurement bound
}

// sample is what one segment measured.
type sample struct {
	requests  int64
	errors    int64
	firstErrs []string
	elapsed   time.Duration
	latencies []time.Duration
	cpu       time.Duration // of the proxy processes on the path
	peakKiB   int64         // sum over the path's processes of VmHWM during the segment
}

// op is one request of a load generator worker; it reports an error for a transport failure, a non-2xx
// answer or a gRPC status other than OK.
type op func(ctx context.Context) error

// worker builds one client's op (its own connection) and a close function.
type worker interface {
	op(i int) op
	close()
}

// runLoad runs conc workers of w through warm-up and measurement. Before the measurement it records the CPU
// time of pids and resets their peak RSS; after it, reads both again.
func runLoad(ctx context.Context, w worker, conc int, ph phase, pids []int) (sample, error) {
	ops := make([]op, conc)
	for i := range ops {
		ops[i] = w.op(i)
	}
	var s sample
	// Warm-up: connections open, caches fill, nothing is recorded except errors.
	if _, err := drive(ctx, ops, ph.warmup, 1<<62, &s); err != nil {
		return s, err
	}
	cpu0, err := sumCPU(pids)
	if err != nil {
		return s, err
	}
	for _, pid := range pids {
		resetPeakRSS(pid)
	}
	lat, err := drive(ctx, ops, ph.duration, ph.maxRequests, &s)
	if err != nil {
		return s, err
	}
	cpu1, err := sumCPU(pids)
	if err != nil {
		return s, err
	}
	s.cpu = cpu1 - cpu0
	for _, pid := range pids {
		hwm, err := statusKiB(pid, "VmHWM")
		if err != nil {
			return s, err
		}
		s.peakKiB += hwm
	}
	s.latencies = lat
	s.requests = int64(len(lat))
	return s, nil
}

// drive runs ops concurrently until d has passed or max requests were started; it returns the latencies of
// the successful requests and counts the failed ones in s (they are not latencies: an error can be fast).
func drive(parent context.Context, ops []op, d time.Duration, max int64, s *sample) ([]time.Duration, error) {
	ctx, cancel := context.WithTimeout(parent, d+30*time.Second) // a hung request cannot hold the run forever
	defer cancel()
	var (
		started atomic.Int64
		mu      sync.Mutex
		all     []time.Duration
		wg      sync.WaitGroup
	)
	begin := time.Now()
	deadline := begin.Add(d)
	for _, o := range ops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			lat := make([]time.Duration, 0, 4096)
			var errs int64
			var first []string
			for started.Add(1) <= max {
				t0 := time.Now()
				if !t0.Before(deadline) || ctx.Err() != nil {
					break
				}
				err := o(ctx)
				t1 := time.Now()
				if err != nil {
					errs++
					if len(first) < 3 {
						first = append(first, err.Error())
					}
					if ctx.Err() != nil {
						break
					}
					time.Sleep(time.Millisecond) // no hot loop against a refusing target
					continue
				}
				lat = append(lat, t1.Sub(t0))
			}
			mu.Lock()
			all = append(all, lat...)
			s.errors += errs
			for _, e := range first {
				if len(s.firstErrs) < 5 {
					s.firstErrs = append(s.firstErrs, e)
				}
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	s.elapsed = time.Since(begin)
	if err := parent.Err(); err != nil {
		return all, err // interrupted: the caller stops
	}
	if ctx.Err() != nil {
		s.errors++
		s.firstErrs = append(s.firstErrs, "a request hung for 30 s past the end of the segment")
	}
	return all, nil
}

func sumCPU(pids []int) (time.Duration, error) {
	var sum time.Duration
	for _, pid := range pids {
		c, err := cpuTime(pid)
		if err != nil {
			return 0, fmt.Errorf("CPU time of %d: %w", pid, err)
		}
		sum += c
	}
	return sum, nil
}

// percentile of sorted latencies, nearest rank.
func percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func sortDurations(d []time.Duration) { slices.Sort(d) }

// v2Worker sends v2 GETs or PUTs of benchKey over HTTP/1.1 keep-alive connections, one per worker at most.
type v2Worker struct {
	client *http.Client
	tr     *http.Transport
	url    string
	put    bool
}

func newV2Worker(base string, put bool, conc int) (*v2Worker, error) {
	if err := checkLoopback(base); err != nil {
		return nil, err
	}
	d := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if err := checkLoopback(addr); err != nil {
				return nil, err
			}
			return d.DialContext(ctx, network, addr)
		},
		MaxIdleConnsPerHost: max(conc, 2),
		IdleConnTimeout:     time.Minute,
		DisableCompression:  true,
		ForceAttemptHTTP2:   false,
	}
	return &v2Worker{client: &http.Client{Transport: tr, Timeout: 30 * time.Second}, tr: tr,
		url: base + "/v2/keys/" + benchKey, put: put}, nil
}

var putBody = url.Values{"value": {benchValue}}.Encode()

func (w *v2Worker) op(int) op {
	return func(ctx context.Context) error {
		var req *http.Request
		var err error
		if w.put {
			req, err = http.NewRequestWithContext(ctx, http.MethodPut, w.url, strings.NewReader(putBody))
			if err == nil {
				req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			}
		} else {
			req, err = http.NewRequestWithContext(ctx, http.MethodGet, w.url, nil)
		}
		if err != nil {
			return err
		}
		resp, err := w.client.Do(req)
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode/100 != 2 {
			return fmt.Errorf("%s %s", req.Method, resp.Status)
		}
		return err
	}
}

func (w *v2Worker) close() { w.tr.CloseIdleConnections() }

// v3Worker sends linearizable Ranges or Puts of benchKey over raw gRPC (no client-side retries that would hide
// an error), one connection per client.
type v3Worker struct {
	addr  string
	put   bool
	mu    sync.Mutex
	conns []*grpc.ClientConn
}

func newV3Worker(addr string, put bool) (*v3Worker, error) {
	if err := checkLoopback(addr); err != nil {
		return nil, err
	}
	return &v3Worker{addr: addr, put: put}, nil
}

func (w *v3Worker) op(int) op {
	conn, err := grpc.NewClient(w.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			if err := checkLoopback(addr); err != nil {
				return nil, err
			}
			return (&net.Dialer{}).DialContext(ctx, "tcp", addr)
		}))
	if err != nil {
		return func(context.Context) error { return err }
	}
	w.mu.Lock()
	w.conns = append(w.conns, conn)
	w.mu.Unlock()
	kv := pb.NewKVClient(conn)
	key, val := []byte(benchKey), []byte(benchValue)
	if w.put {
		return func(ctx context.Context) error {
			_, err := kv.Put(ctx, &pb.PutRequest{Key: key, Value: val})
			return err
		}
	}
	return func(ctx context.Context) error {
		_, err := kv.Range(ctx, &pb.RangeRequest{Key: key}) // Serializable false: linearizable
		return err
	}
}

func (w *v3Worker) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.conns {
		c.Close()
	}
}
