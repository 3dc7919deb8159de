package proxy

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// Every status message the gRPC core answers a call with is in the rules' allow-list, so that a proxy-proxy above
// passes it on instead of replacing it.
func TestGRPCAnswersKnown(t *testing.T) {
	t.Parallel()
	c := &grpcCore{f: &Forwarder{log: slog.New(slog.DiscardHandler), maxRequestBytes: 1 << 20}}
	shutdown, stop := context.WithCancelCause(context.Background())
	stop(errShuttingDown)
	errs := map[string]error{
		"rule":          &ruleError{Rule: "members", Err: errors.New("decoding")},
		"no endpoint":   &noEndpointError{err: errors.New("all down")},
		"not a status":  errors.New("dial tcp 10.0.0.1:2379: connection refused"),
		"transport":     scrubbed(status.Error(codes.Unavailable, "connection error: desc = \"transport: Error while dialing: dial tcp 10.0.0.1:2379\"")),
		"too large":     &localError{status.Error(codes.ResourceExhausted, "grpc: received message larger than max (2000 vs. 1000)")},
		"lost":          status.Error(codes.Unavailable, msgUpstreamLost),
		"answer large":  &answerTooLargeError{status.Error(codes.ResourceExhausted, "grpc: received message larger than max (5000000 vs. 4194304)")},
		"no response":   status.Error(codes.Unavailable, msgNoResponse),
		"shutting down": context.Canceled,
	}
	for name, err := range errs {
		ctx := context.Background()
		if name == "shutting down" {
			ctx = shutdown
		}
		call := &serverCall{ctx: ctx, client: context.Background(), chain: c.chainFor("/etcdserverpb.KV/Range")}
		st := c.finish(call, err)
		if msg := st.Message(); msg == "" || !rules.KnownGRPCMessage(msg) {
			t.Errorf("%s: answered %q, which a proxy-proxy above would replace: add it to the rules' ownMessages", name, msg)
		}
	}
	for _, msg := range []string{msgShuttingDown, msgTooLarge, msgNoIdentity, msgUpstreamLost, msgNoResponse} {
		if !rules.KnownGRPCMessage(msg) {
			t.Errorf("%q is not in the rules' ownMessages", msg)
		}
	}
}

// A hostile (or merely chatty) upstream, through the whole proxy: a status whose message names a host and whose
// details carry a URL, and a member list with an address in a field no etcd schema has. The client sees none of
// it, over gRPC and over the JSON gateway.
func TestHostileGRPCUpstream(t *testing.T) {
	t.Parallel()
	planted := []string{"10.0.0.5", "cluster.internal"}
	// A google.rpc.Status whose code agrees with grpc-status (grpc-go turns a disagreeing one into Internal) and
	// whose message carries a URL.
	details := base64.RawStdEncoding.EncodeToString(protowire.AppendString(protowire.AppendTag(
		protowire.AppendVarint(protowire.AppendTag(nil, 1, protowire.VarintType), 14), 2, protowire.BytesType), "http://10.0.0.5:2379"))
	up := h2cUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", rules.GRPCContentType)
		if r.URL.Path == "/etcdserverpb.Cluster/MemberList" {
			unknown := protowire.AppendString(protowire.AppendTag(nil, 99, protowire.BytesType), "http://10.0.0.5:2379")
			b, _ := (&pb.MemberListResponse{Header: &pb.ResponseHeader{ClusterId: 1, XXX_unrecognized: unknown},
				XXX_unrecognized: unknown}).Marshal()
			w.Header().Set("Trailer", "Grpc-Status")
			_, _ = w.Write(rawFrame(b))
			w.Header().Set("Grpc-Status", "0")
			return
		}
		w.Header().Set("Grpc-Status", "14")
		w.Header().Set("Grpc-Message", "member etcd-2.cluster.internal unreachable")
		w.Header().Set("Grpc-Status-Details-Bin", details)
		w.WriteHeader(http.StatusOK)
	})
	_, base := startProxy(t, Config{Upstreams: []string{up}})
	check := func(what string, resp *http.Response, body []byte) {
		t.Helper()
		dump := fmt.Sprintf("%q %q %q", resp.Header, resp.Trailer, body)
		for _, p := range planted {
			if strings.Contains(dump, p) {
				t.Errorf("%s leaks %q: %s", what, p, dump)
			}
		}
	}

	resp := grpcCall(t, base+"/etcdserverpb.KV/Range", rawFrame(nil))
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	check("gRPC Range", resp, body)
	msg := resp.Trailer.Get(rules.GRPCMessageHeader) + resp.Header.Get(rules.GRPCMessageHeader)
	if msg, _ = url.PathUnescape(msg); grpcStatus(resp) != "14" || msg != rules.WithheldMessage(14) {
		t.Errorf("gRPC Range = %s %q, want 14 %q", grpcStatus(resp), msg, rules.WithheldMessage(14))
	}

	resp = grpcCall(t, base+"/etcdserverpb.Cluster/MemberList", rawFrame(nil))
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	check("gRPC MemberList", resp, body)
	if grpcStatus(resp) != "0" {
		t.Errorf("gRPC MemberList = status %q %v %v", grpcStatus(resp), resp.Header, resp.Trailer)
	}

	resp, body = get(t, http.MethodPost, base+"/v3/kv/range", strings.NewReader(`{"key":"Zm9v"}`))
	check("gateway range", resp, body)
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), rules.WithheldMessage(14)) {
		t.Errorf("gateway range = %d %s, want 503 with %q", resp.StatusCode, body, rules.WithheldMessage(14))
	}
}
