package rules

import (
	"strings"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// The message halves of the built-in rules: what each does to gRPC calls.

// viaMetadata is ViaHeader as gRPC metadata (lower case).
var viaMetadata = strings.ToLower(ViaHeader)

// Claim implements MessageRule: every call, when the rule is on.
func (l *Loop) Claim(*Method) Claim {
	if l.Instance == "" {
		return ClaimNone
	}
	return ClaimCall
}

// Serve implements MessageRule.
func (l *Loop) Serve(s Stream, next Handler) error {
	md := s.Header()
	for _, v := range md.Get(viaMetadata) {
		for id := range strings.SplitSeq(v, ",") {
			if strings.TrimSpace(id) == l.Instance {
				return status.Error(codes.FailedPrecondition, msgLoop)
			}
		}
	}
	md.Append(viaMetadata, l.Instance)
	return next(s)
}

// Claim implements MessageRule: the calls that could change something, when the rule is on.
func (r *ReadOnly) Claim(m *Method) Claim {
	if !r.Enabled || m.ReadOnly {
		return ClaimNone
	}
	return ClaimCall
}

// Serve implements MessageRule.
func (*ReadOnly) Serve(Stream, Handler) error {
	return status.Error(codes.PermissionDenied, msgReadOnly)
}

// Claim implements MessageRule: the answers that carry members, and the membership changes, which are refused
// unless forwarded.
func (m *Members) Claim(x *Method) Claim {
	switch x.Name {
	case methodMemberList, methodStatus:
		return ClaimMessages
	case methodMoveLeader:
		if !m.Forward {
			return ClaimCall
		}
	}
	if isMemberChange(x.Name) {
		if !m.Forward {
			return ClaimCall
		}
		return ClaimMessages
	}
	return ClaimNone
}

// Serve implements MessageRule.
func (m *Members) Serve(s Stream, next Handler) error {
	name := s.Method().Name
	switch {
	case name == methodMoveLeader:
		// The only member a client sees is the proxy: a transfer to it can only fail ("bad leader transferee").
		return status.Error(codes.PermissionDenied, moveLeaderRejected)
	case isMemberChange(name) && !m.Forward:
		return status.Error(codes.PermissionDenied, memberChangeRejected)
	}
	return next(&StreamFuncs{Stream: s, Send: func(msg any) error {
		m.rewrite(msg)
		return s.SendMsg(msg)
	}})
}

// rewrite makes an answer of the Cluster service or Maintenance.Status name the proxy as the one member.
// Every field the pinned schema does not know is dropped, in the message and in all it holds: an upstream of a
// newer schema (or one that is not etcd) may put anything there, addresses included. The fields of Status that
// etcd 3.6 added are checked and kept.
func (m *Members) rewrite(msg any) {
	switch r := msg.(type) {
	case *pb.StatusResponse:
		newer := statusNewerFields(r.XXX_unrecognized)
		r.XXX_DiscardUnknown()
		r.XXX_unrecognized = newer
		m.Self.stamp(r.Header)
		r.Leader = m.Self.ID
		m.Self.checkStatus(r)
	case *pb.MemberListResponse:
		r.XXX_DiscardUnknown()
		r.Members = []*pb.Member{m.Self.v3()}
		m.Self.stamp(r.Header)
	case *pb.MemberAddResponse:
		r.XXX_DiscardUnknown()
		r.Members = []*pb.Member{m.Self.v3()}
		hideURLs(r.Member)
		m.Self.stamp(r.Header)
	case *pb.MemberRemoveResponse:
		r.XXX_DiscardUnknown()
		r.Members = []*pb.Member{m.Self.v3()}
		m.Self.stamp(r.Header)
	case *pb.MemberUpdateResponse:
		r.XXX_DiscardUnknown()
		r.Members = []*pb.Member{m.Self.v3()}
		m.Self.stamp(r.Header)
	case *pb.MemberPromoteResponse:
		r.XXX_DiscardUnknown()
		r.Members = []*pb.Member{m.Self.v3()}
		m.Self.stamp(r.Header)
	}
}

// gRPC methods of the Cluster service.
const (
	methodMemberList    = "/etcdserverpb.Cluster/MemberList"
	methodMemberAdd     = "/etcdserverpb.Cluster/MemberAdd"
	methodMemberRemove  = "/etcdserverpb.Cluster/MemberRemove"
	methodMemberUpdate  = "/etcdserverpb.Cluster/MemberUpdate"
	methodMemberPromote = "/etcdserverpb.Cluster/MemberPromote"
	methodStatus        = "/etcdserverpb.Maintenance/Status"
	methodMoveLeader    = "/etcdserverpb.Maintenance/MoveLeader"
)

func isMemberChange(method string) bool {
	switch method {
	case methodMemberAdd, methodMemberRemove, methodMemberUpdate, methodMemberPromote:
		return true
	}
	return false
}

func (s Self) v3() *pb.Member {
	return &pb.Member{ID: s.ID, Name: s.Name, ClientURLs: s.ClientURLs}
}

// stamp makes a response header name us as the member that answered.
func (s Self) stamp(h *pb.ResponseHeader) {
	if h != nil {
		h.MemberId = s.ID
	}
}

// hideURLs keeps the ID and learner flag of the member a change answered with. Its name goes too: etcd answers
// an add with the name empty (the member has not started), and anything else there comes from below.
func hideURLs(m *pb.Member) {
	if m != nil {
		m.Name, m.PeerURLs, m.ClientURLs = "", nil, nil
	}
}

var (
	_ MessageRule = (*Loop)(nil)
	_ MessageRule = (*ReadOnly)(nil)
	_ MessageRule = (*Members)(nil)
)
