package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httputil"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-multierror"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// Upstream identities per client (contract rule 8). Without them every client reaches the upstream with
// --upstream-cert-file, and under etcd auth with client-cert-auth a member takes that certificate's CN as the
// user: any client holding a listener certificate acts as that user, without a password. With
// --upstream-cert-dir, a client whose verified listener certificate has the CN "alice" reaches the upstream with
// the pair alice.crt/alice.key of that folder, over connections of its own; --upstream-identity says what the
// others get: the shared identity, or a refusal.

// Values of --upstream-identity.
const (
	// IdentityShared: a client without a pair reaches the upstream with --upstream-cert-file (or none).
	IdentityShared = "shared"
	// IdentityStrict: a client without a pair (or without a verified certificate) is refused.
	IdentityStrict = "strict"
)

// maxIdentities bounds the pairs loaded from --upstream-cert-dir: each one may hold its own upstream connections.
const maxIdentities = 4096

// identityHeader carries the CN of a JSON gateway client from the gateway to the gRPC path it calls over the
// in-memory connection (gateway.go): the gRPC metadata entry becomes this request header. It is believed only on
// requests that came over that connection, the gateway sets it on every call whatever a client sent (a client can
// ask grpc-gateway for any metadata with a Grpc-Metadata- header), and it is removed before anything goes upstream.
const identityHeader = "Etcd-Proxy-Proxy-Client-Identity"

var identityMetadata = strings.ToLower(identityHeader)

// msgNoIdentity answers a client refused by --upstream-identity=strict.
const msgNoIdentity = "etcd-proxy-proxy: this client has no upstream identity (--upstream-identity=strict): " +
	"present a certificate whose common name has a pair in --upstream-cert-dir"

// validCN reports a common name that may name a pair in --upstream-cert-dir: letters, digits, '.', '_' and '-',
// not starting with a dot. No path is ever built from anything else, so a CN cannot leave the folder ("../x",
// "a/b"), reach a hidden file or a Kubernetes Secret's "..data", or be cut short by a NUL.
func validCN(cn string) bool {
	if cn == "" || len(cn) > 200 || cn[0] == '.' {
		return false
	}
	for i := 0; i < len(cn); i++ {
		switch c := cn[i]; {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '.', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// verifiedCN is the common name of the client certificate the listener verified, or "" when the client
// presented none that was verified (a plain listener, no --trusted-ca-file).
func verifiedCN(r *http.Request) string { return verifiedCNOf(r.TLS) }

// verifiedCNOf is verifiedCN of a TLS connection's state (nil: none).
func verifiedCNOf(state *tls.ConnectionState) string {
	if state == nil || len(state.VerifiedChains) == 0 || len(state.VerifiedChains[0]) == 0 {
		return ""
	}
	return state.VerifiedChains[0][0].Subject.CommonName
}

// upstreamIdentity is one pair of --upstream-cert-dir and the transports that present it.
type upstreamIdentity struct {
	cn              string
	cert            *tls.Certificate
	leaf            *x509.Certificate
	certPEM, keyPEM []byte // to tell a rewritten pair from the same one

	mu         sync.Mutex // guards making the transports, and retire
	transports atomic.Pointer[identityTransports]
	// retire takes the identity's gRPC connections out of use (grpccore.go).
	retire []func()
}

// identityTransports is Forwarder.transport for one identity: its handshakes present its certificate. (Its
// gRPC connections are the gRPC core's, per identity too.)
type identityTransports struct{ h *http.Transport }

// close drops the identity's idle connections once a reload removed or replaced it; requests still running
// finish on theirs, and one that was already on its way still goes with this identity (never another one): its
// connection is closed after the transport's idle timeout.
func (id *upstreamIdentity) close() {
	if t := id.transports.Load(); t != nil {
		t.h.CloseIdleConnections()
	}
	id.mu.Lock()
	retire := id.retire
	id.retire = nil
	id.mu.Unlock()
	for _, fn := range retire {
		fn()
	}
}

// identities is --upstream-cert-dir as loaded last, reloaded as certificates are (reload.go).
type identities struct {
	dir    string
	strict bool

	mu         sync.Mutex // serialises loads; guards stamps and scanFailed
	stamps     []pairStamp
	scanFailed bool // the folder could not be read at the last attempt
	byCN       atomic.Pointer[map[string]*upstreamIdentity]
}

// pairStamp is what the poller compares for one pair.
type pairStamp struct {
	cn       string
	crt, key fileStamp
}

// newIdentities loads cfg.UpstreamCertDir; nil without one.
func newIdentities(cfg *Config, log *slog.Logger) (*identities, error) {
	if cfg.UpstreamCertDir == "" {
		if cfg.UpstreamTLS.CertFile != "" {
			log.Warn("every client reaches the upstream with --upstream-cert-file's identity; under etcd auth it acts "+
				"as the user of that certificate's common name (see README, Security: --upstream-cert-dir)",
				"upstream-cert-file", cfg.UpstreamTLS.CertFile)
		}
		return nil, nil
	}
	ids := &identities{dir: cfg.UpstreamCertDir, strict: cfg.UpstreamIdentity == IdentityStrict}
	ids.byCN.Store(&map[string]*upstreamIdentity{})
	if _, err := ids.reload(false); err != nil {
		return nil, fmt.Errorf("--upstream-cert-dir: %w", err)
	}
	if !ids.strict {
		log.Warn("--upstream-identity=shared: clients without a pair in --upstream-cert-dir reach the upstream with "+
			"--upstream-cert-file's identity; --upstream-identity=strict refuses them", "upstream-cert-dir", ids.dir)
	}
	return ids, nil
}

// scan lists the pairs of the folder: every <CN>.crt whose CN is valid. A .crt without its .key is an error
// at load.
func (ids *identities) scan() ([]pairStamp, error) {
	entries, err := os.ReadDir(ids.dir)
	if err != nil {
		return nil, err
	}
	var st []pairStamp
	for _, e := range entries {
		cn, ok := strings.CutSuffix(e.Name(), ".crt")
		if !ok || !validCN(cn) {
			continue
		}
		st = append(st, pairStamp{cn: cn, crt: stampOf(ids.path(cn, ".crt")), key: stampOf(ids.path(cn, ".key"))})
	}
	return st, nil // ReadDir sorts by name
}

// path is the file of a valid CN's pair; callers check validCN.
func (ids *identities) path(cn, ext string) string { return filepath.Join(ids.dir, cn+ext) }

func stampOf(file string) fileStamp {
	fi, err := os.Stat(file) // follows symlinks: a Kubernetes Secret volume swaps a symlink
	if err != nil {
		return fileStamp{err: true}
	}
	return fileStamp{modTime: fi.ModTime(), size: fi.Size()}
}

// reload reads the folder again; with onlyIfChanged only when a pair appeared, went or changed since the last
// attempt. A pair that does not load fails the whole reload: the identities loaded before stay. A pair that is
// the same as before keeps its connections; those of pairs that went or changed are closed once idle.
func (ids *identities) reload(onlyIfChanged bool) (changed bool, err error) {
	ids.mu.Lock()
	defer ids.mu.Unlock()
	stamps, err := ids.scan()
	if err != nil {
		if onlyIfChanged && ids.scanFailed {
			return false, nil // said already
		}
		ids.stamps, ids.scanFailed = nil, true
		return true, err
	}
	if onlyIfChanged && !ids.scanFailed && slices.Equal(stamps, ids.stamps) {
		return false, nil
	}
	ids.stamps, ids.scanFailed = stamps, false
	if len(stamps) > maxIdentities {
		return true, fmt.Errorf("%d pairs in %s: at most %d", len(stamps), ids.dir, maxIdentities)
	}
	old := *ids.byCN.Load()
	next := make(map[string]*upstreamIdentity, len(stamps))
	var errs *multierror.Error
	for _, s := range stamps {
		id, err := ids.load(s.cn)
		if err != nil {
			errs = multierror.Append(errs, err)
			continue
		}
		if o := old[s.cn]; o != nil && bytes.Equal(o.certPEM, id.certPEM) && bytes.Equal(o.keyPEM, id.keyPEM) {
			id = o
		}
		next[s.cn] = id
	}
	if err := errs.ErrorOrNil(); err != nil {
		return true, err
	}
	ids.byCN.Store(&next)
	for cn, o := range old {
		if next[cn] != o {
			o.close()
		}
	}
	return true, nil
}

// load reads one pair; cn is valid.
func (ids *identities) load(cn string) (*upstreamIdentity, error) {
	certPEM, err := os.ReadFile(ids.path(cn, ".crt"))
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(ids.path(cn, ".key"))
	if err != nil {
		return nil, fmt.Errorf("%s.crt without its key: %w", cn, err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%s.crt/%s.key: %w", cn, cn, err)
	}
	id := &upstreamIdentity{cn: cn, cert: &cert, certPEM: certPEM, keyPEM: keyPEM}
	id.leaf, _ = x509.ParseCertificate(cert.Certificate[0])
	return id, nil
}

// lookup is the identity of a client CN; nil when it has none.
func (ids *identities) lookup(cn string) *upstreamIdentity {
	if ids == nil || !validCN(cn) {
		return nil
	}
	return (*ids.byCN.Load())[cn]
}

// count and earliest expiry of the identities loaded, for the log and the metrics.
func (ids *identities) summary() (n int, notAfter time.Time, cns []string) {
	for cn, id := range *ids.byCN.Load() {
		n++
		cns = append(cns, cn)
		if id.leaf != nil && (notAfter.IsZero() || id.leaf.NotAfter.Before(notAfter)) {
			notAfter = id.leaf.NotAfter
		}
	}
	slices.Sort(cns)
	return n, notAfter, cns
}

func (ids *identities) close() {
	if ids == nil {
		return
	}
	for _, id := range *ids.byCN.Load() {
		id.close()
	}
}

// identityKey holds, in an outgoing request's context, the *upstreamIdentity it is sent with.
type identityKey struct{}

func identityOf(ctx context.Context) *upstreamIdentity {
	id, _ := ctx.Value(identityKey{}).(*upstreamIdentity)
	return id
}

// identify decides, in Rewrite, which identity a request reaches the upstream with. It returns the refusal
// when there is none for it and --upstream-identity=strict. The identity travels in the context of pr.Out.
func (f *Forwarder) identify(pr *httputil.ProxyRequest) *http.Response {
	pr.Out.Header.Del(identityHeader) // never believed from a client, never sent upstream
	if f.ids == nil {
		return nil
	}
	cn := verifiedCN(pr.In)
	id := f.ids.lookup(cn)
	if id == nil {
		if !f.ids.strict {
			return nil
		}
		f.log.Debug("no upstream identity for the client: refused", "cn", cn, "path", pr.In.URL.Path)
		return rules.Reply(pr.Out, http.StatusForbidden, msgNoIdentity)
	}
	pr.Out = pr.Out.WithContext(context.WithValue(pr.Out.Context(), identityKey{}, id))
	return nil
}

// identityTransport is the transport of an identity, made on its first request: a clone of the shared one
// whose TLS handshakes present the identity's certificate, so that no pooled connection serves two identities.
func (f *Forwarder) identityTransport(id *upstreamIdentity) *http.Transport {
	t := id.transports.Load()
	if t == nil {
		id.mu.Lock()
		if t = id.transports.Load(); t == nil {
			t = &identityTransports{h: f.transport.Clone()}
			t.h.DialTLSContext = f.dialTLS(f.dialTimeout, []string{"h2", "http/1.1"}, id.cert)
			id.transports.Store(t)
		}
		id.mu.Unlock()
	}
	return t.h
}

// The JSON gateway's side of the carrier: its handler puts the client's CN in the call's context
// (gatewayClientKey), an interceptor of its connection turns it into the metadata entry, and the gRPC core
// believes the entry only on calls that came over the gateway's in-memory connection (fromGatewayConn).
type gatewayClientKey struct{}

// withGatewayClient records the CN of the outer request's client for the gateway's calls.
func withGatewayClient(r *http.Request) *http.Request {
	return r.WithContext(context.WithValue(r.Context(), gatewayClientKey{}, verifiedCN(r)))
}

// carryIdentity sets the identity entry of a gateway call, replacing any a client asked grpc-gateway for.
func carryIdentity(ctx context.Context) context.Context {
	cn, _ := ctx.Value(gatewayClientKey{}).(string)
	if !validCN(cn) {
		cn = "" // no pair can match it; and metadata values must be printable ASCII
	}
	md, _ := metadata.FromOutgoingContext(ctx)
	md = md.Copy()
	md.Set(identityMetadata, cn)
	return metadata.NewOutgoingContext(ctx, md)
}

var gatewayIdentityOptions = []grpc.DialOption{
	grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		return invoker(carryIdentity(ctx), method, req, reply, cc, opts...)
	}),
	grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn,
		method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		return streamer(carryIdentity(ctx), desc, cc, method, opts...)
	}),
}

// useIdentities makes SIGHUP and the poller reload --upstream-cert-dir too.
func (r *certReloader) useIdentities(f *Forwarder) {
	if r.ids = f.ids; r.ids != nil {
		r.identitiesLoaded()
	}
}

// reloadIdentities reloads the folder, logs and counts the result; with onlyIfChanged only when it changed.
func (r *certReloader) reloadIdentities(onlyIfChanged bool) error {
	if r.ids == nil {
		return nil
	}
	changed, err := r.ids.reload(onlyIfChanged)
	switch {
	case err != nil:
		r.m.certReloads.WithLabelValues(sideIdentities, "failure").Inc()
		r.log.Error("upstream identities reload failed; keeping the previous ones", "dir", r.ids.dir, "err", err)
		return fmt.Errorf("--upstream-cert-dir: %w", err)
	case changed:
		r.identitiesLoaded()
	}
	return nil
}

func (r *certReloader) identitiesLoaded() {
	n, notAfter, cns := r.ids.summary()
	r.m.certReloads.WithLabelValues(sideIdentities, "success").Inc()
	if !notAfter.IsZero() {
		r.m.certNotAfter.WithLabelValues(sideIdentities).Set(float64(notAfter.Unix()))
	}
	r.log.Info("upstream identities loaded", "dir", r.ids.dir, "count", n, "cns", strings.Join(cns, ","))
}

// sideIdentities is the side label of the cert metrics for --upstream-cert-dir (the earliest expiry of its pairs).
const sideIdentities = "upstream-identities"
