package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// TestValidCN: only names that stay a plain file name in the folder are looked up.
func TestValidCN(t *testing.T) {
	t.Parallel()
	for cn, want := range map[string]bool{
		"alice": true, "Alice-2": true, "svc.example.com": true, "a_b": true, "a..b": true, "-": true,
		"":                       false,
		"../x":                   false,
		"..":                     false,
		".":                      false,
		".hidden":                false,
		"..data":                 false,
		"a/b":                    false,
		`a\b`:                    false,
		"/etc":                   false,
		"a\x00b":                 false,
		"a b":                    false,
		"é":                      false,
		"a\nb":                   false,
		"alice:1":                false,
		strings.Repeat("a", 201): false,
	} {
		if got := validCN(cn); got != want {
			t.Errorf("validCN(%q) = %v, want %v", cn, got, want)
		}
	}
}

// TestIdentitiesDir: the pairs of the folder are loaded under their CN; names that are not valid CNs are never
// read, and no lookup leaves the folder, whatever the client's CN.
func TestIdentitiesDir(t *testing.T) {
	t.Parallel()
	root := t.TempDir()
	dir := filepath.Join(root, "ids")
	writePair(t, root, "x", "x")                      // outside: "../x" must not reach it
	writePair(t, filepath.Join(dir, "sub"), "y", "y") // below: "sub/y" must not reach it
	writePair(t, dir, "alice", "alice-upstream")
	writePair(t, dir, ".hidden", "hidden")
	writePair(t, dir, "a b", "space")
	if err := os.WriteFile(filepath.Join(dir, "notes.txt"), []byte("not a pair"), 0o600); err != nil {
		t.Fatal(err)
	}
	ids, err := newIdentities(&Config{UpstreamCertDir: dir, UpstreamIdentity: IdentityStrict}, discardLog())
	if err != nil {
		t.Fatal(err)
	}
	if id := ids.lookup("alice"); id == nil || id.leaf.Subject.CommonName != "alice-upstream" {
		t.Fatalf("alice: %+v", id)
	}
	for _, cn := range []string{"../x", "x", "sub/y", "y", ".hidden", "hidden", "a b", "a\x00b", "alice\x00", "", "notes", "../ids/alice", "./alice"} {
		if id := ids.lookup(cn); id != nil {
			t.Errorf("lookup(%q) found %s", cn, id.cn)
		}
	}
	if n, _, cns := ids.summary(); n != 1 {
		t.Errorf("%d identities loaded (%v), want alice only", n, cns)
	}
}

// TestIdentitiesReload: the poller's view. An unchanged folder is not reloaded; a new pair appears, a removed
// one goes, an unchanged one keeps its identity (and so its connections); a half pair fails the reload and
// the previous identities stay.
func TestIdentitiesReload(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	writePair(t, dir, "alice", "alice")
	ids, err := newIdentities(&Config{UpstreamCertDir: dir}, discardLog())
	if err != nil {
		t.Fatal(err)
	}
	alice := ids.lookup("alice")
	if changed, err := ids.reload(true); changed || err != nil {
		t.Fatalf("unchanged folder: changed=%v err=%v", changed, err)
	}
	writePair(t, dir, "carol", "carol")
	if changed, err := ids.reload(true); !changed || err != nil {
		t.Fatalf("new pair: changed=%v err=%v", changed, err)
	}
	if ids.lookup("carol") == nil {
		t.Error("carol not loaded")
	}
	if ids.lookup("alice") != alice {
		t.Error("alice's unchanged pair was replaced: her connections would be dropped")
	}
	// A .crt whose .key is missing: the reload fails and nothing changes.
	if err := os.WriteFile(filepath.Join(dir, "dave.crt"), readFile(t, filepath.Join(dir, "carol.crt")), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := ids.reload(true); err == nil || !strings.Contains(err.Error(), "dave") {
		t.Errorf("half pair: err=%v, want one naming dave", err)
	}
	if ids.lookup("carol") == nil || ids.lookup("alice") != alice {
		t.Error("a failed reload changed the identities")
	}
	if err := os.Remove(filepath.Join(dir, "dave.crt")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(dir, "alice.crt")); err != nil {
		t.Fatal(err)
	}
	if _, err := ids.reload(false); err != nil { // SIGHUP
		t.Fatal(err)
	}
	if ids.lookup("alice") != nil || ids.lookup("carol") == nil {
		t.Error("alice's pair was removed: she must have no identity left, carol hers")
	}
	// The folder gone: one failure, reported once, and the identities stay.
	if err := os.Rename(dir, dir+".gone"); err != nil {
		t.Fatal(err)
	}
	if changed, err := ids.reload(true); !changed || err == nil {
		t.Errorf("folder gone: changed=%v err=%v, want the failure", changed, err)
	}
	if changed, err := ids.reload(true); changed || err != nil {
		t.Errorf("folder still gone: changed=%v err=%v, want nothing new to report", changed, err)
	}
	if ids.lookup("carol") == nil {
		t.Error("a folder that cannot be read dropped the identities")
	}
	if err := os.Rename(dir+".gone", dir); err != nil {
		t.Fatal(err)
	}
	if changed, err := ids.reload(true); !changed || err != nil || ids.lookup("carol") == nil {
		t.Errorf("folder back: changed=%v err=%v", changed, err)
	}
}

// TestIdentityCarrier: the entry that carries a gateway client's CN is believed only on the gateway's own
// in-memory connection, removed before anything goes upstream, and the gateway overwrites whatever a client
// asked grpc-gateway for.
func TestIdentityCarrier(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	writePair(t, dir, "alice", "alice")
	f := &Forwarder{log: discardLog()}
	var err error
	if f.ids, err = newIdentities(&Config{UpstreamCertDir: dir, UpstreamIdentity: IdentityStrict}, f.log); err != nil {
		t.Fatal(err)
	}
	identify := func(ctx context.Context) (*httputil.ProxyRequest, *http.Response) {
		in := httptest.NewRequestWithContext(ctx, "GET", "/v2/keys/a", nil)
		in.Header.Set(identityHeader, "alice")
		pr := &httputil.ProxyRequest{In: in, Out: in.Clone(ctx)}
		return pr, f.identify(pr)
	}
	pr, reply := identify(context.Background())
	if reply == nil || reply.StatusCode != http.StatusForbidden || identityOf(pr.Out.Context()) != nil {
		t.Errorf("a client naming alice itself: reply %v, identity %v; want 403 and none", reply, identityOf(pr.Out.Context()))
	}
	if pr.Out.Header.Get(identityHeader) != "" {
		t.Error("the entry goes upstream")
	}
	// The gRPC core believes the entry from the gateway's in-memory connection only, and never sends it up.
	c := &grpcCore{f: f}
	md := metadata.Pairs(identityMetadata, "alice")
	if id, err := c.identify(peer.NewContext(context.Background(), &peer.Peer{Addr: pipeAddr{}}), md); err != nil || id == nil || id.cn != "alice" {
		t.Errorf("a gateway call for alice: identity %v, err %v", id, err)
	}
	if id, err := c.identify(peer.NewContext(context.Background(), &peer.Peer{Addr: &net.TCPAddr{}}), md); status.Code(err) != codes.PermissionDenied || id != nil {
		t.Errorf("a client's call naming alice itself: identity %v, err %v; want PermissionDenied", id, err)
	}
	if up := upstreamMetadata(md); len(up.Get(identityMetadata)) != 0 {
		t.Error("the entry goes upstream")
	}

	// The gateway's side: a client's own entry is replaced by its verified CN, or by nothing.
	forged := metadata.NewOutgoingContext(context.Background(), metadata.Pairs(identityMetadata, "alice"))
	for cn, want := range map[string]string{"": "", "mallory": "mallory", "../alice": ""} {
		ctx := carryIdentity(context.WithValue(forged, gatewayClientKey{}, cn))
		md, _ := metadata.FromOutgoingContext(ctx)
		if got := md.Get(identityMetadata); len(got) != 1 || got[0] != want {
			t.Errorf("client CN %q: entry %q, want [%q]", cn, got, want)
		}
	}
	if md, _ := metadata.FromOutgoingContext(forged); md.Get(identityMetadata)[0] != "alice" {
		t.Error("carryIdentity changed its caller's metadata")
	}
}

// TestValidateIdentityFlags: every problem of the identity flags in one message.
func TestValidateIdentityFlags(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := filepath.Join(dir, "f.pem")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	up := []string{"https://127.0.0.1:2379"}
	err := (&Config{Upstreams: up, UpstreamIdentity: "loose"}).Validate()
	if err == nil || !strings.Contains(err.Error(), `--upstream-identity "loose": want "shared" or "strict"`) {
		t.Errorf("bad mode: %v", err)
	}
	err = (&Config{Upstreams: up, UpstreamIdentity: IdentityStrict}).Validate()
	if err == nil || !strings.Contains(err.Error(), "--upstream-identity=strict needs --upstream-cert-dir") {
		t.Errorf("strict without a folder: %v", err)
	}
	err = (&Config{Upstreams: up, UpstreamCertDir: filepath.Join(dir, "missing"), UpstreamIdentity: IdentityStrict}).Validate()
	for _, w := range []string{"--upstream-cert-dir: no such file or directory", "--upstream-cert-dir needs --trusted-ca-file"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("missing %q in %v", w, err)
		}
	}
	err = (&Config{Upstreams: up, UpstreamCertDir: file, ListenerTLS: TLSInfo{CAFile: file}}).Validate()
	if err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("a file as the folder: %v", err)
	}
	if err := (&Config{Upstreams: up, UpstreamCertDir: dir, UpstreamIdentity: IdentityStrict, ListenerTLS: TLSInfo{CAFile: file}}).Validate(); err != nil {
		t.Errorf("valid: %v", err)
	}
}

// TestIdentityFlagsFromEnv: both flags, from the command line or the environment.
func TestIdentityFlagsFromEnv(t *testing.T) {
	t.Parallel()
	var c Config
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	c.AddFlags(fs)
	if c.UpstreamIdentity != IdentityShared {
		t.Errorf("default --upstream-identity %q, want shared", c.UpstreamIdentity)
	}
	if err := fs.Parse([]string{"--upstream-identity=strict"}); err != nil {
		t.Fatal(err)
	}
	env := map[string]string{"ETCD_PROXY_PROXY_UPSTREAM_CERT_DIR": "/ids", "ETCD_PROXY_PROXY_UPSTREAM_IDENTITY": "shared"}
	if err := SetFlagsFromEnv(fs, func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
		t.Fatal(err)
	}
	if c.UpstreamCertDir != "/ids" || c.UpstreamIdentity != IdentityStrict {
		t.Errorf("dir %q identity %q, want /ids from the environment and strict from the command line", c.UpstreamCertDir, c.UpstreamIdentity)
	}
}

func discardLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func readFile(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// writePair writes a self-signed certificate with common name cn and its key as dir/name.crt and dir/name.key.
// (The harness's PKI cannot be used here: it imports this package.)
func writePair(t *testing.T, dir, name, cn string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for ext, block := range map[string]*pem.Block{".crt": {Type: "CERTIFICATE", Bytes: der}, ".key": {Type: "EC PRIVATE KEY", Bytes: kder}} {
		if err := os.WriteFile(filepath.Join(dir, name+ext), pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := tls.LoadX509KeyPair(filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")); err != nil {
		t.Fatal(err)
	}
}
