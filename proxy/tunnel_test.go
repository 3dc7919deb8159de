package proxy

import (
	"context"
	"errors"
	"flag"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Every problem of the tunnel flags in one message, as the other flags'.
func TestTunnelValidate(t *testing.T) {
	t.Parallel()
	missing := filepath.Join(t.TempDir(), "missing")
	bad := func(tc TunnelConfig, want ...string) {
		t.Helper()
		cfg := Config{Upstreams: []string{"http://127.0.0.1:2379"}, TunnelConfig: tc}
		err := cfg.Validate()
		if err == nil {
			t.Fatalf("%+v: no error", tc)
		}
		for _, w := range want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%+v: %q does not say %q", tc, err, w)
			}
		}
	}
	bad(TunnelConfig{UpstreamVia: "socks5://h:1", UpstreamViaAuthFile: missing, TunnelTLS: TLSInfo{CertFile: missing}},
		"--upstream-via: scheme must be", "--upstream-via-auth-file: no such file",
		"--tunnel-cert-file and --tunnel-key-file go together", "--tunnel-cert-file: no such file")
	bad(TunnelConfig{UpstreamVia: "http-connect://noport/x", TunnelTLS: TLSInfo{CAFile: missing}},
		"want http-connect://HOST:PORT", "must not have a path", "the --tunnel-* files need https-connect://")
	bad(TunnelConfig{TunnelTLS: TLSInfo{CAFile: missing}, UpstreamViaAuthFile: missing},
		"--tunnel-ca-file, --tunnel-cert-file and --tunnel-key-file need --upstream-via",
		"--upstream-via-auth-file needs --upstream-via")
	bad(TunnelConfig{UpstreamVia: "https-connect://u:p@h:1", UpstreamViaAuthFile: missing}, "give one")
	bad(TunnelConfig{UpstreamVia: "konnectivity://u:p@h:1"}, "konnectivity:// authenticates with --tunnel-cert-file")
	for _, via := range []string{"https-connect://u:p@h:3128", "http-connect://h:3128", "konnectivity://h:8090"} {
		ok := Config{Upstreams: []string{"https://m1:2379"}, TunnelConfig: TunnelConfig{UpstreamVia: via}}
		if err := ok.Validate(); err != nil {
			t.Errorf("valid tunnel %s: %v", via, err)
		}
	}
}

// The tunnel flags are set from the environment as every other flag.
func TestTunnelFlagsFromEnv(t *testing.T) {
	t.Parallel()
	var cfg Config
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	cfg.AddFlags(fs)
	env := map[string]string{"ETCD_PROXY_PROXY_UPSTREAM_VIA": "http-connect://h:3128",
		"ETCD_PROXY_PROXY_UPSTREAM_VIA_AUTH_FILE": "/a", "ETCD_PROXY_PROXY_TUNNEL_CA_FILE": "/ca",
		"ETCD_PROXY_PROXY_TUNNEL_CERT_FILE": "/c", "ETCD_PROXY_PROXY_TUNNEL_KEY_FILE": "/k"}
	if err := fs.Parse(nil); err != nil {
		t.Fatal(err)
	}
	if err := SetFlagsFromEnv(fs, func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
		t.Fatal(err)
	}
	want := TunnelConfig{UpstreamVia: "http-connect://h:3128", UpstreamViaAuthFile: "/a",
		TunnelTLS: TLSInfo{CAFile: "/ca", CertFile: "/c", KeyFile: "/k"}}
	if cfg.TunnelConfig != want {
		t.Errorf("from the environment: %+v, want %+v", cfg.TunnelConfig, want)
	}
}

// A CONNECT proxy that accepts but never answers: the dial ends at the dial timeout, as a failed dial (the
// request may go to another endpoint), a timeout, a tunnel error; nothing is left running.
func TestConnectDialTimeout(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	d, err := newTunnelDialer(&TunnelConfig{UpstreamVia: "http-connect://" + l.Addr().String()}, &net.Dialer{}, 300*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	defer d.close()
	start := time.Now()
	c, err := d.dial(context.Background(), "m1:2379")
	took := time.Since(start)
	if err == nil {
		_ = c.Close()
		t.Fatal("a dial through a silent CONNECT proxy succeeded")
	}
	var nerr net.Error
	if !unreached(err) || !errors.As(err, new(*tunnelError)) || !errors.As(err, &nerr) || !nerr.Timeout() {
		t.Errorf("error %v (%T): want an unreached tunnel timeout", err, err)
	}
	if took < 250*time.Millisecond || took > 2*time.Second {
		t.Errorf("the dial took %v, want the 300 ms dial timeout", took)
	}
	if status, _, reason := classify(err); status != 502 || reason != reasonTunnel {
		t.Errorf("classified %d %s, want 502 %s", status, reason, reasonTunnel)
	}
	(<-accepted).Close()
}
