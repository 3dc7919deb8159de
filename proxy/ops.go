package proxy

import (
	"flag"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"time"
)

// Defaults of the operational flags.
const (
	// DefaultUpstreamHealthInterval is how often each upstream endpoint is probed. Every proxy of a fleet probes,
	// and each probe is a request a member answers: a few seconds, not a few milliseconds.
	DefaultUpstreamHealthInterval = 5 * time.Second
	// DefaultCertReloadInterval is how often the certificate files are checked for changes.
	DefaultCertReloadInterval = 5 * time.Second
	// HealthCheckHTTP asks each upstream endpoint for Maintenance.Status through the JSON gateway; healthy is an
	// answer that names a leader. Where the answer is no Status (no gateway, auth on), GET /health answering 200
	// decides (health.go).
	HealthCheckHTTP = "health"
	// HealthCheckTCP probes that a TCP connection to each upstream endpoint opens.
	HealthCheckTCP = "tcp"
)

// OpsConfig is the operational part of Config: the metrics and health listeners, the upstream probe, certificate
// reload and the access log. It is embedded in Config, so its fields read as Config's.
type OpsConfig struct {
	// ListenMetricsURLs are the http/https URLs that serve /metrics, /livez and /readyz, never the client API;
	// empty means none. https listeners use the client listeners' TLS (ListenerTLS), reloaded with it.
	ListenMetricsURLs []string
	// UpstreamHealthInterval is how often every upstream endpoint is probed for /readyz and the
	// etcd_proxy_proxy_upstream_healthy gauge. Zero means DefaultUpstreamHealthInterval; negative disables the
	// probe, and /readyz then looks at the listeners only.
	UpstreamHealthInterval time.Duration
	// UpstreamHealthCheck is HealthCheckHTTP or HealthCheckTCP; empty means HealthCheckHTTP.
	UpstreamHealthCheck string
	// CertReloadInterval is how often the certificate, key and CA files of both sides are checked for a new
	// modification time or size. Zero means DefaultCertReloadInterval; negative disables polling (SIGHUP, that
	// is Server.ReloadCertificates, still reloads).
	CertReloadInterval time.Duration
	// AccessLog logs one line per request at info level: method, path, safe query parameters, status, duration,
	// bytes, remote address. Never headers, bodies or query values that may be secrets. False logs none.
	AccessLog bool
}

// durationFlag is a Go duration where 0 on the command line means "off", stored as a negative duration so that
// the zero value of the field keeps meaning "the default".
type durationFlag struct{ p *time.Duration }

func (d durationFlag) String() string {
	if d.p == nil || *d.p < 0 {
		return "0"
	}
	return d.p.String()
}

func (d durationFlag) Set(s string) error {
	v, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil || v < 0 {
		return fmt.Errorf("want a duration such as 5s (0 for off), got %q", s)
	}
	if v == 0 {
		v = -1
	}
	*d.p = v
	return nil
}

// addFlags registers the operational flags (called from Config.AddFlags).
func (o *OpsConfig) addFlags(fs *flag.FlagSet) {
	if o.UpstreamHealthInterval == 0 {
		o.UpstreamHealthInterval = DefaultUpstreamHealthInterval
	}
	if o.CertReloadInterval == 0 {
		o.CertReloadInterval = DefaultCertReloadInterval
	}
	if o.UpstreamHealthCheck == "" {
		o.UpstreamHealthCheck = HealthCheckHTTP
	}
	fs.Var(listFlag{&o.ListenMetricsURLs}, "listen-metrics-urls", "http/https URLs serving /metrics, /livez and /readyz (not the client API), comma-separated; https uses --cert-file (default none)")
	fs.Var(durationFlag{&o.UpstreamHealthInterval}, "upstream-health-interval", "how often each upstream endpoint is probed for /readyz, e.g. 5s; 0 disables the probe")
	fs.StringVar(&o.UpstreamHealthCheck, "upstream-health-check", o.UpstreamHealthCheck, "the probe: 'health' (Maintenance.Status names a leader; else GET /health answers 200) or 'tcp' (a connection opens)")
	fs.Var(durationFlag{&o.CertReloadInterval}, "cert-reload-interval", "how often certificate, key and CA files are checked for changes, e.g. 5s; 0 disables polling (SIGHUP still reloads)")
	fs.BoolVar(&o.AccessLog, "access-log", false, "log one line per request (no headers, bodies or secret query values)")
}

// validate adds the problems of the operational settings; c is the whole configuration.
func (o *OpsConfig) validate(c *Config, add func(format string, args ...any)) {
	listen := c.listenURLs()
	for _, u := range o.ListenMetricsURLs {
		if err := checkURL(u); err != nil {
			add("--listen-metrics-urls %q: %v", u, err)
			continue
		}
		if pu, _ := url.Parse(u); pu.Port() != "0" && slices.Contains(listen, u) { // :0 picks two ports
			add("--listen-metrics-urls %q is also a client URL: metrics are never mixed into the client API", u)
		}
		if pu, _ := url.Parse(u); pu.Scheme == "https" && c.ListenerTLS.CertFile == "" {
			add("an https metrics URL needs --cert-file and --key-file")
		}
	}
	switch o.UpstreamHealthCheck {
	case "", HealthCheckHTTP, HealthCheckTCP:
	default:
		add("--upstream-health-check %q: want %q or %q", o.UpstreamHealthCheck, HealthCheckHTTP, HealthCheckTCP)
	}
}

func (o *OpsConfig) healthInterval() time.Duration {
	if o.UpstreamHealthInterval == 0 {
		return DefaultUpstreamHealthInterval
	}
	return o.UpstreamHealthInterval
}

func (o *OpsConfig) reloadInterval() time.Duration {
	if o.CertReloadInterval == 0 {
		return DefaultCertReloadInterval
	}
	return o.CertReloadInterval
}
