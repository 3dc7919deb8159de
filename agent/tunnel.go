package agent

import (
	"context"
	"net"
	"sync"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	konnectivity "sigs.k8s.io/apiserver-network-proxy/konnectivity-client/proto/client"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// tunnelSession is one connection to a proxy-proxy's --tunnel-listen, in our protocol (described in
// proxy/tunnelserver.go): a control stream kept open, on which the proxy asks for dials, and one data stream
// opened by us per dialled destination. It ends when the control stream does, after closing every destination.
func (a *Agent) tunnelSession(ctx context.Context, addr string) (connected bool, err error) {
	cc, err := a.client(addr)
	if err != nil {
		return false, err
	}
	defer cc.Close()
	sctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup // the dials and data streams
	defer wg.Wait()
	defer cancel()
	sctx = metadata.AppendToOutgoingContext(sctx, proxy.TunnelAgentIDKey, a.cfg.ID)
	control, err := cc.NewStream(sctx, &proxy.TunnelServiceDesc.Streams[0], proxy.TunnelControlMethod)
	if err != nil {
		return false, err
	}
	if _, err := control.Header(); err != nil { // the proxy accepted us
		return false, err
	}
	a.log.Info("connected to tunnel server", "server", addr)
	var (
		sendMu sync.Mutex
		mu     sync.Mutex
		dials  = map[int64]context.CancelFunc{} // the dials under way, by the request's random
	)
	answer := func(random int64, msg string) {
		sendMu.Lock()
		defer sendMu.Unlock()
		_ = control.SendMsg(dialRsp(random, 0, msg))
	}
	for {
		pkt := new(konnectivity.Packet)
		if err := control.RecvMsg(pkt); err != nil {
			return true, err
		}
		switch pkt.Type {
		case konnectivity.PacketType_DIAL_CLS: // the proxy gave up waiting
			mu.Lock()
			if cancel := dials[pkt.GetCloseDial().GetRandom()]; cancel != nil {
				cancel()
			}
			mu.Unlock()
		case konnectivity.PacketType_DIAL_REQ:
			req := pkt.GetDialRequest()
			random, dest := req.GetRandom(), req.GetAddress()
			if req.GetProtocol() != "tcp" || !a.allow[dest] {
				a.log.Warn("dial refused: destination not allowed", "address", dest, "protocol", req.GetProtocol())
				answer(random, "destination not allowed")
				continue
			}
			select {
			case a.pending <- struct{}{}:
			default:
				a.log.Warn("dial refused: too many pending dials", "address", dest, "max", cap(a.pending))
				answer(random, "too many pending dials")
				continue
			}
			dctx, dcancel := context.WithCancel(sctx)
			mu.Lock()
			dials[random] = dcancel
			mu.Unlock()
			wg.Go(func() {
				defer dcancel()
				stream, conn, err := a.openData(dctx, cc, random, dest)
				<-a.pending
				mu.Lock()
				delete(dials, random)
				mu.Unlock()
				if err != nil {
					a.log.Warn("dial failed", "address", dest, "err", err)
					answer(random, "dial failed")
					return
				}
				relay(stream, conn)
			})
		}
	}
}

// openData dials dest and opens its data stream, whose first message names the dial it answers.
func (a *Agent) openData(ctx context.Context, cc *grpc.ClientConn, random int64, dest string) (grpc.ClientStream, net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, a.cfg.DialTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(dctx, "tcp", dest)
	if err != nil {
		return nil, nil, err
	}
	stream, err := cc.NewStream(ctx, &proxy.TunnelServiceDesc.Streams[1], proxy.TunnelDataMethod)
	if err == nil {
		err = stream.SendMsg(dialRsp(random, 0, ""))
	}
	if err != nil {
		_ = conn.Close()
		return nil, nil, err
	}
	return stream, conn, nil
}

// relay copies between a data stream and its destination until both directions end: the destination's end of
// its bytes half-closes the stream; the proxy's CLOSE_REQ, or the stream's end, closes the destination. The
// stream's context (the dial's) is cancelled by the caller afterwards, which releases it.
func relay(stream grpc.ClientStream, conn net.Conn) {
	done := make(chan struct{})
	go func() { // destination → proxy
		defer close(done)
		buf := make([]byte, 32<<10)
		for {
			n, err := conn.Read(buf)
			if n > 0 {
				if stream.SendMsg(&konnectivity.Packet{Type: konnectivity.PacketType_DATA, Payload: &konnectivity.Packet_Data{
					Data: &konnectivity.Data{Data: buf[:n]}}}) != nil { // SendMsg encodes before it returns
					_ = conn.Close()
					return
				}
			}
			if err != nil {
				_ = stream.CloseSend()
				return
			}
		}
	}()
	for { // proxy → destination
		pkt := new(konnectivity.Packet)
		err := stream.RecvMsg(pkt)
		if err == nil && pkt.Type == konnectivity.PacketType_DATA {
			if _, werr := conn.Write(pkt.GetData().GetData()); werr == nil {
				continue
			}
		}
		// CLOSE_REQ, the stream's end, a broken stream or a failed write: the destination goes, which ends its
		// reader.
		_ = conn.Close()
		break
	}
	<-done
}
