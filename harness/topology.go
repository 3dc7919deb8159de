package harness

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

// Hop is one layer of a topology, started on top of the layer below it.
type Hop interface {
	// Start starts the layer in front of below (c is the cluster at the bottom) and returns how clients reach it.
	// The layer registers its own teardown with e.
	Start(ctx context.Context, e *Env, below Endpoint, c *Cluster) (Endpoint, error)
	String() string
}

// StockV2Hop is etcd's v2 proxy. It can only sit directly on the members: it finds them through their peer URLs,
// not through the layer below.
type StockV2Hop struct {
	// TLS: https listener; see WithTLS.
	TLS bool
}

// Start implements Hop.
func (h StockV2Hop) Start(ctx context.Context, e *Env, below Endpoint, c *Cluster) (Endpoint, error) {
	if below.Name != c.Endpoint().Name {
		return Endpoint{}, fmt.Errorf("harness: the stock v2 proxy cannot chain: it must sit on the members, not on %s", below.Name)
	}
	var opts []StockOption
	if h.TLS {
		opts = append(opts, WithTLS())
	}
	p, err := e.StartStockV2Proxy(ctx, c, opts...)
	if err != nil {
		return Endpoint{}, err
	}
	return p.Endpoint(), nil
}

func (h StockV2Hop) String() string { return "stock-v2" + tlsSuffix(h.TLS) }

// GRPCProxyHop is etcd's grpc-proxy (the real binary).
type GRPCProxyHop struct {
	// TLS: https listener; see WithTLS.
	TLS bool
	// Advertise: --advertise-client-url is the proxy's own address; false: empty, MemberList is forwarded.
	Advertise bool
}

// Start implements Hop.
func (h GRPCProxyHop) Start(ctx context.Context, e *Env, below Endpoint, _ *Cluster) (Endpoint, error) {
	opts := []GRPCProxyOption{WithAdvertise(h.Advertise)}
	if h.TLS {
		opts = append(opts, WithTLS())
	}
	p, err := e.StartGRPCProxy(ctx, below, opts...)
	if err != nil {
		return Endpoint{}, err
	}
	return p.Endpoint(), nil
}

func (h GRPCProxyHop) String() string {
	s := "grpc-proxy" + tlsSuffix(h.TLS)
	if h.Advertise {
		s += "+advertise"
	}
	return s
}

func tlsSuffix(on bool) string {
	if on {
		return "(tls)"
	}
	return ""
}

// Topology is a deployment described as data: members at the bottom, then hops, the last one outermost.
type Topology struct {
	// Name labels the topology in errors and logs.
	Name string
	// Members is the number of members; 0 means 3.
	Members int
	// TLS puts the members' client and peer sides on TLS (WithTLS).
	TLS bool
	// Version runs the members as processes of that etcd line (WithVersion); "" embeds v3.5.35 members.
	Version string
	// Hops are started bottom-up in order.
	Hops []Hop
}

func (t Topology) String() string {
	v := ""
	if t.Version != "" {
		v = " etcd " + t.Version
	}
	parts := []string{fmt.Sprintf("%d%s members%s", t.members(), v, tlsSuffix(t.TLS))}
	for _, h := range t.Hops {
		parts = append(parts, h.String())
	}
	return strings.Join(parts, " ← ")
}

func (t Topology) members() int {
	if t.Members == 0 {
		return 3
	}
	return t.Members
}

// Running is a started topology.
type Running struct {
	Topology Topology
	Cluster  *Cluster
	// Layers[0] is the members, then one entry per hop; the last is the outermost.
	Layers []Endpoint
}

// Top is the outermost layer: what a client of the deployment uses.
func (r *Running) Top() Endpoint { return r.Layers[len(r.Layers)-1] }

// Start starts the topology bottom-up. Teardown is top-down through the Env (reverse start order). On error,
// the parts already started stay registered with the Env and are stopped by its Close.
func (e *Env) Start(ctx context.Context, topo Topology) (*Running, error) {
	if topo.members() < 1 {
		return nil, errors.New("harness: topology " + topo.Name + " needs members")
	}
	opts := []ClusterOption{WithMembers(topo.members()), WithVersion(topo.Version)}
	if topo.TLS {
		opts = append(opts, WithTLS())
	}
	c, err := e.StartCluster(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("topology %s: members: %w", topo.Name, err)
	}
	r, err := e.StartOn(ctx, c, topo.Hops...)
	if err != nil {
		return nil, fmt.Errorf("topology %s: %w", topo.Name, err)
	}
	r.Topology = topo
	e.logf("harness: topology %s up: %s", topo.Name, topo)
	return r, nil
}

// StartOn starts hops bottom-up on a cluster that is already running, so that several chains can share one
// cluster (the demo's do). The Running's Topology lists the hops.
func (e *Env) StartOn(ctx context.Context, c *Cluster, hops ...Hop) (*Running, error) {
	r := &Running{Topology: Topology{Members: len(c.Members), TLS: !c.TLS.IsZero(), Version: c.Version, Hops: hops}, Cluster: c,
		Layers: []Endpoint{c.Endpoint()}}
	for i, h := range hops {
		ep, err := h.Start(ctx, e, r.Top(), c)
		if err != nil {
			return nil, fmt.Errorf("hop %d (%s): %w", i+1, h, err)
		}
		r.Layers = append(r.Layers, ep)
	}
	return r, nil
}

var (
	_ Hop = StockV2Hop{}
	_ Hop = GRPCProxyHop{}
)
