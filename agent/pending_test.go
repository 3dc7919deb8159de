package agent_test

import (
	"context"
	"log/slog"
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	konnectivity "sigs.k8s.io/apiserver-network-proxy/konnectivity-client/proto/client"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/agent"
)

// blackhole is a TCP address whose dials neither succeed nor fail: a socket listening with a backlog of 0
// that never accepts. Once its accept queue holds one connection, Linux drops every further SYN, so a dial
// waits until its deadline.
func blackhole(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
	// Fill the accept queue, then check that a dial now hangs.
	for i := 0; ; i++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { _ = c.Close() })
		if i == 10 {
			t.Skip("the kernel accepts connections beyond the backlog: no black hole here")
		}
	}
	return addr
}

// --max-pending-dials: with a bound of 2 and five dials of a destination that never answers, the first two wait
// and the other three are refused at once with "too many pending dials"; a dial the server gives up (DIAL_CLS)
// frees its slot, so the next dial waits instead of being refused, and the one after it is refused again. The
// agent handles a server's packets in order, so each refusal arriving proves the earlier dials were not refused:
// no sleep. Nothing is left running after the agent stops.
func TestAgentPendingDialBound(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	dest := blackhole(t)
	streams := make(chan grpc.ServerStream, 1)
	done := make(chan struct{})
	addr, caFile, stopServer := fakeServer(t, func(_ any, stream grpc.ServerStream) error {
		_ = stream.SendHeader(metadata.Pairs("serverID", "fake", "serverCount", "1"))
		streams <- stream
		<-done
		return nil
	})
	defer stopServer()

	a, err := agent.New(agent.Config{Servers: []string{"konnectivity://" + addr}, ID: "ours",
		Allow: []string{dest}, CAFile: caFile, MaxPendingDials: 2, DialTimeout: time.Minute}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { a.Run(ctx); close(stopped) }()
	defer func() { close(done); cancel(); <-stopped }()

	var stream grpc.ServerStream
	select {
	case stream = <-streams:
	case <-time.After(10 * time.Second):
		t.Fatal("the agent did not connect within 10 s")
	}
	rsps := make(chan *konnectivity.DialResponse, 16)
	go func() {
		for {
			pkt := new(konnectivity.Packet)
			if stream.RecvMsg(pkt) != nil {
				close(rsps)
				return
			}
			if r := pkt.GetDialResponse(); r != nil {
				rsps <- r
			}
		}
	}()
	send := func(p *konnectivity.Packet) {
		t.Helper()
		if err := stream.SendMsg(p); err != nil {
			t.Fatal(err)
		}
	}
	dial := func(random int64) {
		send(&konnectivity.Packet{Type: konnectivity.PacketType_DIAL_REQ, Payload: &konnectivity.Packet_DialRequest{
			DialRequest: &konnectivity.DialRequest{Protocol: "tcp", Address: dest, Random: random}}})
	}
	next := func() *konnectivity.DialResponse {
		t.Helper()
		select {
		case r, ok := <-rsps:
			if !ok {
				t.Fatal("the agent's stream ended")
			}
			return r
		case <-time.After(10 * time.Second):
			t.Fatal("no dial response within 10 s")
		}
		return nil
	}
	refused := func(want int64) {
		t.Helper()
		if r := next(); r.GetRandom() != want || r.GetError() != "too many pending dials" {
			t.Fatalf("dial response %d %q; want dial %d refused: too many pending dials", r.GetRandom(), r.GetError(), want)
		}
	}

	for random := int64(1); random <= 5; random++ {
		dial(random)
	}
	for _, want := range []int64{3, 4, 5} {
		refused(want)
	}
	// The server gives up dial 1: the agent cancels it, answers it failed, and has a free slot.
	send(&konnectivity.Packet{Type: konnectivity.PacketType_DIAL_CLS, Payload: &konnectivity.Packet_CloseDial{
		CloseDial: &konnectivity.CloseDial{Random: 1}}})
	if r := next(); r.GetRandom() != 1 || r.GetError() == "" {
		t.Fatalf("dial response %d %q; want dial 1 failed", r.GetRandom(), r.GetError())
	}
	dial(6)
	dial(7)
	refused(7) // 6 took the freed slot and waits with 2
}
