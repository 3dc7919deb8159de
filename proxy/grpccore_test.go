package proxy

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/mvccpb"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding/gzip"
	"google.golang.org/grpc/status"
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

// A client that pings every few seconds on a quiet connection (etcd's clients ping every 30 s, some every 2–10 s)
// is not sent away: grpc-go's default enforcement (5 minutes) would answer the third such ping with GOAWAY
// too_many_pings. The proxy enforces etcd's 5 s, without streams too.
func TestGRPCPingsAllowed(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("pings for 17 s")
	}
	up, _ := grpcUpstream(t, func(string) []byte { return rawFrame(nil) })
	_, u := startProxy(t, Config{Upstreams: []string{up}})
	c, err := net.Dial("tcp", strings.TrimPrefix(u, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fr := http2.NewFramer(c, c)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	_ = fr.WriteSettings()
	// A gRPC request first, so that the split hands the connection to the gRPC server.
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", "/etcdserverpb.KV/Range"},
		{":authority", "x"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	_ = fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true})
	_ = fr.WriteData(1, true, rawFrame(nil))
	goaway := make(chan *http2.GoAwayFrame, 1)
	go func() {
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return
			}
			if g, ok := f.(*http2.GoAwayFrame); ok {
				goaway <- g
				return
			}
		}
	}()
	for i := range 4 {
		select {
		case g := <-goaway:
			t.Fatalf("GOAWAY %v %q after %d pings %v apart", g.ErrCode, g.DebugData(), i, 5500*time.Millisecond)
		case <-time.After(5500 * time.Millisecond):
		}
		if err := fr.WritePing(false, [8]byte{byte(i)}); err != nil {
			t.Fatalf("ping %d: %v", i, err)
		}
	}
	select {
	case g := <-goaway:
		t.Fatalf("GOAWAY %v %q after 4 pings 5.5 s apart", g.ErrCode, g.DebugData())
	case <-time.After(time.Second):
	}
}

// A gRPC call on an HTTP/2 connection whose first request was not gRPC (the split sent it to the HTTP/2 server)
// is still served by the gRPC core.
func TestGRPCOnHTTP2Connection(t *testing.T) {
	t.Parallel()
	up, hits := grpcUpstream(t, func(string) []byte { return grpcFrame(t, &pb.RangeResponse{Count: 7}) })
	_, u := startProxy(t, Config{Upstreams: []string{up}})
	tr := &http.Transport{Protocols: new(http.Protocols)}
	tr.Protocols.SetUnencryptedHTTP2(true)
	t.Cleanup(tr.CloseIdleConnections)
	c := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	resp, err := c.Get(u + "/v2/members")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	var conns int
	req, _ := http.NewRequest(http.MethodPost, u+"/etcdserverpb.KV/Range", bytes.NewReader(rawFrame(nil)))
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) {
			if !i.Reused {
				conns++
			}
		}}))
	resp, err = c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var r pb.RangeResponse
	if conns != 0 || grpcStatus(resp) != "0" || len(body) < grpcFrameHeader || r.Unmarshal(body[grpcFrameHeader:]) != nil || r.Count != 7 {
		t.Errorf("Range on the connection of a GET (new connections %d): status %q, body %q", conns, grpcStatus(resp), body)
	}
	if hits.Load() != 2 { // the GET and the Range
		t.Errorf("the upstream got %d requests, want 2", hits.Load())
	}
}

// An upstream that comes back (a member restarted) is used by the next call, although its connection is waiting
// out grpc-go's reconnect backoff: grpc-go fails calls on such a connection at once, and the robustness suite's
// kill scenarios saw new clients refused for a second after the member was back.
func TestGRPCUpstreamBackAtOnce(t *testing.T) {
	t.Parallel()
	answer := func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		grpcOK(w)
	}
	serve := func(l net.Listener) *http.Server {
		srv := &http.Server{Handler: http.HandlerFunc(answer), Protocols: new(http.Protocols)}
		srv.Protocols.SetUnencryptedHTTP2(true)
		go srv.Serve(l)
		return srv
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	up := serve(l)
	_, u := startProxy(t, Config{Upstreams: []string{"http://" + addr}, FailureWait: 20 * time.Second})
	kv := pb.NewKVClient(dialProxy(t, u))
	call := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := kv.Range(ctx, &pb.RangeRequest{Key: []byte("a")})
		return err
	}
	if err := call(); err != nil {
		t.Fatal(err)
	}
	_ = up.Close()
	// Down for 3 s of calls: the connection's backoff grows past what is left of the test.
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if err := call(); err == nil {
			t.Fatal("a call succeeded with the upstream down")
		}
	}
	var l2 net.Listener
	for i := 0; ; i++ { // the same address again
		if l2, err = net.Listen("tcp", addr); err == nil || i == 50 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	up2 := serve(l2)
	t.Cleanup(func() { _ = up2.Close() })
	if err := call(); err != nil {
		t.Errorf("the first call after the upstream came back: %v", err)
	}
}

// A hostile upstream cannot make the proxy hold one large message of a method whose answers are small
// (rules.Method.SmallAnswers): a Snapshot message that announces 5 MiB and a Status answer of 5 MiB are refused
// with ResourceExhausted and the proxy's own text. The Snapshot message's body never comes: the answer arrives at
// once, so the proxy refused it from its 5-byte length prefix, without waiting for (or allocating) the message.
// Range answers stay unbounded, on the same connections.
func TestGRPCSmallAnswersBounded(t *testing.T) {
	t.Parallel()
	const announced = 5 << 20
	big := bytes.Repeat([]byte("v"), announced)
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/grpc")
		w.Header().Set("Trailer", "Grpc-Status")
		w.WriteHeader(http.StatusOK)
		switch r.URL.Path {
		case "/etcdserverpb.Maintenance/Snapshot": // a length prefix, then nothing until the proxy gives up
			_, _ = w.Write(rawFrame(nil)[:1])
			_, _ = w.Write(binary.BigEndian.AppendUint32(nil, announced))
			w.(http.Flusher).Flush()
			<-r.Context().Done()
			return
		case "/etcdserverpb.Maintenance/Status":
			_, _ = w.Write(rawFrame(grpcFrame(t, &pb.StatusResponse{Version: string(big)})[grpcFrameHeader:]))
		case "/etcdserverpb.KV/Range":
			_, _ = w.Write(rawFrame(grpcFrame(t, &pb.RangeResponse{Kvs: []*mvccpb.KeyValue{{Key: []byte("k"), Value: big}}, Count: 1})[grpcFrameHeader:]))
		}
		w.Header().Set("Grpc-Status", "0")
	})
	_, u := startProxy(t, Config{Upstreams: []string{up}})
	cc := dialProxy(t, u)
	callCtx := func() context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	refused := func(what string, err error) {
		t.Helper()
		st := status.Convert(err)
		if st.Code() != codes.ResourceExhausted || !strings.HasPrefix(st.Message(), msgAnswerTooLarge) {
			t.Errorf("%s: %v, want ResourceExhausted %q", what, err, msgAnswerTooLarge)
		}
		if strings.Contains(st.Message(), strings.TrimPrefix(up, "http://")) {
			t.Errorf("%s: the upstream's address in %q", what, st.Message())
		}
		if !rules.KnownGRPCMessage(st.Message()) {
			t.Errorf("%s: %q is not in the rules' ownPatterns: a proxy-proxy above would replace it", what, st.Message())
		}
	}
	snap, err := pb.NewMaintenanceClient(cc).Snapshot(callCtx(), &pb.SnapshotRequest{})
	if err == nil {
		_, err = snap.Recv()
	}
	refused("Snapshot", err)
	_, err = pb.NewMaintenanceClient(cc).Status(callCtx(), &pb.StatusRequest{})
	refused("Status", err)
	resp, err := pb.NewKVClient(cc).Range(callCtx(), &pb.RangeRequest{Key: []byte("k")})
	if err != nil || len(resp.Kvs) != 1 || len(resp.Kvs[0].Value) != announced {
		t.Errorf("a Range answer of 5 MiB after the refusals: %v", err)
	}
}
