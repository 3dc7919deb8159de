package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

type grpcConfig struct {
	tls       bool
	advertise bool
}

// WithAdvertise sets whether the grpc-proxy gets --advertise-client-url=its own address (true, the default) or
// an empty one (false). With an address, MemberList answers with the proxy alone; with none, it forwards
// MemberList and returns the members. (etcd's flag defaults to 127.0.0.1:23790, so "no advertise" has to be
// spelled --advertise-client-url=.)
func WithAdvertise(on bool) GRPCProxyOption {
	return grpcOptionFunc(func(c *grpcConfig) { c.advertise = on })
}

// GRPCProxy is a running `etcd grpc-proxy start` process.
type GRPCProxy struct {
	// Name is the placeholder of the proxy's address ("grpc-proxy").
	Name string
	// URL is the proxy's client URL.
	URL string
	// TLS is what a client presents and trusts; zero when plain.
	TLS TLSFiles
	// Args is the command line after the binary.
	Args []string
	// LogFile receives the process's stdout and stderr.
	LogFile string

	cmd    *exec.Cmd
	exited chan struct{}
	err    error // Wait's result, set before exited is closed
	killed bool
}

// StartGRPCProxy starts the real etcd binary's grpc-proxy in front of below and returns once a MemberList
// through it succeeds. Toward below it uses below.TLS (--cacert/--cert/--key; the certificate must have an
// empty common name, which Cluster.Endpoint's has). With WithTLS the listener serves a Client-CA certificate
// (--cert-file/--key-file) and --trusted-ca-file is the Client CA.
func (e *Env) StartGRPCProxy(ctx context.Context, below Endpoint, opts ...GRPCProxyOption) (*GRPCProxy, error) {
	cfg := grpcConfig{advertise: true}
	for _, o := range opts {
		o.applyGRPC(&cfg)
	}
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	bin, err := Tool(ctx, "etcd")
	if err != nil {
		return nil, err
	}
	name := e.nextName("grpc-proxy")
	p := &GRPCProxy{Name: name, LogFile: filepath.Join(e.Dir, name+".log")}
	var listener TLSFiles
	if cfg.tls {
		if listener, err = e.PKI.Client.Issue(name); err != nil {
			return nil, err
		}
		if p.TLS, err = e.PKI.Client.Issue(name+"-client", ClientAuth()); err != nil {
			return nil, err
		}
	}

	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		ports, err := freePorts(1)
		if err != nil {
			return nil, err
		}
		addr := fmt.Sprintf("127.0.0.1:%d", ports[0])
		p.URL = listener.Scheme() + "://" + addr
		advertise := ""
		if cfg.advertise {
			advertise = addr
		}
		p.Args = []string{"grpc-proxy", "start",
			"--endpoints=" + strings.Join(below.Hosts(), ","),
			"--listen-addr=" + addr,
			"--advertise-client-url=" + advertise,
			"--data-dir=" + filepath.Join(e.Dir, name+".data"),
		}
		if t := below.TLS; !t.IsZero() {
			p.Args = append(p.Args, "--cacert="+t.CAFile, "--cert="+t.CertFile, "--key="+t.KeyFile)
		}
		if !listener.IsZero() {
			p.Args = append(p.Args, "--cert-file="+listener.CertFile, "--key-file="+listener.KeyFile,
				"--trusted-ca-file="+listener.CAFile)
		}
		lastErr = p.start(ctx, bin)
		if lastErr == nil {
			e.Register(addr, name)
			break
		}
		if !p.lostPortRace() || ctx.Err() != nil {
			break
		}
	}
	if lastErr != nil {
		return nil, fmt.Errorf("harness: %s (log %s): %w", name, p.LogFile, lastErr)
	}
	e.Defer(name, p.Close)
	if h, err := os.Hostname(); err == nil {
		// MemberList through an advertising grpc-proxy names the one member after the proxy's host.
		e.RegisterWord(h, "$HOSTNAME")
	}
	e.logf("harness: %s serving on %s", name, p.URL)
	return p, nil
}

func (p *GRPCProxy) start(ctx context.Context, bin string) error {
	logf, err := os.OpenFile(p.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("open log: %w", err)
	}
	defer logf.Close() // the child has its own copy
	fmt.Fprintf(logf, "# %s %s\n", bin, strings.Join(p.Args, " "))
	cmd := exec.Command(bin, p.Args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", bin, err)
	}
	p.cmd = cmd
	p.exited = make(chan struct{})
	go func() {
		p.err = cmd.Wait()
		close(p.exited)
	}()
	if err := p.waitServing(ctx); err != nil {
		_ = p.Close()
		p.cmd, p.killed = nil, false
		return err
	}
	return nil
}

// waitServing polls MemberList through the proxy until it succeeds, the process exits or ctx ends.
func (p *GRPCProxy) waitServing(ctx context.Context) error {
	tc, err := p.TLS.ClientConfig()
	if err != nil {
		return err
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{p.URL},
		TLS:         tc,
		DialTimeout: time.Second,
		Logger:      zap.NewNop(),
		Context:     ctx,
	})
	if err != nil {
		return fmt.Errorf("client for readiness: %w", err)
	}
	defer cli.Close()
	var last error
	for {
		cctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := cli.MemberList(cctx)
		cancel()
		if err == nil {
			return nil
		}
		last = err
		select {
		case <-p.exited:
			return fmt.Errorf("grpc-proxy exited: %v", p.err)
		case <-ctx.Done():
			return fmt.Errorf("grpc-proxy not serving: %w (last: %v)", ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func (p *GRPCProxy) lostPortRace() bool {
	b, err := os.ReadFile(p.LogFile)
	return err == nil && strings.Contains(string(b), "address already in use")
}

// Endpoint is how a client reaches the proxy.
func (p *GRPCProxy) Endpoint() Endpoint {
	return Endpoint{Name: p.Name, URLs: []string{p.URL}, TLS: p.TLS}
}

// Close kills the process and waits for it. Calling Close again is a no-op.
func (p *GRPCProxy) Close() error {
	if p.cmd == nil {
		return nil
	}
	if p.killed {
		return nil
	}
	p.killed = true
	select {
	case <-p.exited:
		return fmt.Errorf("grpc-proxy had exited by itself: %v", p.err)
	default:
	}
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("kill grpc-proxy: %w", err)
	}
	select {
	case <-p.exited:
		return nil
	case <-time.After(10 * time.Second):
		return errors.New("grpc-proxy did not exit 10s after SIGKILL")
	}
}
