package bench

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// Row is one scenario on one path. A ratio or a proxy figure that does not apply is 0 (empty in CSV, "-" in
// the table).
type Row struct {
	Scenario    string   `json:"scenario"` // e.g. "v2 GET c=64"
	API         string   `json:"api"`
	Op          string   `json:"op"`
	Concurrency int      `json:"concurrency"`
	Path        string   `json:"path"`           // direct, stock, proxy-proxy, proxy-proxy x2
	Via         string   `json:"via"`            // what the path is, e.g. "etcd --proxy=on"
	Requests    int64    `json:"requests"`       // successful, measured
	Failed      int64    `json:"failed"`         // non-2xx, gRPC or transport errors (warm-up included)
	Seconds     float64  `json:"seconds"`        // measured time, all rounds
	RPS         float64  `json:"rps"`            //
	P50us       float64  `json:"p50_us"`         //
	P99us       float64  `json:"p99_us"`         //
	VsDirect    float64  `json:"vs_direct"`      // RPS / direct RPS
	VsStock     float64  `json:"vs_stock"`       // RPS / stock proxy RPS
	VsOne       float64  `json:"vs_one"`         // RPS / one proxy-proxy RPS (the chain row)
	AddedP50us  float64  `json:"added_p50_us"`   // P50 - direct P50
	CPUusPerReq float64  `json:"cpu_us_per_req"` // utime+stime of the path's proxies / requests
	PeakRSSMiB  float64  `json:"peak_rss_mib"`   // sum of the path's proxies' VmHWM during the row
	Errors      []string `json:"errors,omitempty"`
}

// WatchRow is one watcher measurement through one fresh proxy-proxy.
type WatchRow struct {
	Kind          string   `json:"kind"`
	Watchers      int      `json:"watchers"`
	Opened        int      `json:"opened"`
	Delivered     int      `json:"delivered"` // got the event written after all were open
	OpenSeconds   float64  `json:"open_seconds"`
	BaseRSSMiB    float64  `json:"base_rss_mib"`
	HeldRSSMiB    float64  `json:"held_rss_mib"`
	PeakRSSMiB    float64  `json:"peak_rss_mib"`
	KiBPerWatcher float64  `json:"kib_per_watcher"`
	Errors        []string `json:"errors,omitempty"`
	// Coalesced watchers only: from a write to its delivery to the last watcher of its key, and the member's
	// count of watchers while they were open.
	DeliveryP50ms    float64 `json:"delivery_p50_ms,omitempty"`
	DeliveryP99ms    float64 `json:"delivery_p99_ms,omitempty"`
	UpstreamWatchers int     `json:"upstream_watchers,omitempty"`
}

// Target is one bar of the issue, met or missed in this run.
type Target struct {
	Name   string  `json:"name"`
	Value  float64 `json:"value"`
	Bound  float64 `json:"bound"`
	Unit   string  `json:"unit"`
	AtMost bool    `json:"at_most"` // the value must not exceed Bound (else: reach it)
	Where  string  `json:"where,omitempty"`
	Met    bool    `json:"met"`
	NA     bool    `json:"na,omitempty"` // not measured in this run
}

// Report is a whole run.
type Report struct {
	Started     time.Time  `json:"started"`
	Smoke       bool       `json:"smoke"`
	Rounds      int        `json:"rounds"`
	Warmup      string     `json:"warmup_per_segment"`
	Duration    string     `json:"duration_per_segment"`
	Member      string     `json:"member"`       // the member every path ends on
	MemberState string     `json:"member_state"` // its raft state
	LoadBefore  string     `json:"loadavg_before"`
	LoadAfter   string     `json:"loadavg_after"`
	Valid       bool       `json:"valid"`
	Rows        []Row      `json:"rows"`
	Watchers    []WatchRow `json:"watchers"`
	Targets     []Target   `json:"targets"`
	OutDir      string     `json:"-"`
}

func via(api, path string) string {
	switch path {
	case pathDirect:
		return "direct"
	case pathStock:
		if api == "v2" {
			return "etcd --proxy=on"
		}
		return "etcd grpc-proxy"
	case pathOne:
		return "proxy-proxy"
	}
	return "proxy-proxy x2"
}

func newRow(sc scenario, path string, s *sample) Row {
	r := Row{Scenario: sc.String(), API: sc.api, Op: sc.op, Concurrency: sc.conc, Path: path, Via: via(sc.api, path),
		Requests: s.requests, Failed: s.errors, Seconds: s.elapsed.Seconds(), Errors: s.firstErrs}
	if s.elapsed > 0 {
		r.RPS = float64(s.requests) / s.elapsed.Seconds()
	}
	sortDurations(s.latencies)
	r.P50us = us(percentile(s.latencies, 0.50))
	r.P99us = us(percentile(s.latencies, 0.99))
	if path != pathDirect && s.requests > 0 {
		r.CPUusPerReq = us(s.cpu) / float64(s.requests)
		r.PeakRSSMiB = float64(s.peakKiB) / 1024
	}
	s.latencies = nil
	return r
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

func watchRow(w *watchResult) WatchRow {
	row := WatchRow{Kind: w.kind, Watchers: w.n, Opened: w.opened, Delivered: w.delivered,
		OpenSeconds: w.openTime.Seconds(), BaseRSSMiB: float64(w.baseKiB) / 1024, HeldRSSMiB: float64(w.heldKiB) / 1024,
		PeakRSSMiB: float64(w.peakKiB) / 1024, KiBPerWatcher: w.perWatcherKiB(), Errors: w.errs,
		UpstreamWatchers: w.upstreamWatchers}
	if d := slices.Clone(w.deliveries); len(d) > 0 {
		slices.Sort(d)
		ms := func(q float64) float64 { return float64(d[int(q*float64(len(d)-1))]) / float64(time.Millisecond) }
		row.DeliveryP50ms, row.DeliveryP99ms = ms(0.5), ms(0.99)
	}
	return row
}

func (rep *Report) row(scenario, path string) *Row {
	for i := range rep.Rows {
		if rep.Rows[i].Scenario == scenario && rep.Rows[i].Path == path {
			return &rep.Rows[i]
		}
	}
	return nil
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// ratios fills every row's ratios from the rows of the same scenario.
func (rep *Report) ratios() {
	for i := range rep.Rows {
		r := &rep.Rows[i]
		if d := rep.row(r.Scenario, pathDirect); d != nil && r.Path != pathDirect {
			r.VsDirect = ratio(r.RPS, d.RPS)
			r.AddedP50us = r.P50us - d.P50us
		}
		if s := rep.row(r.Scenario, pathStock); s != nil && r.Path != pathStock && r.Path != pathDirect {
			r.VsStock = ratio(r.RPS, s.RPS)
		}
		if o := rep.row(r.Scenario, pathOne); o != nil && r.Path == pathTwo {
			r.VsOne = ratio(r.RPS, o.RPS)
		}
	}
}

// evaluate checks the targets and whether the run is valid.
func (rep *Report) evaluate() {
	rep.Valid = true
	for _, r := range rep.Rows {
		if r.Failed > 0 || r.Requests == 0 {
			rep.Valid = false
		}
	}
	for _, w := range rep.Watchers {
		if w.Opened != w.Watchers || w.Delivered != w.Watchers || len(w.Errors) > 0 {
			rep.Valid = false
		}
	}
	one := func(name, scenario string, val func(*Row) float64, bound float64, unit string, atMost bool) {
		t := Target{Name: name, Bound: bound, Unit: unit, AtMost: atMost, Where: scenario}
		if r := rep.row(scenario, pathOne); r != nil {
			t.Value = val(r)
			t.Met = met(t.Value, bound, atMost)
		} else {
			t.NA = true
		}
		rep.Targets = append(rep.Targets, t)
	}
	// worst applies a bound to every row of path that val applies to and reports the worst of them.
	worst := func(name, path string, keep func(*Row) bool, val func(*Row) float64, bound float64, unit string, atMost bool) {
		t := Target{Name: name, Bound: bound, Unit: unit, AtMost: atMost, NA: true}
		for i := range rep.Rows {
			r := &rep.Rows[i]
			if r.Path != path || !keep(r) {
				continue
			}
			v := val(r)
			if t.NA || (atMost && v > t.Value) || (!atMost && v < t.Value) {
				t.Value, t.Where, t.NA = v, r.Scenario, false
			}
		}
		t.Met = !t.NA && met(t.Value, bound, atMost)
		rep.Targets = append(rep.Targets, t)
	}
	vsStock := func(r *Row) float64 { return r.VsStock }
	vsDirect := func(r *Row) float64 { return r.VsDirect }
	one("v2 GET c=64: ≥ 1.5× the stock v2 proxy", "v2 GET c=64", vsStock, 1.5, "×", false)
	one("v2 GET c=64: ≥ 0.55× direct", "v2 GET c=64", vsDirect, 0.55, "×", false)
	one("v2 PUT c=64: ≥ 0.85× direct", "v2 PUT c=64", vsDirect, 0.85, "×", false)
	one("v2 GET c=64: ≤ 40 µs proxy CPU per request", "v2 GET c=64",
		func(r *Row) float64 { return r.CPUusPerReq }, 40, "µs", true)
	worst("c=1: ≤ 50 µs added p50 over direct (worst row)", pathOne,
		func(r *Row) bool { return r.Concurrency == 1 }, func(r *Row) float64 { return r.AddedP50us }, 50, "µs", true)
	// The v3 core's targets (issue 13).
	one("v3 linearizable range c=16: ≥ 1.3× grpc-proxy", "v3 range c=16", vsStock, 1.3, "×", false)
	one("v3 put c=16: ≥ 1.1× grpc-proxy", "v3 put c=16", vsStock, 1.1, "×", false)
	one("v3 range c=1: ≤ 150 µs added p50 over direct", "v3 range c=1",
		func(r *Row) float64 { return r.AddedP50us }, 150, "µs", true)
	worst("v3 chain of two: ≥ 0.85× one proxy-proxy (worst row)", pathTwo,
		func(r *Row) bool { return strings.HasPrefix(r.Scenario, "v3 ") }, func(r *Row) float64 { return r.VsOne }, 0.85, "×", false)
	worst("chain of two: ≥ 0.8× one proxy-proxy (worst row)", pathTwo,
		func(*Row) bool { return true }, func(r *Row) float64 { return r.VsOne }, 0.8, "×", false)
	worst("c=64: ≤ 32 MiB proxy-proxy peak RSS (worst row)", pathOne,
		func(r *Row) bool { return r.Concurrency == 64 }, func(r *Row) float64 { return r.PeakRSSMiB }, 32, "MiB", true)
	for _, w := range []struct {
		kind  string
		bound float64
	}{{"v3 watch streams", 12}, {"v2 long polls", 40}, {"v3 coalesced watchers", 2}} {
		t := Target{Name: fmt.Sprintf("%s: ≤ %.0f KiB proxy RSS each", w.kind, w.bound), Bound: w.bound, Unit: "KiB",
			AtMost: true, NA: true}
		for _, r := range rep.Watchers {
			if r.Kind == w.kind {
				t.Value, t.NA, t.Where = r.KiBPerWatcher, false, fmt.Sprintf("%d watchers", r.Watchers)
				t.Met = met(t.Value, w.bound, true)
			}
		}
		rep.Targets = append(rep.Targets, t)
	}
	// Watch fan-out (issue 14): one upstream watch per key watched.
	t := Target{Name: fmt.Sprintf("coalesced watchers: ≤ %d upstream watches (one per key)", coalescedKeys),
		Bound: coalescedKeys, AtMost: true, NA: true}
	for _, r := range rep.Watchers {
		if r.Kind == "v3 coalesced watchers" && r.UpstreamWatchers >= 0 {
			t.Value, t.NA, t.Where = float64(r.UpstreamWatchers), false, fmt.Sprintf("%d watchers", r.Watchers)
			t.Met = met(t.Value, coalescedKeys, true)
		}
	}
	rep.Targets = append(rep.Targets, t)
}

func met(v, bound float64, atMost bool) bool {
	if atMost {
		return v <= bound
	}
	return v >= bound
}

func f(v float64, prec int) string {
	if v == 0 || math.IsNaN(v) {
		return "-"
	}
	return strconv.FormatFloat(v, 'f', prec, 64)
}

// WriteTable prints the rows, the watchers and the targets as aligned text.
func (rep *Report) WriteTable(w io.Writer) {
	if rep.Smoke {
		fmt.Fprintln(w, "SMOKE RUN: segments of a fraction of a second; the numbers check the tool, they measure nothing.")
	}
	fmt.Fprintf(w, "every path ends on member %s (%s); %d round(s) per path of %s warm-up + %s, paths alternating; loadavg %s → %s\n\n",
		rep.Member, rep.MemberState, rep.Rounds, rep.Warmup, rep.Duration, rep.LoadBefore, rep.LoadAfter)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "scenario\tpath\treq/s\tp50 µs\tp99 µs\t×direct\t×stock\t×1pp\t+p50 µs\tCPU µs/req\tpeak RSS MiB\tfailed\t")
	prev := ""
	for _, r := range rep.Rows {
		if prev != "" && r.Scenario != prev {
			fmt.Fprintln(tw, "\t\t\t\t\t\t\t\t\t\t\t\t")
		}
		prev = r.Scenario
		failed := "0"
		if r.Failed > 0 || r.Requests == 0 {
			failed = fmt.Sprintf("%d INVALID", r.Failed)
		}
		added := "-"
		if r.Path != pathDirect {
			added = strconv.FormatFloat(r.AddedP50us, 'f', 0, 64)
		}
		fmt.Fprintf(tw, "%s\t%s\t%.0f\t%.0f\t%.0f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.Scenario, r.Via,
			r.RPS, r.P50us, r.P99us, f(r.VsDirect, 2), f(r.VsStock, 2), f(r.VsOne, 2), added, f(r.CPUusPerReq, 1),
			f(r.PeakRSSMiB, 1), failed)
	}
	tw.Flush()
	if len(rep.Watchers) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
		fmt.Fprintln(tw, "watchers (one fresh proxy-proxy each)\tN\topen\tevent delivered\topen s\tRSS before MiB\tRSS held MiB\tKiB/watcher\tdelivery p50 ms\tp99 ms\tupstream watchers\t")
		for _, r := range rep.Watchers {
			up := "-"
			if r.UpstreamWatchers > 0 {
				up = strconv.Itoa(r.UpstreamWatchers)
			}
			fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%.1f\t%.1f\t%.1f\t%.1f\t%s\t%s\t%s\t\n", r.Kind, r.Watchers, r.Opened, r.Delivered,
				r.OpenSeconds, r.BaseRSSMiB, r.HeldRSSMiB, r.KiBPerWatcher, f(r.DeliveryP50ms, 1), f(r.DeliveryP99ms, 1), up)
		}
		tw.Flush()
	}
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "target\tmeasured\twhere\t")
	for _, t := range rep.Targets {
		mark := "MISSED"
		switch {
		case t.NA:
			mark = "n/a"
		case t.Met:
			mark = "met"
		}
		val := "-"
		if !t.NA {
			val = strconv.FormatFloat(t.Value, 'f', 2, 64) + " " + t.Unit
		}
		fmt.Fprintf(tw, "%-6s %s\t%s\t%s\t\n", mark, t.Name, val, t.Where)
	}
	tw.Flush()
	for _, r := range rep.Rows {
		for _, e := range r.Errors {
			fmt.Fprintf(w, "error in %s via %s: %s\n", r.Scenario, r.Path, e)
		}
	}
	for _, r := range rep.Watchers {
		for _, e := range r.Errors {
			fmt.Fprintf(w, "error in %s: %s\n", r.Kind, e)
		}
	}
	if !rep.Valid {
		fmt.Fprintf(w, "\n%s\n!!! INVALID RUN: requests failed (non-2xx answers, gRPC errors or watches without their event).\n!!! These numbers do not measure the proxies.\n%s\n",
			strings.Repeat("!", 80), strings.Repeat("!", 80))
	}
}

// write puts bench.txt, bench.csv, bench.json and bench.png into OutDir.
func (rep *Report) write() error {
	var table bytes.Buffer
	rep.WriteTable(&table)
	if err := os.WriteFile(filepath.Join(rep.OutDir, "bench.txt"), table.Bytes(), 0o644); err != nil {
		return err
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(rep.OutDir, "bench.json"), append(js, '\n'), 0o644); err != nil {
		return err
	}
	var b bytes.Buffer
	cw := csv.NewWriter(&b)
	_ = cw.Write([]string{"scenario", "api", "op", "concurrency", "path", "via", "requests", "failed", "seconds",
		"rps", "p50_us", "p99_us", "vs_direct", "vs_stock", "vs_one", "added_p50_us", "cpu_us_per_req", "peak_rss_mib"})
	num := func(v float64, prec int) string {
		if v == 0 {
			return ""
		}
		return strconv.FormatFloat(v, 'f', prec, 64)
	}
	for _, r := range rep.Rows {
		_ = cw.Write([]string{r.Scenario, r.API, r.Op, strconv.Itoa(r.Concurrency), r.Path, r.Via,
			strconv.FormatInt(r.Requests, 10), strconv.FormatInt(r.Failed, 10), num(r.Seconds, 3), num(r.RPS, 1),
			num(r.P50us, 1), num(r.P99us, 1), num(r.VsDirect, 3), num(r.VsStock, 3), num(r.VsOne, 3),
			strconv.FormatFloat(r.AddedP50us, 'f', 1, 64), num(r.CPUusPerReq, 2), num(r.PeakRSSMiB, 2)})
	}
	for _, w := range rep.Watchers {
		_ = cw.Write([]string{w.Kind, "", "watch", strconv.Itoa(w.Watchers), pathOne, "etcd-proxy-proxy",
			strconv.Itoa(w.Opened), strconv.Itoa(w.Watchers - w.Delivered), num(w.OpenSeconds, 3), "", "", "", "", "",
			"", "", "", num(w.HeldRSSMiB, 2)})
	}
	cw.Flush()
	if err := os.WriteFile(filepath.Join(rep.OutDir, "bench.csv"), b.Bytes(), 0o644); err != nil {
		return err
	}
	if len(rep.Rows) > 0 {
		return rep.chart(filepath.Join(rep.OutDir, "bench.png"))
	}
	return nil
}

// summary is one progress line for a scenario's rows.
func summary(rows []Row) string {
	var b strings.Builder
	var direct float64
	for _, r := range rows {
		if r.Path == pathDirect {
			direct = r.RPS
		}
		fmt.Fprintf(&b, "  %s %.0f/s", r.Path, r.RPS)
		if r.Path != pathDirect && direct > 0 {
			fmt.Fprintf(&b, " (%.2f×)", r.RPS/direct)
		}
		if r.Failed > 0 {
			fmt.Fprintf(&b, " %d FAILED", r.Failed)
		}
	}
	return b.String()
}
