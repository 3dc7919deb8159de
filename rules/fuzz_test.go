package rules

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"net/http"
	"net/url"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/protobuf/encoding/protowire"
)

// FuzzGRPCStatus: whatever status an upstream sends, the client gets a numeric grpc-status, no details, and a
// message that is the upstream's own only when it is known, or else one of the fixed texts; no address or
// planted name survives anywhere in the status, and a second proxy-proxy above changes nothing more.
func FuzzGRPCStatus(f *testing.F) {
	seeds := []struct {
		status, msg string
		details     []byte
	}{
		{"14", "etcdserver: request timed out", []byte("\x08\x0e\x12\x14http://10.0.0.5:2379")},
		{"14", "member etcd-2.cluster.internal unreachable", nil},
		{"2", "x10.9.9.9:2379y", nil},
		{"2", "member_10.9.9.9:2379_down", nil},
		{"2", "leader is 127.0.0.1 port 2379", nil},
		{"14", "connection error: desc = \"transport: Error while dialing: dial tcp [fd00::5]:2379: connect: connection refused\"", nil},
		{"8", "grpc: received message larger than max (4194400 vs. 4194304)", nil},
		{"13", "stream terminated by RST_STREAM with error code: PROTOCOL_ERROR", nil},
		{"13", "etcd-proxy-proxy: rule members could not handle the upstream response", nil},
		{"10.0.0.5", "etcdserver: no leader", nil},
		{"0", "OK from infra9", nil},
		{"14", "%65tcd-2.cluster.internal", nil},
		{"", "", []byte("member-secret")},
	}
	for _, s := range seeds {
		f.Add(s.status, s.msg, s.details)
	}
	f.Fuzz(func(t *testing.T, status, msg string, details []byte) {
		in := http.Header{}
		if status != "" {
			in.Set(GRPCStatusHeader, status)
		}
		if msg != "" {
			in.Set(GRPCMessageHeader, msg)
		}
		if len(details) > 0 {
			in.Set(GRPCDetailsHeader, base64.RawStdEncoding.EncodeToString(details))
		}
		headers, trailers := scrubThroughRule(t, in)
		for _, h := range []http.Header{headers, trailers} {
			delete(h, "Content-Type")
			if l := headerLeak(h); l != "" {
				t.Fatalf("status %q %q leaks %q: %q", status, msg, l, h)
			}
			if h.Get(GRPCDetailsHeader) != "" {
				t.Fatalf("details kept: %q", h)
			}
			code := CodeUnknown
			if v := h.Get(GRPCStatusHeader); v != "" {
				n, err := strconv.ParseUint(v, 10, 32)
				if err != nil {
					t.Fatalf("grpc-status %q", v)
				}
				code = int(n)
			}
			got, err := url.PathUnescape(h.Get(GRPCMessageHeader))
			if err != nil {
				t.Fatalf("grpc-message %q does not decode: %v", h.Get(GRPCMessageHeader), err)
			}
			if sent, _ := url.PathUnescape(msg); got != "" && got != TransportFailure && got != WithheldMessage(code) &&
				!(got == sent && KnownGRPCMessage(got)) {
				t.Fatalf("message %q became %q: neither the upstream's known text nor a fixed one", msg, got)
			}
			// A proxy-proxy above passes it on as it is.
			again, _ := scrubThroughRule(t, h)
			delete(again, "Content-Type")
			if !reflect.DeepEqual(again, h) {
				t.Fatalf("a second hop changed %q into %q", h, again)
			}
		}
	})
}

// membershipMethods are the answers the Members rule rewrites, in the order FuzzMembersRewrite picks them.
var membershipMethods = []string{methodMemberList, methodStatus, methodMemberAdd, methodMemberRemove, methodMemberUpdate, methodMemberPromote}

func newAnswer(method string) message {
	switch method {
	case methodMemberList:
		return &pb.MemberListResponse{}
	case methodStatus:
		return &pb.StatusResponse{}
	case methodMemberAdd:
		return &pb.MemberAddResponse{}
	case methodMemberRemove:
		return &pb.MemberRemoveResponse{}
	case methodMemberUpdate:
		return &pb.MemberUpdateResponse{}
	}
	return &pb.MemberPromoteResponse{}
}

// FuzzMembersRewrite: whatever bytes an upstream answers a membership or status call with, the rewritten answer
// decodes, holds no unknown field (but Status's checked newer ones), lists only us, and carries no piece of any
// text that was in an unknown field or in an upstream member, nor a planted name.
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
	for i, m := range []message{
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
		fn, err := (&Members{Self: testSelf, Forward: true}).Response(&http.Response{StatusCode: 200,
			Header: http.Header{"Content-Type": {GRPCContentType}}, Request: grpcRequest(method)})
		if err != nil || fn == nil {
			t.Fatalf("%s not claimed: %v", method, err)
		}
		body := make([]byte, 5+len(data))
		binary.BigEndian.PutUint32(body[1:5], uint32(len(data)))
		copy(body[5:], data)
		out, err := fn(body)
		if err != nil {
			return // the proxy answers with its own error
		}

		// What came from below and must not come out: every piece of text in an unknown field, at any depth,
		// and every text of an upstream member.
		in := newAnswer(method)
		if err := in.Unmarshal(data); err != nil {
			t.Fatalf("the rule decoded what the test cannot: %v", err)
		}
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

		got := newAnswer(method)
		payload, err := unframe(out)
		if err != nil {
			t.Fatalf("output is not one gRPC message: %v", err)
		}
		if err := got.Unmarshal(payload); err != nil {
			t.Fatalf("output does not decode: %v", err)
		}
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
