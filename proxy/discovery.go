package proxy

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-multierror"
)

// discoveryResolver is a test hook: when set, SRV records are looked up with it instead of net.DefaultResolver,
// so that a test can answer them from a DNS server of its own.
var discoveryResolver *net.Resolver

// The paths of the member list: the v3 JSON gateway's, and the v2 API's for an upstream without the gateway
// (etcd's stock v2 proxy).
const (
	memberListV3 = "/v3/cluster/member/list"
	memberListV2 = "/v2/members"
)

// discoverer finds the upstream endpoints: the SRV records of a domain (--discovery-srv) and the client URLs of
// the upstream's members (--discover-members), again every --proxy-refresh-interval.
type discoverer struct {
	cfg       *Config
	endpoints *endpointSet
	log       *slog.Logger
	// seeds are the Upstreams: where the member list is asked for without --discovery-srv.
	seeds []*url.URL
	// resolver looks up the SRV records; nil means net.DefaultResolver.
	resolver *net.Resolver
	// client asks for the member list, with the upstream TLS; it keeps no connection open between refreshes.
	client *http.Client
	// interval is the time between refreshes; zero means none: discovery runs once, at start.
	interval time.Duration
	// timeout bounds each SRV lookup and each member list request.
	timeout time.Duration
	// kick asks run for a refresh before the interval is over (refreshSoon).
	kick chan struct{}
}

// kickGap is the least time between a refresh and one asked for by refreshSoon: an endpoint that is simply down
// (every request and every probe finds it so) costs at most one member list request a second.
const kickGap = time.Second

// discoverFirst runs the first discovery (Start); without discovery configured it does nothing. Nothing found
// by SRV is an error; a member list that cannot be had is not: requests go to the seeds until a refresh gets one.
func (s *Server) discoverFirst() error {
	if s.cfg.DiscoverySRV == "" && !s.cfg.DiscoverMembers {
		return nil
	}
	d := &discoverer{cfg: &s.cfg, endpoints: s.forwarder.endpoints, log: s.log, interval: s.cfg.refreshInterval()}
	for _, raw := range s.cfg.Upstreams {
		if u, err := parseUpstream(raw); err == nil { // validated; parsed as NewForwarder does, so the URLs compare equal
			d.seeds = append(d.seeds, u)
		}
	}
	if s.cfg.DiscoverySRV != "" {
		d.resolver = discoveryResolver
	}
	// As long as the interval (refreshes never overlap), at most 5 s, at least 1 s.
	d.timeout = 5 * time.Second
	if d.interval > 0 {
		d.timeout = max(min(d.timeout, d.interval), time.Second)
	}
	// Its own transport with the upstream TLS (set up in New).
	t := s.forwarder.transport.Clone()
	t.DisableKeepAlives = true
	d.client = &http.Client{Transport: t, Timeout: d.timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	s.discovery = d
	if d.interval > 0 {
		// An endpoint found unreachable may be a member that restarted on other URLs — in etcd's live migration
		// to TLS, its client URLs move from http to https: look again then rather than at the next interval,
		// which would leave the proxy without a usable endpoint if every member moved within one interval.
		d.kick = make(chan struct{}, 1)
		s.forwarder.endpoints.troubled = d.refreshSoon
	}
	if err := d.refresh(context.Background(), true); err != nil {
		return fmt.Errorf("discovery: %w", err)
	}
	return nil
}

// run refreshes every interval, and soon after refreshSoon (at most one such refresh per kickGap), until ctx is
// done. A refresh that fails keeps the endpoints as they are.
func (d *discoverer) run(ctx context.Context) {
	if d.interval <= 0 {
		return
	}
	t := time.NewTicker(d.interval)
	defer t.Stop()
	last := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-d.kick:
			if wait := time.Until(last.Add(kickGap)); wait > 0 {
				select {
				case <-ctx.Done():
					return
				case <-time.After(wait):
				}
			}
		}
		last = time.Now()
		if err := d.refresh(ctx, false); err != nil && ctx.Err() == nil {
			d.log.Warn("discovery: refresh failed; the upstream endpoints stay as they are", "err", err)
		}
	}
}

// refreshSoon asks run for a refresh now; it never blocks (a refresh already asked for covers this one).
func (d *discoverer) refreshSoon() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// refresh looks again and sets the endpoints found: the seeds (SRV records or Upstreams), or with
// --discover-members the client URLs of the members they report. On an error the endpoints stay as they are;
// at start (first), a member list that cannot be had leaves the endpoints at the seeds.
func (d *discoverer) refresh(ctx context.Context, first bool) error {
	seeds := d.seeds
	if d.cfg.DiscoverySRV != "" {
		var err error
		if seeds, err = d.lookupSRV(ctx); err != nil {
			return err
		}
	}
	urls := seeds
	if d.cfg.DiscoverMembers {
		var err error
		urls, err = d.memberURLs(ctx, seeds)
		switch {
		case err != nil && !first:
			return err
		case err != nil:
			d.log.Warn("discovery: no member list yet; forwarding to the seeds until a refresh gets one", "err", err)
			urls = seeds
		}
	}
	if d.endpoints.set(urls) {
		shown := make([]string, len(urls))
		for i, u := range urls {
			shown[i] = u.Redacted()
		}
		d.log.Info("discovery: upstream endpoints changed", "count", len(urls), "urls", shown)
	}
	return nil
}

// lookupSRV finds the endpoints as etcd's client/pkg/srv.GetClient does: https://TARGET:PORT for each
// _etcd-client-ssl[-NAME]._tcp record of the domain, then http://TARGET:PORT for each _etcd-client[-NAME]._tcp
// record. Either name may have no records, not both.
func (d *discoverer) lookupSRV(ctx context.Context) ([]*url.URL, error) {
	suffix := ""
	if d.cfg.DiscoverySRVName != "" {
		suffix = "-" + d.cfg.DiscoverySRVName
	}
	r := cmp.Or(d.resolver, net.DefaultResolver)
	var urls []*url.URL
	var names []string
	for _, svc := range []struct{ scheme, service string }{{"https", "etcd-client-ssl"}, {"http", "etcd-client"}} {
		name := "_" + svc.service + suffix + "._tcp." + d.cfg.DiscoverySRV
		names = append(names, name)
		lctx, cancel := context.WithTimeout(ctx, d.timeout)
		_, srvs, err := r.LookupSRV(lctx, "", "", name)
		cancel()
		if dnsErr := (*net.DNSError)(nil); errors.As(err, &dnsErr) && dnsErr.IsNotFound {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("looking up SRV %s: %w", name, err)
		}
		// LookupSRV shuffles records of equal priority by weight: sort them, so that the list changes only when
		// the records do.
		slices.SortFunc(srvs, func(a, b *net.SRV) int {
			return cmp.Or(cmp.Compare(a.Priority, b.Priority), cmp.Compare(b.Weight, a.Weight),
				strings.Compare(a.Target, b.Target), cmp.Compare(a.Port, b.Port))
		})
		for _, rec := range srvs {
			u := &url.URL{Scheme: svc.scheme,
				Host: net.JoinHostPort(strings.TrimSuffix(rec.Target, "."), strconv.Itoa(int(rec.Port)))}
			if !slices.ContainsFunc(urls, func(v *url.URL) bool { return *v == *u }) {
				urls = append(urls, u)
			}
		}
	}
	if len(urls) == 0 {
		return nil, fmt.Errorf("no SRV records at %s", strings.Join(names, " or "))
	}
	return urls, nil
}

// memberURLs asks the seeds in turn for the member list, then the current endpoints (a cluster whose seeds all
// left is still found); the first that answers gives the endpoints: every client URL of every voting member,
// deduplicated and sorted.
func (d *discoverer) memberURLs(ctx context.Context, seeds []*url.URL) ([]*url.URL, error) {
	ask := slices.Clone(seeds)
	for _, e := range d.endpoints.current() {
		if !slices.ContainsFunc(ask, func(u *url.URL) bool { return u.String() == e.url.String() }) {
			ask = append(ask, e.url)
		}
	}
	var errs *multierror.Error
	for _, seed := range ask {
		urls, err := d.askMembers(ctx, seed)
		if err != nil && seed.Scheme == "http" && !unreached(err) && ctx.Err() == nil {
			// Something listens there but did not answer plain HTTP: the member may have moved its client URLs
			// to https on the same port (etcd's live migration to TLS) since the seed or the endpoint was
			// written down. etcd's TLS listener just closes such a connection; net/http's answers 400. Ask it
			// over https, verified as any upstream. Never the other way round: an https seed is not asked
			// over http.
			https := *seed
			https.Scheme = "https"
			if hurls, herr := d.askMembers(ctx, &https); herr == nil {
				urls, err = hurls, nil
			}
		}
		if err == nil {
			return urls, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		errs = multierror.Append(errs, fmt.Errorf("%s: %w", seed.Redacted(), err))
	}
	return nil, fmt.Errorf("member list: %w", errs.ErrorOrNil())
}

// member is what both member lists say of a member: the v3 gateway's (ID, name, peerURLs, clientURLs,
// isLearner) and the v2 API's (id, name, peerURLs, clientURLs).
type member struct {
	ClientURLs []string `json:"clientURLs"`
	IsLearner  bool     `json:"isLearner"`
}

// errNoGateway is a 404 to the v3 member list: an upstream without the JSON gateway.
var errNoGateway = errors.New(memberListV3 + ": 404 Not Found")

// askMembers asks one seed for its member list: the v3 JSON gateway's, or the v2 API's where the gateway is
// missing.
func (d *discoverer) askMembers(ctx context.Context, seed *url.URL) ([]*url.URL, error) {
	members, err := d.fetchMembers(ctx, http.MethodPost, seed, memberListV3)
	if errors.Is(err, errNoGateway) {
		members, err = d.fetchMembers(ctx, http.MethodGet, seed, memberListV2)
	}
	if err != nil {
		return nil, err
	}
	var urls []*url.URL
	for _, m := range members {
		if m.IsLearner {
			continue // a learner refuses most client requests
		}
		for _, raw := range m.ClientURLs {
			if err := checkURL(raw); err != nil {
				d.log.Warn("discovery: ignoring a member's client URL", "seed", seed.Redacted(), "url", raw, "err", err)
				continue
			}
			u, _ := url.Parse(raw)
			urls = append(urls, &url.URL{Scheme: u.Scheme, Host: u.Host})
		}
	}
	slices.SortFunc(urls, func(a, b *url.URL) int { return strings.Compare(a.String(), b.String()) })
	urls = slices.CompactFunc(urls, func(a, b *url.URL) bool { return *a == *b })
	if len(urls) == 0 {
		return nil, errors.New("the member list names no voting member with a valid client URL")
	}
	return urls, nil
}

// fetchMembers requests a member list at path. The v3 gateway takes a POST with the JSON request {}.
func (d *discoverer) fetchMembers(ctx context.Context, method string, seed *url.URL, path string) ([]member, error) {
	ctx, cancel := context.WithTimeout(ctx, d.timeout)
	defer cancel()
	var body io.Reader
	if method == http.MethodPost {
		body = strings.NewReader("{}")
	}
	req, err := http.NewRequestWithContext(ctx, method, seed.Scheme+"://"+seed.Host+path, body)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := d.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode == http.StatusNotFound && path == memberListV3:
		return nil, errNoGateway
	case resp.StatusCode != http.StatusOK:
		return nil, fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	var list struct {
		Members []member `json:"members"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, d.cfg.maxRuleBody())).Decode(&list); err != nil {
		return nil, fmt.Errorf("%s %s: reading the member list: %w", method, path, err)
	}
	return list.Members, nil
}
