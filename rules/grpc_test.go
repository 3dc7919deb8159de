package rules

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
)

// grpcRequest is a gRPC call as the proxy sees it: HTTP/2, application/grpc.
func grpcRequest(method string) *http.Request {
	req := httptest.NewRequest(http.MethodPost, method, nil)
	req.Proto, req.ProtoMajor, req.ProtoMinor = "HTTP/2.0", 2, 0
	req.Header.Set("Content-Type", "application/grpc")
	return req
}

// frame is one uncompressed gRPC message.
func frame(t *testing.T, m message) []byte {
	t.Helper()
	b, err := m.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 5+len(b))
	binary.BigEndian.PutUint32(out[1:5], uint32(len(b)))
	copy(out[5:], b)
	return out
}

func unframeT[T message](t *testing.T, body []byte, m T) T {
	t.Helper()
	payload, err := unframe(body)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Unmarshal(payload); err != nil {
		t.Fatal(err)
	}
	return m
}

func assertGRPCStatus(t *testing.T, resp *http.Response, code int) {
	t.Helper()
	if resp == nil {
		t.Fatalf("no reply, want gRPC status %d", code)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != GRPCContentType ||
		resp.Header.Get(GRPCStatusHeader) != strconv.Itoa(code) || resp.Header.Get(GRPCMessageHeader) == "" {
		t.Errorf("reply = %d %q, want 200 with trailers-only status %d and a message", resp.StatusCode, resp.Header, code)
	}
}

func TestMembersGRPCRequest(t *testing.T) {
	t.Parallel()
	tests := []struct {
		method string
		change bool
	}{
		{methodMemberList, false},
		{methodStatus, false},
		{"/etcdserverpb.KV/Put", false},
		{methodMemberAdd, true},
		{methodMemberRemove, true},
		{methodMemberUpdate, true},
		{methodMemberPromote, true},
	}
	for _, forward := range []bool{false, true} {
		for _, tt := range tests {
			t.Run(tt.method+map[bool]string{false: " rejected", true: " forwarded"}[forward], func(t *testing.T) {
				t.Parallel()
				reply, err := (&Members{Self: testSelf, Forward: forward}).Request(grpcRequest(tt.method))
				if err != nil {
					t.Fatal(err)
				}
				if tt.change && !forward {
					assertGRPCStatus(t, reply, CodePermissionDenied)
					return
				}
				if reply != nil {
					t.Fatalf("unexpected reply %d %q", reply.StatusCode, reply.Header)
				}
			})
		}
	}
}

func TestMembersGRPCResponse(t *testing.T) {
	t.Parallel()
	upstreamMember := &pb.Member{ID: 0x8e9e05c52164694d, Name: "m1",
		PeerURLs: []string{"http://" + upstreamAddr + "80"}, ClientURLs: []string{"http://" + upstreamAddr + "79"}}
	header := func() *pb.ResponseHeader {
		return &pb.ResponseHeader{ClusterId: 0xcdf818194e3a8c32, MemberId: upstreamMember.ID, Revision: 7, RaftTerm: 2}
	}
	wantSelf := []*pb.Member{{ID: testSelf.ID, Name: "pp", ClientURLs: testSelf.ClientURLs}}
	checkHeader := func(t *testing.T, h *pb.ResponseHeader) {
		t.Helper()
		if h.MemberId != testSelf.ID || h.ClusterId != 0xcdf818194e3a8c32 || h.Revision != 7 {
			t.Errorf("header = %v, want our member ID and the upstream's cluster ID and revision", h)
		}
	}
	checkMembers := func(t *testing.T, got []*pb.Member) {
		t.Helper()
		if len(got) != 1 || got[0].ID != wantSelf[0].ID || got[0].Name != wantSelf[0].Name ||
			!slices.Equal(got[0].ClientURLs, wantSelf[0].ClientURLs) || len(got[0].PeerURLs) != 0 {
			t.Errorf("members = %v, want only %v", got, wantSelf)
		}
	}

	tests := []struct {
		name   string
		method string
		body   []byte
		check  func(t *testing.T, body []byte)
	}{
		{
			name: "MemberList", method: methodMemberList,
			body: frame(t, &pb.MemberListResponse{Header: header(), Members: []*pb.Member{upstreamMember, {ID: 2, Name: "m2"}}}),
			check: func(t *testing.T, b []byte) {
				r := unframeT(t, b, &pb.MemberListResponse{})
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
			},
		},
		{
			name: "MemberAdd", method: methodMemberAdd,
			body: frame(t, &pb.MemberAddResponse{Header: header(),
				Member:  &pb.Member{ID: 3, PeerURLs: []string{"http://" + upstreamAddr + "81"}, IsLearner: true},
				Members: []*pb.Member{upstreamMember}}),
			check: func(t *testing.T, b []byte) {
				r := unframeT(t, b, &pb.MemberAddResponse{})
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
				if r.Member.ID != 3 || !r.Member.IsLearner || len(r.Member.PeerURLs) != 0 || len(r.Member.ClientURLs) != 0 {
					t.Errorf("added member = %v, want its ID and learner flag without URLs", r.Member)
				}
			},
		},
		{
			name: "MemberRemove", method: methodMemberRemove,
			body: frame(t, &pb.MemberRemoveResponse{Header: header(), Members: []*pb.Member{upstreamMember}}),
			check: func(t *testing.T, b []byte) {
				r := unframeT(t, b, &pb.MemberRemoveResponse{})
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
			},
		},
		{
			name: "MemberUpdate", method: methodMemberUpdate,
			body: frame(t, &pb.MemberUpdateResponse{Header: header(), Members: []*pb.Member{upstreamMember}}),
			check: func(t *testing.T, b []byte) {
				r := unframeT(t, b, &pb.MemberUpdateResponse{})
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
			},
		},
		{
			name: "MemberPromote", method: methodMemberPromote,
			body: frame(t, &pb.MemberPromoteResponse{Header: header(), Members: []*pb.Member{upstreamMember}}),
			check: func(t *testing.T, b []byte) {
				r := unframeT(t, b, &pb.MemberPromoteResponse{})
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
			},
		},
		{
			name: "Status", method: methodStatus,
			body: frame(t, &pb.StatusResponse{Header: header(), Leader: upstreamMember.ID, Version: "3.5.35", RaftIndex: 9}),
			check: func(t *testing.T, b []byte) {
				r := unframeT(t, b, &pb.StatusResponse{})
				checkHeader(t, r.Header)
				if r.Leader != testSelf.ID || r.Version != "3.5.35" || r.RaftIndex != 9 {
					t.Errorf("status = %v, want us as the leader and the rest kept", r)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {GRPCContentType}},
				Request: grpcRequest(tt.method)}
			fn, err := (&Members{Self: testSelf, Forward: true}).Response(resp)
			if err != nil || fn == nil {
				t.Fatalf("Response = claimed %v, %v; want a claim", fn != nil, err)
			}
			got, err := fn(tt.body)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(got, []byte(upstreamAddr)) {
				t.Errorf("rewritten message leaks the upstream address")
			}
			tt.check(t, got)
		})
	}
}

func TestMembersGRPCResponseNotClaimed(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		method string
		header http.Header
	}{
		{name: "trailers-only error", method: methodMemberList, header: http.Header{GRPCStatusHeader: {"14"}}},
		{name: "other method", method: "/etcdserverpb.KV/Range"},
		{name: "watch", method: "/etcdserverpb.Watch/Watch"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			h := http.Header{"Content-Type": {GRPCContentType}}
			for k, v := range tt.header {
				h[k] = v
			}
			fn, err := (&Members{Self: testSelf}).Response(&http.Response{StatusCode: 200, Header: h, Request: grpcRequest(tt.method)})
			if err != nil || fn != nil {
				t.Errorf("Response = claimed %v, %v; want no claim", fn != nil, err)
			}
		})
	}
}

func TestMembersGRPCBadFrames(t *testing.T) {
	t.Parallel()
	one := frame(t, &pb.MemberListResponse{})
	compressed := slices.Clone(one)
	compressed[0] = 1
	tests := map[string][]byte{
		"empty":       nil,
		"short":       {0, 0, 0},
		"not gzip":    compressed,
		"two":         append(slices.Clone(one), one...),
		"truncated":   append([]byte{0, 0, 0, 0, 9}, 1, 2),
		"not a proto": append([]byte{0, 0, 0, 0, 3}, 0xff, 0xff, 0xff),
	}
	for name, body := range tests {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			fn, _ := (&Members{Self: testSelf}).Response(&http.Response{StatusCode: 200,
				Header: http.Header{"Content-Type": {GRPCContentType}}, Request: grpcRequest(methodMemberList)})
			if _, err := fn(body); err == nil {
				t.Errorf("no error for %q", body)
			}
		})
	}
}

func TestReadOnlyGRPC(t *testing.T) {
	t.Parallel()
	tests := []struct {
		method  string
		allowed bool
	}{
		{"/etcdserverpb.KV/Range", true},
		{"/etcdserverpb.Watch/Watch", true},
		{"/etcdserverpb.Cluster/MemberList", true},
		{"/etcdserverpb.KV/Put", false},
		{"/etcdserverpb.KV/Txn", false},
		{"/etcdserverpb.Lease/LeaseGrant", false},
		{"/etcdserverpb.Maintenance/Defragment", false},
	}
	for _, tt := range tests {
		t.Run(tt.method, func(t *testing.T) {
			t.Parallel()
			reply, err := (&ReadOnly{Enabled: true}).Request(grpcRequest(tt.method))
			if err != nil {
				t.Fatal(err)
			}
			if tt.allowed {
				if reply != nil {
					t.Fatalf("unexpected reply %q", reply.Header)
				}
				return
			}
			assertGRPCStatus(t, reply, CodePermissionDenied)
		})
	}
}

func TestGRPCStatus(t *testing.T) {
	t.Parallel()
	leaky := "connection error: desc = \"transport: Error while dialing: dial tcp " + upstreamAddr + "79: connect: connection refused\""
	encoded := encodeGRPCMessage(leaky)
	resp := &http.Response{
		StatusCode: 200,
		Header:     http.Header{"Content-Type": {GRPCContentType}, GRPCMessageHeader: {encoded}},
		Trailer:    http.Header{},
		Body:       io.NopCloser(strings.NewReader("message bytes")),
		Request:    grpcRequest("/etcdserverpb.KV/Range"),
	}
	fn, err := (&GRPCStatus{}).Response(resp)
	if err != nil || fn != nil {
		t.Fatalf("Response = claimed %v, %v; want no claim: messages stream", fn != nil, err)
	}
	if got, _ := url.PathUnescape(resp.Header.Get(GRPCMessageHeader)); got != TransportFailure {
		t.Errorf("trailers-only message = %q, want the transport error replaced by %q", got, TransportFailure)
	}
	// The trailers arrive with the end of the body.
	resp.Trailer.Set(GRPCStatusHeader, "14")
	resp.Trailer.Set(GRPCMessageHeader, encoded)
	body, err := io.ReadAll(resp.Body)
	if err != nil || string(body) != "message bytes" {
		t.Fatalf("body = %q, %v; want it untouched", body, err)
	}
	if got, _ := url.PathUnescape(resp.Trailer.Get(GRPCMessageHeader)); strings.Contains(got, upstreamAddr) {
		t.Errorf("trailer message = %q, still has the address", got)
	}

	// Not gRPC: untouched.
	plain := &http.Response{StatusCode: 200, Header: http.Header{GRPCMessageHeader: {encoded}},
		Request: httptest.NewRequest(http.MethodGet, "/v2/keys/a", nil)}
	if fn, err := (&GRPCStatus{}).Response(plain); err != nil || fn != nil || plain.Header.Get(GRPCMessageHeader) != encoded {
		t.Errorf("a non-gRPC response was changed: %q", plain.Header)
	}
}

func TestScrubGRPCMessage(t *testing.T) {
	t.Parallel()
	tests := []struct {
		code     int
		in, want string
	}{
		// Go's real texts for failures below the proxy: every one names hosts, not always as host:port.
		{14, "connection error: desc = \"transport: Error while dialing: dial tcp: lookup etcd-0.etcd.svc on 10.96.0.10:53: no such host\"", TransportFailure},
		{14, "tls: failed to verify certificate: x509: certificate is valid for etcd-1.internal, not etcd-0.internal", TransportFailure},
		{2, "dial tcp fe80::1%eth0: connect: network is unreachable", TransportFailure},
		{14, "etcdserver: request timed out", "etcdserver: request timed out"},
		{2, "etcdserver: request timed out", "etcdserver: request timed out"}, // a grpc-proxy passes etcd's errors as Unknown
		{3, "etcdserver: user name is empty", "etcdserver: user name is empty"},
		{4, "context deadline exceeded", "context deadline exceeded"},
		{8, "grpc: received message larger than max (4194400 vs. 4194304)", "grpc: received message larger than max (4194400 vs. 4194304)"},
		{14, TransportFailure, TransportFailure},
		{13, "etcd-proxy-proxy: rule members could not handle the upstream response", "etcd-proxy-proxy: rule members could not handle the upstream response"},
		{2, "something about fd00::1 happened", "etcd-proxy-proxy: upstream error (Unknown); message withheld"},
		{14, "member at 10.0.0.7:2379 is slow", "etcd-proxy-proxy: upstream error (Unavailable); message withheld"},
		{13, "etcd-proxy-proxy: rule etcd-2 could not handle the upstream response", "etcd-proxy-proxy: upstream error (Internal); message withheld"},
		{99, "anything", "etcd-proxy-proxy: upstream error (code 99); message withheld"},
		{0, "anything", ""},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			t.Parallel()
			if got := ScrubGRPCMessage(tt.code, tt.in); got != tt.want {
				t.Errorf("ScrubGRPCMessage(%d, %q) = %q, want %q", tt.code, tt.in, got, tt.want)
			}
		})
	}
}

// A client that asked for gzip gets the member list compressed from below; the rewrite decompresses it and
// answers uncompressed (flag 0), which every client reads.
func TestMembersGRPCCompressed(t *testing.T) {
	t.Parallel()
	plain, err := (&pb.MemberListResponse{Members: []*pb.Member{{ID: 1, Name: "m1", ClientURLs: []string{"http://10.0.0.1:2379"}}}}).Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	_, _ = zw.Write(plain)
	_ = zw.Close()
	body := make([]byte, 5+z.Len())
	body[0] = 1
	binary.BigEndian.PutUint32(body[1:5], uint32(z.Len()))
	copy(body[5:], z.Bytes())

	self := NewSelf("pp", []string{"http://pp.example:2379"})
	resp := &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {GRPCContentType}},
		Request: grpcRequest("/etcdserverpb.Cluster/MemberList")}
	fn, err := (&Members{Self: self}).Response(resp)
	if err != nil || fn == nil {
		t.Fatalf("MemberList not claimed: %v", err)
	}
	out, err := fn(body)
	if err != nil {
		t.Fatal(err)
	}
	if out[0] != 0 {
		t.Errorf("flag = %d, want 0 (uncompressed)", out[0])
	}
	got := unframeT(t, out, &pb.MemberListResponse{})
	if len(got.Members) != 1 || got.Members[0].ID != self.ID || strings.Contains(string(out), "10.0.0.1") {
		t.Errorf("members = %v", got.Members)
	}
}
