// Package bench measures etcd-proxy-proxy against direct access and etcd's stock proxies, every part a
// separate process on 127.0.0.1, in one run (`make bench`); its smoke mode keeps the tool working in CI.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Binaries are the programs a run starts.
type Binaries struct {
	// Etcd is the pinned etcd (members, `--proxy=on`, `grpc-proxy start`).
	Etcd string
	// Proxy is etcd-proxy-proxy.
	Proxy string
	// Self is this tool's own binary, run as `Self proxy --cpuprofile FILE -- FLAGS` for a profile; empty
	// when no profile is taken.
	Self string
}

// Options configure a run. The zero value of each field means the full benchmark's setting.
type Options struct {
	Bins Binaries
	// Smoke runs every row for a fraction of a second and a handful of watchers: it checks the tool, and
	// measures nothing worth comparing.
	Smoke bool
	// Rounds is how many times every target of a scenario is measured, in rotating order (default 3; smoke 1).
	Rounds int
	// Warmup and Duration bound one measured segment (defaults 0.5 s and 2.5 s; smoke 0.1 s and 0.3 s).
	Warmup, Duration time.Duration
	// MaxRequests bounds the requests of one segment (default 2,000,000).
	MaxRequests int64
	// Watchers is how many v3 streams and v2 long polls are held (default 10,000; smoke 50). -1: none.
	Watchers int
	// Only, when not empty, keeps the scenarios whose name (e.g. "v2 GET c=64") contains it.
	Only string
	// OutDir receives bench.txt, .csv, .json, .png and the processes' logs (default results/<time>).
	OutDir string
	// Profile, when set, replaces the run: the proxy-proxy runs under the profiling wrapper (Bins.Self)
	// during ProfileDuration of ProfileLoad, and its CPU profile is written to this file.
	Profile string
	// ProfileLoad is what the profile measures: "v2" (GET at c=64, the default) or "v3" (linearizable Range
	// at c=16).
	ProfileLoad     string
	ProfileDuration time.Duration
	// Log receives progress lines (default os.Stderr).
	Log io.Writer
}

func (o *Options) defaults() {
	def := func(d *time.Duration, full, smoke time.Duration) {
		if *d == 0 {
			*d = full
			if o.Smoke {
				*d = smoke
			}
		}
	}
	def(&o.Warmup, 500*time.Millisecond, 100*time.Millisecond)
	def(&o.Duration, 2500*time.Millisecond, 300*time.Millisecond)
	def(&o.ProfileDuration, 15*time.Second, 2*time.Second)
	if o.Rounds == 0 {
		o.Rounds = 3
		if o.Smoke {
			o.Rounds = 1
		}
	}
	if o.MaxRequests == 0 {
		o.MaxRequests = 2_000_000
	}
	if o.Watchers == 0 {
		o.Watchers = 10_000
		if o.Smoke {
			o.Watchers = 50
		}
	}
	if o.Log == nil {
		o.Log = os.Stderr
	}
	if o.OutDir == "" {
		name := time.Now().Format("20060102-150405")
		if o.Smoke {
			name += "-smoke"
		}
		o.OutDir = filepath.Join("results", name)
	}
}

// Path names: how a request reaches the member.
const (
	pathDirect = "direct"
	pathStock  = "stock" // the stock v2 proxy for v2, the grpc-proxy for v3
	pathOne    = "proxy-proxy"
	pathTwo    = "proxy-proxy x2"
)

var paths = []string{pathDirect, pathStock, pathOne, pathTwo}

// scenario is one operation at one concurrency, measured on every path.
type scenario struct {
	api  string // "v2", "v3"
	op   string // "GET", "PUT", "range", "put"
	conc int
}

func (s scenario) String() string { return fmt.Sprintf("%s %s c=%d", s.api, s.op, s.conc) }

func scenarios() []scenario {
	var ss []scenario
	for _, op := range []string{"GET", "PUT"} {
		for _, c := range []int{1, 16, 64} {
			ss = append(ss, scenario{"v2", op, c})
		}
	}
	for _, op := range []string{"range", "put"} {
		for _, c := range []int{1, 16} {
			ss = append(ss, scenario{"v3", op, c})
		}
	}
	return ss
}

// Run runs the benchmark (or, with Options.Profile, the profile) and writes its results. The error is
// ErrInvalid when any request failed: the numbers are then not a measurement.
func Run(ctx context.Context, o Options) (*Report, error) {
	o.defaults()
	logf := func(format string, a ...any) { fmt.Fprintf(o.Log, "epp-bench: "+format+"\n", a...) }
	if err := os.MkdirAll(filepath.Join(o.OutDir, "logs"), 0o755); err != nil {
		return nil, err
	}
	// A v2 long poll holds two sockets in the proxy (client side, upstream side): the proxy's open-file limit,
	// which it inherits from this process, bounds how many can be held at once.
	v2Watchers := o.Watchers
	if lim, err := raiseFileLimit(uint64(2*o.Watchers + 4096)); err == nil || lim > 0 {
		if fit := (int(lim) - 300) / 2; fit < v2Watchers {
			logf("open-file limit %d (hard limit; raising it needs CAP_SYS_RESOURCE): %d v2 long polls instead of %d",
				lim, fit, v2Watchers)
			v2Watchers = fit
		}
	}
	tmp, err := os.MkdirTemp("", "epp-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	logDir, _ := filepath.Abs(filepath.Join(o.OutDir, "logs"))
	ps := &procs{dir: logDir, dataDir: tmp}
	defer ps.killAll()
	t := &topology{ps: ps, bins: o.Bins, http: &http.Client{Timeout: 5 * time.Second}}

	if o.Profile != "" {
		return nil, profile(ctx, t, o, logf)
	}

	if err := t.start(ctx, logf); err != nil {
		return nil, err
	}
	rep := &Report{
		Started: time.Now().UTC(), Smoke: o.Smoke, Rounds: o.Rounds, Warmup: o.Warmup.String(),
		Duration: o.Duration.String(), Member: t.target.name, MemberState: t.targetState,
		OutDir: o.OutDir,
	}
	if h, err := os.ReadFile("/proc/loadavg"); err == nil {
		rep.LoadBefore = strings.TrimSpace(string(h))
	}
	ph := phase{warmup: o.Warmup, duration: o.Duration, maxRequests: o.MaxRequests}
	for _, sc := range scenarios() {
		if o.Only != "" && !strings.Contains(sc.String(), o.Only) {
			continue
		}
		acc := map[string]*sample{}
		for round := range o.Rounds {
			// Rotate the order every round: drift of the machine hits every path alike.
			order := slices.Clone(paths)
			k := round % len(order)
			order = append(order[k:], order[:k]...)
			for _, p := range order {
				s, err := t.segment(ctx, sc, p, ph)
				if err != nil {
					return nil, fmt.Errorf("%s via %s: %w", sc, p, err)
				}
				if a := acc[p]; a == nil {
					acc[p] = &s
				} else {
					a.merge(s)
				}
			}
		}
		for _, p := range paths {
			rep.Rows = append(rep.Rows, newRow(sc, p, acc[p]))
		}
		logf("%-14s %s", sc, summary(rep.Rows[len(rep.Rows)-len(paths):]))
	}
	rep.ratios()

	if o.Watchers > 0 && (o.Only == "" || strings.Contains("watchers", o.Only)) {
		settle := 2 * time.Second
		if o.Smoke {
			settle = 200 * time.Millisecond
		}
		for _, kind := range []string{"v3", "v2", "v3-coalesced"} {
			n := o.Watchers
			switch kind {
			case "v2":
				n = v2Watchers
			case "v3-coalesced": // issue 14: 100,000 coalesced watchers
				n = 10 * o.Watchers
			}
			w, err := t.watchers(ctx, kind, n, settle)
			if err != nil {
				return nil, fmt.Errorf("%s watchers: %w", kind, err)
			}
			logf("%s: %d/%d open, %d events delivered, %.1f KiB each", w.kind, w.opened, w.n, w.delivered,
				w.perWatcherKiB())
			rep.Watchers = append(rep.Watchers, watchRow(w))
		}
	}
	if h, err := os.ReadFile("/proc/loadavg"); err == nil {
		rep.LoadAfter = strings.TrimSpace(string(h))
	}
	rep.evaluate()
	if err := rep.write(); err != nil {
		return rep, err
	}
	if !rep.Valid {
		return rep, ErrInvalid
	}
	return rep, nil
}

// ErrInvalid: some request failed, so the run measured something other than the proxies.
var ErrInvalid = errors.New("INVALID RUN: some requests failed (non-2xx answers or gRPC errors); see the table")

// segment measures one scenario on one path once.
func (t *topology) segment(ctx context.Context, sc scenario, path string, ph phase) (sample, error) {
	var (
		w    worker
		err  error
		pids []int
	)
	if sc.api == "v2" {
		base := map[string]string{pathDirect: t.target.clientURL, pathStock: t.stockV2URL, pathOne: t.pp1URL,
			pathTwo: t.chainURL}[path]
		w, err = newV2Worker(base, sc.op == "PUT", sc.conc)
	} else {
		addr := map[string]string{pathDirect: strings.TrimPrefix(t.target.clientURL, "http://"),
			pathStock: t.grpcAddr, pathOne: strings.TrimPrefix(t.pp1URL, "http://"),
			pathTwo: strings.TrimPrefix(t.chainURL, "http://")}[path]
		w, err = newV3Worker(addr, sc.op == "put")
	}
	if err != nil {
		return sample{}, err
	}
	defer w.close()
	switch path {
	case pathStock:
		if sc.api == "v2" {
			pids = []int{t.stockV2.pid()}
		} else {
			pids = []int{t.grpcProxy.pid()}
		}
	case pathOne:
		pids = []int{t.pp1.pid()}
	case pathTwo:
		pids = []int{t.chain[0].pid(), t.chain[1].pid()}
	}
	return runLoad(ctx, w, sc.conc, ph, pids)
}

func (s *sample) merge(o sample) {
	s.requests += o.requests
	s.errors += o.errors
	for _, e := range o.firstErrs {
		if len(s.firstErrs) < 5 {
			s.firstErrs = append(s.firstErrs, e)
		}
	}
	s.elapsed += o.elapsed
	s.latencies = append(s.latencies, o.latencies...)
	s.cpu += o.cpu
	s.peakKiB = max(s.peakKiB, o.peakKiB)
}

// watchers holds n watches of kind through a fresh proxy-proxy (so its memory is the watchers' alone), then
// stops it.
func (t *topology) watchers(ctx context.Context, kind string, n int, settle time.Duration) (*watchResult, error) {
	p, u, err := t.startProxyProxy(ctx, "pp-watch-"+kind, t.target.clientURL)
	if err != nil {
		return nil, err
	}
	defer p.kill()
	switch kind {
	case "v3-coalesced":
		return watchCoalesced(ctx, p, strings.TrimPrefix(u, "http://"), strings.TrimPrefix(t.target.clientURL, "http://"), n, settle)
	case "v3":
		return watchV3(ctx, p, strings.TrimPrefix(u, "http://"), strings.TrimPrefix(t.target.clientURL, "http://"), n, settle)
	}
	return watchV2(ctx, p, u, t.target.clientURL, n, settle)
}

// profile runs v2 GET at c=64 (or v3 Range at c=16) through one proxy-proxy that runs under the profiling
// wrapper and writes its CPU profile.
func profile(ctx context.Context, t *topology, o Options, logf func(string, ...any)) error {
	if o.Bins.Self == "" {
		return errors.New("profile: no wrapper binary")
	}
	if err := t.startCluster(ctx); err != nil {
		return err
	}
	t.target = t.members[0]
	if err := t.put(ctx, t.target.clientURL, benchKey, benchValue); err != nil {
		return err
	}
	out, err := filepath.Abs(o.Profile)
	if err != nil {
		return err
	}
	p, u, err := t.startProxyProxy(ctx, "pp-profiled", t.target.clientURL,
		o.Bins.Self, "proxy", "--cpuprofile", out, "--")
	if err != nil {
		return err
	}
	var w worker
	conc := 64
	if o.ProfileLoad == "v3" {
		conc = 16
		w, err = newV3Worker(strings.TrimPrefix(u, "http://"), false)
	} else {
		w, err = newV2Worker(u, false, conc)
	}
	if err != nil {
		return err
	}
	defer w.close()
	s, err := runLoad(ctx, w, conc, phase{warmup: o.Warmup, duration: o.ProfileDuration, maxRequests: 1 << 40},
		[]int{p.pid()})
	if err != nil {
		return err
	}
	sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := p.stop(sctx); err != nil {
		return err
	}
	logf("profile: %d requests (%d failed) at %.0f/s, %.1f µs CPU each; profile in %s (go tool pprof -top %s)",
		s.requests, s.errors, float64(s.requests)/s.elapsed.Seconds(),
		float64(s.cpu.Microseconds())/float64(max(s.requests, 1)), out, out)
	if s.errors > 0 {
		return ErrInvalid
	}
	return nil
}
