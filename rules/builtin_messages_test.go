package rules

import (
	"bytes"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
)

// assertRefused checks that a rule ended the call with code, a message a proxy-proxy above passes on, and
// without reaching the upstream.
func assertRefused(t *testing.T, err error, code codes.Code, up *testUpstream, c *testCall) string {
	t.Helper()
	st, ok := status.FromError(err)
	if !ok || st.Code() != code {
		t.Fatalf("error = %v, want status %s", err, code)
	}
	if !KnownGRPCMessage(st.Message()) {
		t.Errorf("message %q is not known: a proxy-proxy above would withhold it (add it to ownMessages)", st.Message())
	}
	if up.Called {
		t.Error("the call reached the upstream")
	}
	if len(c.Sent) != 0 {
		t.Errorf("the client got %d answers", len(c.Sent))
	}
	return st.Message()
}

func TestLoopMessages(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		instance  string
		via       []string // via metadata values on the incoming call
		wantReply bool
		wantVia   []string // via metadata values sent up when the rule does not refuse
	}{
		{name: "first hop adds its ID", instance: "aaa", wantVia: []string{"aaa"}},
		{name: "other proxies' IDs are kept", instance: "aaa", via: []string{"bbb, ccc"}, wantVia: []string{"bbb, ccc", "aaa"}},
		{name: "own ID in a list", instance: "aaa", via: []string{"bbb, aaa,ccc"}, wantReply: true},
		{name: "own ID in a second value", instance: "aaa", via: []string{"bbb", "aaa"}, wantReply: true},
		{name: "own ID alone", instance: "aaa", via: []string{"aaa"}, wantReply: true},
		{name: "a prefix of the ID is not the ID", instance: "aaa", via: []string{"aaaa", "aa"}, wantVia: []string{"aaaa", "aa", "aaa"}},
		{name: "empty instance disables", instance: "", via: []string{""}, wantVia: []string{""}},
		{name: "empty instance adds nothing", instance: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rule := &Loop{Instance: tt.instance}
			for _, m := range []string{methodRange, methodWatch, "/some.Unknown/Method"} {
				if got, want := rule.Claim(newCall(t, m).method), map[bool]Claim{false: ClaimNone, true: ClaimCall}[tt.instance != ""]; got != want {
					t.Errorf("Claim(%s) = %d, want %d (it never decodes)", m, got, want)
				}
			}
			c := newCall(t, methodRange, &pb.RangeRequest{Key: []byte("a")})
			if tt.via != nil {
				c.md[viaMetadata] = slices.Clone(tt.via)
			}
			up := &testUpstream{Answers: []Message{&pb.RangeResponse{Count: 1}}}
			err := serveChain(rule, c, up.handler(c))
			if tt.wantReply {
				if msg := assertRefused(t, err, codes.FailedPrecondition, up, c); !strings.Contains(msg, "loop") {
					t.Errorf("message %q does not say loop", msg)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := up.MD.Get(viaMetadata); !slices.Equal(got, tt.wantVia) {
				t.Errorf("%s sent up = %q, want %q", viaMetadata, got, tt.wantVia)
			}
			if len(c.Sent) != 1 {
				t.Errorf("the client got %d answers, want the upstream's one", len(c.Sent))
			}
		})
	}
}

// readOnlyOracle are the calls that change nothing, written out apart from the table in api.go.
var readOnlyOracle = []string{
	"/etcdserverpb.KV/Range", "/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseTimeToLive",
	"/etcdserverpb.Lease/LeaseLeases", "/etcdserverpb.Cluster/MemberList", "/etcdserverpb.Maintenance/Status",
	"/etcdserverpb.Maintenance/Hash", "/etcdserverpb.Maintenance/HashKV", "/etcdserverpb.Maintenance/Snapshot",
	"/etcdserverpb.Auth/Authenticate", "/etcdserverpb.Auth/UserGet", "/etcdserverpb.Auth/UserList",
	"/etcdserverpb.Auth/RoleGet", "/etcdserverpb.Auth/RoleList", "/etcdserverpb.Auth/AuthStatus",
	"/v3electionpb.Election/Leader", "/v3electionpb.Election/Observe",
	"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
}

func TestReadOnlyMessages(t *testing.T) {
	t.Parallel()
	names := []string{"/some.Unknown/Method"}
	for _, m := range Methods() {
		names = append(names, m.Name)
	}
	if len(names) < 50 {
		t.Fatalf("%d methods in the table", len(names))
	}
	for _, enabled := range []bool{false, true} {
		for _, name := range names {
			t.Run(name+map[bool]string{false: " off", true: " on"}[enabled], func(t *testing.T) {
				t.Parallel()
				rule := &ReadOnly{Enabled: enabled}
				allowed := !enabled || slices.Contains(readOnlyOracle, name)
				claim := rule.Claim(newCall(t, name).method)
				if want := map[bool]Claim{true: ClaimNone, false: ClaimCall}[allowed]; claim != want {
					t.Errorf("Claim = %d, want %d", claim, want)
				}
				c := newCall(t, name)
				up := &testUpstream{}
				err := serveChain(rule, c, up.handler(c))
				if allowed {
					if err != nil || !up.Called {
						t.Errorf("refused (%v), want it through", err)
					}
					return
				}
				assertRefused(t, err, codes.PermissionDenied, up, c)
			})
		}
	}
}

func TestMembersMessagesRefused(t *testing.T) {
	t.Parallel()
	tests := []struct {
		method string
		claim  [2]Claim // without and with Forward
		change bool     // refused unless forwarded
	}{
		{methodMemberList, [2]Claim{ClaimMessages, ClaimMessages}, false},
		{methodStatus, [2]Claim{ClaimMessages, ClaimMessages}, false},
		{methodPut, [2]Claim{ClaimNone, ClaimNone}, false},
		{methodRange, [2]Claim{ClaimNone, ClaimNone}, false},
		{methodWatch, [2]Claim{ClaimNone, ClaimNone}, false},
		{methodSnapshot, [2]Claim{ClaimNone, ClaimNone}, false},
		{methodMemberAdd, [2]Claim{ClaimCall, ClaimMessages}, true},
		{methodMemberRemove, [2]Claim{ClaimCall, ClaimMessages}, true},
		{methodMemberUpdate, [2]Claim{ClaimCall, ClaimMessages}, true},
		{methodMemberPromote, [2]Claim{ClaimCall, ClaimMessages}, true},
		{methodMoveLeader, [2]Claim{ClaimCall, ClaimNone}, true},
	}
	for i, forward := range []bool{false, true} {
		for _, tt := range tests {
			t.Run(tt.method+map[bool]string{false: " rejected", true: " forwarded"}[forward], func(t *testing.T) {
				t.Parallel()
				rule := &Members{Self: testSelf, Forward: forward}
				c := newCall(t, tt.method)
				if got := rule.Claim(c.method); got != tt.claim[i] {
					t.Errorf("Claim = %d, want %d", got, tt.claim[i])
				}
				up := &testUpstream{}
				err := serveChain(rule, c, up.handler(c))
				if tt.change && !forward {
					if msg := assertRefused(t, err, codes.PermissionDenied, up, c); !strings.Contains(msg, "--forward-member-changes") {
						t.Errorf("message %q does not name the flag that allows changes", msg)
					}
					return
				}
				if err != nil || !up.Called {
					t.Errorf("refused (%v), want it through", err)
				}
			})
		}
	}
}

func TestMembersRewrite(t *testing.T) {
	t.Parallel()
	upstreamMember := &pb.Member{ID: 0x8e9e05c52164694d, Name: "m1",
		PeerURLs: []string{"http://" + upstreamAddr + "80"}, ClientURLs: []string{"http://" + upstreamAddr + "79"}}
	header := func() *pb.ResponseHeader {
		return &pb.ResponseHeader{ClusterId: 0xcdf818194e3a8c32, MemberId: upstreamMember.ID, Revision: 7, RaftTerm: 2}
	}
	wantSelf := &pb.Member{ID: testSelf.ID, Name: "pp", ClientURLs: testSelf.ClientURLs}
	checkHeader := func(t *testing.T, h *pb.ResponseHeader) {
		t.Helper()
		if h.MemberId != testSelf.ID || h.ClusterId != 0xcdf818194e3a8c32 || h.Revision != 7 || h.RaftTerm != 2 {
			t.Errorf("header = %v, want our member ID and the upstream's cluster ID, revision and term", h)
		}
	}
	checkMembers := func(t *testing.T, got []*pb.Member) {
		t.Helper()
		if len(got) != 1 || got[0].ID != wantSelf.ID || got[0].Name != wantSelf.Name ||
			!slices.Equal(got[0].ClientURLs, wantSelf.ClientURLs) || len(got[0].PeerURLs) != 0 || got[0].IsLearner {
			t.Errorf("members = %v, want only %v", got, wantSelf)
		}
	}
	tests := []struct {
		method string
		answer Message
		check  func(t *testing.T, m Message)
	}{
		{methodMemberList, &pb.MemberListResponse{Header: header(), Members: []*pb.Member{upstreamMember, {ID: 2, Name: "m2"}}},
			func(t *testing.T, m Message) {
				r := m.(*pb.MemberListResponse)
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
			}},
		{methodMemberAdd, &pb.MemberAddResponse{Header: header(),
			Member:  &pb.Member{ID: 3, Name: "new", PeerURLs: []string{"http://" + upstreamAddr + "81"}, IsLearner: true},
			Members: []*pb.Member{upstreamMember}},
			func(t *testing.T, m Message) {
				r := m.(*pb.MemberAddResponse)
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
				if r.Member.ID != 3 || !r.Member.IsLearner || r.Member.Name != "" || len(r.Member.PeerURLs) != 0 || len(r.Member.ClientURLs) != 0 {
					t.Errorf("added member = %v, want its ID and learner flag without name or URLs", r.Member)
				}
			}},
		{methodMemberRemove, &pb.MemberRemoveResponse{Header: header(), Members: []*pb.Member{upstreamMember}},
			func(t *testing.T, m Message) {
				r := m.(*pb.MemberRemoveResponse)
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
			}},
		{methodMemberUpdate, &pb.MemberUpdateResponse{Header: header(), Members: []*pb.Member{upstreamMember}},
			func(t *testing.T, m Message) {
				r := m.(*pb.MemberUpdateResponse)
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
			}},
		{methodMemberPromote, &pb.MemberPromoteResponse{Header: header(), Members: []*pb.Member{upstreamMember}},
			func(t *testing.T, m Message) {
				r := m.(*pb.MemberPromoteResponse)
				checkHeader(t, r.Header)
				checkMembers(t, r.Members)
			}},
		{methodStatus, &pb.StatusResponse{Header: header(), Leader: upstreamMember.ID, Version: "3.5.35", RaftIndex: 9, DbSize: 4096},
			func(t *testing.T, m Message) {
				r := m.(*pb.StatusResponse)
				checkHeader(t, r.Header)
				if r.Leader != testSelf.ID || r.Version != "3.5.35" || r.RaftIndex != 9 || r.DbSize != 4096 {
					t.Errorf("status = %v, want us as the leader and the rest kept", r)
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.method, func(t *testing.T) {
			t.Parallel()
			up := &testUpstream{Answers: []Message{tt.answer}}
			c, err := serve(t, &Members{Self: testSelf, Forward: true}, tt.method, up, LookupMethod(tt.method).NewRequest())
			if err != nil {
				t.Fatal(err)
			}
			if len(up.Got) != 1 {
				t.Errorf("the upstream got %d requests, want the client's one", len(up.Got))
			}
			if bytes.Contains(c.Sent[0], []byte(upstreamAddr)) || bytes.Contains(c.Sent[0], []byte("m1")) {
				t.Errorf("rewritten answer leaks the upstream member: %q", c.Sent[0])
			}
			tt.check(t, c.answer())
		})
	}
}

// An error of the upstream reaches the client as it is (the core scrubs its message), with no answer.
func TestMembersUpstreamStatus(t *testing.T) {
	t.Parallel()
	for _, method := range []string{methodMemberList, methodStatus, methodMemberAdd} {
		t.Run(method, func(t *testing.T) {
			t.Parallel()
			want := status.Error(codes.Unavailable, "etcdserver: no leader")
			up := &testUpstream{Err: want}
			c, err := serve(t, &Members{Self: testSelf, Forward: true}, method, up, LookupMethod(method).NewRequest())
			if !errors.Is(err, want) {
				t.Errorf("error = %v, want the upstream's %v", err, want)
			}
			if len(c.Sent) != 0 {
				t.Errorf("the client got %d answers", len(c.Sent))
			}
		})
	}
}

// unknownField is a field no etcd schema has, carrying s.
func unknownField(num protowire.Number, s string) []byte {
	b := protowire.AppendTag(nil, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// A membership or status answer from an upstream with a newer schema (or a hostile one): unknown fields at
// every level carry addresses, and none may come out of the rewrite (issue 11 item 5).
func TestMembersUnknownFields(t *testing.T) {
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
		msg    Message
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
			if !bytes.Contains(mustMarshal(t, tt.msg), []byte("10.0.0.5")) {
				t.Fatal("the planted fields were not encoded")
			}
			c, err := serve(t, &Members{Self: testSelf, Forward: true}, tt.method, &testUpstream{Answers: []Message{tt.msg}},
				LookupMethod(tt.method).NewRequest())
			if err != nil {
				t.Fatal(err)
			}
			if len(c.Sent) != 1 {
				t.Fatalf("the client got %d answers", len(c.Sent))
			}
			for _, s := range []string{"10.0.0.5", "cluster.internal", "m1"} {
				if bytes.Contains(c.Sent[0], []byte(s)) {
					t.Errorf("rewritten answer still holds %q: %q", s, c.Sent[0])
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

	rewrite := func(t *testing.T, in *pb.StatusResponse) (*pb.StatusResponse, []byte) {
		t.Helper()
		c, err := serve(t, &Members{Self: testSelf}, methodStatus, &testUpstream{Answers: []Message{in}}, &pb.StatusRequest{})
		if err != nil {
			t.Fatal(err)
		}
		return c.answer().(*pb.StatusResponse), c.Sent[0]
	}
	got, out := rewrite(t, &pb.StatusResponse{Header: &pb.ResponseHeader{MemberId: 9}, Version: "3.6.16", Leader: 9,
		Errors:           []string{"memberID:9 alarm:NOSPACE ", "etcdserver: no leader", "dial tcp 10.0.0.5:2379: refused", "memberID:9 alarm:CORRUPT"},
		XXX_unrecognized: newer})
	// (our alarm text reads like host:port to the oracle)
	if l := leak(strings.ReplaceAll(string(out), "memberID:"+strconv.FormatUint(testSelf.ID, 10), "")); l != "" {
		t.Errorf("rewritten status holds %q", l)
	}
	self := "memberID:" + strconv.FormatUint(testSelf.ID, 10)
	wantErrors := []string{self + " alarm:NOSPACE ", "etcdserver: no leader", self + " alarm:CORRUPT "}
	if got.Version != "3.6.16" || got.Leader != testSelf.ID || got.Header.MemberId != testSelf.ID || !slices.Equal(got.Errors, wantErrors) {
		t.Errorf("status = %v, want version 3.6.16, us as the leader and member, errors %q", got, wantErrors)
	}
	// What a 3.6 client decodes from the fields the 3.5 schema does not know.
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
	var bad []byte
	bad = protowire.AppendTag(bad, statusStorageVersion, protowire.BytesType)
	bad = protowire.AppendString(bad, "infra9:2379")
	info = protowire.AppendTag(nil, downgradeTarget, protowire.BytesType)
	info = protowire.AppendString(info, "3.5.0 at 10.0.0.5")
	bad = protowire.AppendTag(bad, statusDowngradeInfo, protowire.BytesType)
	bad = protowire.AppendBytes(bad, info)
	got, out = rewrite(t, &pb.StatusResponse{Version: "10.0.0.5", Errors: []string{"memberID:9 alarm:NOSPACE at infra9"}, XXX_unrecognized: bad})
	if l := leak(string(out)); l != "" {
		t.Errorf("rewritten status holds %q", l)
	}
	if got.Version != "" || len(got.Errors) != 0 {
		t.Errorf("version %q, errors %q; want none", got.Version, got.Errors)
	}
}

// The rules' own statuses pass a proxy-proxy above unchanged.
func TestOwnAnswersKnown(t *testing.T) {
	t.Parallel()
	loop := newCall(t, methodRange)
	loop.md.Set(viaMetadata, "me")
	calls := map[string]struct {
		rule MessageRule
		c    *testCall
	}{
		"loop":        {&Loop{Instance: "me"}, loop},
		"readonly":    {&ReadOnly{Enabled: true}, newCall(t, methodPut)},
		"members":     {&Members{Self: testSelf}, newCall(t, methodMemberAdd)},
		"move-leader": {&Members{Self: testSelf}, newCall(t, methodMoveLeader)},
	}
	for name, x := range calls {
		err := serveChain(x.rule, x.c, (&testUpstream{}).handler(x.c))
		st, ok := status.FromError(err)
		if !ok || st.Code() == codes.OK {
			t.Fatalf("%s: no status (%v)", name, err)
		}
		if !KnownGRPCMessage(st.Message()) {
			t.Errorf("%s answers %q, which a proxy-proxy above would replace: add it to ownMessages", name, st.Message())
		}
	}
	for _, msg := range []string{TransportFailure, msgSnapshotHash, msgSnapshotBroken, msgSnapshotMalformed,
		msgSnapshotRewrite, msgSnapshotSpool, msgSnapshotTooLarge + " (4096 bytes)"} {
		if !KnownGRPCMessage(msg) {
			t.Errorf("%q is not known", msg)
		}
	}
}
