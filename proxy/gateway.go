package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	gw "github.com/grpc-ecosystem/grpc-gateway/runtime"
	"github.com/tmc/grpc-websocket-proxy/wsproxy"
	etcdgw "go.etcd.io/etcd/api/v3/etcdserverpb/gw"
	electiongw "go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb/gw"
	lockgw "go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb/gw"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// GatewayTimeout bounds a unary call made through the JSON gateway; streams (watch, keep-alive, observe,
// snapshot) are bounded by the client.
const GatewayTimeout = 30 * time.Second

// gateway serves etcd's v3 JSON gateway (/v3/...) in the proxy itself, with etcd's own generated handlers. Its
// calls go through the proxy's own gRPC path over an in-memory connection, so every rule applies to them and the
// gateway works behind upstreams that serve none (the stock grpc-proxy).
type gateway struct {
	handler http.Handler
	conn    *grpc.ClientConn
	ln      *pipeListener
	cancel  context.CancelFunc
}

// newGateway starts the gateway; its gRPC calls go to srv over an in-memory connection. One connection carries
// every gateway call, so its calls have no connection affinity: each goes to the next available endpoint in turn
// (endpoints.go). Only on that connection is the client identity entry believed (identity.go).
func newGateway(srv *grpc.Server) (*gateway, error) {
	g := &gateway{ln: newPipeListener()}
	go func() { _ = srv.Serve(g.ln) }()
	conn, err := grpc.NewClient("passthrough:///etcd-proxy-proxy", append([]grpc.DialOption{
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return g.ln.dial(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)),
	}, gatewayIdentityOptions...)...) // every call carries its client's identity (identity.go)
	if err != nil {
		_ = g.ln.Close()
		return nil, fmt.Errorf("gateway connection: %w", err)
	}
	g.conn = conn
	var ctx context.Context
	ctx, g.cancel = context.WithCancel(context.Background())
	mux := gw.NewServeMux()
	for _, register := range []func(context.Context, *gw.ServeMux, *grpc.ClientConn) error{
		etcdgw.RegisterKVHandler,
		etcdgw.RegisterWatchHandler,
		etcdgw.RegisterLeaseHandler,
		etcdgw.RegisterClusterHandler,
		etcdgw.RegisterMaintenanceHandler,
		etcdgw.RegisterAuthHandler,
		lockgw.RegisterLockHandler,
		electiongw.RegisterElectionHandler,
	} {
		if err := register(ctx, mux, conn); err != nil {
			g.close()
			return nil, fmt.Errorf("gateway: %w", err)
		}
	}
	// As etcd does: streams over websockets too, always as POST.
	ws := wsproxy.WebsocketProxy(mux,
		wsproxy.WithRequestMutator(func(_ *http.Request, out *http.Request) *http.Request { out.Method = http.MethodPost; return out }),
		wsproxy.WithMaxRespBodyBufferSize(math.MaxInt32))
	g.handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Its calls go upstream with its client's identity (identity.go).
		r = withGatewayClient(r)
		if rest, ok := strings.CutPrefix(r.URL.Path, "/v3beta/"); ok { // etcd's backward-compatible prefix
			r.URL.Path = "/v3/" + rest
		}
		if !isGatewayStream(r.URL.Path) {
			ctx, cancel := context.WithTimeout(r.Context(), GatewayTimeout)
			defer cancel()
			r = r.WithContext(ctx)
		}
		if r.URL.Path == "/v3/watch" && r.Body != nil {
			// The gateway half-closes the gRPC stream when the request body ends. A member keeps watching
			// after a half-close, but the stock grpc-proxy ends the whole watch: keep the stream open for as
			// long as the client stays.
			r.Body = &holdOpenBody{ReadCloser: r.Body, done: r.Context().Done()}
		}
		ws.ServeHTTP(w, r)
	})
	return g, nil
}

// holdOpenBody delays the end of a request body until done is closed.
type holdOpenBody struct {
	io.ReadCloser
	done <-chan struct{}
}

func (b *holdOpenBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if errors.Is(err, io.EOF) {
		if n > 0 {
			return n, nil // the next Read waits
		}
		<-b.done
	}
	return n, err
}

// isGatewayPath reports a v3 JSON gateway call.
func isGatewayPath(path string) bool {
	return strings.HasPrefix(path, "/v3/") || strings.HasPrefix(path, "/v3beta/")
}

// isGatewayStream reports the gateway calls that stream for as long as the client wants (the table of the
// metrics marks them).
func isGatewayStream(path string) bool { return gatewayPaths[path] }

func (g *gateway) close() {
	if g.cancel != nil {
		g.cancel()
	}
	if g.conn != nil {
		_ = g.conn.Close()
	}
	_ = g.ln.Close()
}

// pipeListener is an in-memory listener: dial hands one end of a net.Pipe to Accept.
type pipeListener struct {
	conns  chan net.Conn
	done   chan struct{}
	closed sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

var errListenerClosed = errors.New("gateway listener closed")

func (l *pipeListener) dial(ctx context.Context) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
	case <-ctx.Done():
	}
	_ = client.Close()
	_ = server.Close()
	return nil, errListenerClosed
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, errListenerClosed
	}
}

func (l *pipeListener) Close() error {
	l.closed.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "etcd-proxy-proxy-gateway" }
