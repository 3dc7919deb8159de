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
	"slices"
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
	version  string
	process  bool // members as processes (WithProcesses)
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

// Cluster is a set of etcd members started together: embedded v3.5.35 members, or processes of the pinned etcd
// (WithProcesses) or of a newer one (WithVersion).
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
	// Version is the etcd line of the members (WithVersion); "" for v3.5.35 members, embedded or processes.
	Version string

	env *Env
}

// Member is one etcd server: embedded, or a process (WithProcesses, WithVersion).
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
	// A process member: its binary and command line, the running process (nil when stopped), and the
	// cluster's client certificate for asking it about itself.
	bin       string
	args      []string
	proc      *memberProc
	clientTLS TLSFiles
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
	c := &Cluster{env: e, Version: cfg.version}
	var bin string
	if cfg.version != "" || cfg.process {
		tool := "etcd"
		if cfg.version != "" {
			if !slices.Contains(EtcdVersions, cfg.version) {
				return nil, fmt.Errorf("harness: no etcd %q to start (known: %s)", cfg.version, strings.Join(EtcdVersions, ", "))
			}
			tool += "-" + cfg.version
		}
		var err error
		if bin, err = Tool(ctx, tool); err != nil {
			return nil, err
		}
	}
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
		err := c.start(ctx, cfg, bin, filepath.Join(clusterDir, fmt.Sprintf("try-%d", attempt)))
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

func (c *Cluster) start(ctx context.Context, cfg clusterConfig, bin, dir string) error {
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
		if bin != "" {
			m.bin, m.args, m.clientTLS = bin, processArgs(m, c.Token, strings.Join(initial, ","), cfg.tls, cfg.version == ""), c.TLS
		} else {
			m.config = memberConfig(m, c.Token, strings.Join(initial, ","), cfg.tls)
			for _, f := range cfg.configs {
				m.Reconfigure(func(ec *embed.Config) { f(m, ec) })
			}
		}
		members[i] = m
	}
	var started []*Member
	stopAll := func() {
		for _, m := range started {
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := m.discard(sctx); err != nil {
				e.logf("harness: %v", err)
			}
			cancel()
		}
	}
	for _, m := range members {
		if err := os.MkdirAll(m.Dir, 0o700); err != nil {
			stopAll()
			return fmt.Errorf("harness: member dir: %w", err)
		}
		if bin != "" {
			if err := m.startProcess(); err != nil {
				stopAll()
				return err
			}
			started = append(started, m)
			continue
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
		if bin != "" {
			id, err := m.waitServing(ctx)
			if err != nil {
				stopAll()
				return err
			}
			c.ID = id
			continue
		}
		if err := waitReady(ctx, m.etcd); err != nil {
			stopAll()
			return fmt.Errorf("harness: %s not ready: %w", m.Name, err)
		}
		if got := uint64(m.etcd.Server.ID()); got != m.ID {
			stopAll()
			return fmt.Errorf("harness: %s has ID %x, computed %x", m.Name, got, m.ID)
		}
		c.ID = uint64(m.etcd.Server.Cluster().ID())
	}
	c.Members = members
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
		var l uint64
		if ee := m.server(); ee != nil {
			l = uint64(ee.Server.Leader())
		} else if p := m.process(); p != nil && !p.done() {
			l = m.processLeader()
		} else {
			continue
		}
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
			var err error
			if ee := lead.server(); ee != nil {
				err = ee.Server.MoveLeader(ctx, lead.ID, target.ID)
			} else if lead.process() != nil {
				err = moveLeaderProcess(ctx, lead, target)
			}
			if err != nil && ctx.Err() == nil {
				c.env.logf("harness: move leader to %s: %v (retrying)", target.Name, err)
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("harness: move leader to %s: %w", target.Name, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Close stops every member still running; process members are killed.
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
			if err := m.discard(ctx); err != nil {
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

func (m *Member) process() *memberProc {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.proc
}

// Stop stops the member, keeping its data directory and ports for Restart. Stopping a stopped member is a no-op.
// A process member gets SIGTERM, and SIGKILL when ctx ends first.
func (m *Member) Stop(ctx context.Context) error {
	m.mu.Lock()
	ee, p := m.etcd, m.proc
	m.etcd, m.proc = nil, nil
	m.mu.Unlock()
	if p != nil {
		return stopProcess(ctx, m.Name, p)
	}
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

// Restart starts a stopped member (or a process member whose process exited) again with the same directory, ports
// and certificate (or what Reconfigure changed), and waits until it serves. The other members must be able to
// form a quorum with it.
func (m *Member) Restart(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, DefaultStartTimeout)
	defer cancel()
	m.mu.Lock()
	if m.proc != nil && m.proc.done() {
		m.proc = nil // it exited (Signal): the member is stopped
	}
	if m.etcd != nil || m.proc != nil {
		m.mu.Unlock()
		return fmt.Errorf("harness: restart %s: still running", m.Name)
	}
	config := m.config
	m.mu.Unlock()
	if m.bin != "" {
		return m.restartProcess(ctx)
	}
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

// Running reports whether the member is started (and, for a process member, its process has not exited).
func (m *Member) Running() bool {
	p := m.process()
	return m.server() != nil || (p != nil && !p.done())
}

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
