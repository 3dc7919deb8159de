package proxy

import (
	"bytes"
	"context"
	"io"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding/gzip"
)

// dialProxy is a grpc-go client of the proxy at u (http://host:port).
func dialProxy(t *testing.T, u string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(strings.TrimPrefix(u, "http://"), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(math.MaxInt32)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() })
	return cc
}

// grpc-go's defaults that would break real clients are not the proxy's: an answer over 4 MiB (a large Range)
// comes through, and a client that compresses its requests with gzip is understood.
func TestGRPCLargeAnswerAndGzip(t *testing.T) {
	t.Parallel()
	big := bytes.Repeat([]byte("v"), 6<<20)
	var got []byte
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		got, _ = io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(rawFrame(grpcFrame(t, &pb.RangeResponse{Kvs: []*mvccpb.KeyValue{{Key: []byte("k"), Value: big}}, Count: 1})[grpcFrameHeader:]))
		w.Header().Set("Grpc-Status", "0")
	})
	_, u := startProxy(t, Config{Upstreams: []string{up}})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := pb.NewKVClient(dialProxy(t, u)).Range(ctx, &pb.RangeRequest{Key: []byte("k")}, grpc.UseCompressor(gzip.Name))
	if err != nil {
		t.Fatalf("Range of a 6 MiB value: %v", err)
	}
	if len(resp.Kvs) != 1 || !bytes.Equal(resp.Kvs[0].Value, big) {
		t.Errorf("Range answered %d kvs", len(resp.Kvs))
	}
	var req pb.RangeRequest
	if len(got) < grpcFrameHeader || got[0] != 0 || req.Unmarshal(got[grpcFrameHeader:]) != nil || string(req.Key) != "k" {
		t.Errorf("the upstream got %q, want the request uncompressed", got)
	}
}
