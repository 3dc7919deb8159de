package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
)

// BenchmarkWatchStreams opens b.N concurrent v3 watch streams through one proxy-proxy (the real binary, its
// own process, in front of one embedded member) and reports the proxy's resident memory per stream:
//
//	go test ./e2e -run '^$' -bench WatchStreams -benchtime 10000x
//
// Every stream is a separate gRPC Watch call with one watcher, created and confirmed before the next.
func BenchmarkWatchStreams(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	e := harness.NewTestEnv(b)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		b.Fatal(err)
	}
	bin := proxyBinary(b, ctx)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	cmd := exec.CommandContext(ctx, bin, "--upstream", c.Endpoint().URLs[0],
		"--listen-client-urls", "http://"+addr, "--advertise-client-urls", "http://"+addr)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	kv := pb.NewKVClient(conn)
	for { // ready when a Range goes through
		rctx, rcancel := context.WithTimeout(ctx, time.Second)
		_, err := kv.Range(rctx, &pb.RangeRequest{Key: []byte("ready")})
		rcancel()
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			b.Fatal(err)
		}
	}
	before := rssKiB(b, cmd.Process.Pid)
	watch := pb.NewWatchClient(conn)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		s, err := watch.Watch(ctx)
		if err != nil {
			b.Fatalf("stream %d: %v", i, err)
		}
		key := []byte("/watched/" + strconv.Itoa(i))
		if err := s.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
			CreateRequest: &pb.WatchCreateRequest{Key: key}}}); err != nil {
			b.Fatalf("stream %d: %v", i, err)
		}
		if r, err := s.Recv(); err != nil || !r.Created {
			b.Fatalf("stream %d: created=%v err=%v", i, r.GetCreated(), err)
		}
	}
	b.StopTimer()
	after := rssKiB(b, cmd.Process.Pid)
	b.ReportMetric(float64(after-before)*1024/float64(b.N), "proxy-bytes/stream")
	b.ReportMetric(float64(after)/1024, "proxy-MiB")
}

// rssKiB reads VmRSS of a process.
func rssKiB(b *testing.B, pid int) int {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Fatal("no VmRSS")
	return 0
}
