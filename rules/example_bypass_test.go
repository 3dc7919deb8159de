package rules_test

import (
	"testing"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// The README's message rule holds against the ways around it: a delete wrapped in Txns, a range that covers the
// prefix from below, --from-key, the whole keyspace. And it refuses nothing it should let through.
func TestProtectPrefix(t *testing.T) {
	t.Parallel()
	del := func(key, end string) *pb.DeleteRangeRequest {
		return &pb.DeleteRangeRequest{Key: []byte(key), RangeEnd: []byte(end)}
	}
	delOp := func(key, end string) *pb.RequestOp {
		return &pb.RequestOp{Request: &pb.RequestOp_RequestDeleteRange{RequestDeleteRange: del(key, end)}}
	}
	txnOp := func(success ...*pb.RequestOp) *pb.RequestOp { // a Txn whose compare holds
		return &pb.RequestOp{Request: &pb.RequestOp_RequestTxn{RequestTxn: &pb.TxnRequest{Success: success}}}
	}
	failTxnOp := func(failure ...*pb.RequestOp) *pb.RequestOp { // a Txn whose compare fails
		return &pb.RequestOp{Request: &pb.RequestOp_RequestTxn{RequestTxn: &pb.TxnRequest{Failure: failure}}}
	}
	putOp := &pb.RequestOp{Request: &pb.RequestOp_RequestPut{RequestPut: &pb.PutRequest{Key: []byte("/config/a"), Value: []byte("v")}}}
	rangeOp := &pb.RequestOp{Request: &pb.RequestOp_RequestRange{RequestRange: &pb.RangeRequest{Key: []byte("/config/"), RangeEnd: []byte("/config0")}}}
	const (
		deleteRange = "/etcdserverpb.KV/DeleteRange"
		txn         = "/etcdserverpb.KV/Txn"
	)
	tests := []struct {
		name    string
		method  string
		req     rules.Message
		refused bool
	}{
		{"a protected key", deleteRange, del("/config/a", ""), true},
		{"the prefix itself as a key", deleteRange, del("/config/", ""), true},
		{"--prefix on the prefix", deleteRange, del("/config/", "/config0"), true},
		{"--prefix on a shorter prefix", deleteRange, del("/", "0"), true},
		{"--prefix inside the prefix", deleteRange, del("/config/a/", "/config/a0"), true},
		{"a range from below into the prefix", deleteRange, del("/a", "/config/b"), true},
		{"a range across the prefix", deleteRange, del("/a", "/z"), true},
		{"--from-key below the prefix", deleteRange, del("/a", "\x00"), true},
		{"--from-key inside the prefix", deleteRange, del("/config/zz", "\x00"), true},
		{"the whole keyspace", deleteRange, del("\x00", "\x00"), true},
		{"in a txn's success", txn, &pb.TxnRequest{Success: []*pb.RequestOp{putOp, delOp("/config/a", "")}}, true},
		{"in a txn's failure", txn, &pb.TxnRequest{Failure: []*pb.RequestOp{delOp("/", "\x00")}}, true},
		{"in a txn in a txn in a txn", txn, &pb.TxnRequest{Success: []*pb.RequestOp{
			txnOp(putOp, txnOp(rangeOp, delOp("/config/x", "")))}}, true},
		{"in a nested txn's failure", txn, &pb.TxnRequest{Failure: []*pb.RequestOp{
			failTxnOp(txnOp(putOp), failTxnOp(putOp, delOp("/a", "/config/b")))}}, true},

		{"the prefix without its slash", deleteRange, del("/config", ""), false},
		{"another key", deleteRange, del("/tmp/a", ""), false},
		{"a range that ends where the prefix starts", deleteRange, del("/a", "/config/"), false},
		{"a range that starts where the prefix ends", deleteRange, del("/config0", "/z"), false},
		{"--from-key past the prefix", deleteRange, del("/d", "\x00"), false},
		{"--prefix of a sibling", deleteRange, del("/configs/", "/configs0"), false},
		{"a txn that reads and writes the prefix", txn, &pb.TxnRequest{Success: []*pb.RequestOp{putOp, rangeOp}}, false},
		{"nested txns that delete elsewhere", txn, &pb.TxnRequest{Success: []*pb.RequestOp{
			txnOp(delOp("/tmp/a", ""), txnOp(delOp("/config0", "\x00")))}}, false},
		{"an empty op", txn, &pb.TxnRequest{Success: []*pb.RequestOp{{}, txnOp()}}, false},
		{"a Put", "/etcdserverpb.KV/Put", &pb.PutRequest{Key: []byte("/config/a")}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := rules.NewCall(t, tt.method, tt.req)
			up := &rules.TestUpstream{Answers: []rules.Message{rules.LookupMethod(tt.method).NewResponse()}}
			err := rules.ServeChain(&ProtectPrefix{Prefix: "/config/"}, c, up.Handler(c))
			if !tt.refused {
				if err != nil || len(up.Got) != 1 || len(c.Sent) != 1 {
					t.Fatalf("refused (%v): the upstream got %d requests, the client %d answers", err, len(up.Got), len(c.Sent))
				}
				return
			}
			st, ok := status.FromError(err)
			if !ok || st.Code() != codes.PermissionDenied || !rules.KnownGRPCMessage(st.Message()) {
				t.Errorf("error = %v, want PermissionDenied with a text the proxy passes on", err)
			}
			if len(up.Got) != 0 || len(c.Sent) != 0 {
				t.Errorf("the upstream got %d requests, the client %d answers; want none", len(up.Got), len(c.Sent))
			}
		})
	}

	// A prefix of 0xff bytes has no end: every key from it on is under it.
	c := rules.NewCall(t, deleteRange, del("\xff\xff\xff", "\x00"))
	up := &rules.TestUpstream{}
	if err := rules.ServeChain(&ProtectPrefix{Prefix: "\xff\xff"}, c, up.Handler(c)); status.Code(err) != codes.PermissionDenied {
		t.Errorf("--from-key under a prefix of 0xff: %v, want PermissionDenied", err)
	}
}
