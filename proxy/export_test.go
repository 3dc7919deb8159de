package proxy

import (
	"context"
	"net"
)

// TunnelDial dials addr as the forwarder dials an upstream (through --upstream-via or an agent of
// --tunnel-listen), for tests of the tunnel itself.
func (s *Server) TunnelDial(ctx context.Context, addr string) (net.Conn, error) {
	return s.forwarder.tunnel.dial(ctx, addr)
}
