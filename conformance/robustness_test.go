package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// TestReadRobustness reads a test2json stream as the robustness suite writes it: one scenario passed with its
// fault, traffic and verdicts, one failed at the health check after its fault, and a binary that failed before
// any test began.
func TestReadRobustness(t *testing.T) {
	t.Parallel()
	var b strings.Builder
	ev := func(action, test, output string, elapsed float64) {
		line, _ := json.Marshal(map[string]any{"Action": action, "Test": test, "Output": output, "Elapsed": elapsed})
		b.Write(append(line, '\n'))
	}
	const top, a, c = "TestRobustnessRegression", "TestRobustnessRegression/Issue15220", "TestRobustnessRegression/Issue13766"
	ev("run", top, "", 0)
	ev("run", a, "", 0)
	ev("output", a, "    logger.go:146: 2026-11-28T11:19:48.120Z\tINFO\tTriggering failpoint\t{\"failpoint\": \"Kill\"}\n", 0)
	ev("output", a, "    logger.go:146: x\tINFO\tReporting complete traffic\t{\"successes\": 1396, \"failures\": 6, \"qps\": 699}\n", 0)
	ev("output", a, "    logger.go:146: x\tINFO\tLinearization success\t{\"duration\": \"62ms\"}\n", 0)
	ev("output", a, "    logger.go:146: x\tINFO\tWatch validation success\n", 0)
	ev("pass", a, "", 4.2)
	ev("run", c, "", 0)
	ev("output", c, "    logger.go:146: x\tINFO\tTriggering failpoint\t{\"failpoint\": \"blackholePeerNetwork\"}\n", 0)
	ev("output", c, "    main_test.go:142: failed to verify cluster health after failpoint injection, err: Unavailable\n", 0)
	ev("output", c, "    logger.go:146: x\tERROR\tLinearization illegal\n", 0)
	ev("fail", c, "", 6.5)
	ev("fail", top, "", 10.7)
	runs, err := readRobustness([]byte(b.String()), "^x$")
	if err != nil {
		t.Fatal(err)
	}
	want := []robustnessRun{
		{test: a, result: "pass", time: "4.2s", details: "fault Kill; 1396 requests ok, 6 failed; linearization success; watch validation success"},
		{test: c, result: "fail", time: "6.5s", details: "fault blackholePeerNetwork; " +
			"failed to verify cluster health after failpoint injection, err: Unavailable; linearization illegal"},
	}
	if len(runs) != len(want) {
		t.Fatalf("got %d runs %+v, want %+v", len(runs), runs, want)
	}
	for i := range want {
		if runs[i] != want[i] {
			t.Errorf("run %d:\n got %+v\nwant %+v", i, runs[i], want[i])
		}
	}
	runs, err = readRobustness([]byte("flag provided but not defined: -bin-dir\n"), "^TestX$")
	if err != nil {
		t.Fatal(err)
	}
	if len(runs) != 1 || runs[0].result != "fail" || runs[0].test != "^TestX$" {
		t.Errorf("a binary that failed before any test: got %+v, want one failed run", runs)
	}
	if anyFailed(runs[:0]) || !anyFailed(runs) {
		t.Error("anyFailed")
	}
}
