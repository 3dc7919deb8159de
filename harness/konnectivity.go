package harness

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/agent"
)

// Konnectivity is a stock konnectivity server (apiserver-network-proxy, the version tools/konnectivity pins) in
// gRPC or http-connect mode, mTLS on both of its sides with certificates of its own CA: clients (a proxy-proxy's
// --upstream-via konnectivity://) on Addr, agents on AgentAddr.
type Konnectivity struct {
	Name string
	// Addr is the frontend's host:port.
	Addr string
	// ClientTLS is what a frontend client presents and trusts.
	ClientTLS TLSFiles
	// AgentAddr is where agents connect; AgentTLS is what an agent presents and trusts.
	AgentAddr string
	AgentTLS  TLSFiles
	// CA signs every certificate of the tunnel; it is neither the cluster's nor the clients'.
	CA *CA

	env    *Env
	health string // the server's health URL (readyz: an agent is connected)
	agents int
}

// konnectivityPort picks a port that was free a moment ago below the kernel's ephemeral range: the stock server
// and agent refuse ports above 49151 ("please do not try to use ephemeral port").
func konnectivityPort() (int, error) {
	for range 50 {
		p := 10000 + rand.IntN(22000)
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err == nil {
			_ = l.Close()
			return p, nil
		}
	}
	return 0, errors.New("harness: no free port below 32000")
}

func konnectivityPorts(n int) ([]int, error) {
	var ps []int
	for len(ps) < n {
		p, err := konnectivityPort()
		if err != nil {
			return nil, err
		}
		if !contains(ps, p) {
			ps = append(ps, p)
		}
	}
	return ps, nil
}

func contains(l []int, v int) bool {
	for _, x := range l {
		if x == v {
			return true
		}
	}
	return false
}

// KonnectivityOption configures StartKonnectivity.
type KonnectivityOption func(*konnectivityConfig)

type konnectivityConfig struct{ mode string }

// KonnectivityHTTPConnect runs the server's frontend in http-connect mode (HTTP CONNECT over mTLS) instead of
// gRPC.
func KonnectivityHTTPConnect() KonnectivityOption {
	return func(c *konnectivityConfig) { c.mode = "http-connect" }
}

// StartKonnectivity starts the stock konnectivity server (gRPC mode unless an option says otherwise) and waits
// until it answers its health check. Agents are started with StartStockAgent (or are a test's own).
func (e *Env) StartKonnectivity(ctx context.Context, opts ...KonnectivityOption) (*Konnectivity, error) {
	cfg := konnectivityConfig{mode: "grpc"}
	for _, o := range opts {
		o(&cfg)
	}
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	bin, err := Tool(ctx, "konnectivity-server")
	if err != nil {
		return nil, err
	}
	name := e.nextName("konnectivity")
	k := &Konnectivity{Name: name, env: e}
	if k.CA, err = NewCA(filepath.Join(e.Dir, name+"-ca"), name+"-ca"); err != nil {
		return nil, err
	}
	server, err := k.CA.Issue("server", ServerAuth())
	if err != nil {
		return nil, err
	}
	if k.ClientTLS, err = k.CA.Issue("frontend-client", ClientAuth()); err != nil {
		return nil, err
	}
	if k.AgentTLS, err = k.CA.Issue("agent", ClientAuth()); err != nil {
		return nil, err
	}
	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		ports, err := konnectivityPorts(4)
		if err != nil {
			return nil, err
		}
		k.Addr = fmt.Sprintf("127.0.0.1:%d", ports[0])
		k.AgentAddr = fmt.Sprintf("127.0.0.1:%d", ports[1])
		k.health = fmt.Sprintf("http://127.0.0.1:%d", ports[3])
		args := []string{"--mode=" + cfg.mode, "--server-count=1", "--server-id=" + name,
			"--server-bind-address=127.0.0.1", "--server-port=" + strconv.Itoa(ports[0]),
			"--server-cert=" + server.CertFile, "--server-key=" + server.KeyFile, "--server-ca-cert=" + k.CA.CertFile,
			"--agent-bind-address=127.0.0.1", "--agent-port=" + strconv.Itoa(ports[1]),
			"--cluster-cert=" + server.CertFile, "--cluster-key=" + server.KeyFile, "--cluster-ca-cert=" + k.CA.CertFile,
			"--admin-bind-address=127.0.0.1", "--admin-port=" + strconv.Itoa(ports[2]),
			"--health-bind-address=127.0.0.1", "--health-port=" + strconv.Itoa(ports[3]),
		}
		p, err := e.startProc(name, bin, args)
		if err != nil {
			return nil, err
		}
		lastErr = waitProc(ctx, p, k.health+"/healthz")
		if lastErr == nil {
			e.Register(k.Addr, name)
			e.Register(k.AgentAddr, name+"-agents")
			e.logf("harness: %s serving on %s, agents on %s", name, k.Addr, k.AgentAddr)
			return k, nil
		}
		_ = p.stop()
		if !p.logHas("address already in use") || ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("harness: %s: %w", name, lastErr)
}

// StartStockAgent starts a stock konnectivity agent connected to the server, with id as its agent ID, and waits
// until the server is ready (an agent is connected). The agent dials whatever the server asks of it. kill kills
// it (the Env's Close does too).
func (k *Konnectivity) StartStockAgent(ctx context.Context, id string) (kill func() error, err error) {
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	bin, err := Tool(ctx, "konnectivity-agent")
	if err != nil {
		return nil, err
	}
	k.agents++
	name := fmt.Sprintf("%s-agent-%d", k.Name, k.agents)
	host, port, _ := net.SplitHostPort(k.AgentAddr)
	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		ports, err := konnectivityPorts(2)
		if err != nil {
			return nil, err
		}
		args := []string{"--agent-id=" + id, "--proxy-server-host=" + host, "--proxy-server-port=" + port,
			"--agent-cert=" + k.AgentTLS.CertFile, "--agent-key=" + k.AgentTLS.KeyFile, "--ca-cert=" + k.CA.CertFile,
			"--health-server-host=127.0.0.1", "--health-server-port=" + strconv.Itoa(ports[0]),
			"--admin-bind-address=127.0.0.1", "--admin-server-port=" + strconv.Itoa(ports[1]),
			"--sync-interval=100ms", "--probe-interval=100ms",
		}
		p, err := k.env.startProc(name, bin, args)
		if err != nil {
			return nil, err
		}
		lastErr = waitProc(ctx, p, k.health+"/readyz")
		if lastErr == nil {
			k.env.logf("harness: %s connected to %s", name, k.Name)
			return p.stop, nil
		}
		_ = p.stop()
		if !p.logHas("address already in use") || ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("harness: %s: %w", name, lastErr)
}

// WaitAgent waits until the server is ready: an agent is connected (an agent that is not a stock one).
func (k *Konnectivity) WaitAgent(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	return waitProc(ctx, nil, k.health+"/readyz")
}

// ClientConfig is the TLS configuration of a frontend client (tests that dial the server themselves).
func (k *Konnectivity) ClientConfig() (*tls.Config, error) { return k.ClientTLS.ClientConfig() }

// proc is a started tool process, killed at the Env's Close.
type proc struct {
	name, log string
	cmd       *exec.Cmd
	exited    chan struct{}
	err       error
}

func (e *Env) startProc(name, bin string, args []string) (*proc, error) {
	p := &proc{name: name, log: filepath.Join(e.Dir, name+".log"), exited: make(chan struct{})}
	logf, err := os.OpenFile(p.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("harness: %s: open log: %w", name, err)
	}
	defer logf.Close() // the child has its own copy
	fmt.Fprintf(logf, "# %s %s\n", bin, strings.Join(args, " "))
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("harness: start %s: %w", bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	e.Defer(name, p.stop)
	return p, nil
}

// stop kills the process and waits for it; stopping a stopped one does nothing.
func (p *proc) stop() error {
	select {
	case <-p.exited:
		return nil
	default:
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %s: %w", p.name, err)
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s did not exit 10s after SIGKILL", p.name)
	}
}

func (p *proc) logHas(s string) bool {
	b, err := os.ReadFile(p.log)
	return err == nil && strings.Contains(string(b), s)
}

// waitProc polls url until it answers 200, the process (if any) exits or ctx ends.
func waitProc(ctx context.Context, p *proc, url string) error {
	c := &http.Client{Timeout: time.Second}
	last := ""
	for {
		resp, err := c.Get(url)
		if err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		var exited chan struct{} // nil without a process: never ready
		if p != nil {
			exited = p.exited
		}
		select {
		case <-exited:
			return fmt.Errorf("%s exited: %v (log %s)", p.name, p.err, p.log)
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w (last: %s)", url, ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Metric returns the sum of the server's samples of a metric (every label set); -1 when it cannot be read.
func (k *Konnectivity) Metric(ctx context.Context, name string) float64 {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.health+"/metrics", nil)
	if err != nil {
		return -1
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return -1
	}
	sum := 0.0
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) == 2 && (f[0] == name || strings.HasPrefix(f[0], name+"{")) {
			v, _ := strconv.ParseFloat(f[1], 64)
			sum += v
		}
	}
	return sum
}

// RunAgent runs our agent (package agent) of cfg, logging to logs, until the returned stop, which waits for its
// end and fails t if it does not come within 10 s; stop again is a no-op, and it is called at t's cleanup.
func RunAgent(t testing.TB, cfg agent.Config, logs *Buffer) (stop func()) {
	t.Helper()
	a, err := agent.New(cfg, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Error("the agent did not stop within 10 s of its context's end")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// NewTunnelPKI makes, in dir, a CA of its own for a proxy-proxy's --tunnel-listen and our agents, and issues the
// server's certificate (server) and an agent's (agent); the CAFile of each is that CA's.
func NewTunnelPKI(dir string) (server, agent TLSFiles, err error) {
	ca, err := NewCA(dir, "tunnel-ca")
	if err != nil {
		return TLSFiles{}, TLSFiles{}, err
	}
	if server, err = ca.Issue("tunnel-server", ServerAuth()); err != nil {
		return TLSFiles{}, TLSFiles{}, err
	}
	if agent, err = ca.Issue("agent", ClientAuth()); err != nil {
		return TLSFiles{}, TLSFiles{}, err
	}
	return server, agent, nil
}
