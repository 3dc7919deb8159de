package harness

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// DefaultCommandTimeout bounds an etcdctl run when the caller's context has no deadline.
const DefaultCommandTimeout = 20 * time.Second

// Endpoint is how a client reaches one part.
type Endpoint struct {
	// Name is the part's placeholder ("members", "stock-v2", "grpc-proxy" …).
	Name string
	// URLs are the client URLs, http:// or https://.
	URLs []string
	// TLS is what a client must present and trust; the zero value means plain.
	TLS TLSFiles
}

// Hosts returns the URLs without their scheme (host:port), as grpc-proxy's --endpoints takes them.
func (ep Endpoint) Hosts() []string {
	var h []string
	for _, u := range ep.URLs {
		h = append(h, hostPort(u))
	}
	return h
}

// Etcdctl runs the pinned etcdctl against one endpoint.
type Etcdctl struct {
	// API is 2 or 3 (ETCDCTL_API).
	API int
	// Endpoint is what --endpoints and the TLS flags are built from.
	Endpoint Endpoint
	// Env is added to the process environment (after ETCDCTL_API, so it can override it). Other ETCDCTL_*
	// variables of this process are not passed on.
	Env []string

	env *Env
}

// Result is one finished etcdctl run.
type Result struct {
	// Args is the whole command line after the program name, including the flags Run added.
	Args []string
	// API is the ETCDCTL_API the command ran with.
	API            int
	Stdout, Stderr string
	// Exit is the exit status; -1 when the process did not exit by itself (not started, killed at the deadline).
	Exit int
	// Err says why the command could not be run or was killed; nil for any exit status of a finished run.
	Err error
}

// Etcdctl returns a runner for API version api (2 or 3) against ep.
func (e *Env) Etcdctl(api int, ep Endpoint) *Etcdctl {
	return &Etcdctl{API: api, Endpoint: ep, env: e}
}

// Args returns the flags Run puts before the caller's arguments: --endpoints and the TLS flags of the API.
func (c *Etcdctl) Args() []string {
	args := []string{"--endpoints=" + strings.Join(c.Endpoint.URLs, ",")}
	t := c.Endpoint.TLS
	ca, cert, key := "--cacert", "--cert", "--key"
	if c.API == 2 {
		ca, cert, key = "--ca-file", "--cert-file", "--key-file"
	}
	if t.CAFile != "" {
		args = append(args, ca+"="+t.CAFile)
	}
	if t.CertFile != "" {
		args = append(args, cert+"="+t.CertFile, key+"="+t.KeyFile)
	}
	return args
}

// Run runs etcdctl with the endpoint flags followed by args, until it exits or ctx ends (DefaultCommandTimeout
// if ctx has no deadline). For API 2 the caller's global flags (--debug, --no-sync) go before the command
// name in args, as etcdctl v2 requires.
func (c *Etcdctl) Run(ctx context.Context, args ...string) Result {
	return c.RunWith(ctx, "", "", args...)
}

// RunWith is Run with stdin (empty: none) as the standard input and, if until is not empty, SIGINT sent once
// stdout has a line equal to until — for watch and elect, which run until interrupted. A command interrupted
// that way that dies of the signal has exit status -1 and no Err.
func (c *Etcdctl) RunWith(ctx context.Context, stdin, until string, args ...string) Result {
	full := append(c.Args(), args...)
	res := Result{Args: full, API: c.API, Exit: -1}
	bin, err := Tool(ctx, "etcdctl")
	if err != nil {
		res.Err = err
		return res
	}
	ctx, cancel := withDefaultTimeout(ctx, DefaultCommandTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, full...)
	cmd.Env = append(filteredEnviron(), fmt.Sprintf("ETCDCTL_API=%d", c.API))
	cmd.Env = append(cmd.Env, c.Env...)
	cmd.WaitDelay = 2 * time.Second
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	var stdout, stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err == nil {
		err = cmd.Start()
	}
	if err != nil {
		res.Err = fmt.Errorf("harness: etcdctl %s: %w", strings.Join(args, " "), err)
		return res
	}
	interrupted := false
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		stdout.WriteString(sc.Text() + "\n")
		if until != "" && !interrupted && sc.Text() == until {
			interrupted = cmd.Process.Signal(os.Interrupt) == nil
		}
	}
	err = cmd.Wait()
	res.Stdout, res.Stderr = stdout.String(), stderr.String()
	var exit *exec.ExitError
	switch {
	case err == nil:
		res.Exit = 0
	case ctx.Err() != nil:
		res.Err = fmt.Errorf("harness: etcdctl %s: %w", strings.Join(args, " "), ctx.Err())
	case errors.As(err, &exit) && exit.Exited():
		res.Exit = exit.ExitCode()
	case interrupted && errors.As(err, &exit):
	default:
		res.Err = fmt.Errorf("harness: etcdctl %s: %w", strings.Join(args, " "), err)
	}
	if c.env != nil {
		c.env.logf("harness: %s → exit %d", res.CommandLine(), res.Exit)
	}
	return res
}

// CommandLine is the command as a person would type it: ETCDCTL_API=N etcdctl ARGS.
func (r Result) CommandLine() string {
	return fmt.Sprintf("ETCDCTL_API=%d etcdctl %s", r.API, strings.Join(r.Args, " "))
}

// Check returns an error describing the run unless it exited 0.
func (r Result) Check() error {
	if r.Err != nil {
		return r.Err
	}
	if r.Exit != 0 {
		return fmt.Errorf("%s: exit %d\nstdout:\n%s\nstderr:\n%s", r.CommandLine(), r.Exit, r.Stdout, r.Stderr)
	}
	return nil
}

func filteredEnviron() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "ETCDCTL_") {
			env = append(env, kv)
		}
	}
	return env
}
