package rules_test

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// servedBy marks every response. Passthrough supplies the request side it does not need.
type servedBy struct{ rules.Passthrough }

func (servedBy) Name() string { return "served-by" }

func (servedBy) Response(resp *http.Response) (rules.BodyFunc, error) {
	resp.Header.Set("X-Served-By", "etcd-proxy-proxy")
	return nil, nil // no body claimed: the response streams through
}

// A user-defined rule added to the end of the default chain: its request side runs last and its response side
// first.
func Example_responseRule() {
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, `{"action":"get"}`)
	}))
	defer upstream.Close()

	srv, err := proxy.New(proxy.Config{
		Upstreams:        []string{upstream.URL},
		ListenClientURLs: []string{"http://127.0.0.1:0"},
	},
		proxy.WithLogger(slog.New(slog.DiscardHandler)),
		proxy.WithRules(func(defaults []rules.Rule, _ rules.Self) []rules.Rule {
			return append(defaults, servedBy{})
		}),
	)
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := srv.Start(); err != nil {
		fmt.Println(err)
		return
	}
	defer srv.Close()

	resp, err := http.Get(srv.URLs()[0] + "/v2/keys/foo")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer resp.Body.Close()
	fmt.Println(resp.Status, resp.Header.Get("X-Served-By"))
	// Output: 200 OK etcd-proxy-proxy
}

// ProtectPrefix is a message rule: it refuses every DeleteRange that could delete a key under Prefix, whether
// sent alone or inside a Txn — a Txn's operations may be Txns themselves, to any depth, so it looks through all of
// them, or a client could wrap its delete in a Txn and pass. A range counts with etcd's meaning of range_end:
// empty is the key alone, "\x00" every key from the key on (--from-key; with the key "\x00", the whole keyspace).
// The JSON gateway's /v3/kv/deleterange and /v3/kv/txn come through the same path.
//
// It guards DeleteRange only: a key under the prefix still goes when its lease is revoked or expires, and Put
// still overwrites it.
type ProtectPrefix struct {
	rules.Passthrough // no HTTP half: v3 is all gRPC (v2 keys are another store)
	Prefix            string
}

func (*ProtectPrefix) Name() string { return "protect-prefix" }

// Claim asks for the decoded messages of the two methods that delete; every other call passes undecoded.
func (*ProtectPrefix) Claim(m *rules.Method) rules.Claim {
	switch m.Name {
	case "/etcdserverpb.KV/DeleteRange", "/etcdserverpb.KV/Txn":
		return rules.ClaimMessages
	}
	return rules.ClaimNone
}

// Serve looks at the client's request on its way up and ends the call before it gets there. The status text is
// etcd's own, which the proxy passes to clients (a text of our own would be replaced by a fixed one).
func (p *ProtectPrefix) Serve(s rules.Stream, next rules.Handler) error {
	return next(&rules.StreamFuncs{Stream: s, Recv: func() (any, error) {
		m, err := s.RecvMsg()
		if err == nil && p.deletes(m) {
			return nil, rpctypes.ErrGRPCPermissionDenied
		}
		return m, err
	}})
}

// deletes reports whether a request could delete a protected key.
func (p *ProtectPrefix) deletes(m any) bool {
	switch r := m.(type) {
	case *pb.DeleteRangeRequest:
		return p.touches(r.GetKey(), r.GetRangeEnd())
	case *pb.TxnRequest:
		for _, ops := range [][]*pb.RequestOp{r.GetSuccess(), r.GetFailure()} {
			for _, op := range ops {
				if d := op.GetRequestDeleteRange(); d != nil && p.deletes(d) {
					return true
				}
				if t := op.GetRequestTxn(); t != nil && p.deletes(t) {
					return true
				}
			}
		}
	}
	return false
}

// touches reports whether the range [key, end) meets the prefix's range [Prefix, GetPrefixRangeEnd(Prefix)).
func (p *ProtectPrefix) touches(key, end []byte) bool {
	prefix := []byte(p.Prefix)
	if len(end) == 0 {
		return bytes.HasPrefix(key, prefix)
	}
	toEnd := bytes.Equal(end, []byte{0}) // from key to the end of the keyspace
	prefixEnd := []byte(clientv3.GetPrefixRangeEnd(p.Prefix))
	noPrefixEnd := bytes.Equal(prefixEnd, []byte{0}) // a prefix of 0xff bytes runs to the end
	return (noPrefixEnd || bytes.Compare(key, prefixEnd) < 0) && (toEnd || bytes.Compare(prefix, end) < 0)
}

// A message rule added to the default chain, in front of a real etcd member: deletes under /config/ are refused
// however they are wrapped, other deletes go through.
func Example_messageRule() {
	dir, err := os.MkdirTemp("", "example-message-rule-")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer os.RemoveAll(dir)
	env, err := harness.NewEnv(dir)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer env.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cluster, err := env.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		fmt.Println(err)
		return
	}

	srv, err := proxy.New(proxy.Config{
		Upstreams:        []string{cluster.Members[0].ClientURL},
		ListenClientURLs: []string{"http://127.0.0.1:0"},
	},
		proxy.WithLogger(slog.New(slog.DiscardHandler)),
		proxy.WithRules(func(defaults []rules.Rule, _ rules.Self) []rules.Rule {
			return append(defaults, &ProtectPrefix{Prefix: "/config/"})
		}),
	)
	if err != nil {
		fmt.Println(err)
		return
	}
	if err := srv.Start(); err != nil {
		fmt.Println(err)
		return
	}
	defer srv.Close()

	cli, err := clientv3.New(clientv3.Config{Endpoints: srv.URLs(), Logger: zap.NewNop()})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer cli.Close()
	for _, k := range []string{"/config/a", "/tmp/a"} {
		if _, err := cli.Put(ctx, k, "1"); err != nil {
			fmt.Println(err)
			return
		}
	}
	_, err = cli.Delete(ctx, "/config/a")
	fmt.Println("delete /config/a:", err)
	_, err = cli.Delete(ctx, "/", clientv3.WithPrefix())
	fmt.Println("delete --prefix /:", err)
	_, err = cli.Txn(ctx).Then(clientv3.OpTxn(nil, []clientv3.Op{clientv3.OpTxn(nil, []clientv3.Op{clientv3.OpDelete("/config/a")}, nil)}, nil)).Commit()
	fmt.Println("delete in a txn in a txn:", err)
	if del, err := cli.Delete(ctx, "/tmp/a"); err == nil {
		fmt.Println("delete /tmp/a: deleted", del.Deleted)
	} else {
		fmt.Println("delete /tmp/a:", err)
	}
	if get, err := cli.Get(ctx, "/config/a"); err == nil {
		fmt.Println("/config/a: count", get.Count)
	} else {
		fmt.Println("/config/a:", err)
	}
	// Output:
	// delete /config/a: etcdserver: permission denied
	// delete --prefix /: etcdserver: permission denied
	// delete in a txn in a txn: etcdserver: permission denied
	// delete /tmp/a: deleted 1
	// /config/a: count 1
}
