package harness

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// ProcessCluster is a cluster of etcd members, each a process of the pinned etcd binary: for the failures an
// embedded member cannot have — SIGKILL, SIGSTOP, a process that exits. Plain HTTP only.
type ProcessCluster struct {
	// Members in start order; member i is named "<cluster>member-i".
	Members []*ProcessMember
}

// ProcessMember is one etcd process of a ProcessCluster.
type ProcessMember struct {
	// Name is the member's etcd name and its placeholder.
	Name string
	// ClientURL and PeerURL are the member's only client and peer URLs.
	ClientURL, PeerURL string
	// Dir is the data directory; LogFile receives the process's output.
	Dir, LogFile string
	// Args is the command line after the binary.
	Args []string

	bin    string
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{} // closed when the current process has exited
}

// StartProcessCluster starts n etcd member processes and returns once each answers GET /health with 200 (the
// cluster has a leader) or ctx ends. Ports come from 127.0.0.1:0; a start that loses a port race is retried.
func (e *Env) StartProcessCluster(ctx context.Context, n int) (*ProcessCluster, error) {
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	bin, err := Tool(ctx, "etcd")
	if err != nil {
		return nil, err
	}
	prefix := e.nextName("pcluster")
	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		c, err := startProcessCluster(ctx, e, bin, prefix, filepath.Join(e.Dir, fmt.Sprintf("%s-try-%d", prefix, attempt)), n)
		if err == nil {
			e.Defer(prefix, c.Close)
			for _, m := range c.Members {
				e.Register(hostPort(m.ClientURL), m.Name)
				e.Register(hostPort(m.PeerURL), m.Name+"-peer")
				e.logf("harness: %s (pid %d) client %s peer %s", m.Name, m.Pid(), m.ClientURL, m.PeerURL)
			}
			return c, nil
		}
		lastErr = err
		if !strings.Contains(err.Error(), "address already in use") || ctx.Err() != nil {
			break
		}
	}
	return nil, fmt.Errorf("harness: %s: %w", prefix, lastErr)
}

func startProcessCluster(ctx context.Context, e *Env, bin, prefix, dir string, n int) (*ProcessCluster, error) {
	ports, err := freePorts(2 * n)
	if err != nil {
		return nil, err
	}
	c := &ProcessCluster{}
	var initial []string
	for i := range n {
		m := &ProcessMember{
			Name:      fmt.Sprintf("%s-member-%d", prefix, i),
			ClientURL: fmt.Sprintf("http://127.0.0.1:%d", ports[2*i]),
			PeerURL:   fmt.Sprintf("http://127.0.0.1:%d", ports[2*i+1]),
			bin:       bin,
		}
		m.Dir = filepath.Join(dir, m.Name)
		m.LogFile = filepath.Join(dir, m.Name+".log")
		c.Members = append(c.Members, m)
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	token := "epp-" + randomHex(8)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	for _, m := range c.Members {
		m.Args = []string{"--name=" + m.Name, "--data-dir=" + m.Dir,
			"--listen-client-urls=" + m.ClientURL, "--advertise-client-urls=" + m.ClientURL,
			"--listen-peer-urls=" + m.PeerURL, "--initial-advertise-peer-urls=" + m.PeerURL,
			"--initial-cluster=" + strings.Join(initial, ","), "--initial-cluster-token=" + token,
			"--initial-cluster-state=new", "--enable-v2", "--log-level=error"}
		if err := m.start(); err != nil {
			_ = c.Close()
			return nil, err
		}
	}
	for _, m := range c.Members {
		if err := m.waitHealthy(ctx); err != nil {
			_ = c.Close()
			return nil, err
		}
	}
	return c, nil
}

func (m *ProcessMember) start() error {
	logf, err := os.OpenFile(m.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("harness: %s: open log: %w", m.Name, err)
	}
	defer logf.Close() // the child has its own copy
	fmt.Fprintf(logf, "# %s %s\n", m.bin, strings.Join(m.Args, " "))
	cmd := exec.Command(m.bin, m.Args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("harness: start %s: %w", m.Name, err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(exited)
	}()
	m.mu.Lock()
	m.cmd, m.exited = cmd, exited
	m.mu.Unlock()
	return nil
}

// waitHealthy polls GET /health until it answers 200, the process exits or ctx ends.
func (m *ProcessMember) waitHealthy(ctx context.Context) error {
	cl := &http.Client{Timeout: time.Second}
	defer cl.CloseIdleConnections()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, m.ClientURL+"/health", nil)
		if resp, err := cl.Do(req); err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-m.Exited():
			b, _ := os.ReadFile(m.LogFile)
			return fmt.Errorf("%s exited while starting: %s", m.Name, lastLines(string(b), 5))
		case <-ctx.Done():
			return fmt.Errorf("%s not healthy: %w", m.Name, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// Pid is the process ID of the running process (0 before a start).
func (m *ProcessMember) Pid() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cmd == nil || m.cmd.Process == nil {
		return 0
	}
	return m.cmd.Process.Pid
}

// Exited is closed when the current process has exited.
func (m *ProcessMember) Exited() <-chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.exited
}

// Signal sends sig to the current process: syscall.SIGTERM (etcd stops gracefully), SIGKILL, SIGSTOP (the
// process keeps its sockets open and answers nothing: the kernel still accepts connections), SIGCONT.
func (m *ProcessMember) Signal(sig syscall.Signal) error {
	m.mu.Lock()
	cmd := m.cmd
	m.mu.Unlock()
	if cmd == nil {
		return fmt.Errorf("harness: %s: not started", m.Name)
	}
	if err := cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("harness: signal %s to %s: %w", sig, m.Name, err)
	}
	return nil
}

// Restart starts the member again, with the same data directory and ports, after its process exited, and waits
// until it is healthy. The other members must be able to form a quorum with it.
func (m *ProcessMember) Restart(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	select {
	case <-m.Exited():
	default:
		return fmt.Errorf("harness: restart %s: still running", m.Name)
	}
	if err := m.start(); err != nil {
		return err
	}
	return m.waitHealthy(ctx)
}

// kill ends the process whatever its state (a stopped one too) and waits for it.
func (m *ProcessMember) kill() error {
	m.mu.Lock()
	cmd, exited := m.cmd, m.exited
	m.mu.Unlock()
	if cmd == nil {
		return nil
	}
	select {
	case <-exited:
		return nil
	default:
	}
	_ = cmd.Process.Signal(syscall.SIGCONT)
	if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill %s: %w", m.Name, err)
	}
	select {
	case <-exited:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s did not exit 10s after SIGKILL", m.Name)
	}
}

// Close kills every member process still running and waits for them.
func (c *ProcessCluster) Close() error {
	var errs []error
	for _, m := range c.Members {
		if err := m.kill(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Endpoint is every member's client URL (plain HTTP).
func (c *ProcessCluster) Endpoint() Endpoint {
	ep := Endpoint{Name: "members"}
	for _, m := range c.Members {
		ep.URLs = append(ep.URLs, m.ClientURL)
	}
	return ep
}
