package bench

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
)

// TestSmoke runs the benchmark's smoke mode end to end — 3 member processes, both stock proxies, a
// proxy-proxy and a chain of two, every row and a few watchers — so that CI keeps `make bench` working. It
// times nothing: it fails only when the tool fails or a request through a proxy fails.
func TestSmoke(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	etcd, err := harness.Tool(ctx, "etcd")
	if err != nil {
		t.Fatal(err)
	}
	root, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	proxyBin := filepath.Join(t.TempDir(), "etcd-proxy-proxy")
	build := exec.CommandContext(ctx, "go", "build", "-o", proxyBin, "./cmd/etcd-proxy-proxy")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out := t.TempDir()
	rep, err := Run(ctx, Options{
		Bins:     Binaries{Etcd: etcd, Proxy: proxyBin},
		Smoke:    true,
		Warmup:   50 * time.Millisecond,
		Duration: 150 * time.Millisecond,
		Watchers: 20,
		OutDir:   out,
		Log:      t.Output(),
	})
	if rep != nil {
		rep.WriteTable(t.Output())
	}
	if err != nil {
		t.Fatal(err)
	}
	if want := len(scenarios()) * len(paths); len(rep.Rows) != want {
		t.Errorf("%d rows, want %d", len(rep.Rows), want)
	}
	if len(rep.Watchers) != 3 {
		t.Errorf("%d watcher rows, want 3", len(rep.Watchers))
	}
	// CPU comes from /proc in clock ticks (10 ms): a smoke segment of 150 ms through a slow path may take less
	// than one, so each path must show CPU in some row, not in every one.
	cpu := map[string]float64{}
	for _, r := range rep.Rows {
		cpu[r.Path] += r.CPUusPerReq
	}
	for _, p := range paths {
		if p != pathDirect && cpu[p] <= 0 {
			t.Errorf("via %s: no proxy CPU measured in any row", p)
		}
	}
	for _, name := range []string{"bench.txt", "bench.csv", "bench.json", "bench.png"} {
		fi, err := os.Stat(filepath.Join(out, name))
		if err != nil || fi.Size() == 0 {
			t.Errorf("%s not written: %v", name, err)
		}
	}
}

func TestCheckLoopback(t *testing.T) {
	for s, ok := range map[string]bool{
		"http://127.0.0.1:2379": true, "127.0.0.1:1": true, "http://localhost:2379": false,
		"http://10.0.0.1:2379": false, "example.com:80": false, "http://[::1]:2379": false,
	} {
		if err := checkLoopback(s); (err == nil) != ok {
			t.Errorf("checkLoopback(%q) = %v, want ok=%v", s, err, ok)
		}
	}
}

// TestFailuresInvalidateTheRun: a non-2xx answer is counted, and a run with one is marked invalid, loudly.
func TestFailuresInvalidateTheRun(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			http.Error(w, `{"message":"no"}`, http.StatusInternalServerError)
		}
	}))
	defer srv.Close()
	ph := phase{warmup: 10 * time.Millisecond, duration: 50 * time.Millisecond, maxRequests: 1 << 20}
	rep := &Report{}
	for _, put := range []bool{false, true} {
		w, err := newV2Worker(srv.URL, put, 2)
		if err != nil {
			t.Fatal(err)
		}
		s, err := runLoad(context.Background(), w, 2, ph, nil)
		w.close()
		if err != nil {
			t.Fatal(err)
		}
		if put != (s.errors > 0) {
			t.Errorf("put=%v: %d failures", put, s.errors)
		}
		op := "GET"
		if put {
			op = "PUT"
		}
		rep.Rows = append(rep.Rows, newRow(scenario{"v2", op, 2}, pathDirect, &s))
	}
	rep.evaluate()
	var b strings.Builder
	rep.WriteTable(&b)
	if rep.Valid || !strings.Contains(b.String(), "INVALID RUN") {
		t.Errorf("valid=%v, table:\n%s", rep.Valid, b.String())
	}
}
