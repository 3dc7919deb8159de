package proxy_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// Through the stock konnectivity server and agent to a member (a process, so that only the proxy runs here):
// v3 calls and v2 requests on fresh connections, then the proxy stops and not one goroutine of its tunnel is
// left (konnectivity's users report leaked goroutines and fds: #270, #276, #340). Not parallel: goleak sees the
// whole process.
func TestKonnectivityNoLeak(t *testing.T) {
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithProcesses())
	if err != nil {
		t.Fatal(err)
	}
	k, err := e.StartKonnectivity(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.StartStockAgent(ctx, "agent-1"); err != nil {
		t.Fatal(err)
	}
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	pp, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.UpstreamVia = "konnectivity://" + k.Addr
		cfg.TunnelTLS = proxy.TLSInfo{CAFile: k.ClientTLS.CAFile, CertFile: k.ClientTLS.CertFile, KeyFile: k.ClientTLS.KeyFile}
		cfg.UpstreamKeepAliveTime = -1
	}})
	if err != nil {
		t.Fatal(err)
	}
	addr := strings.TrimPrefix(pp.Endpoint.URLs[0], "http://")
	for i := range 3 {
		cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		kv := pb.NewKVClient(cc)
		if _, err := kv.Put(ctx, &pb.PutRequest{Key: []byte("k"), Value: []byte{byte('0' + i)}}); err != nil {
			t.Fatalf("Put through konnectivity: %v", err)
		}
		resp, err := kv.Range(ctx, &pb.RangeRequest{Key: []byte("k")})
		if err != nil || len(resp.Kvs) != 1 || resp.Kvs[0].Value[0] != byte('0'+i) {
			t.Fatalf("Range through konnectivity: %v %v", resp, err)
		}
		_ = cc.Close()
		tr := &http.Transport{DisableKeepAlives: true}
		res, err := (&http.Client{Transport: tr}).Get(pp.Endpoint.URLs[0] + "/v2/keys/nothing")
		if err != nil || res.StatusCode != http.StatusNotFound {
			t.Fatalf("v2 GET through konnectivity: %v %v", res, err)
		}
		_ = res.Body.Close()
		tr.CloseIdleConnections()
	}
	sctx, scancel := context.WithTimeout(ctx, 10*time.Second)
	defer scancel()
	if err := pp.Stop(sctx); err != nil {
		t.Fatal(err)
	}
}
