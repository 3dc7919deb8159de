// The e2e framework's proxy starter for etcd-proxy-proxy, for go.etcd.io/etcd/tests/v3 at v3.7.x: the
// conformance runner (-suite robustness) copies this file into tests/framework/e2e of a copy of that module and
// builds with -tags cluster_proxy,epp. It mirrors etcd's 3.7 cluster_proxy.go (a grpc-proxy per member) with
// one etcd-proxy-proxy per member; 3.7 members have no v2, so the proxy serves v3 only (gRPC and the JSON
// gateway). etcd's starter listens on the member's port + 3, which 3.7's framework also gives a member's peer
// proxy (e2e.WithPeerProxy, the robustness suite's network faults); ours listens on the member's port + 10003. Unlike etcd's starter, the proxy outlives its member: a member
// killed and started again (the robustness suite's Kill failpoint) keeps its proxy, which reconnects to it. The
// binary is $EPP_PROXY_BIN.

//go:build cluster_proxy && epp

package e2e

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.uber.org/zap"

	"go.etcd.io/etcd/pkg/v3/expect"
	"go.etcd.io/etcd/tests/v3/framework/config"
)

type eppEtcdProcess struct {
	*EtcdServerProcess
	epp *eppProc
}

func NewEtcdProcess(t testing.TB, cfg *EtcdServerProcessConfig) (EtcdProcess, error) {
	ep, err := NewEtcdServerProcess(t, cfg)
	if err != nil {
		return nil, err
	}
	p, err := newEppProc(cfg)
	if err != nil {
		return nil, err
	}
	return &eppEtcdProcess{EtcdServerProcess: ep, epp: p}, nil
}

func (p *eppEtcdProcess) EndpointsHTTP() []string { return []string{p.epp.listen} }
func (p *eppEtcdProcess) EndpointsGRPC() []string { return []string{p.epp.listen} }
func (p *eppEtcdProcess) EndpointsMetrics() []string {
	panic("not implemented; proxy doesn't provide health information") // as etcd's starter
}

// Etcdctl goes to the member, as etcd's 3.7 starter has it; the cluster's Etcdctl goes through the proxies.
func (p *eppEtcdProcess) Etcdctl(opts ...config.ClientOption) *EtcdctlV3 {
	etcdctl, err := NewEtcdctl(p.EtcdServerProcess.Config().Client, p.EtcdServerProcess.EndpointsGRPC(), opts...)
	if err != nil {
		panic(err)
	}
	return etcdctl
}

func (p *eppEtcdProcess) Start(ctx context.Context) error {
	if err := p.EtcdServerProcess.Start(ctx); err != nil {
		return err
	}
	if p.epp.proc != nil { // still running after its member was killed
		return nil
	}
	return p.epp.Start(ctx)
}

func (p *eppEtcdProcess) Restart(ctx context.Context) error {
	if err := p.EtcdServerProcess.Restart(ctx); err != nil {
		return err
	}
	return p.epp.Restart(ctx)
}

func (p *eppEtcdProcess) Stop() error {
	err := p.epp.Stop()
	if eerr := p.EtcdServerProcess.Stop(); eerr != nil && err == nil {
		if !strings.Contains(eerr.Error(), "exit status 2") { // as etcd's starter
			err = eerr
		}
	}
	return err
}

func (p *eppEtcdProcess) Close() error {
	err := p.epp.Close()
	if eerr := p.EtcdServerProcess.Close(); eerr != nil && err == nil {
		if !strings.Contains(eerr.Error(), "exit status 2") {
			err = eerr
		}
	}
	return err
}

// eppProc is one etcd-proxy-proxy in front of one member.
type eppProc struct {
	lg     *zap.Logger
	name   string
	args   []string
	listen string // the member's client port + eppPortOffset
	proc   *expect.ExpectProcess
}

// eppPortOffset puts the proxy's port clear of the 5 ports per member the framework gives out from 20000.
const eppPortOffset = 10003

func newEppProc(cfg *EtcdServerProcessConfig) (*eppProc, error) {
	listen := proxyListenURL(cfg, eppPortOffset)
	// The grpc-proxy serves TLS whenever the member's client TLS flags are given; so do we.
	var tlsArgs []string
	tlsListener := false
	for i := 0; i < len(cfg.TLSArgs); i++ {
		switch cfg.TLSArgs[i] {
		case "--cert-file", "--key-file", "--trusted-ca-file", "--client-crl-file":
			tlsArgs = append(tlsArgs, cfg.TLSArgs[i], cfg.TLSArgs[i+1])
			tlsListener = tlsListener || cfg.TLSArgs[i] == "--cert-file"
			i++
		case "--client-cert-auth":
			tlsArgs = append(tlsArgs, "--client-cert-auth")
		case "--peer-trusted-ca-file", "--peer-cert-file", "--peer-key-file", "--cipher-suites":
			i++ // not the client side, or no such flag here
		case "--auto-tls":
			return nil, fmt.Errorf("etcd-proxy-proxy starter: --auto-tls members are not supported for v3.7")
		}
	}
	member := cfg.ClientURL
	if tlsListener {
		// Toward the member: a certificate without CN (as etcd's starter), so auth sees no user in it.
		tlsArgs = append(tlsArgs,
			"--upstream-cert-file", filepath.Join(FixturesDir, "client-nocn.crt"),
			"--upstream-key-file", filepath.Join(FixturesDir, "client-nocn.key.insecure"),
			"--upstream-ca-file", filepath.Join(FixturesDir, "ca.crt"))
		u, _ := url.Parse(listen)
		u.Scheme = "https"
		listen = u.String()
		if strings.HasPrefix(member, "http://") && slices.Contains(cfg.TLSArgs, "--cert-file") {
			member = "https://" + strings.TrimPrefix(member, "http://")
		}
	}
	bin := os.Getenv("EPP_PROXY_BIN")
	if bin == "" {
		return nil, fmt.Errorf("EPP_PROXY_BIN: the etcd-proxy-proxy binary is not set")
	}
	args := []string{bin,
		"--upstream", member,
		"--listen-client-urls", listen,
		"--advertise-client-urls", listen,
		"--name", cfg.Name + "-epp",
		"--shutdown-timeout", "1s",
		"--upstream-health-interval", "1s",
	}
	return &eppProc{lg: cfg.lg, name: cfg.Name + "-epp", args: append(args, tlsArgs...), listen: listen}, nil
}

// proxyListenURL is etcd's starter's: the member's client URL with its port moved by portOffset.
func proxyListenURL(cfg *EtcdServerProcessConfig, portOffset int) string {
	u, err := url.Parse(cfg.ClientURL)
	if err != nil {
		panic(err)
	}
	host, port, _ := net.SplitHostPort(u.Host)
	p, _ := strconv.Atoi(port)
	u.Host = net.JoinHostPort(host, strconv.Itoa(p+portOffset))
	return u.String()
}

func (pp *eppProc) Start(ctx context.Context) error {
	if pp.proc != nil {
		panic("already started")
	}
	proc, err := SpawnCmdWithLogger(pp.lg, pp.args, nil, pp.name)
	if err != nil {
		return err
	}
	pp.proc = proc
	return WaitReadyExpectProc(ctx, proc, []string{"etcd-proxy-proxy started"})
}

func (pp *eppProc) Restart(ctx context.Context) error {
	if err := pp.Stop(); err != nil {
		return err
	}
	return pp.Start(ctx)
}

func (pp *eppProc) Stop() error {
	if pp.proc == nil {
		return nil
	}
	proc := pp.proc
	pp.proc = nil
	if err := proc.Stop(); err != nil {
		return err
	}
	if err := proc.Close(); err != nil && !strings.Contains(err.Error(), "unexpected exit code") &&
		!strings.Contains(err.Error(), "exit status 1") {
		return err
	}
	return nil
}

func (pp *eppProc) Close() error { return pp.Stop() }
