package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Members of a newer etcd line than the pinned one cannot be embedded (their modules fight ours), so they run
// as processes of a binary built from their own module under tools/: WithVersion("3.6") starts tool "etcd-3.6".
// WithProcesses runs the pinned etcd (tool "etcd") the same way, for the failures an embedded member cannot
// have: SIGKILL, SIGSTOP, a process that exits (Member.Signal).

// EtcdVersions are the etcd lines WithVersion accepts, oldest first; "" (the pinned v3.5.35) is not
// among them.
var EtcdVersions = []string{"3.6", "3.7"}

// WithVersion runs the members as processes of etcd v (one of EtcdVersions) instead of embedded v3.5.35 ones;
// "" keeps them embedded. Those members serve no v2 API (3.6 removed it).
func WithVersion(v string) ClusterOption {
	return clusterOptionFunc(func(c *clusterConfig) { c.version = v })
}

// WithProcesses runs the members as processes of the pinned etcd (v3.5.35, with the v2 API as the embedded ones)
// instead of embedding them. WithVersion implies it.
func WithProcesses() ClusterOption {
	return clusterOptionFunc(func(c *clusterConfig) { c.process = true })
}

// memberProc is a member running as an etcd process.
type memberProc struct {
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // Wait's result, set before exited is closed
}

// done reports whether p has exited.
func (p *memberProc) done() bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}

// processArgs is the command line of m: the same settings memberConfig gives an embedded member, as flags; v2
// turns the v2 API on (only the pinned etcd has it).
func processArgs(m *Member, token, initial string, tls, v2 bool) []string {
	args := []string{
		"--name=" + m.Name,
		"--data-dir=" + m.Dir,
		"--listen-client-urls=" + m.ClientURL, "--advertise-client-urls=" + m.ClientURL,
		"--listen-peer-urls=" + m.PeerURL, "--initial-advertise-peer-urls=" + m.PeerURL,
		"--initial-cluster=" + initial,
		"--initial-cluster-token=" + token,
		"--initial-cluster-state=new",
		"--log-level=error",
	}
	if v2 {
		args = append(args, "--enable-v2")
	}
	if tls {
		args = append(args,
			"--cert-file="+m.TLS.CertFile, "--key-file="+m.TLS.KeyFile, "--trusted-ca-file="+m.TLS.CAFile,
			"--client-cert-auth",
			"--peer-cert-file="+m.TLS.CertFile, "--peer-key-file="+m.TLS.KeyFile,
			"--peer-trusted-ca-file="+m.TLS.CAFile, "--peer-client-cert-auth")
	}
	return args
}

// logFile is where a process member's stdout and stderr go: beside its data directory, as an embedded
// member's log.
func (m *Member) logFile() string { return filepath.Join(m.Dir, "..", m.Name+".log") }

// startProcess starts m's process; it does not wait for it to serve (waitServing does).
func (m *Member) startProcess() error {
	logf, err := os.OpenFile(m.logFile(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("harness: %s log: %w", m.Name, err)
	}
	defer logf.Close() // the child has its own copy
	fmt.Fprintf(logf, "# %s %s\n", m.bin, strings.Join(m.args, " "))
	cmd := exec.Command(m.bin, m.args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("harness: start %s: %w", m.Name, err)
	}
	p := &memberProc{cmd: cmd, exited: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	m.mu.Lock()
	m.proc = p
	m.mu.Unlock()
	return nil
}

// client is a clientv3 client of m alone, with the cluster's client certificate.
func (m *Member) client(ctx context.Context) (*clientv3.Client, error) {
	tc, err := m.clientTLS.ClientConfig()
	if err != nil {
		return nil, err
	}
	return clientv3.New(clientv3.Config{
		Endpoints:   []string{m.ClientURL},
		TLS:         tc,
		DialTimeout: time.Second,
		Logger:      zap.NewNop(),
		Context:     ctx,
	})
}

// waitServing polls Status on the process member until it answers with its computed ID and a leader (an etcd
// member serves clients only once it is ready, as ReadyNotify), the process exits or ctx ends. It returns the
// cluster ID. A process that lost a port race says "address already in use" in the returned error.
func (m *Member) waitServing(ctx context.Context) (uint64, error) {
	p := m.process()
	if p == nil {
		return 0, fmt.Errorf("harness: %s is not running", m.Name)
	}
	cli, err := m.client(ctx)
	if err != nil {
		return 0, fmt.Errorf("harness: client of %s: %w", m.Name, err)
	}
	defer cli.Close()
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		st, err := cli.Status(cctx, m.ClientURL)
		cancel()
		switch {
		case err != nil:
			last = err
		case st.Header.MemberId != m.ID:
			return 0, fmt.Errorf("harness: %s has ID %x, computed %x", m.Name, st.Header.MemberId, m.ID)
		case st.Leader != 0:
			return st.Header.ClusterId, nil
		default:
			last = errors.New("no leader yet")
		}
		select {
		case <-p.exited:
			log, _ := os.ReadFile(m.logFile())
			if strings.Contains(string(log), "address already in use") {
				return 0, fmt.Errorf("harness: %s exited: address already in use (log %s)", m.Name, m.logFile())
			}
			return 0, fmt.Errorf("harness: %s exited: %v (log %s)", m.Name, p.err, m.logFile())
		case <-ctx.Done():
			return 0, fmt.Errorf("harness: %s not serving: %w (last: %v)", m.Name, ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stopProcess ends p as an operator would (SIGTERM), and kills it if it has not exited when ctx ends.
func stopProcess(ctx context.Context, name string, p *memberProc) error {
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("harness: stop %s: %w", name, err)
	}
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.exited:
		return fmt.Errorf("harness: stop %s: killed, SIGTERM did not end it: %w", name, ctx.Err())
	case <-time.After(10 * time.Second):
		return fmt.Errorf("harness: stop %s: still running 10s after SIGKILL", name)
	}
}

// processLeader asks m which member leads; 0 when it cannot say within a second.
func (m *Member) processLeader() uint64 {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	cli, err := m.client(ctx)
	if err != nil {
		return 0
	}
	defer cli.Close()
	st, err := cli.Status(ctx, m.ClientURL)
	if err != nil {
		return 0
	}
	return st.Leader
}

// moveLeaderProcess asks the leader lead to hand leadership to target.
func moveLeaderProcess(ctx context.Context, lead, target *Member) error {
	cli, err := lead.client(ctx)
	if err != nil {
		return err
	}
	defer cli.Close()
	_, err = cli.MoveLeader(ctx, target.ID)
	return err
}

// restartProcess starts a stopped process member again on its data directory (etcd ignores the initial-cluster
// flags then) and waits until it serves; a start that finds its ports still taken is tried again until ctx ends.
func (m *Member) restartProcess(ctx context.Context) error {
	for {
		if err := m.startProcess(); err != nil {
			return err
		}
		_, err := m.waitServing(ctx)
		if err == nil {
			return nil
		}
		m.mu.Lock()
		p := m.proc
		m.proc = nil
		m.mu.Unlock()
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_ = stopProcess(sctx, m.Name, p)
		cancel()
		if !isAddrInUse(err) || ctx.Err() != nil {
			return fmt.Errorf("harness: restart %s: %w", m.Name, err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("harness: restart %s: %w (last: %v)", m.Name, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// discard stops a member whose data is thrown away: an embedded one as Stop does, a process at once (a leader
// given SIGTERM tries to hand leadership over to members that are stopping too, and waits seconds for that).
func (m *Member) discard(ctx context.Context) error {
	if m.process() == nil {
		return m.Stop(ctx)
	}
	return m.kill(ctx)
}

// kill ends a process member at once (SIGKILL); a stopped member is left alone.
func (m *Member) kill(ctx context.Context) error {
	m.mu.Lock()
	p := m.proc
	m.proc = nil
	m.mu.Unlock()
	if p == nil {
		return nil
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("harness: kill %s: %w", m.Name, err)
	}
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("harness: kill %s: still running: %w", m.Name, ctx.Err())
	}
}

// Signal sends sig to a process member's process: syscall.SIGTERM (etcd stops gracefully), SIGKILL, SIGSTOP (the
// process keeps its sockets open and answers nothing: the kernel still accepts connections), SIGCONT. Once the
// process has exited (Exited), the member counts as stopped: Restart starts it again; Close kills a stopped
// (SIGSTOP) process too.
func (m *Member) Signal(sig syscall.Signal) error {
	p := m.process()
	if p == nil {
		return fmt.Errorf("harness: signal %s to %s: no process", sig, m.Name)
	}
	if err := p.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("harness: signal %s to %s: %w", sig, m.Name, err)
	}
	return nil
}

// Exited is closed when the process member's current process has exited; nil when the member has no process
// (embedded, or stopped with Stop).
func (m *Member) Exited() <-chan struct{} {
	if p := m.process(); p != nil {
		return p.exited
	}
	return nil
}

// Pid is the process ID of the member's current process; 0 when it has none.
func (m *Member) Pid() int {
	if p := m.process(); p != nil {
		return p.cmd.Process.Pid
	}
	return 0
}
