package harness

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-multierror"
	"go.etcd.io/etcd/client/pkg/v3/types"
	"go.etcd.io/etcd/server/v3/embed"
	"go.etcd.io/etcd/server/v3/etcdserver/api/membership"
)

// DefaultStartTimeout bounds a start when the caller's context has no deadline.
const DefaultStartTimeout = 30 * time.Second

type clusterConfig struct {
	members  int
	tls      bool
	certOpts []CertOption
	configs  []func(*Member, *embed.Config)
}

// WithMembers sets the number of members (default 3).
func WithMembers(n int) ClusterOption {
	return clusterOptionFunc(func(c *clusterConfig) { c.members = n })
}

// WithMemberCertOptions adds options to every member's certificate (for example Hosts("wrong.example") for a
// negative test). Implies nothing about TLS: combine with WithTLS.
func WithMemberCertOptions(opts ...CertOption) ClusterOption {
	return clusterOptionFunc(func(c *clusterConfig) { c.certOpts = append(c.certOpts, opts...) })
}

// WithMemberConfig changes every member's configuration after the harness has filled it in, at the first start
// and at every Restart: an extra client listener (etcd's legacy plain-HTTP port 4001, say). It must not change
// the first advertised client or peer URL at the first start: the harness names members by the IDs those give.
func WithMemberConfig(f func(*Member, *embed.Config)) ClusterOption {
	return clusterOptionFunc(func(c *clusterConfig) { c.configs = append(c.configs, f) })
}

// Cluster is a set of embedded etcd members started together.
type Cluster struct {
	// Name is the placeholder prefix of this cluster's members: "" for the first cluster of an Env, "c2-" …
	Name string
	// Members are sorted by member ID, so member-0 always has the smallest ID and every listing that etcd sorts
	// by ID (v2 and v3 member list, cluster-health) comes out in placeholder order.
	Members []*Member
	// ID is the cluster ID.
	ID uint64
	// Token is the initial cluster token (unique per cluster).
	Token string
	// TLS is the client certificate (Cluster CA, empty common name) for reaching the members; zero when plain.
	TLS TLSFiles

	env *Env
}

// Member is one embedded etcd server.
type Member struct {
	// Name is the member's etcd name, equal to its placeholder ("member-0").
	Name string
	// ClientURL and PeerURL are the member's only client and peer URLs.
	ClientURL, PeerURL string
	// ID is the member ID.
	ID uint64
	// Dir is the data directory.
	Dir string
	// TLS is the member's own server/peer certificate; zero when plain.
	TLS TLSFiles

	mu     sync.Mutex
	etcd   *embed.Etcd
	config func() *embed.Config
}

type memberSpec struct {
	name                 string
	clientPort, peerPort int
	id                   types.ID
}

// StartCluster starts the members and returns once every member serves (ReadyNotify) or ctx ends. Ports come
// from 127.0.0.1:0; a start that loses a port race is retried with new ports.
func (e *Env) StartCluster(ctx context.Context, opts ...ClusterOption) (*Cluster, error) {
	cfg := clusterConfig{members: 3}
	for _, o := range opts {
		o.applyCluster(&cfg)
	}
	if cfg.members < 1 {
		return nil, fmt.Errorf("harness: cluster needs at least one member, got %d", cfg.members)
	}
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()

	prefix := e.nextName("cluster")
	c := &Cluster{env: e}
	if prefix != "cluster" {
		c.Name = "c" + strings.TrimPrefix(prefix, "cluster-") + "-"
	}
	clusterDir := filepath.Join(e.Dir, prefix)
	if cfg.tls {
		f, err := e.PKI.Cluster.Issue(c.Name+"members-client", ClientAuth(), CommonName(""))
		if err != nil {
			return nil, err
		}
		c.TLS = f
	}

	var lastErr error
	for attempt := 1; attempt <= 3; attempt++ {
		err := c.start(ctx, cfg, filepath.Join(clusterDir, fmt.Sprintf("try-%d", attempt)))
		if err == nil {
			break
		}
		lastErr = err
		if !isAddrInUse(err) || ctx.Err() != nil {
			return nil, err
		}
		e.logf("harness: cluster start lost a port race, retrying: %v", err)
	}
	if c.Members == nil {
		return nil, lastErr
	}
	e.Defer(prefix, c.Close)

	for i, m := range c.Members {
		e.Register(hostPort(m.ClientURL), m.Name)
		e.Register(hostPort(m.PeerURL), m.Name+"-peer")
		e.Register(types.ID(m.ID).String(), m.Name+"-id")
		e.Register(fmt.Sprint(m.ID), m.Name+"-id")
		e.logf("harness: %s (%d/%d) id %s client %s peer %s", m.Name, i+1, len(c.Members), types.ID(m.ID), m.ClientURL, m.PeerURL)
	}
	e.Register(types.ID(c.ID).String(), c.Name+"cluster-id")
	e.Register(fmt.Sprint(c.ID), c.Name+"cluster-id")
	return c, nil
}

func (c *Cluster) start(ctx context.Context, cfg clusterConfig, dir string) error {
	e := c.env
	ports, err := freePorts(2 * cfg.members)
	if err != nil {
		return err
	}
	c.Token = "epp-" + randomHex(8)
	scheme := "http"
	if cfg.tls {
		scheme = "https"
	}
	specs := make([]memberSpec, cfg.members)
	for i := range specs {
		specs[i].clientPort, specs[i].peerPort = ports[2*i], ports[2*i+1]
		peer := types.MustNewURLs([]string{fmt.Sprintf("%s://127.0.0.1:%d", scheme, specs[i].peerPort)})
		// The same computation etcd makes for an initial member, so that names can follow ID order.
		specs[i].id = membership.NewMember("", peer, c.Token, nil).ID
	}
	sort.Slice(specs, func(i, j int) bool { return specs[i].id < specs[j].id })
	var initial []string
	for i := range specs {
		specs[i].name = fmt.Sprintf("%smember-%d", c.Name, i)
		initial = append(initial, fmt.Sprintf("%s=%s://127.0.0.1:%d", specs[i].name, scheme, specs[i].peerPort))
	}

	members := make([]*Member, len(specs))
	for i, s := range specs {
		m := &Member{
			Name:      s.name,
			ClientURL: fmt.Sprintf("%s://127.0.0.1:%d", scheme, s.clientPort),
			PeerURL:   fmt.Sprintf("%s://127.0.0.1:%d", scheme, s.peerPort),
			ID:        uint64(s.id),
			Dir:       filepath.Join(dir, s.name),
		}
		if cfg.tls {
			// Names are unique per CA: the attempt and the cluster prefix are part of them.
			f, err := e.PKI.Cluster.Issue(fmt.Sprintf("%s-%s", filepath.Base(dir), s.name), cfg.certOpts...)
			if err != nil {
				return err
			}
			m.TLS = f
		}
		m.config = memberConfig(m, c.Token, strings.Join(initial, ","), cfg.tls)
		for _, f := range cfg.configs {
			m.Reconfigure(func(ec *embed.Config) { f(m, ec) })
		}
		members[i] = m
	}
	var started []*Member
	stopAll := func() {
		for _, m := range started {
			m.etcd.Close()
		}
	}
	for _, m := range members {
		if err := os.MkdirAll(m.Dir, 0o700); err != nil {
			stopAll()
			return fmt.Errorf("harness: member dir: %w", err)
		}
		ee, err := embed.StartEtcd(m.config())
		if err != nil {
			stopAll()
			return fmt.Errorf("harness: start %s: %w", m.Name, err)
		}
		m.etcd = ee
		started = append(started, m)
	}
	for _, m := range members {
		if err := waitReady(ctx, m.etcd); err != nil {
			stopAll()
			return fmt.Errorf("harness: %s not ready: %w", m.Name, err)
		}
		if got := uint64(m.etcd.Server.ID()); got != m.ID {
			stopAll()
			return fmt.Errorf("harness: %s has ID %x, computed %x", m.Name, got, m.ID)
		}
	}
	c.Members = members
	c.ID = uint64(members[0].etcd.Server.Cluster().ID())
	return nil
}

func memberConfig(m *Member, token, initial string, tls bool) func() *embed.Config {
	return func() *embed.Config {
		cfg := embed.NewConfig()
		cfg.Name = m.Name
		cfg.Dir = m.Dir
		cu, _ := url.Parse(m.ClientURL)
		pu, _ := url.Parse(m.PeerURL)
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
		cfg.InitialCluster = initial
		cfg.InitialClusterToken = token
		cfg.ClusterState = embed.ClusterStateFlagNew
		cfg.EnableV2 = true
		cfg.Logger = "zap"
		cfg.LogLevel = "error"
		cfg.LogOutputs = []string{filepath.Join(m.Dir, "..", m.Name+".log")}
		if tls {
			info := m.TLS.TLSInfo()
			info.ClientCertAuth = true
			cfg.ClientTLSInfo = info
			cfg.PeerTLSInfo = info
		}
		return cfg
	}
}

func waitReady(ctx context.Context, ee *embed.Etcd) error {
	select {
	case <-ee.Server.ReadyNotify():
		return nil
	case err := <-ee.Err():
		return fmt.Errorf("member failed while starting: %w", err)
	case <-ee.Server.StopNotify():
		return errors.New("member stopped while starting")
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Endpoint is how a client reaches the members: every client URL, and with TLS a Cluster-CA client certificate.
func (c *Cluster) Endpoint() Endpoint {
	ep := Endpoint{Name: "members", TLS: c.TLS}
	for _, m := range c.Members {
		ep.URLs = append(ep.URLs, m.ClientURL)
	}
	return ep
}

// PeerURLs returns every member's peer URL.
func (c *Cluster) PeerURLs() []string {
	var u []string
	for _, m := range c.Members {
		u = append(u, m.PeerURL)
	}
	return u
}

// Leader returns the member that the running members agree is the leader, or nil.
func (c *Cluster) Leader() *Member {
	var lead uint64
	for _, m := range c.Members {
		ee := m.server()
		if ee == nil {
			continue
		}
		l := uint64(ee.Server.Leader())
		if l == 0 || (lead != 0 && l != lead) {
			return nil
		}
		lead = l
	}
	for _, m := range c.Members {
		if m.ID == lead {
			return m
		}
	}
	return nil
}

// MoveLeader makes Members[i] the leader and waits until every running member agrees. Goldens that print
// isLeader use it to stop depending on who won the first election.
func (c *Cluster) MoveLeader(ctx context.Context, i int) error {
	ctx, cancel := withDefaultTimeout(ctx, 10*time.Second)
	defer cancel()
	target := c.Members[i]
	for {
		lead := c.Leader()
		switch {
		case lead == target:
			return nil
		case lead != nil:
			if ee := lead.server(); ee != nil {
				if err := ee.Server.MoveLeader(ctx, lead.ID, target.ID); err != nil && ctx.Err() == nil {
					c.env.logf("harness: move leader to %s: %v (retrying)", target.Name, err)
				}
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("harness: move leader to %s: %w", target.Name, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Close stops every member still running.
func (c *Cluster) Close() error {
	var errs *multierror.Error
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, m := range c.Members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			if err := m.Stop(ctx); err != nil {
				mu.Lock()
				errs = multierror.Append(errs, err)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return errs.ErrorOrNil()
}

func (m *Member) server() *embed.Etcd {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.etcd
}

// Stop stops the member, keeping its data directory and ports for Restart. Stopping a stopped member is a no-op.
func (m *Member) Stop(ctx context.Context) error {
	m.mu.Lock()
	ee := m.etcd
	m.etcd = nil
	m.mu.Unlock()
	if ee == nil {
		return nil
	}
	done := make(chan struct{})
	go func() {
		ee.Close()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("harness: stop %s: %w", m.Name, ctx.Err())
	}
}

// Reconfigure adds f to the member's configuration from its next (re)start on, after the changes made before: an
// operator's drop-in and restart, such as client and peer URLs moving to https with the TLS files to serve them.
// Call it while the member is stopped, and from one goroutine: Restart then sets ClientURL and PeerURL to the
// first advertised client and peer URL of the new configuration (they are plain fields, read without a lock).
// A changed peer URL must be told to the cluster too (member update), as etcd requires.
func (m *Member) Reconfigure(f func(*embed.Config)) {
	m.mu.Lock()
	defer m.mu.Unlock()
	base := m.config
	m.config = func() *embed.Config {
		cfg := base()
		f(cfg)
		return cfg
	}
}

// Restart starts a stopped member again with the same directory, ports and certificate (or what Reconfigure
// changed), and waits until it serves. The other members must be able to form a quorum with it.
func (m *Member) Restart(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	m.mu.Lock()
	if m.etcd != nil {
		m.mu.Unlock()
		return fmt.Errorf("harness: restart %s: still running", m.Name)
	}
	config := m.config
	m.mu.Unlock()
	var ee *embed.Etcd
	var err error
	var cfg *embed.Config
	// The old listeners may linger for a moment after Close; retry the bind until the deadline.
	for {
		cfg = config()
		ee, err = embed.StartEtcd(cfg)
		if err == nil || !isAddrInUse(err) {
			break
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("harness: restart %s: %w (last: %v)", m.Name, ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
	if err != nil {
		return fmt.Errorf("harness: restart %s: %w", m.Name, err)
	}
	if err := waitReady(ctx, ee); err != nil {
		ee.Close()
		return fmt.Errorf("harness: restart %s: %w", m.Name, err)
	}
	m.mu.Lock()
	m.etcd = ee
	if len(cfg.AdvertiseClientUrls) > 0 {
		m.ClientURL = cfg.AdvertiseClientUrls[0].String()
	}
	if len(cfg.AdvertisePeerUrls) > 0 {
		m.PeerURL = cfg.AdvertisePeerUrls[0].String()
	}
	m.mu.Unlock()
	return nil
}

// Running reports whether the member is started.
func (m *Member) Running() bool { return m.server() != nil }

// freePorts returns n distinct ports that were free a moment ago on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("harness: pick a free port: %w", err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func isAddrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || (err != nil && strings.Contains(err.Error(), "address already in use"))
}

func hostPort(raw string) string {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" {
		return raw
	}
	return u.Host
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}
