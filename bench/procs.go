package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat: 100 on every Linux architecture Go
// supports.
const clockTicks = 100

// proc is one child process: a member, a stock proxy or a proxy-proxy.
type proc struct {
	name    string
	cmd     *exec.Cmd
	logFile string
	exited  chan struct{}
	err     error // Wait's result, set before exited is closed
}

// procs owns every child process of a run, so that one deferred call kills them all.
type procs struct {
	mu      sync.Mutex
	list    []*proc
	dir     string // logs
	dataDir string // data directories, removed after the run
}

// start runs bin with args, its output in dir/name.log. The child gets SIGKILL when this process dies, so an
// interrupted run leaves nothing behind.
func (ps *procs) start(name, bin string, args ...string) (*proc, error) {
	ps.mu.Lock()
	for _, q := range ps.list {
		if strings.HasPrefix(q.name, name) {
			name += "+" // a restart after a lost port race: keep the first one's log
		}
	}
	ps.mu.Unlock()
	p := &proc{name: name, logFile: filepath.Join(ps.dir, name+".log"), exited: make(chan struct{})}
	logf, err := os.OpenFile(p.logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%s: log: %w", name, err)
	}
	defer logf.Close() // the child has its own copy
	fmt.Fprintf(logf, "# %s %s\n", bin, strings.Join(args, " "))
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: start %s: %w", name, bin, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	ps.mu.Lock()
	ps.list = append(ps.list, p)
	ps.mu.Unlock()
	return p, nil
}

// killAll kills every process still running and waits for it.
func (ps *procs) killAll() {
	ps.mu.Lock()
	list := ps.list
	ps.list = nil
	ps.mu.Unlock()
	for _, p := range list {
		p.kill()
	}
}

// kill sends SIGKILL and waits up to 5 s for the process to be reaped.
func (p *proc) kill() {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Kill()
	select {
	case <-p.exited:
	case <-time.After(5 * time.Second):
	}
}

// stop sends SIGINT (a graceful stop, e.g. so a profiling wrapper writes its profile) and waits until ctx ends.
func (p *proc) stop(ctx context.Context) error {
	_ = p.cmd.Process.Signal(os.Interrupt)
	select {
	case <-p.exited:
		return nil
	case <-ctx.Done():
		p.kill()
		return fmt.Errorf("%s did not stop on SIGINT: %w", p.name, ctx.Err())
	}
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// waitReady calls ready every 50 ms until it succeeds, the process exits or ctx ends.
func (p *proc) waitReady(ctx context.Context, ready func(context.Context) error) error {
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		last = ready(cctx)
		cancel()
		if last == nil {
			return nil
		}
		select {
		case <-p.exited:
			return fmt.Errorf("%s exited (%v) before it was ready; log %s", p.name, p.err, p.logFile)
		case <-ctx.Done():
			return fmt.Errorf("%s not ready: %w (last: %v); log %s", p.name, ctx.Err(), last, p.logFile)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// lostPortRace reports a start that failed because another program took the probed port meanwhile.
func (p *proc) lostPortRace() bool {
	b, err := os.ReadFile(p.logFile)
	return err == nil && strings.Contains(string(b), "address already in use")
}

// freeAddrs probes n free 127.0.0.1 ports by listening on 127.0.0.1:0. Another program may take one before the
// child binds it: starts retry with new ports when the log says so.
func freeAddrs(n int) ([]string, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var addrs []string
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("probing a free port: %w", err)
		}
		ls = append(ls, l)
		addrs = append(addrs, l.Addr().String())
	}
	return addrs, nil
}

// cpuTime is utime+stime of a process.
func cpuTime(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// Fields after the command name, which is in parentheses and may contain anything.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, errors.New("malformed /proc/PID/stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("short /proc/PID/stat")
	}
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * time.Second / clockTicks, nil
}

// statusKiB reads a "Vm…:  N kB" line of /proc/PID/status (VmRSS, VmHWM).
func statusKiB(pid int, field string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			return strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// resetPeakRSS sets VmHWM back to the current RSS (Linux ≥ 4.0), so that a row's peak is its own. It fails
// quietly where that is not allowed; the peak is then the process's lifetime peak.
func resetPeakRSS(pid int) bool {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0) == nil
}

// raiseFileLimit lifts RLIMIT_NOFILE (soft and hard) to at least want, for this process and the children it
// starts: 10,000 v2 long polls hold 20,000 sockets in the proxy. Raising the hard limit needs root; without it
// the soft limit goes as high as the hard one.
func raiseFileLimit(want uint64) (uint64, error) {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return 0, err
	}
	if r.Cur >= want {
		return r.Cur, nil
	}
	n := syscall.Rlimit{Cur: max(want, r.Cur), Max: max(want, r.Max)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &n); err != nil {
		n = syscall.Rlimit{Cur: r.Max, Max: r.Max}
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &n); err != nil {
			return r.Cur, err
		}
	}
	return n.Cur, nil
}

// checkLoopback refuses any URL or host:port that is not on 127.0.0.1: the load generator targets nothing else.
func checkLoopback(s string) error {
	host := s
	if strings.Contains(s, "://") {
		u, err := url.Parse(s)
		if err != nil {
			return err
		}
		host = u.Host
	}
	h, _, err := net.SplitHostPort(host)
	if err != nil {
		return fmt.Errorf("target %q: %w", s, err)
	}
	if h != "127.0.0.1" {
		return fmt.Errorf("target %q is not on 127.0.0.1: refused", s)
	}
	return nil
}
