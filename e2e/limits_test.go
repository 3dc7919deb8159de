package e2e

import (
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// --max-request-bytes answers a write over it as etcd's own limit does: clientv3 gets rpctypes.ErrRequestTooLarge
// (what etcd's TestKVLargeRequests expects), the same error a member gives for a write over its limit; one past
// the limit and gRPC's overhead gets grpc-go's ResourceExhausted, from the proxy as from a member. The member
// never sees a refused write.
func TestMaxRequestBytesAsEtcd(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 2*time.Minute)
	e := harness.NewTestEnv(t)
	// The member allows etcd's default 1.5 MiB, the proxy above it the default 10 MiB, the one on top 1 MiB.
	r, err := e.Start(ctx, harness.Topology{Name: "limits", Members: 1, Hops: []harness.Hop{harness.ProxyProxyHop{},
		harness.ProxyProxyHop{Configure: func(c *proxy.Config) { c.MaxRequestBytes = 1 << 20 }}}})
	if err != nil {
		t.Fatal(err)
	}
	client := func(u string) *clientv3.Client {
		cli, err := clientv3.New(clientv3.Config{Endpoints: []string{u}, DialTimeout: 5 * time.Second,
			MaxCallSendMsgSize: 10 << 20, Logger: zap.NewNop()})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cli.Close() })
		return cli
	}
	direct, wide, through := client(r.Layers[0].URLs[0]), client(r.Layers[1].URLs[0]), client(r.Top().URLs[0])
	for _, c := range []struct {
		name string
		cli  *clientv3.Client
		size int
		want error // nil: no error; else compared as etcd's test compares
	}{
		{"direct, over the member's limit", direct, 1<<20 + 600<<10, rpctypes.ErrRequestTooLarge},
		{"proxy, over the member's limit", wide, 1<<20 + 600<<10, rpctypes.ErrRequestTooLarge},
		{"proxy, over the proxy's limit", through, 1<<20 + 100<<10, rpctypes.ErrRequestTooLarge},
		{"proxy, under both", through, 900 << 10, nil},
		{"direct, past the member's gRPC limit", direct, 2<<20 + 100<<10, status.Error(codes.ResourceExhausted, "grpc: received message larger than max")},
		{"proxy, past the proxy's gRPC limit", through, 1<<20 + 600<<10 + 100<<10, status.Error(codes.ResourceExhausted, "grpc: received message larger than max")},
	} {
		key := strings.ReplaceAll(c.name, " ", "-")
		_, err := c.cli.Put(ctx, key, strings.Repeat("v", c.size))
		switch {
		case c.want == nil:
			if err != nil {
				t.Errorf("%s: put of %d bytes: %v", c.name, c.size, err)
			}
			continue
		case status.Code(c.want) == codes.ResourceExhausted:
			if status.Code(err) != codes.ResourceExhausted || !strings.HasPrefix(status.Convert(err).Message(), status.Convert(c.want).Message()) {
				t.Errorf("%s: put of %d bytes: %v, want %v", c.name, c.size, err, c.want)
			}
		case err != c.want: // as etcd's TestKVLargeRequests compares an rpctypes.EtcdError
			t.Errorf("%s: put of %d bytes: %v (%T), want %v", c.name, c.size, err, err, c.want)
		}
		if resp, err := direct.Get(ctx, key); err != nil || len(resp.Kvs) != 0 {
			t.Errorf("%s: the refused put reached the member (%v, %d kvs)", c.name, err, len(resp.Kvs))
		}
	}
}
