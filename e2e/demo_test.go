package e2e

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
)

// command is a command of this module, built once per test run.
type command struct {
	pkg  string // as go build takes it: ./cmd/...
	once sync.Once
	path string
	err  error
}

var (
	proxyCommand = &command{pkg: "./cmd/etcd-proxy-proxy"}
	demoCommand  = &command{pkg: "./cmd/demo"}
)

func (c *command) build(t testing.TB, ctx context.Context) string {
	t.Helper()
	c.once.Do(func() {
		root, err := harness.ModuleRoot()
		if err != nil {
			c.err = err
			return
		}
		dir, err := os.MkdirTemp("", "epp-bin-")
		if err != nil {
			c.err = err
			return
		}
		c.path = filepath.Join(dir, filepath.Base(c.pkg))
		cmd := exec.CommandContext(ctx, "go", "build", "-o", c.path, c.pkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			c.err = fmt.Errorf("go build %s: %v\n%s", c.pkg, err, out)
		}
	})
	if c.err != nil {
		t.Fatal(c.err)
	}
	return c.path
}

// proxyBinary builds cmd/etcd-proxy-proxy once per test run.
func proxyBinary(t testing.TB, ctx context.Context) string { return proxyCommand.build(t, ctx) }

// readmeDemoCommand is the demo's line in README.md's "## The two commands", which must be `go run ./cmd/demo`
// (the test runs the binary that go build makes of it: a signal to `go run` would not reach the demo).
func readmeDemoCommand(t *testing.T) string {
	t.Helper()
	root, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	_, section, _ := strings.Cut(string(b), "\n## The two commands\n")
	section, _, _ = strings.Cut(section, "\n## ")
	for line := range strings.Lines(section) {
		if cmd, _, _ := strings.Cut(line, "#"); strings.Contains(cmd, "demo") {
			return strings.TrimSpace(cmd)
		}
	}
	t.Fatal(`README.md: no demo command in "## The two commands"`)
	return ""
}

// TestDemo runs the demo as a user does (README.md's `go run ./cmd/demo`): it must print working etcdctl lines
// (run here exactly as printed, v2 and v3) and exit 0 soon after SIGINT. Everything runs in that one process, so
// its exit closes every port it opened.
func TestDemo(t *testing.T) {
	t.Parallel()
	if got, want := readmeDemoCommand(t), "go run "+demoCommand.pkg; got != want {
		t.Fatalf("README.md runs the demo with %q, want %q", got, want)
	}
	ctx := testContext(t, 3*time.Minute)
	bin := demoCommand.build(t, ctx)
	etcdctl, err := harness.Tool(ctx, "etcdctl")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.CommandContext(ctx, bin, "--dir", filepath.Join(t.TempDir(), "demo"))
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill() })

	var lines []string
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		lines = append(lines, sc.Text())
		if strings.HasPrefix(sc.Text(), "Press Ctrl-C") {
			break
		}
	}
	if len(lines) == 0 || !strings.HasPrefix(lines[len(lines)-1], "Press Ctrl-C") {
		t.Fatalf("demo did not come up; stdout:\n%s\nstderr:\n%s", strings.Join(lines, "\n"), stderr.String())
	}
	go func() { // keep draining so the demo never blocks on a full pipe
		for sc.Scan() {
		}
	}()
	out := strings.Join(lines, "\n")

	run := func(line string, env ...string) string {
		t.Helper()
		fields := strings.Fields(line)
		var vars []string
		for len(fields) > 0 && strings.Contains(fields[0], "=") && !strings.HasPrefix(fields[0], "-") {
			vars, fields = append(vars, fields[0]), fields[1:]
		}
		if fields[0] != "etcdctl" {
			t.Fatalf("not an etcdctl line: %q", line)
		}
		c := exec.CommandContext(ctx, etcdctl, fields[1:]...)
		c.Env = append(append(os.Environ(), env...), vars...)
		b, err := c.CombinedOutput()
		if err != nil {
			t.Fatalf("%s: %v\n%s", line, err, b)
		}
		return string(b)
	}
	find := func(re string) []string {
		t.Helper()
		m := regexp.MustCompile(re).FindAllString(out, -1)
		if len(m) == 0 {
			t.Fatalf("no line matching %s in:\n%s", re, out)
		}
		return m
	}
	// v2 lines through the stock v2 proxy chain.
	for _, line := range find(`(?m)^etcdctl .* (set foo bar|get foo|member list)$`) {
		got := run(line, "ETCDCTL_API=2")
		if strings.HasSuffix(line, "member list") && (strings.Count(got, "\n") != 1 || !strings.Contains(got, "name=etcd-proxy-proxy")) {
			t.Errorf("%s printed %q, want exactly the proxy-proxy", line, got)
		}
		if strings.HasSuffix(line, "get foo") && strings.TrimSpace(got) != "bar" {
			t.Errorf("%s printed %q", line, got)
		}
	}
	// v3 lines through the proxy-proxy chain.
	for _, line := range find(`(?m)^ETCDCTL_API=3 etcdctl .* (put foo bar|get foo|member list)$`) {
		got := run(line)
		if strings.HasSuffix(line, "member list") && (strings.Count(got, "\n") != 1 || !strings.Contains(got, "etcd-proxy-proxy")) {
			t.Errorf("%s printed %q, want exactly the proxy-proxy", line, got)
		}
	}

	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("demo exit: %v\nstderr:\n%s", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("demo did not stop within 30s of SIGINT")
	}
}
