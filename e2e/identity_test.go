package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// TestUpstreamIdentity is contract rule 8 against a real member with etcd auth on and client-cert-auth, where
// the member takes the CN of the client certificate as the user: the proxy's --upstream-cert-file is CN=root, and
// alice may write under /alice/ only. A client whose listener certificate says CN=alice, with a pair for alice in
// --upstream-cert-dir, writes as alice over gRPC and through the JSON gateway (a write elsewhere is denied by
// etcd); in strict mode a client without a pair (CN=mallory), or without any certificate, cannot act as root —
// not even by asking the gateway for the identity metadata entry; in shared mode it acts as root, as documented;
// a pair added to the folder takes effect without a restart. Without per-client identities every one of these
// clients writes as root: alice's write outside /alice/ succeeds, and so do mallory's in strict mode.
func TestUpstreamIdentity(t *testing.T) {
	t.Parallel()
	// The subtests are not parallel: they share this deadline, and a parallel subtest waits for a free slot after
	// its parent returns, with the deadline running (it ran out under the whole suite on 2 cores).
	ctx := testContext(t, 120*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithTLS())
	if err != nil {
		t.Fatal(err)
	}
	members := c.Endpoint()
	// Toward the member (Cluster CA): the proxy's own identity, and alice's.
	rootUp := issueCert(t, e.PKI.Cluster, "id-root", harness.ClientAuth(), harness.CommonName("root"))
	aliceUp := issueCert(t, e.PKI.Cluster, "id-alice", harness.ClientAuth(), harness.CommonName("alice"))
	enableAuth(t, ctx, harness.Endpoint{URLs: members.URLs, TLS: rootUp})

	// Toward the proxies (Client CA): what clients present.
	clientCert := func(cn string) harness.TLSFiles {
		return issueCert(t, e.PKI.Client, "client-"+cn, harness.ClientAuth(), harness.CommonName(cn))
	}
	certs := map[string]harness.TLSFiles{
		"alice":   clientCert("alice"),
		"mallory": clientCert("mallory"),
		"no-cert": {CAFile: e.PKI.Client.CertFile},
	}

	startProxy := func(mode string) (*harness.ProxyProxy, string) {
		dir := t.TempDir()
		addPair(t, dir, "alice", aliceUp)
		p, err := e.StartProxyProxy(ctx, members, harness.ProxyProxyHop{TLS: true, Configure: func(cfg *proxy.Config) {
			cfg.UpstreamTLS.CertFile, cfg.UpstreamTLS.KeyFile = rootUp.CertFile, rootUp.KeyFile
			cfg.UpstreamCertDir, cfg.UpstreamIdentity = dir, mode
			cfg.ListenerTLS.ClientCertAuth = false // verified when given: clients without a certificate get in
			cfg.CertReloadInterval = 100 * time.Millisecond
		}})
		if err != nil {
			t.Fatal(err)
		}
		return p, dir
	}
	as := func(p *harness.ProxyProxy, who string) harness.Endpoint {
		return harness.Endpoint{URLs: p.Endpoint.URLs, TLS: certs[who]}
	}
	// alice writes as alice over gRPC and the gateway: in her prefix, and denied by etcd outside it.
	actsAsAlice := func(t *testing.T, p *harness.ProxyProxy, mine, others string) {
		t.Helper()
		alice := secV3Client(t, as(p, "alice"))
		mustPut(t, ctx, alice, mine)
		wantEtcdDenied(t, ctx, alice, others)
		gateway(t, ctx, as(p, "alice"), mine+"-gw", nil, http.StatusOK, "")
		gateway(t, ctx, as(p, "alice"), others+"-gw", nil, http.StatusForbidden, "etcdserver: permission denied")
	}

	t.Run("shared", func(t *testing.T) {
		p, _ := startProxy(proxy.IdentityShared)
		actsAsAlice(t, p, "/alice/shared", "/root/by-alice")
		// Documented: with --upstream-identity=shared a client without a pair acts as --upstream-cert-file.
		for _, who := range []string{"mallory", "no-cert"} {
			mustPut(t, ctx, secV3Client(t, as(p, who)), "/root/by-"+who)
		}
	})

	t.Run("strict", func(t *testing.T) {
		p, dir := startProxy(proxy.IdentityStrict)
		actsAsAlice(t, p, "/alice/strict", "/root/by-alice-strict")

		forged := map[string]string{"Grpc-Metadata-Etcd-Proxy-Proxy-Client-Identity": "alice",
			"Etcd-Proxy-Proxy-Client-Identity": "alice"}
		for _, who := range []string{"mallory", "no-cert"} {
			cli := secV3Client(t, as(p, who))
			wantRefused(t, cli, ctx, "/alice/by-"+who)
			// A client that names the identity itself, as the gateway does on its own calls, gets nothing more.
			fctx := metadata.AppendToOutgoingContext(ctx, "etcd-proxy-proxy-client-identity", "alice")
			wantRefused(t, cli, fctx, "/alice/forged-by-"+who)
			gateway(t, ctx, as(p, who), "/alice/gw-by-"+who, nil, http.StatusForbidden, "no upstream identity")
			gateway(t, ctx, as(p, who), "/alice/gw-forged-by-"+who, forged, http.StatusForbidden, "no upstream identity")
			res := secDo(ctx, httpClient(t, as(p, who)), p.Endpoint.URLs[0], secProbe{method: "GET", path: "/v2/keys/alice/strict"})
			var msg struct{ Message string }
			if res.status != http.StatusForbidden || json.Unmarshal(res.body, &msg) != nil || !strings.Contains(msg.Message, "no upstream identity") {
				t.Errorf("%s: v2 GET: want 403 {\"message\": ...no upstream identity...}, got\n%s", who, res.dump)
			}
		}

		// A pair for mallory (alice's upstream identity) is picked up by the poller, without a restart.
		addPair(t, dir, "mallory", aliceUp)
		mallory := secV3Client(t, as(p, "mallory"))
		eventually(t, ctx, "mallory's pair taking effect", func() (bool, string) {
			err := putV3(ctx, mallory, "/alice/by-mallory")
			return err == nil, errString(err)
		})
		wantEtcdDenied(t, ctx, mallory, "/root/by-mallory-strict")
	})
}

// enableAuth creates the users root (role root) and alice (read-write under /alice/), both without passwords
// (they authenticate by their certificate's CN), and turns auth on; ep must present CN=root.
func enableAuth(t *testing.T, ctx context.Context, ep harness.Endpoint) {
	t.Helper()
	cli := secV3Client(t, ep)
	noPassword := &clientv3.UserAddOptions{NoPassword: true}
	steps := []func() error{
		func() error { _, err := cli.RoleAdd(ctx, "alice"); return err },
		func() error {
			_, err := cli.RoleGrantPermission(ctx, "alice", "/alice/", clientv3.GetPrefixRangeEnd("/alice/"),
				clientv3.PermissionType(clientv3.PermReadWrite))
			return err
		},
		func() error { _, err := cli.UserAddWithOptions(ctx, "root", "", noPassword); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "root", "root"); return err },
		func() error { _, err := cli.UserAddWithOptions(ctx, "alice", "", noPassword); return err },
		func() error { _, err := cli.UserGrantRole(ctx, "alice", "alice"); return err },
		func() error { _, err := cli.AuthEnable(ctx); return err },
	}
	for i, step := range steps {
		if err := step(); err != nil {
			t.Fatalf("auth setup step %d: %v", i, err)
		}
	}
}

// addPair writes f as the pair of cn into dir, key first, each file renamed into place: the poller never sees
// half a pair.
func addPair(t *testing.T, dir, cn string, f harness.TLSFiles) {
	t.Helper()
	replaceFile(t, filepath.Join(dir, cn+".key"), f.KeyFile)
	replaceFile(t, filepath.Join(dir, cn+".crt"), f.CertFile)
	if _, err := os.Stat(filepath.Join(dir, cn+".crt")); err != nil {
		t.Fatal(err)
	}
}

func putV3(ctx context.Context, cli *clientv3.Client, key string) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := cli.Put(ctx, key, "v")
	return err
}

func errString(err error) string {
	if err == nil {
		return "ok"
	}
	return err.Error()
}

func mustPut(t *testing.T, ctx context.Context, cli *clientv3.Client, key string) {
	t.Helper()
	if err := putV3(ctx, cli, key); err != nil {
		t.Errorf("put %s: %v", key, err)
	}
}

// wantEtcdDenied: the member refused the write (the client's identity lacks the permission).
func wantEtcdDenied(t *testing.T, ctx context.Context, cli *clientv3.Client, key string) {
	t.Helper()
	err := putV3(ctx, cli, key)
	if !errors.Is(err, rpctypes.ErrPermissionDenied) { // clientv3 turns etcd's own statuses into these errors
		t.Errorf("put %s: %v, want etcd's PermissionDenied", key, err)
	}
}

// wantRefused: the proxy refused the call (no upstream identity in strict mode).
func wantRefused(t *testing.T, cli *clientv3.Client, ctx context.Context, key string) {
	t.Helper()
	err := putV3(ctx, cli, key)
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(errString(err), "no upstream identity") {
		t.Errorf("put %s: %v, want the proxy's PermissionDenied", key, err)
	}
}

// gateway puts key through the JSON gateway as ep's client and checks the status and, for errors, the message.
func gateway(t *testing.T, ctx context.Context, ep harness.Endpoint, key string, header map[string]string, want int, msg string) {
	t.Helper()
	res := secDo(ctx, httpClient(t, ep), ep.URLs[0], secProbe{method: "POST", path: "/v3/kv/put",
		body: `{"key":"` + b64(key) + `","value":"` + b64("v") + `"}`, ctype: "application/json", header: header})
	var body struct{ Message string }
	if res.status != want || want != http.StatusOK && (json.Unmarshal(res.body, &body) != nil || !strings.Contains(body.Message, msg)) {
		t.Errorf("gateway put %s: want %d %q, got\n%s", key, want, msg, res.dump)
	}
}
