package proxy

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"net/url"
	"os"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-multierror"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// EnvPrefix is the prefix of the environment variable of every flag: --listen-client-urls is read from
// ETCD_PROXY_PROXY_LISTEN_CLIENT_URLS when the command line does not set it.
const EnvPrefix = "ETCD_PROXY_PROXY_"

// Defaults of the seed tool and of etcd.
const (
	DefaultListenClientURLs    = "http://localhost:2379,http://localhost:4001"
	DefaultAdvertiseClientURLs = "http://localhost:2379"
	DefaultName                = "etcd-proxy-proxy"
	// DefaultDialTimeout is the stock proxy's --proxy-dial-timeout (1000 ms).
	DefaultDialTimeout = time.Second
	// DefaultWriteTimeout is the stock proxy's --proxy-write-timeout (5000 ms).
	DefaultWriteTimeout = 5 * time.Second
	// DefaultMaxRuleBody bounds a response body buffered for a rule (membership lists are a few KiB).
	DefaultMaxRuleBody = 4 << 20
	// DefaultFailureWait is the stock proxy's --proxy-failure-wait (5000 ms).
	DefaultFailureWait = 5 * time.Second
	// DefaultRefreshInterval is the stock proxy's --proxy-refresh-interval (30000 ms).
	DefaultRefreshInterval = 30 * time.Second
	// DefaultMaxRequestBytes bounds a request body and each gRPC message: etcd's largest recommended
	// --max-request-bytes (10 MiB), so a proxy never refuses what its members accept.
	DefaultMaxRequestBytes = 10 << 20
	// DefaultMaxSnapshotBytes bounds a snapshot spooled from the upstream (rules.DefaultMaxSnapshotBytes: etcd's
	// largest recommended --quota-backend-bytes).
	DefaultMaxSnapshotBytes = rules.DefaultMaxSnapshotBytes
	// DefaultWatchHistory is --watch-history.
	DefaultWatchHistory = 1000
	// DefaultWatchCatchUpLimit is --watch-catch-up-limit.
	DefaultWatchCatchUpLimit = 1000
	// DefaultMaxHeaderBytes bounds a request header, as net/http does by default.
	DefaultMaxHeaderBytes = 1 << 20
	// DefaultMaxUpstreamHeaderBytes bounds an upstream's status line and response headers, as http.Transport
	// does by default (10 MiB).
	DefaultMaxUpstreamHeaderBytes = 10 << 20
	// DefaultReadHeaderTimeout bounds reading a request header: a slow client cannot hold a connection open
	// without ever sending a request.
	DefaultReadHeaderTimeout = 10 * time.Second
	// DefaultIdleTimeout closes a client connection that has been idle this long.
	DefaultIdleTimeout = 5 * time.Minute
	// DefaultShutdownTimeout bounds a graceful shutdown: in-flight requests get this long to finish.
	DefaultShutdownTimeout = 10 * time.Second
)

// TLSInfo describes one TLS side as file paths, as etcd's transport.TLSInfo does. The zero value is plain TCP.
type TLSInfo struct {
	// CertFile and KeyFile are this side's own certificate; empty means none is presented.
	CertFile, KeyFile string
	// CAFile is the bundle that verifies the other side; empty means the system pool (toward the upstream) or
	// no client verification (on a listener).
	CAFile string
	// ClientCertAuth, on a listener, requires a client certificate signed by CAFile.
	ClientCertAuth bool
	// CRLFile, on a listener, is a certificate revocation list (PEM or DER): a client certificate whose serial
	// it lists is refused in the handshake, as etcd's --client-crl-file. Empty means no list.
	CRLFile string
	// InsecureSkipVerify, toward the upstream, accepts any server certificate (-k).
	InsecureSkipVerify bool
}

// Config is everything the proxy needs. It owns its flags (AddFlags); Validate reports every problem at once.
type Config struct {
	// Upstreams are the client URLs requests are forwarded to, in order of preference. Required.
	Upstreams []string
	// UpstreamTLS is the TLS toward the upstream: its CA, our client certificate, -k.
	UpstreamTLS TLSInfo
	// UpstreamCertDir holds per-client upstream identities: a client whose verified listener certificate has the
	// common name CN reaches the upstream with CN.crt and CN.key of this folder (identity.go). Empty means none:
	// every client reaches the upstream with UpstreamTLS's certificate.
	UpstreamCertDir string
	// UpstreamIdentity is what a client without a pair in UpstreamCertDir gets: IdentityShared (UpstreamTLS's
	// certificate) or IdentityStrict (refused). Empty means IdentityShared.
	UpstreamIdentity string
	// ListenClientURLs are the http/https URLs to listen on; empty means DefaultListenClientURLs.
	ListenClientURLs []string
	// AdvertiseClientURLs are the URLs every membership view answers with; empty means DefaultAdvertiseClientURLs.
	AdvertiseClientURLs []string
	// ListenerTLS is the TLS of the https listeners: our server certificate and the CA of client certificates.
	ListenerTLS TLSInfo
	// Name is the member name membership views report; empty means DefaultName.
	Name string
	// ForwardMemberChanges forwards member add/update/remove upstream; false rejects them with an error.
	ForwardMemberChanges bool
	// ReadOnly answers every request that is not GET or HEAD with 501, as the stock proxy's readonly mode does.
	ReadOnly bool
	// DialTimeout bounds a connection attempt to the upstream; zero means DefaultDialTimeout.
	DialTimeout time.Duration
	// WriteTimeout bounds writing a request to the upstream; zero means DefaultWriteTimeout.
	WriteTimeout time.Duration
	// ReadTimeout bounds how long an HTTP request waits for the upstream, as the stock proxy's
	// --proxy-read-timeout does: each read of an HTTP/1.1 answer, the answer's headers over HTTP/2 (a deadline on
	// a shared connection would end its other requests). gRPC calls carry their clients' deadlines. Zero means
	// none, which v2 watches need.
	ReadTimeout time.Duration
	// UpstreamKeepAliveTime is how long an upstream connection may stay silent before the proxy checks that the
	// upstream still answers: an HTTP/2 ping, or for v2 streams over HTTP/1.1 a GET /version to their endpoint.
	// Zero means DefaultUpstreamKeepAliveTime; negative means no checks.
	UpstreamKeepAliveTime time.Duration
	// UpstreamKeepAliveTimeout is how long that check may wait for its answer before the connection is closed and
	// its streams end. Zero means DefaultUpstreamKeepAliveTimeout.
	UpstreamKeepAliveTimeout time.Duration
	// FailureWait is how long an endpoint that could not be reached gets no new requests, unless the probe finds
	// it healthy sooner. Zero means DefaultFailureWait; negative means no wait.
	FailureWait time.Duration
	// RefreshInterval is how often discovery (DiscoverySRV, DiscoverMembers) looks again. Zero means
	// DefaultRefreshInterval; negative means only once, at start.
	RefreshInterval time.Duration
	// DiscoverySRV is a DNS domain whose _etcd-client-ssl._tcp and _etcd-client._tcp SRV records name the
	// upstream endpoints (https and http), as etcd's --discovery-srv; it replaces Upstreams. Empty means none.
	DiscoverySRV string
	// DiscoverySRVName suffixes the SRV service names (_etcd-client-ssl-NAME._tcp), as etcd's
	// --discovery-srv-name. Empty means none.
	DiscoverySRVName string
	// DiscoverMembers learns the members' client URLs from the upstream's member list and uses them as the
	// endpoints, refreshed every RefreshInterval; Upstreams (or DiscoverySRV) are only where it asks. Off by
	// default: it is for members only — another proxy-proxy answers the member list with its own advertised
	// URLs, which may not even be reachable from here.
	DiscoverMembers bool
	// MaxRuleBody bounds a response body buffered for a rule; zero means DefaultMaxRuleBody.
	MaxRuleBody int64
	// MaxRequestBytes bounds a request body, and each message of a gRPC call; zero means
	// DefaultMaxRequestBytes.
	MaxRequestBytes int64
	// MaxHeaderBytes bounds a request header on the listeners; zero means DefaultMaxHeaderBytes.
	MaxHeaderBytes int64
	// MaxUpstreamHeaderBytes bounds the status line and headers of an upstream's answer; zero means
	// DefaultMaxUpstreamHeaderBytes.
	MaxUpstreamHeaderBytes int64
	// SnapshotSpoolDir holds the snapshots being rewritten (rules.Snapshot): up to twice a snapshot's size each.
	// Empty means os.TempDir().
	SnapshotSpoolDir string
	// MaxSnapshotBytes bounds a snapshot received from the upstream; zero means DefaultMaxSnapshotBytes.
	MaxSnapshotBytes int64
	// NoWatchFanOut gives every client watch its own upstream watch, as without the fan-out (watchhub.go).
	NoWatchFanOut bool
	// WatchHistory is how many upstream responses a shared watch keeps for watches that start at an earlier
	// revision and for slow clients; zero means DefaultWatchHistory.
	WatchHistory int
	// WatchCatchUpLimit bounds the slow clients' watches caught up by upstream watches of their own at once; one
	// more is cancelled. Zero means DefaultWatchCatchUpLimit.
	WatchCatchUpLimit int
	// ReadHeaderTimeout bounds reading a request header on the listeners. Zero means
	// DefaultReadHeaderTimeout; negative means none.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes a client connection idle for this long. Zero means DefaultIdleTimeout; negative means
	// never.
	IdleTimeout time.Duration
	// ShutdownTimeout is how long a graceful shutdown lets in-flight requests finish (open streams are ended
	// at once). Zero means DefaultShutdownTimeout; negative means none: everything is closed at once.
	ShutdownTimeout time.Duration
	// EncryptPrefixes are the key prefixes whose values are stored encrypted (rules.Encrypt); empty means none.
	EncryptPrefixes []string
	// EncryptionKeyFiles are the encryption keys' files (<name>:<base64 of 32 bytes>, as `keygen` writes them):
	// the first encrypts, all decrypt. Required with EncryptPrefixes.
	EncryptionKeyFiles []string
	// EncryptionReadPlaintext reads a value under EncryptPrefixes that is not encrypted as it is (counted as
	// stale), to turn encryption on over existing data; false makes it an error.
	EncryptionReadPlaintext bool
	// EncryptionConfig is a file (YAML or JSON) of key prefixes each with its ordered providers (key files,
	// identity), the general case of EncryptPrefixes and EncryptionKeyFiles, which it excludes; reloaded on
	// SIGHUP and when it or its key files change. Empty means none.
	EncryptionConfig string
	// EncryptionMaxRequestBytes is the members' --max-request-bytes: a write that encryption would make larger
	// is refused. Zero means rules.DefaultEncryptMaxRequestBytes (etcd's default, 1.5 MiB).
	EncryptionMaxRequestBytes int64
	// EtcvaultKeychain is etcvault's keychain directory (its <name>.pem RSA keys): under the encrypted prefixes,
	// etcvault's values read as their plaintext (stale: rewrap them) and its ETCVAULT::plain: write markers are
	// encrypted as the plaintext they hold. Empty means none.
	EtcvaultKeychain string
	// OpsConfig holds the metrics/health listeners, the upstream probe, certificate reload and the access log
	// (ops.go); its fields are promoted.
	OpsConfig
	// TunnelConfig is how upstreams that cannot be dialled directly are reached (tunnel.go); its fields are
	// promoted.
	TunnelConfig
}

// listFlag is a comma-separated list flag.
type listFlag struct{ p *[]string }

func (l listFlag) String() string {
	if l.p == nil {
		return ""
	}
	return strings.Join(*l.p, ",")
}

func (l listFlag) Set(s string) error {
	*l.p = nil
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l.p = append(*l.p, v)
		}
	}
	return nil
}

// ListFlag is a comma-separated list flag over p, as --upstream's: for the agent's flags (agent.Config).
func ListFlag(p *[]string) flag.Value { return listFlag{p} }

// repeatFlag is a flag given once per value, taken as it is (a key prefix may hold commas, or be empty). From
// the environment it takes one value.
type repeatFlag struct{ p *[]string }

func (r repeatFlag) String() string {
	if r.p == nil {
		return ""
	}
	return strings.Join(*r.p, " ")
}

func (r repeatFlag) Set(s string) error {
	*r.p = append(*r.p, s)
	return nil
}

// msFlag is a duration given in milliseconds, as the stock proxy's --proxy-*-timeout flags are. With zeroOff,
// 0 is stored as a negative duration, so that the zero value of the field keeps meaning "the default".
type msFlag struct {
	p       *time.Duration
	zeroOff bool
}

func (m msFlag) String() string {
	if m.p == nil || *m.p < 0 {
		return "0"
	}
	return fmt.Sprint(m.p.Milliseconds())
}

func (m msFlag) Set(s string) error {
	// Not fmt.Sscan: it stops at the first non-digit and would read "1s" as 1 ms.
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || n < 0 {
		return fmt.Errorf("want milliseconds as a non-negative integer, got %q", s)
	}
	*m.p = time.Duration(n) * time.Millisecond
	if n == 0 && m.zeroOff {
		*m.p = -1
	}
	return nil
}

// bytesFlag is a positive number of bytes.
type bytesFlag struct{ p *int64 }

func (b bytesFlag) String() string {
	if b.p == nil {
		return "0"
	}
	return fmt.Sprint(*b.p)
}

func (b bytesFlag) Set(s string) error {
	n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
	if err != nil || n <= 0 {
		return fmt.Errorf("want a number of bytes greater than 0, got %q", s)
	}
	*b.p = n
	return nil
}

// AddFlags registers the configuration's flags on fs, with the seed tool's names and etcd's spellings as aliases.
// Defaults are filled in so that --help shows them.
func (c *Config) AddFlags(fs *flag.FlagSet) {
	if len(c.ListenClientURLs) == 0 {
		c.ListenClientURLs = split(DefaultListenClientURLs)
	}
	if len(c.AdvertiseClientURLs) == 0 {
		c.AdvertiseClientURLs = split(DefaultAdvertiseClientURLs)
	}
	if c.Name == "" {
		c.Name = DefaultName
	}
	if c.UpstreamIdentity == "" {
		c.UpstreamIdentity = IdentityShared
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = DefaultWriteTimeout
	}
	for _, d := range []struct {
		p   *time.Duration
		def time.Duration
	}{
		{&c.FailureWait, DefaultFailureWait}, {&c.RefreshInterval, DefaultRefreshInterval},
		{&c.ReadHeaderTimeout, DefaultReadHeaderTimeout}, {&c.IdleTimeout, DefaultIdleTimeout},
		{&c.ShutdownTimeout, DefaultShutdownTimeout}, {&c.UpstreamKeepAliveTime, DefaultUpstreamKeepAliveTime},
		{&c.UpstreamKeepAliveTimeout, DefaultUpstreamKeepAliveTimeout},
	} {
		if *d.p == 0 {
			*d.p = d.def
		}
	}
	c.MaxRuleBody, c.MaxRequestBytes, c.MaxHeaderBytes = c.maxRuleBody(), c.maxRequestBytes(), c.maxHeaderBytes()
	c.MaxUpstreamHeaderBytes = c.maxUpstreamHeaderBytes()
	c.MaxSnapshotBytes = orDefault(c.MaxSnapshotBytes, DefaultMaxSnapshotBytes)
	c.WatchHistory = orDefault(c.WatchHistory, DefaultWatchHistory)
	c.WatchCatchUpLimit = orDefault(c.WatchCatchUpLimit, DefaultWatchCatchUpLimit)
	fs.Var(listFlag{&c.Upstreams}, "upstream", "upstream client URL(s), comma-separated: an etcd member, a stock etcd proxy or another etcd-proxy-proxy (required)")
	fs.StringVar(&c.UpstreamTLS.CAFile, "upstream-ca-file", "", "verify the upstream's certificate with this CA bundle (default: the system roots)")
	fs.StringVar(&c.UpstreamTLS.CertFile, "upstream-cert-file", "", "client certificate presented to the upstream")
	fs.StringVar(&c.UpstreamTLS.KeyFile, "upstream-key-file", "", "key of --upstream-cert-file")
	fs.StringVar(&c.UpstreamCertDir, "upstream-cert-dir", "", "folder of per-client upstream identities: a client whose verified certificate has the common name CN reaches the upstream with CN.crt and CN.key from it (reloaded as certificates are)")
	fs.StringVar(&c.UpstreamIdentity, "upstream-identity", c.UpstreamIdentity, "what a client without a pair in --upstream-cert-dir gets: 'shared' (--upstream-cert-file's identity) or 'strict' (refused: 403 / PermissionDenied)")
	fs.BoolVar(&c.UpstreamTLS.InsecureSkipVerify, "k", false, "do not verify the upstream's certificate")
	fs.BoolVar(&c.UpstreamTLS.InsecureSkipVerify, "upstream-insecure-skip-tls-verify", false, "alias of -k")
	fs.Var(listFlag{&c.ListenClientURLs}, "listen-client-urls", "http/https URLs to listen on for client traffic, comma-separated")
	fs.Var(listFlag{&c.AdvertiseClientURLs}, "advertise-client-urls", "client URLs to advertise in every membership view, comma-separated")
	fs.Var(listFlag{&c.AdvertiseClientURLs}, "client-advertise-urls", "alias of --advertise-client-urls (the seed's name)")
	fs.StringVar(&c.ListenerTLS.CertFile, "cert-file", "", "server certificate of the https listeners")
	fs.StringVar(&c.ListenerTLS.KeyFile, "key-file", "", "key of --cert-file")
	fs.StringVar(&c.ListenerTLS.CAFile, "trusted-ca-file", "", "verify client certificates with this CA bundle")
	fs.StringVar(&c.ListenerTLS.CAFile, "trust-ca-file", "", "alias of --trusted-ca-file (the seed's README spelling)")
	fs.BoolVar(&c.ListenerTLS.ClientCertAuth, "client-cert-auth", false, "require a client certificate signed by --trusted-ca-file")
	fs.StringVar(&c.ListenerTLS.CRLFile, "client-crl-file", "", "refuse client certificates revoked by this certificate revocation list (PEM or DER)")
	fs.StringVar(&c.Name, "name", c.Name, "member name reported in membership views")
	fs.BoolVar(&c.ForwardMemberChanges, "forward-member-changes", false, "forward member add/update/remove upstream instead of rejecting them")
	fs.BoolVar(&c.ReadOnly, "readonly", false, "answer every request but GET and HEAD with 501, as the stock readonly proxy does")
	fs.Var(msFlag{p: &c.DialTimeout}, "proxy-dial-timeout", "milliseconds to wait for a connection to the upstream")
	fs.Var(msFlag{p: &c.WriteTimeout}, "proxy-write-timeout", "milliseconds to wait for a request to be written to the upstream")
	fs.Var(msFlag{p: &c.ReadTimeout}, "proxy-read-timeout", "milliseconds an HTTP request waits for the upstream (each read over HTTP/1.1, the headers over HTTP/2; not gRPC); 0 waits for ever (v2 watches need it)")
	fs.Var(durationFlag{&c.UpstreamKeepAliveTime}, "upstream-keepalive-time", "how long an upstream connection may be silent before the proxy checks that the upstream answers (HTTP/2 ping; GET /version for v2 streams over HTTP/1.1), e.g. 30s; 0 for never")
	fs.Var(durationFlag{&c.UpstreamKeepAliveTimeout}, "upstream-keepalive-timeout", "how long that check waits for its answer before the connection is closed and its streams end, e.g. 15s")
	fs.Var(msFlag{p: &c.FailureWait, zeroOff: true}, "proxy-failure-wait", "milliseconds an endpoint that could not be reached gets no new requests (unless the probe finds it healthy sooner)")
	fs.Var(msFlag{p: &c.RefreshInterval, zeroOff: true}, "proxy-refresh-interval", "milliseconds between discovery refreshes (--discovery-srv, --discover-members); 0 discovers once, at start")
	fs.StringVar(&c.DiscoverySRV, "discovery-srv", "", "DNS domain whose _etcd-client-ssl._tcp / _etcd-client._tcp SRV records name the upstream endpoints (instead of --upstream)")
	fs.StringVar(&c.DiscoverySRVName, "discovery-srv-name", "", "suffix of the SRV service names: _etcd-client-ssl-NAME._tcp")
	fs.BoolVar(&c.DiscoverMembers, "discover-members", false, "use the client URLs of the upstream's members as the endpoints, refreshed every --proxy-refresh-interval (for members only: another proxy-proxy answers with itself)")
	fs.Var(bytesFlag{&c.MaxRequestBytes}, "max-request-bytes", "largest request body, and largest message of a gRPC call, in bytes")
	fs.Var(bytesFlag{&c.MaxRuleBody}, "max-rule-body-bytes", "largest upstream response a rule may buffer to rewrite (membership lists), in bytes")
	fs.Var(bytesFlag{&c.MaxHeaderBytes}, "max-header-bytes", "largest request header, in bytes")
	fs.Var(bytesFlag{&c.MaxUpstreamHeaderBytes}, "max-upstream-header-bytes", "largest status line and header of an upstream's answer, in bytes; more is answered 502")
	fs.StringVar(&c.SnapshotSpoolDir, "snapshot-spool-dir", "", "directory where snapshots are spooled to hide the membership in them, up to twice a snapshot's size each (default: the system's temporary directory)")
	fs.Var(bytesFlag{&c.MaxSnapshotBytes}, "max-snapshot-bytes", "largest snapshot (database and hash) accepted from the upstream, in bytes; a larger one fails with ResourceExhausted")
	fs.Var(notFlag{&c.NoWatchFanOut}, "watch-fan-out", "identical client watches share one upstream watch, resumed on another endpoint when its member fails (default true; false: one upstream watch per client watch)")
	fs.IntVar(&c.WatchHistory, "watch-history", c.WatchHistory, "upstream responses a shared watch keeps, for watches that start at an earlier revision and for slow clients (default 1000)")
	fs.IntVar(&c.WatchCatchUpLimit, "watch-catch-up-limit", c.WatchCatchUpLimit, "watches of slow clients (fallen behind --watch-history) caught up by upstream watches of their own at once; one more is cancelled with a CancelReason that says from which revision to watch again (default 1000)")
	fs.Var(durationFlag{&c.ReadHeaderTimeout}, "listen-read-header-timeout", "how long a client may take to send a request header, e.g. 10s; 0 for no limit")
	fs.Var(durationFlag{&c.IdleTimeout}, "listen-idle-timeout", "how long an idle client connection is kept, e.g. 5m; 0 for ever")
	fs.Var(durationFlag{&c.ShutdownTimeout}, "shutdown-timeout", "how long in-flight requests may take to finish on SIGTERM (streams end at once), e.g. 10s; 0 closes at once")
	if c.EncryptionMaxRequestBytes == 0 {
		c.EncryptionMaxRequestBytes = rules.DefaultEncryptMaxRequestBytes
	}
	fs.Var(repeatFlag{&c.EncryptPrefixes}, "encrypt-prefix", "store the values of the keys under this prefix encrypted (repeatable; needs --encryption-key-file)")
	fs.Var(repeatFlag{&c.EncryptionKeyFiles}, "encryption-key-file", "file of an encryption key, <name>:<base64 of 32 bytes> as keygen writes it (repeatable: the first encrypts, all decrypt)")
	fs.StringVar(&c.EncryptionConfig, "encryption-config", "", "file (YAML or JSON) of key prefixes, each with its ordered providers (keyFile, identity); instead of --encrypt-prefix and --encryption-key-file; reloaded on SIGHUP and when it or its key files change")
	fs.BoolVar(&c.EncryptionReadPlaintext, "encryption-read-plaintext", false, "read a value under --encrypt-prefix that is not encrypted as it is (to turn encryption on over existing data); otherwise it is an error")
	fs.Var(bytesFlag{&c.EncryptionMaxRequestBytes}, "encryption-max-request-bytes", "the members' --max-request-bytes: a write that encryption would make larger is refused, in bytes")
	fs.StringVar(&c.EtcvaultKeychain, "etcvault-keychain", "", "etcvault's keychain directory (NAME.pem): under the encrypted prefixes, etcvault's values read as their plaintext (to migrate: rewrap them)")
	c.OpsConfig.addFlags(fs)    // metrics, health, reload, access log (ops.go)
	c.TunnelConfig.addFlags(fs) // --upstream-via, --tunnel-* (tunnel.go)
}

// SetFlagsFromEnv sets every flag that the command line left unset from its ETCD_PROXY_PROXY_ variable, as etcd's
// pkg/flags.SetFlagsFromEnv does. Single-letter flags have no variable. Call it after fs.Parse.
func SetFlagsFromEnv(fs *flag.FlagSet, lookup func(string) (string, bool)) error {
	if lookup == nil {
		lookup = os.LookupEnv
	}
	// A flag counts as set when the command line set it or one of its aliases (the same Value): otherwise
	// ETCD_PROXY_PROXY_TRUST_CA_FILE would override --trusted-ca-file given on the command line.
	var set []flag.Value
	fs.Visit(func(f *flag.Flag) { set = append(set, f.Value) })
	var errs *multierror.Error
	fs.VisitAll(func(f *flag.Flag) {
		if len(f.Name) == 1 || slices.ContainsFunc(set, func(v flag.Value) bool { return sameValue(v, f.Value) }) {
			return
		}
		key := EnvPrefix + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))
		if v, ok := lookup(key); ok {
			if err := fs.Set(f.Name, v); err != nil {
				errs = multierror.Append(errs, fmt.Errorf("%s=%q: %w", key, v, err))
			}
		}
	})
	return errs.ErrorOrNil()
}

// sameValue reports whether two flags are aliases: registered on the same variable.
func sameValue(a, b flag.Value) bool {
	ta := reflect.TypeOf(a)
	return ta == reflect.TypeOf(b) && ta.Comparable() && a == b
}

// Validate reports every problem of the configuration at once.
func (c *Config) Validate() error {
	var errs *multierror.Error
	add := func(format string, args ...any) { errs = multierror.Append(errs, fmt.Errorf(format, args...)) }
	switch {
	case len(c.Upstreams) == 0 && c.DiscoverySRV == "":
		add("--upstream or --discovery-srv is required")
	case len(c.Upstreams) > 0 && c.DiscoverySRV != "":
		add("--upstream and --discovery-srv exclude each other: give one")
	}
	if c.DiscoverySRVName != "" && c.DiscoverySRV == "" {
		add("--discovery-srv-name needs --discovery-srv")
	}
	for _, u := range c.Upstreams {
		if _, _, tunnelled := splitTunnelUpstream(u); tunnelled {
			continue // checked by TunnelConfig.validate (tunnelserver.go)
		}
		if err := checkURL(u); err != nil {
			add("--upstream %q: %v", u, err)
		}
	}
	listen := c.listenURLs()
	tlsListener := false
	for _, u := range listen {
		if err := checkURL(u); err != nil {
			add("--listen-client-urls %q: %v", u, err)
		}
		tlsListener = tlsListener || strings.HasPrefix(u, "https://")
	}
	for _, u := range c.advertiseURLs() {
		if err := checkURL(u); err != nil {
			add("--advertise-client-urls %q: %v", u, err)
		}
	}
	if (c.ListenerTLS.CertFile == "") != (c.ListenerTLS.KeyFile == "") {
		add("--cert-file and --key-file go together")
	}
	if tlsListener && c.ListenerTLS.CertFile == "" {
		add("an https listen URL needs --cert-file and --key-file")
	}
	if c.ListenerTLS.ClientCertAuth && c.ListenerTLS.CAFile == "" {
		add("--client-cert-auth needs --trusted-ca-file")
	}
	if c.ListenerTLS.CRLFile != "" && c.ListenerTLS.CAFile == "" {
		add("--client-crl-file needs --trusted-ca-file")
	}
	if c.ListenerTLS.ClientCertAuth {
		for _, u := range listen {
			if strings.HasPrefix(u, "http://") {
				add("--client-cert-auth: %s would serve without any authentication; listen on https URLs only", u)
			}
		}
	}
	if (c.UpstreamTLS.CertFile == "") != (c.UpstreamTLS.KeyFile == "") {
		add("--upstream-cert-file and --upstream-key-file go together")
	}
	for flagName, path := range map[string]string{
		"--cert-file": c.ListenerTLS.CertFile, "--key-file": c.ListenerTLS.KeyFile,
		"--trusted-ca-file": c.ListenerTLS.CAFile, "--client-crl-file": c.ListenerTLS.CRLFile,
		"--upstream-ca-file": c.UpstreamTLS.CAFile, "--upstream-cert-file": c.UpstreamTLS.CertFile,
		"--upstream-key-file": c.UpstreamTLS.KeyFile,
	} {
		if path == "" {
			continue
		}
		if _, err := os.Stat(path); err != nil {
			add("%s: %v", flagName, errors.Unwrap(err))
		}
	}
	switch c.UpstreamIdentity {
	case "", IdentityShared:
	case IdentityStrict:
		if c.UpstreamCertDir == "" {
			add("--upstream-identity=strict needs --upstream-cert-dir")
		}
	default:
		add("--upstream-identity %q: want %q or %q", c.UpstreamIdentity, IdentityShared, IdentityStrict)
	}
	if c.UpstreamCertDir != "" {
		if fi, err := os.Stat(c.UpstreamCertDir); err != nil {
			add("--upstream-cert-dir: %v", errors.Unwrap(err))
		} else if !fi.IsDir() {
			add("--upstream-cert-dir %s: not a directory", c.UpstreamCertDir)
		}
		if c.ListenerTLS.CAFile == "" {
			add("--upstream-cert-dir needs --trusted-ca-file: a client is known by the certificate it verifies")
		}
	}
	if c.SnapshotSpoolDir != "" {
		if fi, err := os.Stat(c.SnapshotSpoolDir); err != nil {
			add("--snapshot-spool-dir: %v", errors.Unwrap(err))
		} else if !fi.IsDir() {
			add("--snapshot-spool-dir: %s is not a directory", c.SnapshotSpoolDir)
		}
	}
	if c.MaxRuleBody < 0 || c.MaxRequestBytes < 0 || c.MaxHeaderBytes < 0 || c.MaxSnapshotBytes < 0 ||
		c.MaxUpstreamHeaderBytes < 0 || c.EncryptionMaxRequestBytes < 0 {
		add("byte limits must not be negative")
	}
	if c.WatchHistory < 0 {
		add("--watch-history: must not be negative")
	}
	if c.WatchCatchUpLimit < 0 {
		add("--watch-catch-up-limit: must not be negative")
	}
	if c.MaxHeaderBytes > math.MaxInt32 {
		add("--max-header-bytes: at most %d", math.MaxInt32)
	}
	if c.MaxRequestBytes > math.MaxInt32 { // a gRPC message's length has 32 bits
		add("--max-request-bytes: at most %d", math.MaxInt32)
	}
	if c.UpstreamKeepAliveTimeout < 0 {
		add("--upstream-keepalive-timeout: must be greater than 0")
	}
	c.validateEncryption(add)
	c.OpsConfig.validate(c, add)              // ops.go
	c.TunnelConfig.validate(c.Upstreams, add) // tunnel.go
	return sortErrors(errs)
}

// validateEncryption checks the encryption flags, and reads every key file.
func (c *Config) validateEncryption(add func(format string, args ...any)) {
	if c.EncryptionConfig != "" {
		if len(c.EncryptPrefixes) > 0 || len(c.EncryptionKeyFiles) > 0 || c.EncryptionReadPlaintext {
			add("--encryption-config excludes --encrypt-prefix, --encryption-key-file and --encryption-read-plaintext")
		}
		_, _, errs := loadEncryptionConfig(c.EncryptionConfig, c.EtcvaultKeychain)
		for _, err := range errs {
			add("%v", err)
		}
		return
	}
	if len(c.EncryptPrefixes) == 0 {
		if c.EtcvaultKeychain != "" {
			add("--etcvault-keychain needs --encrypt-prefix or --encryption-config")
		}
		if len(c.EncryptionKeyFiles) > 0 {
			add("--encryption-key-file needs --encrypt-prefix")
		}
		if c.EncryptionReadPlaintext {
			add("--encryption-read-plaintext needs --encrypt-prefix")
		}
		return
	}
	if len(c.EncryptionKeyFiles) == 0 {
		add("--encrypt-prefix needs --encryption-key-file")
		return
	}
	if _, errs := c.encryptionKeyring(); errs != nil {
		for _, err := range errs {
			add("%v", err)
		}
	}
}

// encryptionKeyring reads the key files into a keyring, with the identity provider last when plaintext reads.
func (c *Config) encryptionKeyring() (*crypt.Keyring, []error) {
	var (
		keys []*crypt.Key
		errs []error
		seen = map[string]string{}
	)
	for _, f := range c.EncryptionKeyFiles {
		k, err := crypt.LoadKeyFile(f)
		var pe *os.PathError
		switch {
		case errors.As(err, &pe):
			errs = append(errs, fmt.Errorf("--encryption-key-file %s: %v", f, pe.Err))
			continue
		case err != nil:
			errs = append(errs, fmt.Errorf("--encryption-key-file %v", err))
			continue
		}
		if other, dup := seen[k.Name()]; dup {
			errs = append(errs, fmt.Errorf("--encryption-key-file %s: key %s is also in %s", f, k.Name(), other))
			continue
		}
		seen[k.Name()] = f
		keys = append(keys, k)
	}
	if errs != nil {
		return nil, errs
	}
	if c.EncryptionReadPlaintext {
		keys = append(keys, crypt.IdentityKey())
	}
	ev, err := loadEtcvaultKeychain(c.EtcvaultKeychain)
	if err != nil {
		return nil, []error{err}
	}
	if ev != nil {
		keys = append(keys, ev)
	}
	r, err := crypt.NewKeyring(keys...)
	if err != nil {
		return nil, []error{err}
	}
	return r, nil
}

// sortErrors keeps the message stable: map iteration above is random.
func sortErrors(errs *multierror.Error) error {
	if errs == nil {
		return nil
	}
	slices.SortFunc(errs.Errors, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
	return errs
}

func checkURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return errors.Unwrap(err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return fmt.Errorf("scheme must be http or https")
	}
	if _, _, err := net.SplitHostPort(u.Host); err != nil {
		return fmt.Errorf("want host:port")
	}
	if u.Path != "" && u.Path != "/" {
		return fmt.Errorf("must not have a path")
	}
	return nil
}

func (c *Config) listenURLs() []string {
	if len(c.ListenClientURLs) == 0 {
		return split(DefaultListenClientURLs)
	}
	return c.ListenClientURLs
}

func (c *Config) advertiseURLs() []string {
	if len(c.AdvertiseClientURLs) == 0 {
		return split(DefaultAdvertiseClientURLs)
	}
	return c.AdvertiseClientURLs
}

func split(s string) []string {
	var l []string
	_ = listFlag{&l}.Set(s)
	return l
}

func (c *Config) failureWait() time.Duration { return orDefault(c.FailureWait, DefaultFailureWait) }
func (c *Config) refreshInterval() time.Duration {
	return orDefault(c.RefreshInterval, DefaultRefreshInterval)
}
func (c *Config) readHeaderTimeout() time.Duration {
	return orDefault(c.ReadHeaderTimeout, DefaultReadHeaderTimeout)
}
func (c *Config) idleTimeout() time.Duration { return orDefault(c.IdleTimeout, DefaultIdleTimeout) }

// upstreamKeepAlive is the keep-alive time (zero: no checks) and timeout, with their defaults.
func (c *Config) upstreamKeepAlive() (time.Duration, time.Duration) {
	return orDefault(c.UpstreamKeepAliveTime, DefaultUpstreamKeepAliveTime),
		orDefault(c.UpstreamKeepAliveTimeout, DefaultUpstreamKeepAliveTimeout)
}

// ShutdownGrace is how long Shutdown should let in-flight requests finish: ShutdownTimeout with its default.
func (c *Config) ShutdownGrace() time.Duration {
	return orDefault(c.ShutdownTimeout, DefaultShutdownTimeout)
}

func (c *Config) maxRuleBody() int64     { return orDefault(c.MaxRuleBody, DefaultMaxRuleBody) }
func (c *Config) maxRequestBytes() int64 { return orDefault(c.MaxRequestBytes, DefaultMaxRequestBytes) }
func (c *Config) maxHeaderBytes() int64  { return orDefault(c.MaxHeaderBytes, DefaultMaxHeaderBytes) }
func (c *Config) maxUpstreamHeaderBytes() int64 {
	return orDefault(c.MaxUpstreamHeaderBytes, DefaultMaxUpstreamHeaderBytes)
}

// orDefault is v with zero meaning def and a negative value meaning off (returned as zero).
func orDefault[T int | int64 | time.Duration](v, def T) T {
	switch {
	case v == 0:
		return def
	case v < 0:
		return 0
	}
	return v
}

// notFlag is a boolean flag that sets the negation of its field, so the field's zero value is the default.
type notFlag struct{ p *bool }

func (f notFlag) String() string {
	if f.p == nil {
		return "true"
	}
	return strconv.FormatBool(!*f.p)
}

func (f notFlag) Set(v string) error {
	b, err := strconv.ParseBool(v)
	if err != nil {
		return err
	}
	*f.p = !b
	return nil
}

func (notFlag) IsBoolFlag() bool { return true }
