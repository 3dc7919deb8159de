package rules

import (
	"bytes"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/protobuf/encoding/protowire"
)

// FuzzScrubGRPCMessage: whatever status message an upstream sends, the client gets the upstream's own only when
// it is known, or else one of the fixed texts; no address or planted name survives, and a second proxy-proxy
// above changes nothing more. (The core builds the client's status anew from the code and this message: the
// upstream's details never pass.)
func FuzzScrubGRPCMessage(f *testing.F) {
	seeds := []struct {
		code uint32
		msg  string
	}{
		{14, "etcdserver: request timed out"},
		{14, "member etcd-2.cluster.internal unreachable"},
		{2, "x10.9.9.9:2379y"},
		{2, "member_10.9.9.9:2379_down"},
		{2, "leader is 127.0.0.1 port 2379"},
		{14, "connection error: desc = \"transport: Error while dialing: dial tcp [fd00::5]:2379: connect: connection refused\""},
		{8, "grpc: received message larger than max (4194400 vs. 4194304)"},
		{13, "stream terminated by RST_STREAM with error code: PROTOCOL_ERROR"},
		{13, "etcd-proxy-proxy: rule members could not handle the upstream response"},
		{14, "etcd-proxy-proxy: upstream error (Unavailable); message withheld"},
		{0, "OK from infra9"},
		{14, "%65tcd-2.cluster.internal"},
		{99, "member-secret"},
		{2, ""},
	}
	for _, s := range seeds {
		f.Add(s.code, s.msg)
	}
	f.Fuzz(func(t *testing.T, code uint32, msg string) {
		got := ScrubGRPCMessage(int(code), msg)
		if l := leak(got); l != "" {
			t.Fatalf("status %d %q leaks %q: %q", code, msg, l, got)
		}
		if got != "" && got != TransportFailure && got != WithheldMessage(int(code)) && !(got == msg && KnownGRPCMessage(got)) {
			t.Fatalf("message %q became %q: neither the upstream's known text nor a fixed one", msg, got)
		}
		if got == "" && code != 0 && msg != "" {
			t.Fatalf("status %d %q lost its message", code, msg)
		}
		// A proxy-proxy above passes it on as it is.
		if again := ScrubGRPCMessage(int(code), got); again != got {
			t.Fatalf("a second hop changed %q into %q", got, again)
		}
	})
}

// membershipMethods are the answers the Members rule rewrites, in the order FuzzMembersRewrite picks them.
var membershipMethods = []string{methodMemberList, methodStatus, methodMemberAdd, methodMemberRemove, methodMemberUpdate, methodMemberPromote}

// FuzzMembersRewrite: whatever message an upstream answers a membership or status call with (any bytes that
// decode as the method's answer, as the core decodes them), the rewritten answer decodes, holds no unknown field
// (but Status's checked newer ones), lists only us, and carries no piece of any text that was in an unknown field
// or in an upstream member, nor a planted name.
func FuzzMembersRewrite(f *testing.F) {
	planted := "http://10.0.0.5:2379 etcd-2.cluster.internal [fd00::5]:2380"
	header := &pb.ResponseHeader{ClusterId: 7, MemberId: 9, Revision: 3, RaftTerm: 2, XXX_unrecognized: unknownField(90, planted)}
	member := &pb.Member{ID: 9, Name: "member-secret", PeerURLs: []string{"http://10.9.9.9:2380"},
		ClientURLs: []string{"https://infra9.cluster.internal:2379"}, XXX_unrecognized: unknownField(91, planted)}
	status := &pb.StatusResponse{Header: header, Version: "3.6.16", Leader: 9, RaftIndex: 100, Errors: []string{"memberID:9 alarm:NOSPACE "},
		XXX_unrecognized: append(slices.Concat(
			protowire.AppendString(protowire.AppendTag(nil, statusStorageVersion, protowire.BytesType), "3.6.0"),
			protowire.AppendVarint(protowire.AppendTag(nil, statusDBSizeQuota, protowire.VarintType), 2<<30)),
			unknownField(99, planted)...)}
	for i, m := range []Message{
		&pb.MemberListResponse{Header: header, Members: []*pb.Member{member, {ID: 2, Name: "infra9"}}, XXX_unrecognized: unknownField(99, planted)},
		status,
		&pb.MemberAddResponse{Header: header, Member: member, Members: []*pb.Member{member}},
		&pb.MemberRemoveResponse{Header: header, Members: []*pb.Member{member}},
		&pb.MemberUpdateResponse{Header: header, Members: []*pb.Member{member}},
		&pb.MemberPromoteResponse{Header: header, Members: []*pb.Member{member}},
	} {
		b, err := m.Marshal()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(uint8(i), b)
	}
	f.Fuzz(func(t *testing.T, pick uint8, data []byte) {
		method := membershipMethods[int(pick)%len(membershipMethods)]
		in := LookupMethod(method).NewResponse()
		if err := in.Unmarshal(data); err != nil {
			return // the core fails the call: it cannot decode the answer
		}
		c, err := serve(t, &Members{Self: testSelf, Forward: true}, method, &testUpstream{Answers: []Message{in}},
			LookupMethod(method).NewRequest())
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		if len(c.Sent) != 1 {
			t.Fatalf("the client got %d answers, want one", len(c.Sent))
		}
		out := c.Sent[0]

		// What came from below and must not come out: every piece of text in an unknown field, at any depth,
		// and every text of an upstream member.
		var secrets [][]byte
		walkMessages(reflect.ValueOf(in), func(v reflect.Value) {
			if u := v.FieldByName("XXX_unrecognized"); u.IsValid() {
				secrets = append(secrets, textPieces(u.Bytes())...)
			}
			if m, ok := v.Addr().Interface().(*pb.Member); ok {
				for _, s := range slices.Concat([]string{m.Name}, m.PeerURLs, m.ClientURLs) {
					secrets = append(secrets, textPieces([]byte(s))...)
				}
			}
		})

		got := c.answer()
		// What the answer keeps on purpose is checked here, then taken out: ourselves as the one member, Status's
		// version and errors, and the fields of etcd 3.6's Status. What is left (headers, numbers, a changed
		// member's ID) must hold nothing from below.
		walkMessages(reflect.ValueOf(got), func(v reflect.Value) {
			u := v.FieldByName("XXX_unrecognized")
			if !u.IsValid() || u.Len() == 0 {
				return
			}
			if r, ok := v.Addr().Interface().(*pb.StatusResponse); ok {
				eachField(r.XXX_unrecognized, func(num protowire.Number, typ protowire.Type, b []byte, _ uint64) {
					switch {
					case num == statusDBSizeQuota && typ == protowire.VarintType:
					case num == statusStorageVersion && typ == protowire.BytesType && versionText.Match(b):
					case num == statusDowngradeInfo && typ == protowire.BytesType:
						eachField(b, func(num protowire.Number, typ protowire.Type, b []byte, _ uint64) {
							if !(num == downgradeEnabled && typ == protowire.VarintType) &&
								!(num == downgradeTarget && typ == protowire.BytesType && versionText.Match(b)) {
								t.Fatalf("Status's downgradeInfo keeps field %d %q", num, b)
							}
						})
					default:
						t.Fatalf("Status keeps unknown field %d %q", num, b)
					}
				})
				r.XXX_unrecognized = nil
				return
			}
			t.Fatalf("%s keeps unknown fields %q", v.Type(), u.Bytes())
		})
		switch r := got.(type) {
		case *pb.StatusResponse:
			if r.Leader != testSelf.ID {
				t.Fatalf("leader %x, want us", r.Leader)
			}
			if r.Version != "" && !versionText.MatchString(r.Version) {
				t.Fatalf("version %q", r.Version)
			}
			for _, e := range r.Errors {
				if !alarmOfSelf.MatchString(e) && !KnownGRPCMessage(e) {
					t.Fatalf("status error %q", e)
				}
			}
			r.Version, r.Errors = "", nil
		case interface{ GetMembers() []*pb.Member }:
			if ms := r.GetMembers(); len(ms) != 1 || ms[0].ID != testSelf.ID || ms[0].Name != testSelf.Name ||
				!slices.Equal(ms[0].ClientURLs, testSelf.ClientURLs) || len(ms[0].PeerURLs) != 0 {
				t.Fatalf("members = %v, want only us", ms)
			}
			reflect.ValueOf(got).Elem().FieldByName("Members").SetZero()
		}
		if h := reflect.ValueOf(got).Elem().FieldByName("Header").Interface().(*pb.ResponseHeader); h != nil && h.MemberId != testSelf.ID {
			t.Fatalf("header member %x, want us", h.MemberId)
		}
		rest, err := got.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range secrets {
			if bytes.Contains(rest, s) {
				t.Fatalf("%s answer keeps %q from below: %q", method, s, out)
			}
		}
		for _, s := range secretNames {
			if bytes.Contains(out, []byte(s)) {
				t.Fatalf("%s answer holds %q: %q", method, s, out)
			}
		}
	})
}

// versionText and alarmOfSelf are the oracle's own spelling of what Status may keep.
var (
	versionText = regexp.MustCompile(`^[0-9]+\.[0-9]+(\.[0-9]+)?(-[a-z]+\.[0-9]+)?$`)
	alarmOfSelf = regexp.MustCompile(`^memberID:` + strconv.FormatUint(testSelf.ID, 10) + ` alarm:[A-Z]+ $`)
)

// walkMessages calls fn with every message struct reachable from v (a pointer to a generated message).
func walkMessages(v reflect.Value, fn func(reflect.Value)) {
	switch v.Kind() {
	case reflect.Pointer:
		if !v.IsNil() {
			walkMessages(v.Elem(), fn)
		}
	case reflect.Slice:
		for i := range v.Len() {
			walkMessages(v.Index(i), fn)
		}
	case reflect.Struct:
		fn(v)
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				walkMessages(v.Field(i), fn)
			}
		}
	}
}

// textPieces are the 8-byte windows of every run of printable bytes in b (shorter runs of 4 or more whole): a
// piece of text that came out is found whatever was cut around it.
func textPieces(b []byte) [][]byte {
	var out [][]byte
	for len(b) > 0 {
		i := 0
		for i < len(b) && b[i] >= 0x20 && b[i] < 0x7f {
			i++
		}
		run := b[:i]
		switch {
		case len(run) >= 8:
			for j := 0; j+8 <= len(run); j++ {
				out = append(out, run[j:j+8])
			}
		case len(run) >= 4:
			out = append(out, run)
		}
		if i < len(b) {
			i++
		}
		b = b[i:]
	}
	return out
}
