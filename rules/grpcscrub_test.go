package rules

import (
	"bytes"
	"encoding/base64"
	"io"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/raft/v3"
	"google.golang.org/protobuf/encoding/protowire"
)

// secretNames are upstream names the tests and fuzz targets plant: none may come out.
var secretNames = []string{"etcd-2.cluster.internal", "cluster.internal", "member-secret", "infra9"}

// addressLike finds what names a host, wherever it sits in a text (glued to other characters included): URLs,
// IPv4, IPv6 and host:port. It is the tests' oracle, independent of the rule's own check.
var addressLike = regexp.MustCompile(`(?i)[a-z][a-z0-9+.-]*://|\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|[0-9a-f]{0,4}::[0-9a-f]{0,4}|[0-9a-f]{1,4}(:[0-9a-f]{1,4}){2,}|[a-z0-9.-]+:\d{1,5}`)

// leak returns what in s names a host or a planted name, or "".
func leak(s string) string {
	if m := addressLike.FindString(s); m != "" {
		return m
	}
	lower := strings.ToLower(s)
	for _, n := range secretNames {
		if strings.Contains(lower, n) {
			return n
		}
	}
	return ""
}

// headerLeak returns the first header value of h that leaks, decoded as a client decodes it.
func headerLeak(h http.Header) string {
	for k, vs := range h {
		for _, v := range vs {
			if strings.HasSuffix(k, "-Bin") {
				if d, err := base64.RawStdEncoding.DecodeString(strings.TrimRight(v, "=")); err == nil {
					v += " " + string(d)
				}
			}
			if d, err := url.PathUnescape(v); err == nil {
				v += " " + d
			}
			if l := leak(v); l != "" {
				return k + ": " + l
			}
		}
	}
	return ""
}

// statusDetails is a grpc-status-details-bin value: google.rpc.Status{code, message, details: [Any{type_url,
// value}]}, encoded by hand so that the test depends on nothing but the wire format.
func statusDetails(code int, msg, detail string) string {
	var anyMsg []byte
	anyMsg = protowire.AppendTag(anyMsg, 1, protowire.BytesType)
	anyMsg = protowire.AppendString(anyMsg, "type.googleapis.com/google.rpc.DebugInfo")
	anyMsg = protowire.AppendTag(anyMsg, 2, protowire.BytesType)
	anyMsg = protowire.AppendString(anyMsg, detail)
	var st []byte
	st = protowire.AppendTag(st, 1, protowire.VarintType)
	st = protowire.AppendVarint(st, uint64(code))
	st = protowire.AppendTag(st, 2, protowire.BytesType)
	st = protowire.AppendString(st, msg)
	st = protowire.AppendTag(st, 3, protowire.BytesType)
	st = protowire.AppendBytes(st, anyMsg)
	return base64.RawStdEncoding.EncodeToString(st)
}

// scrubThroughRule runs a status through the GRPCStatus rule twice: as a trailers-only answer (headers) and as
// the trailers of an answer with messages. It returns both header sets as the client gets them.
func scrubThroughRule(t testing.TB, status http.Header) (headers, trailers http.Header) {
	t.Helper()
	h := status.Clone()
	h.Set("Content-Type", GRPCContentType)
	resp := &http.Response{StatusCode: 200, Header: h, Trailer: http.Header{}, Body: io.NopCloser(strings.NewReader("")),
		Request: grpcRequest("/etcdserverpb.KV/Range")}
	if _, err := (&GRPCStatus{}).Response(resp); err != nil {
		t.Fatal(err)
	}
	headers = resp.Header

	resp = &http.Response{StatusCode: 200, Header: http.Header{"Content-Type": {GRPCContentType}}, Trailer: http.Header{},
		Body: io.NopCloser(strings.NewReader("message bytes")), Request: grpcRequest("/etcdserverpb.KV/Range")}
	if _, err := (&GRPCStatus{}).Response(resp); err != nil {
		t.Fatal(err)
	}
	for k, v := range status { // the trailers arrive with the end of the body
		resp.Trailer[k] = slices.Clone(v)
	}
	if _, err := io.ReadAll(resp.Body); err != nil {
		t.Fatal(err)
	}
	return headers, resp.Trailer
}

// The bypasses of issue 11 item 4: each got an address or a host name through the regex scrubbing.
func TestGRPCStatusBypasses(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		status http.Header
		want   string // the message the client gets
	}{
		{name: "clean message, details with an address", status: http.Header{
			GRPCStatusHeader:  {"14"},
			GRPCMessageHeader: {"etcdserver: request timed out"},
			GRPCDetailsHeader: {statusDetails(14, "etcdserver: request timed out", "http://10.0.0.5:2379")}},
			want: "etcdserver: request timed out"},
		{name: "host name", status: http.Header{GRPCStatusHeader: {"14"},
			GRPCMessageHeader: {"member etcd-2.cluster.internal unreachable"}},
			want: "etcd-proxy-proxy: upstream error (Unavailable); message withheld"},
		{name: "address glued to letters", status: http.Header{GRPCStatusHeader: {"2"},
			GRPCMessageHeader: {"x10.9.9.9:2379y"}}, want: "etcd-proxy-proxy: upstream error (Unknown); message withheld"},
		{name: "address glued to underscores", status: http.Header{GRPCStatusHeader: {"2"},
			GRPCMessageHeader: {"member_10.9.9.9:2379_down"}}, want: "etcd-proxy-proxy: upstream error (Unknown); message withheld"},
		{name: "port apart", status: http.Header{GRPCStatusHeader: {"2"},
			GRPCMessageHeader: {"leader is 127.0.0.1 port 2379"}}, want: "etcd-proxy-proxy: upstream error (Unknown); message withheld"},
		{name: "percent-encoded", status: http.Header{GRPCStatusHeader: {"2"},
			GRPCMessageHeader: {"leader%20is%20127%2E0%2E0%2E1"}}, want: "etcd-proxy-proxy: upstream error (Unknown); message withheld"},
		{name: "second message value", status: http.Header{GRPCStatusHeader: {"14"},
			GRPCMessageHeader: {"etcdserver: no leader", "dial tcp 10.0.0.5:2379"}}, want: "etcdserver: no leader"},
		{name: "status not a number", status: http.Header{GRPCStatusHeader: {"10.0.0.5"},
			GRPCMessageHeader: {"etcdserver: no leader"}}, want: "etcdserver: no leader"},
		{name: "details alone", status: http.Header{GRPCStatusHeader: {"13"},
			GRPCDetailsHeader: {statusDetails(13, "member-secret", "infra9:2380")}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			headers, trailers := scrubThroughRule(t, tt.status)
			for where, h := range map[string]http.Header{"trailers-only headers": headers, "trailers": trailers} {
				if l := headerLeak(h); l != "" {
					t.Errorf("%s leak %q: %q", where, l, h)
				}
				if h.Get(GRPCDetailsHeader) != "" {
					t.Errorf("%s keep grpc-status-details-bin", where)
				}
				if _, err := strconv.ParseUint(h.Get(GRPCStatusHeader), 10, 32); err != nil {
					t.Errorf("%s: grpc-status %q is not a number", where, h.Get(GRPCStatusHeader))
				}
				if len(h.Values(GRPCMessageHeader)) > 1 {
					t.Errorf("%s: %d grpc-message values", where, len(h.Values(GRPCMessageHeader)))
				}
				if got, _ := url.PathUnescape(h.Get(GRPCMessageHeader)); got != tt.want {
					t.Errorf("%s: message = %q, want %q", where, got, tt.want)
				}
			}
		})
	}
}

// Every text of the allow-list: etcd 3.5.35's rpctypes all pass, and no listed text names a host.
func TestKnownGRPCMessages(t *testing.T) {
	t.Parallel()
	for _, err := range []error{
		raft.ErrProposalDropped, raft.ErrStopped, // passed on by etcd as they are when a member stops
		rpctypes.ErrGRPCEmptyKey, rpctypes.ErrGRPCKeyNotFound, rpctypes.ErrGRPCValueProvided, rpctypes.ErrGRPCLeaseProvided,
		rpctypes.ErrGRPCTooManyOps, rpctypes.ErrGRPCDuplicateKey,
		rpctypes.ErrGRPCCompacted, rpctypes.ErrGRPCFutureRev, rpctypes.ErrGRPCNoSpace,
		rpctypes.ErrGRPCLeaseNotFound, rpctypes.ErrGRPCLeaseExist, rpctypes.ErrGRPCLeaseTTLTooLarge,
		rpctypes.ErrGRPCWatchCanceled, rpctypes.ErrGRPCMemberExist, rpctypes.ErrGRPCPeerURLExist,
		rpctypes.ErrGRPCMemberNotEnoughStarted, rpctypes.ErrGRPCMemberBadURLs, rpctypes.ErrGRPCMemberNotFound,
		rpctypes.ErrGRPCMemberNotLearner, rpctypes.ErrGRPCLearnerNotReady, rpctypes.ErrGRPCTooManyLearners,
		rpctypes.ErrGRPCClusterIdMismatch, rpctypes.ErrGRPCRequestTooLarge, rpctypes.ErrGRPCRequestTooManyRequests,
		rpctypes.ErrGRPCRootUserNotExist, rpctypes.ErrGRPCRootRoleNotExist, rpctypes.ErrGRPCUserAlreadyExist,
		rpctypes.ErrGRPCUserEmpty, rpctypes.ErrGRPCUserNotFound, rpctypes.ErrGRPCRoleAlreadyExist,
		rpctypes.ErrGRPCRoleNotFound, rpctypes.ErrGRPCRoleEmpty, rpctypes.ErrGRPCAuthFailed,
		rpctypes.ErrGRPCPermissionNotGiven, rpctypes.ErrGRPCPermissionDenied, rpctypes.ErrGRPCRoleNotGranted,
		rpctypes.ErrGRPCPermissionNotGranted, rpctypes.ErrGRPCAuthNotEnabled, rpctypes.ErrGRPCInvalidAuthToken,
		rpctypes.ErrGRPCInvalidAuthMgmt, rpctypes.ErrGRPCAuthOldRevision, rpctypes.ErrGRPCNoLeader,
		rpctypes.ErrGRPCNotLeader, rpctypes.ErrGRPCLeaderChanged, rpctypes.ErrGRPCNotCapable, rpctypes.ErrGRPCStopped,
		rpctypes.ErrGRPCTimeout, rpctypes.ErrGRPCTimeoutDueToLeaderFail, rpctypes.ErrGRPCTimeoutDueToConnectionLost,
		rpctypes.ErrGRPCTimeoutWaitAppliedIndex, rpctypes.ErrGRPCUnhealthy, rpctypes.ErrGRPCCorrupt,
		rpctypes.ErrGRPCBadLeaderTransferee,
		rpctypes.ErrGRPCClusterVersionUnavailable, rpctypes.ErrGRPCWrongDowngradeVersionFormat,
		rpctypes.ErrGRPCInvalidDowngradeTargetVersion, rpctypes.ErrGRPCDowngradeInProcess,
		rpctypes.ErrGRPCNoInflightDowngrade, rpctypes.ErrGRPCCanceled, rpctypes.ErrGRPCDeadlineExceeded,
	} {
		if msg := rpctypes.ErrorDesc(err); !KnownGRPCMessage(msg) {
			t.Errorf("etcd 3.5.35's %q is not in the allow-list", msg)
		}
	}
	for msg := range knownGRPCMessages {
		if l := leak(msg); l != "" {
			t.Errorf("listed text %q names %q", msg, l)
		}
	}
	for code := range 20 {
		if msg := WithheldMessage(code); !KnownGRPCMessage(msg) || leak(msg) != "" {
			t.Errorf("WithheldMessage(%d) = %q does not pass a proxy-proxy above", code, msg)
		}
	}
}

// The rules' own gRPC answers pass a proxy-proxy above unchanged.
func TestOwnGRPCAnswersKnown(t *testing.T) {
	t.Parallel()
	loopReq := grpcRequest("/etcdserverpb.KV/Range")
	loopReq.Header.Set(ViaHeader, "me")
	replies := map[string]func() (*http.Response, error){
		"loop": func() (*http.Response, error) { return (&Loop{Instance: "me"}).Request(loopReq) },
		"readonly": func() (*http.Response, error) {
			return (&ReadOnly{Enabled: true}).Request(grpcRequest("/etcdserverpb.KV/Put"))
		},
		"members": func() (*http.Response, error) {
			return (&Members{Self: testSelf}).Request(grpcRequest(methodMemberAdd))
		},
		"move-leader": func() (*http.Response, error) {
			return (&Members{Self: testSelf}).Request(grpcRequest(methodMoveLeader))
		},
	}
	for name, reply := range replies {
		resp, err := reply()
		if err != nil || resp == nil {
			t.Fatalf("%s: no reply (%v)", name, err)
		}
		if msg, _ := url.PathUnescape(resp.Header.Get(GRPCMessageHeader)); !KnownGRPCMessage(msg) {
			t.Errorf("%s answers %q, which a proxy-proxy above would replace: add it to ownMessages", name, msg)
		}
	}
	for _, msg := range []string{TransportFailure, msgSnapshotHash, msgSnapshotBroken, msgSnapshotMalformed,
		msgSnapshotRewrite, msgSnapshotSpool, msgSnapshotTooLarge + " (4096 bytes)"} {
		if !KnownGRPCMessage(msg) {
			t.Errorf("%q is not known", msg)
		}
	}
}

// unknownField is a field no etcd schema has, carrying s.
func unknownField(num protowire.Number, s string) []byte {
	b := protowire.AppendTag(nil, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// A membership or status answer from an upstream with a newer schema (or a hostile one): unknown fields at
// every level carry addresses, and none may come out of the rewrite (issue 11 item 5).
func TestMembersGRPCUnknownFields(t *testing.T) {
	t.Parallel()
	const planted = "http://10.0.0.5:2379 etcd-2.cluster.internal"
	header := func() *pb.ResponseHeader {
		return &pb.ResponseHeader{ClusterId: 7, MemberId: 9, Revision: 3, XXX_unrecognized: unknownField(90, planted)}
	}
	member := func() *pb.Member {
		return &pb.Member{ID: 9, Name: "m1", XXX_unrecognized: unknownField(91, planted)}
	}
	top := unknownField(99, planted)
	tests := []struct {
		method string
		msg    message
	}{
		{methodMemberList, &pb.MemberListResponse{Header: header(), Members: []*pb.Member{member()}, XXX_unrecognized: top}},
		{methodMemberAdd, &pb.MemberAddResponse{Header: header(), Member: member(), Members: []*pb.Member{member()}, XXX_unrecognized: top}},
		{methodMemberRemove, &pb.MemberRemoveResponse{Header: header(), Members: []*pb.Member{member()}, XXX_unrecognized: top}},
		{methodMemberUpdate, &pb.MemberUpdateResponse{Header: header(), Members: []*pb.Member{member()}, XXX_unrecognized: top}},
		{methodMemberPromote, &pb.MemberPromoteResponse{Header: header(), Members: []*pb.Member{member()}, XXX_unrecognized: top}},
		{methodStatus, &pb.StatusResponse{Header: header(), Version: "3.5.35", Leader: 9, XXX_unrecognized: top}},
	}
	for _, tt := range tests {
		t.Run(tt.method, func(t *testing.T) {
			t.Parallel()
			body := frame(t, tt.msg)
			if !bytes.Contains(body, []byte("10.0.0.5")) {
				t.Fatal("the planted fields were not encoded")
			}
			fn, err := (&Members{Self: testSelf, Forward: true}).Response(&http.Response{StatusCode: 200,
				Header: http.Header{"Content-Type": {GRPCContentType}}, Request: grpcRequest(tt.method)})
			if err != nil || fn == nil {
				t.Fatalf("not claimed: %v", err)
			}
			out, err := fn(body)
			if err != nil {
				t.Fatal(err)
			}
			for _, s := range []string{"10.0.0.5", "cluster.internal", "m1"} {
				if bytes.Contains(out, []byte(s)) {
					t.Errorf("rewritten answer still holds %q: %q", s, out)
				}
			}
		})
	}
}

// The fields etcd 3.6 added to StatusResponse survive the rewrite when they read as what they are; anything else
// a newer or hostile upstream puts in the answer's strings does not.
func TestStatusNewerFields(t *testing.T) {
	t.Parallel()
	var newer []byte
	newer = protowire.AppendTag(newer, statusStorageVersion, protowire.BytesType)
	newer = protowire.AppendString(newer, "3.6.0")
	newer = protowire.AppendTag(newer, statusDBSizeQuota, protowire.VarintType)
	newer = protowire.AppendVarint(newer, 8<<30)
	var info []byte
	info = protowire.AppendTag(info, downgradeEnabled, protowire.VarintType)
	info = protowire.AppendVarint(info, 1)
	info = protowire.AppendTag(info, downgradeTarget, protowire.BytesType)
	info = protowire.AppendString(info, "3.5.0")
	info = append(info, unknownField(7, "10.0.0.5:2380")...)
	newer = protowire.AppendTag(newer, statusDowngradeInfo, protowire.BytesType)
	newer = protowire.AppendBytes(newer, info)
	newer = append(newer, unknownField(14, "etcd-2.cluster.internal")...)

	in := &pb.StatusResponse{Header: &pb.ResponseHeader{MemberId: 9}, Version: "3.6.16", Leader: 9, IsLearner: false,
		Errors:           []string{"memberID:9 alarm:NOSPACE ", "etcdserver: no leader", "dial tcp 10.0.0.5:2379: refused"},
		XXX_unrecognized: newer}
	fn, _ := (&Members{Self: testSelf}).Response(&http.Response{StatusCode: 200,
		Header: http.Header{"Content-Type": {GRPCContentType}}, Request: grpcRequest(methodStatus)})
	out, err := fn(frame(t, in))
	if err != nil {
		t.Fatal(err)
	}
	// (our alarm text reads like host:port to the oracle)
	if l := leak(strings.ReplaceAll(string(out), "memberID:"+strconv.FormatUint(testSelf.ID, 10), "")); l != "" {
		t.Errorf("rewritten status holds %q", l)
	}
	got := unframeT(t, out, &pb.StatusResponse{})
	wantErrors := []string{"memberID:" + strconv.FormatUint(testSelf.ID, 10) + " alarm:NOSPACE ", "etcdserver: no leader"}
	if got.Version != "3.6.16" || got.Leader != testSelf.ID || !slices.Equal(got.Errors, wantErrors) {
		t.Errorf("status = %v, want version 3.6.16, us as the leader, errors %q", got, wantErrors)
	}
	// What a 3.6 client decodes from the appended fields.
	var storage, target string
	var quota uint64
	var enabled bool
	eachField(got.XXX_unrecognized, func(num protowire.Number, _ protowire.Type, v []byte, n uint64) {
		switch num {
		case statusStorageVersion:
			storage = string(v)
		case statusDBSizeQuota:
			quota = n
		case statusDowngradeInfo:
			eachField(v, func(num protowire.Number, _ protowire.Type, v []byte, n uint64) {
				switch num {
				case downgradeEnabled:
					enabled = n == 1
				case downgradeTarget:
					target = string(v)
				default:
					t.Errorf("downgradeInfo keeps field %d", num)
				}
			})
		default:
			t.Errorf("status keeps unknown field %d", num)
		}
	})
	if storage != "3.6.0" || quota != 8<<30 || !enabled || target != "3.5.0" {
		t.Errorf("newer fields = storage %q quota %d downgrade %v %q, want 3.6.0 %d true 3.5.0", storage, quota, enabled, target, 8<<30)
	}

	// Strings that do not read as versions go.
	in = &pb.StatusResponse{Version: "10.0.0.5", XXX_unrecognized: append(
		protowire.AppendTag(nil, statusStorageVersion, protowire.BytesType), protowire.AppendString(nil, "infra9:2379")...)}
	out, err = fn(frame(t, in))
	if err != nil {
		t.Fatal(err)
	}
	if l := leak(string(out)); l != "" {
		t.Errorf("rewritten status holds %q", l)
	}
}
