package rules

import (
	"strings"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3election/v3electionpb"
	"go.etcd.io/etcd/server/v3/etcdserver/api/v3lock/v3lockpb"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// Method is what the proxy knows of one gRPC method of etcd's v3 API: the one table of those facts.
type Method struct {
	// Name is the full method name, "/etcdserverpb.KV/Range".
	Name string
	// ClientStream and ServerStream: the client sends several messages, the server answers several.
	ClientStream, ServerStream bool
	// ReadOnly: the call changes nothing (a read-only proxy lets it through).
	ReadOnly bool
	// Retryable: a call that may have reached an endpoint may still be sent to another one — it changes
	// nothing there and its answer does not depend on which endpoint gives it in a way a client could notice
	// more than with a direct connection that moved.
	Retryable bool
	// Long: the call lasts as long as the client wants (watches, keep-alives, observers) or waits for
	// something that may never come (Lock, Campaign); a graceful shutdown ends it at once. Snapshots are
	// long too, but they end by themselves.
	Long bool
	// SmallAnswers: every answer message is small whatever the data behind it — fixed fields, a header alone,
	// the members, the alarms, a snapshot chunk (32 KiB from etcd, a grpc-proxy or a proxy-proxy) — so the proxy
	// takes none over SmallAnswerBytes from the upstream, and a hostile or broken upstream cannot make it hold
	// one message of up to 2 GiB. Not set where an answer grows with the data: Range, Txn, a Watch response's
	// events, a Put's or DeleteRange's previous values, a lease's keys, the leases, users and roles (with their
	// permissions' keys), a lock's or an election's key and value; those take what gRPC can carry (2 GiB), as
	// etcd's clients do.
	SmallAnswers bool
	// NewRequest and NewResponse make the method's messages, for the rules that claim them. Nil for methods
	// whose messages are not etcd's (grpc.health.v1).
	NewRequest, NewResponse func() Message
}

// SmallAnswerBytes bounds each answer message of the methods with SmallAnswers: the bound the byte-level snapshot
// rule had, and gRPC's default receive limit, which etcd's own small answers never come near.
const SmallAnswerBytes = 4 << 20

// Message is what etcd's generated (gogo) message types implement.
type Message interface {
	Marshal() ([]byte, error)
	Unmarshal([]byte) error
	Size() int
	Reset()
	// XXX_DiscardUnknown drops the fields the pinned schema does not know, in the message and all it holds.
	XXX_DiscardUnknown()
}

// IsStream reports a call that has more than one message in some direction.
func (m *Method) IsStream() bool { return m.ClientStream || m.ServerStream }

// LookupMethod returns the facts of a method, nil for a method etcd does not serve.
func LookupMethod(name string) *Method { return methods[name] }

// Methods lists every method of etcd v3.5's client API.
func Methods() []*Method {
	out := make([]*Method, 0, len(methods))
	for _, m := range methods {
		out = append(out, m)
	}
	return out
}

// Flags of the table below: s server stream, c client stream, r read-only, y retryable, l long, b small answers.
func method[Req, Resp any, PReq interface {
	*Req
	Message
}, PResp interface {
	*Resp
	Message
}](name, flags string) *Method {
	return &Method{
		Name: name, ServerStream: strings.Contains(flags, "s"), ClientStream: strings.Contains(flags, "c"),
		ReadOnly: strings.Contains(flags, "r"), Retryable: strings.Contains(flags, "y"), Long: strings.Contains(flags, "l"),
		SmallAnswers: strings.Contains(flags, "b"),
		NewRequest:   func() Message { return PReq(new(Req)) },
		NewResponse:  func() Message { return PResp(new(Resp)) },
	}
}

var methods = func() map[string]*Method {
	const (
		kv, watch, lease, cluster = "/etcdserverpb.KV/", "/etcdserverpb.Watch/", "/etcdserverpb.Lease/", "/etcdserverpb.Cluster/"
		maint, auth, lock, elect  = "/etcdserverpb.Maintenance/", "/etcdserverpb.Auth/", "/v3lockpb.Lock/", "/v3electionpb.Election/"
	)
	list := []*Method{
		method[pb.RangeRequest, pb.RangeResponse](kv+"Range", "ry"),
		method[pb.PutRequest, pb.PutResponse](kv+"Put", ""),
		method[pb.DeleteRangeRequest, pb.DeleteRangeResponse](kv+"DeleteRange", ""),
		method[pb.TxnRequest, pb.TxnResponse](kv+"Txn", ""),
		method[pb.CompactionRequest, pb.CompactionResponse](kv+"Compact", "b"),
		method[pb.WatchRequest, pb.WatchResponse](watch+"Watch", "csrl"),
		method[pb.LeaseGrantRequest, pb.LeaseGrantResponse](lease+"LeaseGrant", "b"),
		method[pb.LeaseRevokeRequest, pb.LeaseRevokeResponse](lease+"LeaseRevoke", "b"),
		method[pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse](lease+"LeaseKeepAlive", "cslb"),
		method[pb.LeaseTimeToLiveRequest, pb.LeaseTimeToLiveResponse](lease+"LeaseTimeToLive", "r"),
		method[pb.LeaseLeasesRequest, pb.LeaseLeasesResponse](lease+"LeaseLeases", "r"),
		method[pb.MemberAddRequest, pb.MemberAddResponse](cluster+"MemberAdd", "b"),
		method[pb.MemberRemoveRequest, pb.MemberRemoveResponse](cluster+"MemberRemove", "b"),
		method[pb.MemberUpdateRequest, pb.MemberUpdateResponse](cluster+"MemberUpdate", "b"),
		method[pb.MemberListRequest, pb.MemberListResponse](cluster+"MemberList", "rb"),
		method[pb.MemberPromoteRequest, pb.MemberPromoteResponse](cluster+"MemberPromote", "b"),
		method[pb.AlarmRequest, pb.AlarmResponse](maint+"Alarm", "b"),
		method[pb.StatusRequest, pb.StatusResponse](maint+"Status", "rb"),
		method[pb.DefragmentRequest, pb.DefragmentResponse](maint+"Defragment", "b"),
		method[pb.HashRequest, pb.HashResponse](maint+"Hash", "rb"),
		method[pb.HashKVRequest, pb.HashKVResponse](maint+"HashKV", "rb"),
		method[pb.SnapshotRequest, pb.SnapshotResponse](maint+"Snapshot", "srb"),
		method[pb.MoveLeaderRequest, pb.MoveLeaderResponse](maint+"MoveLeader", "b"),
		method[pb.DowngradeRequest, pb.DowngradeResponse](maint+"Downgrade", "b"),
		method[pb.AuthEnableRequest, pb.AuthEnableResponse](auth+"AuthEnable", "b"),
		method[pb.AuthDisableRequest, pb.AuthDisableResponse](auth+"AuthDisable", "b"),
		method[pb.AuthStatusRequest, pb.AuthStatusResponse](auth+"AuthStatus", "rb"),
		method[pb.AuthenticateRequest, pb.AuthenticateResponse](auth+"Authenticate", "rb"),
		method[pb.AuthUserAddRequest, pb.AuthUserAddResponse](auth+"UserAdd", "b"),
		method[pb.AuthUserGetRequest, pb.AuthUserGetResponse](auth+"UserGet", "r"),
		method[pb.AuthUserListRequest, pb.AuthUserListResponse](auth+"UserList", "r"),
		method[pb.AuthUserDeleteRequest, pb.AuthUserDeleteResponse](auth+"UserDelete", "b"),
		method[pb.AuthUserChangePasswordRequest, pb.AuthUserChangePasswordResponse](auth+"UserChangePassword", "b"),
		method[pb.AuthUserGrantRoleRequest, pb.AuthUserGrantRoleResponse](auth+"UserGrantRole", "b"),
		method[pb.AuthUserRevokeRoleRequest, pb.AuthUserRevokeRoleResponse](auth+"UserRevokeRole", "b"),
		method[pb.AuthRoleAddRequest, pb.AuthRoleAddResponse](auth+"RoleAdd", "b"),
		method[pb.AuthRoleGetRequest, pb.AuthRoleGetResponse](auth+"RoleGet", "r"),
		method[pb.AuthRoleListRequest, pb.AuthRoleListResponse](auth+"RoleList", "r"),
		method[pb.AuthRoleDeleteRequest, pb.AuthRoleDeleteResponse](auth+"RoleDelete", "b"),
		method[pb.AuthRoleGrantPermissionRequest, pb.AuthRoleGrantPermissionResponse](auth+"RoleGrantPermission", "b"),
		method[pb.AuthRoleRevokePermissionRequest, pb.AuthRoleRevokePermissionResponse](auth+"RoleRevokePermission", "b"),
		method[v3lockpb.LockRequest, v3lockpb.LockResponse](lock+"Lock", "l"),
		method[v3lockpb.UnlockRequest, v3lockpb.UnlockResponse](lock+"Unlock", "b"),
		method[v3electionpb.CampaignRequest, v3electionpb.CampaignResponse](elect+"Campaign", "l"),
		method[v3electionpb.ProclaimRequest, v3electionpb.ProclaimResponse](elect+"Proclaim", "b"),
		method[v3electionpb.LeaderRequest, v3electionpb.LeaderResponse](elect+"Leader", "r"),
		method[v3electionpb.LeaderRequest, v3electionpb.LeaderResponse](elect+"Observe", "srl"),
		method[v3electionpb.ResignRequest, v3electionpb.ResignResponse](elect+"Resign", "b"),
		// Not etcd's messages: no rule decodes them.
		{Name: "/" + healthpb.Health_ServiceDesc.ServiceName + "/Check", ReadOnly: true, SmallAnswers: true},
		{Name: "/" + healthpb.Health_ServiceDesc.ServiceName + "/Watch", ServerStream: true, ReadOnly: true, Long: true, SmallAnswers: true},
	}
	m := make(map[string]*Method, len(list))
	for _, x := range list {
		m[x.Name] = x
	}
	return m
}()
