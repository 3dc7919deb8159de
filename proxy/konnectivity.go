package proxy

import (
	"context"
	"crypto/tls"
	"io"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	konnectivity "sigs.k8s.io/apiserver-network-proxy/konnectivity-client/pkg/client"
)

// newKonnectivityDialer dials through a konnectivity server's gRPC mode with konnectivity-client's reusable
// tunnel: one gRPC connection to the server (mTLS with the tunnel files, TCP by base), one Proxy stream per
// upstream connection, so each has HTTP/2 flow control of its own (no head-of-line blocking between them). The
// server hands each dial to an agent on the far side, which dials the upstream.
func newKonnectivityDialer(server string, base *net.Dialer, tc *tls.Config) (*tunnelDialer, error) {
	t, err := konnectivity.CreateGRPCTunnel(context.Background(), server,
		grpc.WithTransportCredentials(credentials.NewTLS(tc)),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return base.DialContext(ctx, "tcp", addr)
		}))
	if err != nil {
		return nil, err
	}
	var open sync.WaitGroup // the tunnelled connections' copying goroutines
	return &tunnelDialer{
		dial: func(ctx context.Context, addr string) (net.Conn, error) {
			c, err := t.DialContext(ctx, "tcp", addr)
			if err != nil {
				return nil, err
			}
			return pipeConn(c, addr, &open), nil
		},
		close: func() {
			// Connections closed just before (the forwarder's pools) finish their close handshake with the
			// server first, for a while: the tunnel's Close cuts their streams, which konnectivity-client logs
			// as errors.
			done := make(chan struct{})
			go func() { open.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(closeGrace):
			}
			_ = t.Close()
		},
	}, nil
}

// closeGrace is how long the tunnel's close waits for connections still closing.
const closeGrace = 2 * time.Second

// pipeConn gives a tunnelled connection what net.Conn promises and konnectivity-client's lacks: deadlines (the
// HTTP/1.1 path bounds reads with them and ends a cancelled request by one) and addresses. Our end of a net.Pipe
// is the connection; two goroutines copy between its other end and the tunnel. A close of either side ends both
// (the tunnel's Close waits for the server's CLOSE_RSP: it runs in the copying goroutine, never in the caller).
func pipeConn(tunnelled net.Conn, addr string, open *sync.WaitGroup) net.Conn {
	ours, theirs := net.Pipe()
	open.Add(2)
	go func() {
		defer open.Done()
		_, _ = io.Copy(tunnelled, theirs)
		_ = tunnelled.Close()
	}()
	go func() {
		defer open.Done()
		_, _ = io.Copy(theirs, tunnelled)
		_ = theirs.Close()
	}()
	return &addrConn{Conn: ours, remote: tunnelAddr(addr)}
}

// addrConn reports the upstream a tunnelled connection reaches as its remote address.
type addrConn struct {
	net.Conn
	remote net.Addr
}

func (c *addrConn) RemoteAddr() net.Addr { return c.remote }

// tunnelAddr is the address of the upstream a tunnelled connection reaches.
type tunnelAddr string

func (a tunnelAddr) Network() string { return "tcp" }
func (a tunnelAddr) String() string  { return string(a) }
