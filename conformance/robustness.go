package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"
)

// The robustness suite (-suite robustness): go.etcd.io/etcd/tests/v3 at v3.7.x has robustness/, which runs
// traffic against an e2e cluster while it injects a fault, then checks the history it recorded for
// linearizability (porcupine) and the watch guarantees. Its clients use the cluster's gRPC endpoints, so the e2e
// starter swap (testdata/cluster_epp37.go) routes them through an etcd-proxy-proxy per member.

// robustnessModules are the modules tests/v3@v3.7.x replaces with sibling folders of etcd's repository.
var robustnessModules = []string{"api/v3", "cache/v3", "client/pkg/v3", "client/v3", "etcdctl/v3", "etcdutl/v3",
	"pkg/v3", "server/v3"}

// defaultRobustnessRun are the regression scenarios whose faults need no failpoint-instrumented (gofail) etcd:
// a member killed (Issue13766: 3 members, Issue15220: 1 member) and a member's peer traffic blackholed until
// the leader snapshots past it (Issue15271, Issue20221). The others panic or sleep at gofail failpoints.
// Each comma-separated pattern runs in a process of its own.
const defaultRobustnessRun = "^TestRobustnessRegression$/^Issue15220$,^TestRobustnessRegression$/^Issue13766$," +
	"^TestRobustnessRegression$/^Issue15271$,^TestRobustnessRegression$/^Issue20221$"

// robustnessVariants: the variant's build tags. etcd's own 3.7 grpc-proxy starter cannot be the anchor: it
// starts the proxy again with its member after a kill and panics ("already started"); direct is the cluster
// without a proxy.
var robustnessVariants = map[string]string{"ours": "cluster_proxy,epp", "direct": "", "anchor": "cluster_proxy"}

// robustnessRun is one scenario run in one process.
type robustnessRun struct {
	variant, test, result, time string
	details                     string // fault, traffic and the validators' verdicts, from its log
}

// robustnessDefaults sets the defaults of the robustness suite for the flags the command line did not set.
func robustnessDefaults(o *options, set map[string]bool) {
	for name, apply := range map[string]func(){
		"version":  func() { o.version = "v3.7.3" },
		"work":     func() { o.work = "build/robustness" },
		"variants": func() { o.variants = []string{"ours"} },
		"timeout":  func() { o.timeout = 3 * time.Minute },
	} {
		if !set[name] {
			apply()
		}
	}
}

func runRobustness(o options) error {
	start := time.Now()
	dir, err := prepareRobustness(o)
	if err != nil {
		return fmt.Errorf("preparing the tests module: %w", err)
	}
	fmt.Printf("prepared %s@%s in %s\n", testsModule, o.version, time.Since(start).Round(time.Second))
	run := o.run
	if run == "" {
		run = defaultRobustnessRun
	}
	tests := strings.Split(run, ",") // each its own process, one at a time
	var runs []robustnessRun
	for _, v := range o.variants {
		tags, ok := robustnessVariants[v]
		if !ok {
			return fmt.Errorf("unknown variant %q for the robustness suite: want ours or direct", v)
		}
		r, err := runRobustnessVariant(o, dir, v, tags, tests)
		if err != nil {
			return fmt.Errorf("robustness through %s: %w", v, err)
		}
		runs = append(runs, r...)
	}
	var b strings.Builder
	b.WriteString("\n| scenario | through | result | time | fault, traffic, verdicts |\n|---|---|---|---:|---|\n")
	failed := false
	for _, r := range runs {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", r.test, r.variant, r.result, r.time, r.details)
		failed = failed || (r.variant == "ours" && r.result == "fail") // flaky: passed when tried again
	}
	fmt.Print(b.String())
	if o.out != "" {
		if err := os.MkdirAll(filepath.Dir(o.out), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(o.out+".md", []byte(b.String()), 0o644); err != nil {
			return err
		}
	}
	if failed {
		return errors.New("robustness scenarios fail through etcd-proxy-proxy (logs: " + o.work + ")")
	}
	return nil
}

// prepareRobustness copies tests/v3@v3.7.x out of the module cache, drops its replace directives and toolchain
// line, and adds our starter; it returns the copy's folder. bin/etcd in the work folder is the 3.7 etcd.
func prepareRobustness(o options) (string, error) {
	dir, err := copyTestsModule(o)
	if err != nil {
		return "", err
	}
	// go.etcd.io/etcd/cache/v3@v3.7.x is not on the module proxy (403): only integration/cache_test.go needs it.
	if err := os.Remove(filepath.Join(dir, "integration", "cache_test.go")); err != nil {
		return "", err
	}
	edit := []string{"mod", "edit", "-toolchain=none", "-droprequire=go.etcd.io/etcd/cache/v3"}
	for _, m := range robustnessModules {
		edit = append(edit, "-dropreplace=go.etcd.io/etcd/"+m)
	}
	for _, s := range [][]string{edit, {"mod", "tidy"}} {
		c := exec.Command("go", s...)
		c.Dir = dir
		if _, err := output(c); err != nil {
			return "", err
		}
	}
	fw := filepath.Join(dir, "framework", "e2e")
	if err := replaceIn(filepath.Join(fw, "cluster_proxy.go"), "//go:build cluster_proxy\n",
		"//go:build cluster_proxy && !epp\n"); err != nil {
		return "", err
	}
	// The blackhole-until-snapshot fault reads "the cluster's" revision from the cluster's endpoints less the
	// blackholed member's, which it finds by the member's own client URL: with a proxy starter (etcd's as ours)
	// the endpoints are the proxies', nothing is left out, and when the first is the blackholed member's proxy
	// it compares the member with itself until the test's timeout (seen: 5 minutes, one run in three). Left
	// out by the member's gRPC endpoint instead (the same URL without a proxy).
	if err := replaceIn(filepath.Join(dir, "robustness", "failpoint", "network.go"),
		"if ep == blackholedMember.Config().ClientURL {", "if ep == blackholedMember.EndpointsGRPC()[0] {"); err != nil {
		return "", err
	}
	b, err := os.ReadFile(filepath.Join(filepath.Dir(o.expected), "testdata", "cluster_epp37.go"))
	if err != nil {
		return "", err
	}
	if err := os.WriteFile(filepath.Join(fw, "cluster_epp.go"), b, 0o644); err != nil {
		return "", err
	}
	bin := filepath.Join(o.work, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return "", err
	}
	_ = os.Remove(filepath.Join(bin, "etcd"))
	if err := os.Symlink(filepath.Join(o.tools, "etcd-3.7"), filepath.Join(bin, "etcd")); err != nil {
		return "", err
	}
	return dir, nil
}

// runRobustnessVariant builds the robustness test binary with the variant's tags and runs each -run pattern in
// a process of its own.
func runRobustnessVariant(o options, dir, variant, tags string, tests []string) ([]robustnessRun, error) {
	testBin := filepath.Join(o.work, variant, "robustness.test")
	c := exec.Command("go", "test", "-c", "-tags", tags, "-o", testBin, "./robustness")
	c.Dir = dir
	start := time.Now()
	if _, err := output(c); err != nil {
		return nil, err
	}
	fmt.Printf("built the robustness suite for %s in %s\n", variant, time.Since(start).Round(time.Second))
	logPath := filepath.Join(o.work, variant, "robustness.jsonl")
	log, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer log.Close()
	var runs []robustnessRun
	results := filepath.Join(o.work, variant, "results")
	for _, t := range tests {
		got, err := runRobustnessTest(o, dir, testBin, t, results, log)
		if err != nil {
			return nil, err
		}
		// A failed scenario is tried again (-retries); one that then passes is reported as flaky, with what
		// failed the first time.
		for try := 0; try < o.retries && anyFailed(got); try++ {
			again, err := runRobustnessTest(o, dir, testBin, t, results, log)
			if err != nil {
				return nil, err
			}
			if !anyFailed(again) {
				for i := range again {
					again[i].result = "flaky"
					again[i].details += " (first try: " + got[i%len(got)].details + ")"
				}
			}
			got = again
		}
		for i := range got {
			got[i].variant = variant
			fmt.Printf("  %s %s %s (%s) %s\n", variant, got[i].result, got[i].test, got[i].time, got[i].details)
		}
		runs = append(runs, got...)
	}
	return runs, nil
}

func anyFailed(runs []robustnessRun) bool {
	for _, r := range runs {
		if r.result == "fail" {
			return true
		}
	}
	return false
}

// runRobustnessTest runs the tests that match one -run pattern in a process of their own; it returns the
// scenarios (subtests) that ran.
func runRobustnessTest(o options, dir, testBin, t, results string, log io.Writer) ([]robustnessRun, error) {
	c := exec.Command("go", "tool", "test2json", "-t", "-p", "robustness", testBin, "-test.v=test2json",
		"-test.count=1", "-test.timeout="+o.timeout.String(), "-test.run="+t, "-bin-dir="+filepath.Join(o.work, "bin"))
	c.Dir = filepath.Join(dir, "robustness")
	c.Env = append(os.Environ(), "EPP_PROXY_BIN="+o.proxy, "RESULTS_DIR="+results)
	var out bytes.Buffer
	c.Stdout, c.Stderr = io.MultiWriter(&out, log), log
	werr := c.Run()
	if leaked := reapOrphans(); len(leaked) > 0 {
		fmt.Printf("  %s left processes running (killed): %s\n", t, strings.Join(leaked, ", "))
	}
	var exit *exec.ExitError
	if werr != nil && !errors.As(werr, &exit) {
		return nil, werr
	}
	return readRobustness(out.Bytes(), t)
}

// readRobustness reads a test2json stream: the scenarios (subtests) that ran, their results and run times, and
// the fault, traffic and verdicts their logs report. A binary that failed before a test began is one failed run.
func readRobustness(out []byte, pattern string) ([]robustnessRun, error) {
	r := &pkgResult{Tests: map[string]string{}}
	if err := r.read(bytes.NewReader(out)); err != nil {
		return nil, err
	}
	times, details := map[string]string{}, map[string]string{}
	readElapsed(out, times, details)
	var runs []robustnessRun
	for _, name := range r.order {
		if strings.Contains(name, "/") {
			runs = append(runs, robustnessRun{test: name, result: r.Tests[name], time: times[name], details: details[name]})
		}
	}
	if len(runs) == 0 {
		name := pattern
		if len(r.order) > 0 {
			name = r.order[0]
		}
		runs = append(runs, robustnessRun{test: name, result: "fail", time: times[name], details: details[name]})
	}
	return runs, nil
}

// verdictRe matches the log lines of the robustness suite that say which fault it injected, how much traffic
// it ran and what its validators found.
var verdictRe = regexp.MustCompile(`(Triggering failpoint)\s+\{"failpoint": "([^"]+)"|` +
	`(Reporting complete traffic)\s+\{"successes": (\d+), "failures": (\d+)|` +
	`(Linearization|Watch validation|Serializable validation) (success|failed|illegal|timed out|deadline exceeded)|` +
	`(failed triggering failpoint|failed to verify cluster health[^"]*)`)

// readElapsed reads each test's run time from test2json's pass and fail events, and the robustness suite's
// fault, traffic and verdicts from its output.
func readElapsed(out []byte, times, details map[string]string) {
	for _, line := range bytes.Split(out, []byte("\n")) {
		var e struct {
			Action, Test, Output string
			Elapsed              float64
		}
		if json.Unmarshal(line, &e) != nil || e.Test == "" {
			continue
		}
		switch e.Action {
		case "pass", "fail", "skip":
			times[e.Test] = (time.Duration(e.Elapsed*1000) * time.Millisecond).String()
		case "output":
			m := verdictRe.FindStringSubmatch(strings.TrimSpace(e.Output))
			var d string
			switch {
			case m == nil:
				continue
			case m[1] != "":
				d = "fault " + m[2]
			case m[3] != "":
				d = m[4] + " requests ok, " + m[5] + " failed"
			case m[6] != "":
				d = strings.ToLower(m[6]) + " " + m[7]
			default:
				d = m[8]
			}
			if details[e.Test] != "" {
				d = details[e.Test] + "; " + d
			}
			details[e.Test] = d
		}
	}
}
