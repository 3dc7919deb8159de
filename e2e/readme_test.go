package e2e

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// TestReadme runs the four usage examples of README.md ("## Usage") with the real binary: the same flags, with
// only hosts, ports and files substituted, and then the README's etcdctl line, v3 (the default) and v2.
//
// Substitutions, each the smallest that lets an example run on one machine:
//   - "some-etcd-proxy:2379" is a real upstream of the harness; the examples that give no --upstream-ca-file
//     verify it with the system roots, so the process gets SSL_CERT_FILE = the CA that signed it;
//   - the examples without listen flags listen on their defaults (localhost:2379, localhost:4001): their listen
//     and advertise URLs come from ETCD_PROXY_PROXY_LISTEN_CLIENT_URLS / _ADVERTISE_CLIENT_URLS instead, so the
//     command line stays as written;
//   - localhost:2379 and 0.0.0.0:2379 become 127.0.0.1 on a free port; the DMZ example advertises
//     https://127.0.0.1:PORT and https://localhost:PORT for "https://etcd.cluster,https://api.example.com";
//   - the certificate files keep their names (client.crt, server.crt, root-ca.crt …) in the working directory.
//
// The etcdctl line gets --endpoints (the README relies on etcdctl's default 127.0.0.1:2379). etcdctl v2 spells
// the TLS flags --ca-file/--cert-file/--key-file.
func TestReadme(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 2*time.Minute)
	bin := proxyBinary(t, ctx)
	etcdctl, err := harness.Tool(ctx, "etcdctl")
	if err != nil {
		t.Fatal(err)
	}
	e := harness.NewTestEnv(t)
	plain, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	stock, err := e.StartStockV2Proxy(ctx, plain)
	if err != nil {
		t.Fatal(err)
	}
	secure, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithTLS())
	if err != nil {
		t.Fatal(err)
	}
	// The DMZ example's upstream is an https etcd proxy that asks for no client certificate (the example gives
	// none): a TLS proxy-proxy without client-certificate auth.
	open, err := e.StartProxyProxy(ctx, secure.Endpoint(), harness.ProxyProxyHop{TLS: true, Configure: func(c *proxy.Config) {
		c.ListenerTLS.ClientCertAuth, c.ListenerTLS.CAFile = false, ""
	}})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []*harness.Cluster{plain, secure} {
		if err := e.Etcdctl(3, c.Endpoint()).Run(ctx, "put", "foo", "bar").Check(); err != nil {
			t.Fatal(err)
		}
		if err := e.Etcdctl(2, c.Endpoint()).Run(ctx, "set", "foo", "bar").Check(); err != nil {
			t.Fatal(err)
		}
	}
	// client.crt of examples 2 and 3 is presented to the members (Cluster CA) and, in example 3, to the
	// proxy's listener too, whose root-ca.crt must then be the Cluster CA as well.
	clusterServer := issueCert(t, e.PKI.Cluster, "readme-server", harness.ServerAuth())
	dmzServer := issueCert(t, e.PKI.Client, "readme-dmz-server", harness.ServerAuth())
	dmzClient := issueCert(t, e.PKI.Client, "readme-dmz-client", harness.ClientAuth())

	type example struct {
		name string
		// args are the README's flags, with $PORT for the free port.
		args []string
		// env adds to the proxy's environment.
		env []string
		// files are copied into the working directory: name → source.
		files map[string]string
		// endpoint is what etcdctl's --endpoints gets; tls: etcdctl uses root-ca.crt, client.crt, client.key.
		endpoint string
		tls      bool
		// v3: the upstream carries gRPC (etcd's stock v2 proxy does not).
		v3 bool
		// members: `member list` must show exactly these URLs.
		members []string
	}
	examples := []example{
		{
			name:     "1-plain/members",
			args:     []string{"-upstream", plain.Members[0].ClientURL},
			env:      []string{"ETCD_PROXY_PROXY_LISTEN_CLIENT_URLS=http://127.0.0.1:$PORT", "ETCD_PROXY_PROXY_ADVERTISE_CLIENT_URLS=http://127.0.0.1:$PORT"},
			endpoint: "http://127.0.0.1:$PORT", v3: true,
		},
		{
			name:     "1-plain/stock-v2-proxy",
			args:     []string{"-upstream", stock.URL},
			env:      []string{"ETCD_PROXY_PROXY_LISTEN_CLIENT_URLS=http://127.0.0.1:$PORT", "ETCD_PROXY_PROXY_ADVERTISE_CLIENT_URLS=http://127.0.0.1:$PORT"},
			endpoint: "http://127.0.0.1:$PORT",
		},
		{
			name: "2-upstream-tls",
			args: []string{"-upstream", secure.Members[0].ClientURL,
				"-upstream-cert-file", "client.crt", "-upstream-key-file", "client.key"},
			env: []string{"ETCD_PROXY_PROXY_LISTEN_CLIENT_URLS=http://127.0.0.1:$PORT", "ETCD_PROXY_PROXY_ADVERTISE_CLIENT_URLS=http://127.0.0.1:$PORT",
				"SSL_CERT_FILE=" + e.PKI.Cluster.CertFile},
			files:    map[string]string{"client.crt": secure.TLS.CertFile, "client.key": secure.TLS.KeyFile},
			endpoint: "http://127.0.0.1:$PORT", v3: true,
		},
		{
			name: "3-client-certs-both-sides",
			args: []string{"-upstream", secure.Members[0].ClientURL,
				"-upstream-cert-file", "client.crt", "-upstream-key-file", "client.key",
				"-cert-file", "server.crt", "-key-file", "server.key",
				"-trust-ca-file", "root-ca.crt", "-client-cert-auth",
				"-listen-client-urls", "https://127.0.0.1:$PORT", "-advertise-client-urls", "https://127.0.0.1:$PORT"},
			env: []string{"SSL_CERT_FILE=" + e.PKI.Cluster.CertFile},
			files: map[string]string{"client.crt": secure.TLS.CertFile, "client.key": secure.TLS.KeyFile,
				"server.crt": clusterServer.CertFile, "server.key": clusterServer.KeyFile, "root-ca.crt": e.PKI.Cluster.CertFile},
			endpoint: "https://127.0.0.1:$PORT", tls: true, v3: true,
		},
		{
			name: "4-dmz",
			args: []string{"-upstream", open.Endpoint.URLs[0],
				"-cert-file", "server.crt", "-key-file", "server.key",
				"-trust-ca-file", "root-ca.crt", "-client-cert-auth",
				"-listen-client-urls", "https://127.0.0.1:$PORT",
				"-advertise-client-urls", "https://127.0.0.1:$PORT,https://localhost:$PORT"},
			env: []string{"SSL_CERT_FILE=" + e.PKI.Client.CertFile},
			files: map[string]string{"client.crt": dmzClient.CertFile, "client.key": dmzClient.KeyFile,
				"server.crt": dmzServer.CertFile, "server.key": dmzServer.KeyFile, "root-ca.crt": e.PKI.Client.CertFile},
			endpoint: "https://localhost:$PORT", tls: true, v3: true,
			members: []string{"https://127.0.0.1:$PORT", "https://localhost:$PORT"},
		},
	}
	for _, ex := range examples {
		t.Run(ex.name, func(t *testing.T) {
			t.Parallel()
			// Its own deadline: a parallel subtest may wait for a free slot long after its parent returned.
			ctx := testContext(t, 2*time.Minute)
			dir := t.TempDir()
			for name, src := range ex.files {
				b, err := os.ReadFile(src)
				if err == nil {
					err = os.WriteFile(filepath.Join(dir, name), b, 0o600)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			port := strings.TrimPrefix(closedAddr(t), "127.0.0.1:")
			subst := func(s string) string { return strings.ReplaceAll(s, "$PORT", port) }
			args := make([]string, len(ex.args))
			for i, a := range ex.args {
				args[i] = subst(a)
			}
			cmd := exec.CommandContext(ctx, bin, args...)
			cmd.Dir = dir
			cmd.Env = readmeEnv("ETCD_PROXY_PROXY_", "SSL_CERT_")
			for _, v := range ex.env {
				cmd.Env = append(cmd.Env, subst(v))
			}
			var out strings.Builder
			cmd.Stdout, cmd.Stderr = &out, &out
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			exited := make(chan error, 1)
			go func() { exited <- cmd.Wait() }()
			t.Cleanup(func() {
				_ = cmd.Process.Kill()
				<-exited
			})
			t.Logf("%s %s", bin, strings.Join(args, " "))

			var tc *tls.Config
			if ex.tls {
				f := harness.TLSFiles{CAFile: filepath.Join(dir, "root-ca.crt"), CertFile: filepath.Join(dir, "client.crt"), KeyFile: filepath.Join(dir, "client.key")}
				var err error
				if tc, err = f.ClientConfig(); err != nil {
					t.Fatal(err)
				}
			}
			endpoint := subst(ex.endpoint)
			if err := readmeWait(ctx, endpoint, tc, exited); err != nil {
				t.Fatalf("the proxy did not serve: %v\n%s", err, out.String())
			}

			tlsFlags := map[int][]string{}
			if ex.tls {
				tlsFlags[3] = []string{"--cacert", "root-ca.crt", "--cert", "client.crt", "--key", "client.key"}
				tlsFlags[2] = []string{"--ca-file", "root-ca.crt", "--cert-file", "client.crt", "--key-file", "client.key"}
			}
			run := func(api int, args ...string) (string, error) {
				all := append([]string{"--endpoints", endpoint}, tlsFlags[api]...)
				c := exec.CommandContext(ctx, etcdctl, append(all, args...)...)
				c.Dir = dir
				c.Env = append(readmeEnv("ETCDCTL_"), fmt.Sprintf("ETCDCTL_API=%d", api))
				b, err := c.CombinedOutput()
				return string(b), err
			}
			for _, api := range []int{3, 2} {
				if api == 3 && !ex.v3 {
					continue
				}
				// v2 prints the value; v3 prints the key, then the value.
				want := "bar"
				if api == 3 {
					want = "foo\nbar"
				}
				if got, err := run(api, "get", "foo"); err != nil || strings.TrimSpace(got) != want {
					t.Errorf("ETCDCTL_API=%d etcdctl get foo: %v, printed %q, want %q\nproxy output:\n%s", api, err, got, want, out.String())
				}
			}
			if ex.members != nil {
				want := make([]string, len(ex.members))
				for i, m := range ex.members {
					want[i] = subst(m)
				}
				for _, api := range []int{3, 2} {
					got, err := run(api, "member", "list")
					if err != nil || strings.Count(strings.TrimSpace(got), "\n") != 0 {
						t.Errorf("ETCDCTL_API=%d etcdctl member list: %v\n%s", api, err, got)
						continue
					}
					for _, u := range want {
						if !strings.Contains(got, u) {
							t.Errorf("ETCDCTL_API=%d etcdctl member list does not show %s:\n%s", api, u, got)
						}
					}
				}
			}
		})
	}
}

// readmeEnv is this process's environment without the variables whose names start with one of prefixes.
func readmeEnv(prefixes ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		keep := true
		for _, p := range prefixes {
			if strings.HasPrefix(kv, p) {
				keep = false
			}
		}
		if keep {
			env = append(env, kv)
		}
	}
	return env
}

// readmeWait polls GET /version until it answers 200, the process exits, or ctx ends.
func readmeWait(ctx context.Context, endpoint string, tc *tls.Config, exited <-chan error) error {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	tr := &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr, Timeout: 2 * time.Second}
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, endpoint+"/version", nil)
		resp, err := cl.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("GET /version: %s", resp.Status)
		}
		last = err
		select {
		case err := <-exited:
			return fmt.Errorf("exited: %v (last: %v)", err, last)
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
