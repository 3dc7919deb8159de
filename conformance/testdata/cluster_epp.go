// The e2e framework's proxy starter for etcd-proxy-proxy: the conformance runner copies this file into
// tests/framework/e2e of a copy of go.etcd.io/etcd/tests/v3 and builds with -tags cluster_proxy,epp. It
// mirrors etcd's own cluster_proxy.go (a grpc-proxy and a v2 proxy per member) with one etcd-proxy-proxy per
// member that serves v2 and v3 on both of the stock proxies' ports (member port + 2 and + 3). The binary is
// $EPP_PROXY_BIN.

//go:build cluster_proxy && epp

package e2e

import (
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/pkg/v3/expect"
	"go.uber.org/zap"
)

func init() {
	// curl goes through the proxy too: etcd-proxy-proxy serves v2 and the v3 JSON gateway (the grpc-proxy does
	// not, so etcd's starter sends curl to the member). A member serving TLS and plain on one port (ClientBoth)
	// is the exception: the proxy serves one of them, and curl asks for both, so it goes to the member.
	curlURL = func(m EtcdProcess) string {
		acurl := m.Config().Acurl
		if p, ok := m.(*eppEtcdProcess); ok && p.epp.tls == strings.HasPrefix(acurl, "https://") {
			return p.epp.v2
		}
		return acurl
	}
}

type eppEtcdProcess struct {
	*EtcdServerProcess
	epp *eppProc
}

func NewEtcdProcess(cfg *EtcdServerProcessConfig) (EtcdProcess, error) {
	ep, err := NewEtcdServerProcess(cfg)
	if err != nil {
		return nil, err
	}
	p, err := newEppProc(cfg)
	if err != nil {
		return nil, err
	}
	return &eppEtcdProcess{EtcdServerProcess: ep, epp: p}, nil
}

func (p *eppEtcdProcess) Config() *EtcdServerProcessConfig { return p.EtcdServerProcess.Config() }

func (p *eppEtcdProcess) EndpointsV2() []string   { return p.EndpointsHTTP() }
func (p *eppEtcdProcess) EndpointsV3() []string   { return p.EndpointsGRPC() }
func (p *eppEtcdProcess) EndpointsHTTP() []string { return []string{p.epp.v2} }
func (p *eppEtcdProcess) EndpointsGRPC() []string { return []string{p.epp.v3} }
func (p *eppEtcdProcess) EndpointsMetrics() []string {
	panic("not implemented; proxy doesn't provide health information") // as etcd's starter
}

func (p *eppEtcdProcess) Start() error {
	if err := p.EtcdServerProcess.Start(); err != nil {
		return err
	}
	return p.epp.Start()
}

func (p *eppEtcdProcess) Restart() error {
	if err := p.EtcdServerProcess.Restart(); err != nil {
		return err
	}
	return p.epp.Restart()
}

func (p *eppEtcdProcess) Stop() error {
	err := p.epp.Stop()
	if eerr := p.EtcdServerProcess.Stop(); eerr != nil && err == nil {
		// fails on go-grpc issue #1384 (as etcd's starter)
		if !strings.Contains(eerr.Error(), "exit status 2") {
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

func (p *eppEtcdProcess) WithStopSignal(sig os.Signal) os.Signal {
	p.epp.stopSignal = sig
	return p.EtcdServerProcess.WithStopSignal(sig)
}

func (p *eppEtcdProcess) Logs() LogsExpect { return p.EtcdServerProcess.Logs() }

// eppProc is one etcd-proxy-proxy in front of one member.
type eppProc struct {
	lg         *zap.Logger
	args       []string
	v2, v3     string // listen URLs: where etcd's starter puts its v2 and v3 proxies
	tls        bool   // the proxy serves TLS
	stopSignal os.Signal
	proc       *expect.ExpectProcess
}

func newEppProc(cfg *EtcdServerProcessConfig) (*eppProc, error) {
	v2, v3 := proxyListenURL(cfg, 2), proxyListenURL(cfg, 3)
	// The grpc-proxy serves TLS whenever the member's client TLS flags are given; so do we.
	var listen, upstream []string
	tlsListener := false
	for i := 0; i < len(cfg.TlsArgs); i++ {
		switch cfg.TlsArgs[i] {
		case "--cert-file", "--key-file", "--trusted-ca-file":
			listen = append(listen, cfg.TlsArgs[i], cfg.TlsArgs[i+1])
			tlsListener = tlsListener || cfg.TlsArgs[i] == "--cert-file"
			i++
		case "--client-cert-auth":
			listen = append(listen, "--client-cert-auth")
		case "--client-crl-file":
			listen = append(listen, "--client-crl-file", cfg.TlsArgs[i+1])
			i++
		case "--auto-tls":
			// etcd-proxy-proxy has no auto TLS: a self-signed certificate made here, as the member makes its own.
			dir := filepath.Join(cfg.DataDirPath, "epp-auto-tls")
			info, err := transport.SelfCert(zap.NewNop(), dir, []string{"localhost", "127.0.0.1"}, 1)
			if err != nil {
				return nil, fmt.Errorf("auto TLS for etcd-proxy-proxy: %w", err)
			}
			listen = append(listen, "--cert-file", info.CertFile, "--key-file", info.KeyFile)
			upstream = append(upstream, "--upstream-insecure-skip-tls-verify")
			tlsListener = true
		case "--peer-trusted-ca-file", "--peer-cert-file", "--peer-key-file", "--cipher-suites":
			i++ // not the client side, or no such flag here
		}
	}
	if tlsListener && !eppContains(upstream, "--upstream-insecure-skip-tls-verify") {
		// Toward the member: a certificate without CN (as etcd's starter), so auth sees no user in it.
		upstream = append(upstream,
			"--upstream-cert-file", filepath.Join(FixturesDir, "client-nocn.crt"),
			"--upstream-key-file", filepath.Join(FixturesDir, "client-nocn.key.insecure"),
			"--upstream-ca-file", filepath.Join(FixturesDir, "ca.crt"))
	}
	scheme := func(raw string) string {
		u, _ := url.Parse(raw)
		if tlsListener {
			u.Scheme = "https"
		} else {
			u.Scheme = "http"
		}
		return u.String()
	}
	member := cfg.Acurl
	if tlsListener && strings.HasPrefix(member, "http://") && eppContains(cfg.TlsArgs, "--cert-file") {
		member = "https://" + strings.TrimPrefix(member, "http://") // the member serves TLS on the same port
	}
	args := []string{
		"--upstream", member,
		"--listen-client-urls", scheme(v2) + "," + scheme(v3),
		"--advertise-client-urls", scheme(v3) + "," + scheme(v2),
		"--name", cfg.Name + "-epp",
		"--shutdown-timeout", "1s",
		"--upstream-health-interval", "1s",
	}
	args = append(args, listen...)
	args = append(args, upstream...)
	bin := os.Getenv("EPP_PROXY_BIN")
	if bin == "" {
		return nil, fmt.Errorf("EPP_PROXY_BIN: the etcd-proxy-proxy binary is not set")
	}
	return &eppProc{lg: cfg.lg, args: append([]string{bin}, args...), v2: v2, v3: v3, tls: tlsListener}, nil
}

// proxyListenURL is etcd's starter's: the member's client URL with its port moved by portOffset.
func proxyListenURL(cfg *EtcdServerProcessConfig, portOffset int) string {
	u, err := url.Parse(cfg.Acurl)
	if err != nil {
		panic(err)
	}
	host, port, _ := net.SplitHostPort(u.Host)
	p, _ := strconv.Atoi(port)
	u.Host = net.JoinHostPort(host, strconv.Itoa(p+portOffset))
	return u.String()
}

func eppContains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func (pp *eppProc) Start() error {
	if pp.proc != nil {
		panic("already started")
	}
	proc, err := SpawnCmdWithLogger(pp.lg, pp.args, nil)
	if err != nil {
		return err
	}
	if pp.stopSignal != nil {
		proc.StopSignal = pp.stopSignal
	}
	pp.proc = proc
	return WaitReadyExpectProc(proc, []string{"etcd-proxy-proxy started"})
}

func (pp *eppProc) Restart() error {
	if err := pp.Stop(); err != nil {
		return err
	}
	return pp.Start()
}

func (pp *eppProc) Stop() error {
	if pp.proc == nil {
		return nil
	}
	if err := pp.proc.Stop(); err != nil && !strings.Contains(err.Error(), "exit status 1") {
		return err
	}
	pp.proc = nil
	return nil
}

func (pp *eppProc) Close() error { return pp.Stop() }
