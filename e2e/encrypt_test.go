package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/cli"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// TestEncryptV3: values under --encrypt-prefix are stored encrypted and bound to their keys, and every v3 path
// through the proxy (put, range, txn to any depth, delete and put with prev_kv, watch, the JSON gateway) gives
// the plaintext; what a member holds is never the plaintext; a value moved to another key, tampered with or
// stored in plaintext fails to read instead of reading as something; what cannot work on ciphertext is refused.
// /secret/ holds good values only; /vault/ gets the bad ones, so that ranges over /secret/ stay readable.
func TestEncryptV3(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "k1.key")
	data, err := crypt.GenerateKeyFile("k1")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, data, 0o600); err != nil {
		t.Fatal(err)
	}
	key, err := crypt.ParseKeyFile(data)
	if err != nil {
		t.Fatal(err)
	}
	ring, _ := crypt.NewKeyring(key)
	encrypting := func(plaintext bool) harness.ProxyProxyHop {
		return harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
			cfg.EncryptPrefixes = []string{"/secret/", "/vault/"}
			cfg.EncryptionKeyFiles = []string{keyFile}
			cfg.EncryptionReadPlaintext = plaintext
			cfg.ListenMetricsURLs = []string{"http://127.0.0.1:0"}
		}}
	}
	p, err := e.StartProxyProxy(ctx, c.Endpoint(), encrypting(false))
	if err != nil {
		t.Fatal(err)
	}
	lax, err := e.StartProxyProxy(ctx, c.Endpoint(), encrypting(true))
	if err != nil {
		t.Fatal(err)
	}
	client := func(ep harness.Endpoint) *clientv3.Client {
		return v3Client(t, ep.URLs...)
	}
	cli, laxCli, direct := client(p.Endpoint), client(lax.Endpoint), client(c.Endpoint())
	stored := func(t *testing.T, k string) []byte {
		t.Helper()
		r, err := direct.Get(ctx, k)
		if err != nil || len(r.Kvs) != 1 {
			t.Fatalf("member's %s: %v, %v", k, r, err)
		}
		return r.Kvs[0].Value
	}
	checkStored := func(t *testing.T, k, plain string) {
		t.Helper()
		v := stored(t, k)
		if !bytes.HasPrefix(v, []byte("epp:enc:v1:xchacha20poly1305:k1:")) || bytes.Contains(v, []byte(plain)) {
			t.Errorf("the member stores %s as %q; want epp:enc:v1:xchacha20poly1305:k1:… without the plaintext", k, v)
		}
	}
	get := func(t *testing.T, cl *clientv3.Client, k string) string {
		t.Helper()
		r, err := cl.Get(ctx, k)
		if err != nil || len(r.Kvs) != 1 {
			t.Fatalf("get %s: %v, %v", k, r, err)
		}
		return string(r.Kvs[0].Value)
	}
	wantCode := func(t *testing.T, what string, err error, code codes.Code, text string) {
		t.Helper()
		st, _ := status.FromError(err)
		if err == nil || st.Code() != code || !strings.Contains(err.Error(), text) {
			t.Errorf("%s: %v; want %s, %q", what, err, code, text)
		}
	}
	mustPut := func(t *testing.T, cl *clientv3.Client, k, v string) {
		t.Helper()
		if _, err := cl.Put(ctx, k, v); err != nil {
			t.Fatalf("put %s: %v", k, err)
		}
	}

	t.Run("put-get", func(t *testing.T) {
		mustPut(t, cli, "/secret/a", "hunter2")
		mustPut(t, cli, "/public/a", "plain")
		checkStored(t, "/secret/a", "hunter2")
		if got := get(t, cli, "/secret/a"); got != "hunter2" {
			t.Errorf("get through the proxy: %q; want hunter2", got)
		}
		if got := string(stored(t, "/public/a")); got != "plain" {
			t.Errorf("a key outside the prefixes is stored as %q; want it untouched", got)
		}
		r, err := cli.Get(ctx, "/public/a", clientv3.WithRange("/secret/b")) // across the prefix's edge
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, kv := range r.Kvs {
			got[string(kv.Key)] = string(kv.Value)
		}
		if got["/secret/a"] != "hunter2" || got["/public/a"] != "plain" {
			t.Errorf("range over both: %v", got)
		}
		if r, err := cli.Get(ctx, "/secret/", clientv3.WithPrefix(), clientv3.WithKeysOnly()); err != nil || len(r.Kvs) == 0 {
			t.Errorf("keys-only range: %v, %v", r, err)
		}
		_, err = cli.Get(ctx, "/secret/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByValue, clientv3.SortAscend))
		wantCode(t, "range sorted by value", err, codes.InvalidArgument, "cannot be sorted by value")
		if _, err := cli.Get(ctx, "/public/", clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByValue, clientv3.SortAscend)); err != nil {
			t.Errorf("range sorted by value outside the prefixes: %v", err)
		}
	})

	t.Run("prev-kv", func(t *testing.T) {
		mustPut(t, cli, "/secret/p", "one")
		r, err := cli.Put(ctx, "/secret/p", "two", clientv3.WithPrevKV())
		if err != nil || r.PrevKv == nil || string(r.PrevKv.Value) != "one" {
			t.Errorf("put with prev_kv: %v, %v; want prev value one", r, err)
		}
		d, err := cli.Delete(ctx, "/secret/p", clientv3.WithPrevKV())
		if err != nil || len(d.PrevKvs) != 1 || string(d.PrevKvs[0].Value) != "two" {
			t.Errorf("delete with prev_kv: %v, %v; want prev value two", d, err)
		}
	})

	t.Run("txn", func(t *testing.T) {
		mustPut(t, cli, "/secret/t1", "first")
		r, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.Version("/secret/t2"), "=", 0)).Then(
			clientv3.OpPut("/secret/t2", "second"),
			clientv3.OpGet("/secret/t1"),
			clientv3.OpTxn(nil, []clientv3.Op{clientv3.OpGet("/secret/t2"), clientv3.OpPut("/secret/t3", "third", clientv3.WithPrevKV())}, nil),
		).Commit()
		if err != nil || !r.Succeeded || len(r.Responses) != 3 {
			t.Fatalf("txn: %v, %v", r, err)
		}
		if kvs := r.Responses[1].GetResponseRange().Kvs; len(kvs) != 1 || string(kvs[0].Value) != "first" {
			t.Errorf("get in the txn: %v; want first", kvs)
		}
		inner := r.Responses[2].GetResponseTxn()
		if kvs := inner.GetResponses()[0].GetResponseRange().Kvs; len(kvs) != 1 || string(kvs[0].Value) != "second" {
			t.Errorf("get in the txn in the txn: %v; want second", kvs)
		}
		checkStored(t, "/secret/t2", "second")
		checkStored(t, "/secret/t3", "third")
		_, err = cli.Txn(ctx).If(clientv3.Compare(clientv3.Value("/secret/t1"), "=", "first")).Commit()
		wantCode(t, "compare on an encrypted value", err, codes.InvalidArgument, "cannot work on ciphertext")
		_, err = cli.Txn(ctx).Then(clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.Value("/secret/").WithPrefix(), ">", "a")}, nil, nil)).Commit()
		wantCode(t, "compare on encrypted values in a txn in a txn", err, codes.InvalidArgument, "cannot work on ciphertext")
		if _, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.Value("/public/t"), "=", "x")).Commit(); err != nil {
			t.Errorf("compare on a value outside the prefixes: %v", err)
		}
	})

	t.Run("watch", func(t *testing.T) {
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		w := cli.Watch(wctx, "/secret/w/", clientv3.WithPrefix(), clientv3.WithPrevKV(), clientv3.WithCreatedNotify())
		if r := <-w; !r.Created {
			t.Fatalf("first watch answer: %+v", r)
		}
		mustPut(t, cli, "/secret/w/1", "a")
		mustPut(t, cli, "/secret/w/1", "b")
		if _, err := cli.Delete(ctx, "/secret/w/1"); err != nil {
			t.Fatal(err)
		}
		var got []string
		for len(got) < 3 {
			r, ok := <-w
			if !ok || r.Err() != nil {
				t.Fatalf("watch ended: %v", r.Err())
			}
			for _, ev := range r.Events {
				prev := ""
				if ev.PrevKv != nil {
					prev = string(ev.PrevKv.Value)
				}
				got = append(got, ev.Type.String()+" "+string(ev.Kv.Value)+" prev="+prev)
			}
		}
		if want := "PUT a prev=|PUT b prev=a|DELETE  prev=b"; strings.Join(got, "|") != want {
			t.Errorf("events %q; want %q", strings.Join(got, "|"), want)
		}
	})

	// watch-cancel speaks the Watch protocol itself: clientv3 closes a watch canceled by the server without
	// handing on its reason or the events queued before it.
	t.Run("watch-cancel", func(t *testing.T) {
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		ws, err := pb.NewWatchClient(cli.ActiveConnection()).Watch(wctx)
		if err != nil {
			t.Fatal(err)
		}
		create := func(key string, id int64) {
			t.Helper()
			err := ws.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{CreateRequest: &pb.WatchCreateRequest{
				Key: []byte(key), RangeEnd: []byte(clientv3.GetPrefixRangeEnd(key)), WatchId: id}}})
			if err != nil {
				t.Fatal(err)
			}
			if r, err := ws.Recv(); err != nil || !r.Created || r.WatchId != id {
				t.Fatalf("create watch %d: %v, %v", id, r, err)
			}
		}
		create("/vault/w/", 7)
		// One revision, two events: the first decrypts, the second does not.
		good, _ := ring.Encrypt([]byte("/vault/w/a"), []byte("good"))
		if _, err := direct.Txn(ctx).Then(clientv3.OpPut("/vault/w/a", string(good)), clientv3.OpPut("/vault/w/b", "not encrypted")).Commit(); err != nil {
			t.Fatal(err)
		}
		r, err := ws.Recv()
		if err != nil || r.WatchId != 7 || len(r.Events) != 1 || string(r.Events[0].Kv.Value) != "good" {
			t.Fatalf("first answer: %v, %v; want the event that decrypts", r, err)
		}
		r, err = ws.Recv()
		if err != nil || r.WatchId != 7 || !r.Canceled || !strings.Contains(r.CancelReason, "does not decrypt; watch canceled") {
			t.Fatalf("second answer: %v, %v; want watch 7 canceled with the reason", r, err)
		}
		// The upstream's watch 7 is canceled too: the ID can be used again on the stream, and the upstream's
		// confirmation never reaches the client.
		mustPut(t, direct, "/vault/w/c", "not encrypted either")
		create("/secret/w2/", 7)
		mustPut(t, cli, "/secret/w2/x", "still")
		if r, err := ws.Recv(); err != nil || r.WatchId != 7 || r.Canceled || len(r.Events) != 1 || string(r.Events[0].Kv.Value) != "still" {
			t.Errorf("the new watch 7 on the same stream: %v, %v", r, err)
		}
	})

	t.Run("fail-closed", func(t *testing.T) {
		mustPut(t, cli, "/vault/orig", "secret")
		ct := stored(t, "/vault/orig")
		tampered := bytes.Clone(ct)
		i := len("epp:enc:v1:xchacha20poly1305:k1:") + 30 // a base64 digit of the ciphertext, changed to another
		tampered[i] = map[bool]byte{true: 'B', false: 'A'}[tampered[i] == 'A']
		mustPut(t, direct, "/vault/moved", string(ct))
		mustPut(t, direct, "/vault/tampered", string(tampered))
		mustPut(t, direct, "/vault/plain", "old")
		for _, k := range []string{"/vault/moved", "/vault/tampered"} {
			_, err := cli.Get(ctx, k)
			wantCode(t, "get "+k, err, codes.DataLoss, "does not decrypt")
			_, err = laxCli.Get(ctx, k)
			wantCode(t, "get "+k+" with --encryption-read-plaintext", err, codes.DataLoss, "does not decrypt")
		}
		_, err := cli.Get(ctx, "/vault/moved", clientv3.WithRange("/vault/orig\x00")) // a bad value and a good one
		wantCode(t, "range over bad values", err, codes.DataLoss, "does not decrypt")
		_, err = cli.Get(ctx, "/vault/plain")
		wantCode(t, "get plaintext", err, codes.FailedPrecondition, "is not encrypted")
		if got := get(t, laxCli, "/vault/plain"); got != "old" {
			t.Errorf("plaintext with --encryption-read-plaintext: %q; want old", got)
		}
		_, err = cli.Txn(ctx).Then(clientv3.OpPut("/vault/tx", "x"), clientv3.OpGet("/vault/moved")).Commit()
		wantCode(t, "txn that wrote and read a bad value", err, codes.DataLoss, "the transaction was applied")
		if got := get(t, cli, "/vault/tx"); got != "x" {
			t.Errorf("the txn's put: %q", got)
		}
		// An applied write whose prev_kv does not decrypt succeeds without it.
		r, err := cli.Put(ctx, "/vault/tampered", "new", clientv3.WithPrevKV())
		if err != nil || r.PrevKv != nil {
			t.Errorf("put over a tampered value with prev_kv: %v, %v; want success without prev_kv", r, err)
		}
		d, err := cli.Delete(ctx, "/vault/moved", clientv3.WithPrevKV())
		if err != nil || d.Deleted != 1 || len(d.PrevKvs) != 0 {
			t.Errorf("delete of a moved value with prev_kv: %v, %v; want 1 deleted, no prev_kvs", d, err)
		}
		// What failed is counted (other subtests add to the counts, never take from them).
		code, metrics := do(ctx, &http.Client{Timeout: 5 * time.Second}, http.MethodGet, p.Server.MetricsURLs()[0]+"/metrics", "")
		for series, least := range map[string]float64{
			`etcd_proxy_proxy_encryption_values_total{key="k1",result="failed"}`:    4, // moved, tampered: by both reads
			`etcd_proxy_proxy_encryption_values_total{key="",result="failed"}`:      1, // plaintext refused
			`etcd_proxy_proxy_encryption_values_total{key="k1",result="encrypted"}`: 2,
			`etcd_proxy_proxy_encryption_dropped_total{what="prev_kv"}`:             2,
		} {
			i := strings.Index(metrics, "\n"+series+" ")
			var v float64
			if i >= 0 {
				_, _ = fmt.Sscan(metrics[i+len(series)+2:], &v)
			}
			if code != http.StatusOK || i < 0 || v < least {
				t.Errorf("metrics: %s = %v (status %d); want at least %v", series, v, code, least)
			}
		}
	})

	// A proxy-proxy above passes the encrypting one's refusals and failures on as they are (it withholds texts it
	// does not know).
	t.Run("chain", func(t *testing.T) {
		top, err := e.StartProxyProxy(ctx, p.Endpoint, harness.ProxyProxyHop{})
		if err != nil {
			t.Fatal(err)
		}
		cl := client(top.Endpoint)
		mustPut(t, cl, "/secret/chain", "through two")
		if got := get(t, cl, "/secret/chain"); got != "through two" {
			t.Errorf("get through the chain: %q", got)
		}
		_, err = cl.Txn(ctx).If(clientv3.Compare(clientv3.Value("/secret/chain"), "=", "x")).Commit()
		wantCode(t, "compare on value through the chain", err, codes.InvalidArgument, "cannot work on ciphertext")
		mustPut(t, direct, "/vault/zz-chain-plain", "plain")
		_, err = cl.Get(ctx, "/vault/zz-chain-plain")
		wantCode(t, "plaintext through the chain", err, codes.FailedPrecondition, "is not encrypted")
	})

	t.Run("too-large", func(t *testing.T) {
		big := strings.Repeat("x", 1200<<10) // etcd takes it (1.5 MiB); its base64 ciphertext is 1.6 MiB
		_, err := cli.Put(ctx, "/vault/big", big)
		wantCode(t, "put of a value that encryption makes too large", err, codes.InvalidArgument, "larger than the upstream accepts")
		if _, err := cli.Put(ctx, "/spare/big", big); err != nil {
			t.Errorf("the same value outside the prefixes: %v", err)
		}
	})

	// etcdctl, as a user runs it: put and get, an election (Campaign stores the value under a key the member
	// makes, name/lease), a txn comparing a value.
	t.Run("etcdctl", func(t *testing.T) {
		ctl := e.Etcdctl(3, p.Endpoint)
		for _, c := range []struct {
			args        []string
			stdin       string
			until, want string
			exit        int
		}{
			{args: []string{"put", "/secret/ctl", "from etcdctl"}, want: "OK\n"},
			{args: []string{"get", "--print-value-only", "/secret/ctl"}, want: "from etcdctl\n"},
			{args: []string{"elect", "/secret/election", "candidate-1"}, until: "candidate-1"},
			{args: []string{"txn"}, stdin: "val(\"/secret/ctl\") = \"from etcdctl\"\n\nput /secret/ctl x\n\n\n", exit: 1},
		} {
			r := ctl.RunWith(ctx, c.stdin, c.until, c.args...)
			switch {
			case r.Err != nil || r.Exit != c.exit:
				t.Errorf("etcdctl %s: exit %d, %v, %q", strings.Join(c.args, " "), r.Exit, r.Err, r.Stderr)
			case c.want != "" && r.Stdout != c.want:
				t.Errorf("etcdctl %s: %q; want %q", strings.Join(c.args, " "), r.Stdout, c.want)
			case c.until != "" && !strings.HasPrefix(r.Stdout, "/secret/election/") || c.exit == 1 && !strings.Contains(r.Stderr, "cannot work on ciphertext"):
				t.Errorf("etcdctl %s: stdout %q, stderr %q", strings.Join(c.args, " "), r.Stdout, r.Stderr)
			}
		}
		// etcdctl resigned when it was interrupted: the leader's key is in the history.
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		w := direct.Watch(wctx, "/secret/election/", clientv3.WithPrefix(), clientv3.WithRev(1))
		if r := <-w; len(r.Events) == 0 || !bytes.HasPrefix(r.Events[0].Kv.Value, []byte("epp:enc:v1:")) {
			t.Errorf("the member's election key: %v, %v; want the value encrypted", r.Events, r.Err())
		}
	})

	t.Run("gateway", func(t *testing.T) {
		b64 := base64.StdEncoding.EncodeToString
		cl := &http.Client{Timeout: 5 * time.Second}
		post := func(path, body string) string {
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, p.Endpoint.URLs[0]+path, strings.NewReader(body))
			resp, err := cl.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var buf bytes.Buffer
			_, _ = buf.ReadFrom(resp.Body)
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("POST %s: %d %s", path, resp.StatusCode, buf.String())
			}
			return buf.String()
		}
		post("/v3/kv/put", `{"key":"`+b64([]byte("/secret/gw"))+`","value":"`+b64([]byte("via gateway"))+`"}`)
		checkStored(t, "/secret/gw", "via gateway")
		var rr struct {
			Kvs []struct{ Value []byte } `json:"kvs"`
		}
		if err := json.Unmarshal([]byte(post("/v3/kv/range", `{"key":"`+b64([]byte("/secret/gw"))+`"}`)), &rr); err != nil {
			t.Fatal(err)
		}
		if len(rr.Kvs) != 1 || string(rr.Kvs[0].Value) != "via gateway" {
			t.Errorf("gateway range: %+v; want the plaintext", rr)
		}
	})
}

// BenchmarkEncryptV3: put and range of 1 KiB values through a proxy with --encrypt-prefix and through one
// without, 16 clients at a time, against one member; batches of the two alternate, so that the machine's other
// load falls on both alike. It reports each one's operations per second and their ratio
// (go test -run '^$' -bench EncryptV3 -benchtime 1x ./e2e/).
func BenchmarkEncryptV3(b *testing.B) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := harness.NewTestEnv(b)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		b.Fatal(err)
	}
	keyFile := filepath.Join(b.TempDir(), "k1.key")
	data, _ := crypt.GenerateKeyFile("k1")
	if err := os.WriteFile(keyFile, data, 0o600); err != nil {
		b.Fatal(err)
	}
	value := strings.Repeat("v", 1024)
	modes := []string{"plain", "encrypted"}
	clients := map[string]*clientv3.Client{}
	for _, mode := range modes {
		p, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
			if mode == "encrypted" {
				cfg.EncryptPrefixes, cfg.EncryptionKeyFiles = []string{"/bench/"}, []string{keyFile}
			}
		}})
		if err != nil {
			b.Fatal(err)
		}
		cli, err := clientv3.New(clientv3.Config{Endpoints: p.Endpoint.URLs, Logger: zap.NewNop()})
		if err != nil {
			b.Fatal(err)
		}
		defer cli.Close()
		if _, err := cli.Put(ctx, "/bench/"+mode, value); err != nil {
			b.Fatal(err)
		}
		clients[mode] = cli
	}
	const clientsAtOnce, batch, rounds = 16, 400, 10
	for _, op := range []string{"put", "range"} {
		b.Run(op, func(b *testing.B) {
			for range b.N {
				took := map[string]time.Duration{}
				for r := range rounds {
					for i := range modes {
						mode := modes[(i+r)%2]
						cli := clients[mode]
						start := time.Now()
						var wg sync.WaitGroup
						for range clientsAtOnce {
							wg.Go(func() {
								for range batch / clientsAtOnce {
									var err error
									if op == "put" {
										_, err = cli.Put(ctx, "/bench/"+mode, value)
									} else {
										_, err = cli.Get(ctx, "/bench/"+mode)
									}
									if err != nil {
										b.Error(err)
										return
									}
								}
							})
						}
						wg.Wait()
						took[mode] += time.Since(start)
					}
				}
				n := float64(batch * rounds)
				b.ReportMetric(n/took["plain"].Seconds(), "plain-ops/s")
				b.ReportMetric(n/took["encrypted"].Seconds(), "encrypted-ops/s")
				b.ReportMetric(took["plain"].Seconds()/took["encrypted"].Seconds(), "encrypted/plain")
			}
		})
	}
}

// TestEncryptRotation: a new key goes in first with the old one behind it; rewrap re-encrypts every stale value
// (the old key's, and plaintext) with the new key while a writer keeps writing, leases kept; then the old key
// can go: everything reads with the new key alone, and every write the writer made is there.
func TestEncryptRotation(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyFiles := map[string]string{}
	for _, name := range []string{"old", "new"} {
		keyFiles[name] = filepath.Join(dir, name+".key")
		if code, out, errOut := runCLI("keygen", "--out", keyFiles[name], "--name", name); code != 0 {
			t.Fatalf("keygen: %d %s %s", code, out, errOut)
		}
	}
	connect := func(files []string, plaintext bool) *clientv3.Client {
		t.Helper()
		p, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
			cfg.EncryptPrefixes, cfg.EncryptionKeyFiles, cfg.EncryptionReadPlaintext = []string{"/r/"}, files, plaintext
		}})
		if err != nil {
			t.Fatal(err)
		}
		return v3Client(t, p.Endpoint.URLs...)
	}
	direct := v3Client(t, c.Endpoint().URLs...)

	const n = 60
	want := map[string]string{"/r/plain": "plain", "/r/leased": "leased"}
	oldCli := connect([]string{keyFiles["old"]}, false)
	for i := range n {
		k := fmt.Sprintf("/r/%02d", i)
		want[k] = "v" + k
		if _, err := oldCli.Put(ctx, k, want[k]); err != nil {
			t.Fatal(err)
		}
	}
	lease, err := direct.Grant(ctx, 600)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := oldCli.Put(ctx, "/r/leased", "leased", clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	if _, err := direct.Put(ctx, "/r/plain", "plain"); err != nil {
		t.Fatal(err)
	}
	rewrapArgs := []string{"rewrap", "--upstream", c.Endpoint().URLs[0], "--prefix", "/r/", "--encryption-key-file", keyFiles["new"],
		"--encryption-key-file", keyFiles["old"], "--encryption-read-plaintext"}
	code, out, errOut := runCLI(append(rewrapArgs, "--dry-run")...)
	if code != 0 || !strings.Contains(out, fmt.Sprintf("scanned %d, stale %d, would rewrap (dry run) %d,", n+2, n+2, n+2)) {
		t.Errorf("dry run: exit %d, %q, %q", code, out, errOut)
	}

	// The new key encrypts everywhere now; a writer goes on through it while rewrap runs.
	newCli := connect([]string{keyFiles["new"], keyFiles["old"]}, true)
	stop := make(chan struct{})
	writerDone := make(chan map[string]string)
	go func() {
		wrote := map[string]string{}
		for round := 0; ; round++ {
			for i := 0; i < n; i += 3 {
				select {
				case <-stop:
					writerDone <- wrote
					return
				default:
				}
				k, v := fmt.Sprintf("/r/%02d", i), fmt.Sprintf("w%d", round)
				if _, err := newCli.Put(ctx, k, v); err == nil {
					wrote[k] = v
				}
			}
		}
	}()
	code, out, errOut = runCLI(rewrapArgs...)
	close(stop)
	for k, v := range <-writerDone {
		want[k] = v
	}
	if code != 0 || !strings.Contains(out, "failed to decrypt 0") {
		t.Fatalf("rewrap: exit %d, %q, %q", code, out, errOut)
	}
	t.Logf("rewrap: %s", strings.TrimSpace(out))

	r, err := direct.Get(ctx, "/r/", clientv3.WithPrefix())
	if err != nil || len(r.Kvs) != len(want) {
		t.Fatalf("member: %d keys, %v; want %d", len(r.Kvs), err, len(want))
	}
	for _, kv := range r.Kvs {
		if !bytes.HasPrefix(kv.Value, []byte("epp:enc:v1:xchacha20poly1305:new:")) {
			t.Errorf("%s stored as %.40q after rewrap; want the new key's", kv.Key, kv.Value)
		}
		if string(kv.Key) == "/r/leased" && clientv3.LeaseID(kv.Lease) != lease.ID {
			t.Errorf("/r/leased lost its lease: %x, want %x", kv.Lease, lease.ID)
		}
	}
	onlyNew := connect([]string{keyFiles["new"]}, false)
	r, err = onlyNew.Get(ctx, "/r/", clientv3.WithPrefix())
	if err != nil {
		t.Fatalf("read with the new key alone: %v", err)
	}
	for _, kv := range r.Kvs {
		if want[string(kv.Key)] != string(kv.Value) {
			t.Errorf("%s = %q; want %q (a write lost?)", kv.Key, kv.Value, want[string(kv.Key)])
		}
	}
}

// runCLI runs the etcd-proxy-proxy command in process.
func runCLI(args ...string) (int, string, string) {
	var out, errOut bytes.Buffer
	code := cli.Main(append([]string{"etcd-proxy-proxy"}, args...), &out, &errOut)
	return code, out.String(), errOut.String()
}

// TestEncryptV2: the v2 half. A member stores what is written under an encrypted prefix as ciphertext bound to
// the node's path (an in-order create: to its directory); get, a recursive listing, prevNode and watches, one
// event and stream=true alike, give the plaintext; a value moved to another path fails; prevValue is refused.
func TestEncryptV2(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "k1.key")
	if code, out, errOut := runCLI("keygen", "--out", keyFile, "--name", "k1"); code != 0 {
		t.Fatalf("keygen: %d %s %s", code, out, errOut)
	}
	p, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.EncryptPrefixes, cfg.EncryptionKeyFiles = []string{"/secret/"}, []string{keyFile}
	}})
	if err != nil {
		t.Fatal(err)
	}
	cl := &http.Client{Timeout: 10 * time.Second}
	via, member := p.Endpoint.URLs[0]+"/v2/keys", c.Members[0].ClientURL+"/v2/keys"
	type node struct {
		Key   string  `json:"key"`
		Value *string `json:"value"`
		Nodes []node  `json:"nodes"`
	}
	type event struct {
		Action   string `json:"action"`
		Node     *node  `json:"node"`
		PrevNode *node  `json:"prevNode"`
		Message  string `json:"message"`
	}
	call := func(t *testing.T, method, u, body string) (int, event, string) {
		t.Helper()
		code, b := do(ctx, cl, method, u, body)
		var ev event
		_ = json.Unmarshal([]byte(b), &ev)
		return code, ev, b
	}
	value := func(n *node) string {
		if n == nil || n.Value == nil {
			return "<none>"
		}
		return *n.Value
	}

	if code, ev, b := call(t, http.MethodPut, via+"/secret/a", "value=hunter2"); code != http.StatusCreated || value(ev.Node) != "hunter2" {
		t.Fatalf("PUT through the proxy: %d %s", code, b)
	}
	_, stored, b := call(t, http.MethodGet, member+"/secret/a", "")
	if !strings.HasPrefix(value(stored.Node), "epp:enc:v1:xchacha20poly1305:k1:") {
		t.Fatalf("the member stores %s", b)
	}
	if _, ev, b := call(t, http.MethodGet, via+"/secret/a", ""); value(ev.Node) != "hunter2" {
		t.Errorf("GET through the proxy: %s", b)
	}
	if code, ev, b := call(t, http.MethodPut, via+"/secret/a?value=again&prevExist=true", ""); code != http.StatusOK ||
		value(ev.Node) != "again" || value(ev.PrevNode) != "hunter2" {
		t.Errorf("PUT with the value in the query: %d %s; want again, prevNode hunter2", code, b)
	}
	if _, ev, b := call(t, http.MethodPut, via+"/public/a", "value=plain"); value(ev.Node) != "plain" {
		t.Errorf("PUT outside the prefix: %s", b)
	}
	if _, ev, _ := call(t, http.MethodGet, member+"/public/a", ""); value(ev.Node) != "plain" {
		t.Errorf("a value outside the prefix is stored as %q", value(ev.Node))
	}
	if code, ev, b := call(t, http.MethodPost, via+"/secret/queue", "value=job"); code != http.StatusCreated || value(ev.Node) != "job" {
		t.Errorf("in-order POST: %d %s", code, b)
	}
	_, ev, b := call(t, http.MethodGet, via+"/?recursive=true", "")
	got := map[string]string{}
	var walk func(n *node)
	walk = func(n *node) {
		if n.Value != nil {
			got[n.Key] = *n.Value
		}
		for i := range n.Nodes {
			walk(&n.Nodes[i])
		}
	}
	if ev.Node != nil {
		walk(ev.Node)
	}
	if got["/secret/a"] != "again" || got["/public/a"] != "plain" || len(got) != 3 {
		t.Errorf("recursive listing: %v (%s)", got, b)
	}
	for k, v := range got {
		if strings.HasPrefix(k, "/secret/queue/") && v != "job" {
			t.Errorf("in-order key %s = %q; want job", k, v)
		}
	}

	if code, _, b := call(t, http.MethodPut, via+"/secret/a", "value=x&prevValue=again"); code != http.StatusBadRequest ||
		!strings.Contains(b, "prevValue cannot be compared") {
		t.Errorf("prevValue: %d %s; want 400", code, b)
	}
	if _, ev, _ := call(t, http.MethodGet, via+"/secret/a", ""); value(ev.Node) != "again" {
		t.Errorf("after a refused prevValue: %q; want it unchanged", value(ev.Node))
	}
	// A ciphertext moved to another path, and plaintext, fail; a write over one succeeds without prevNode.
	if code, _, b := call(t, http.MethodPut, member+"/secret/moved", "value="+url.QueryEscape(value(stored.Node))); code != http.StatusCreated {
		t.Fatalf("PUT on the member: %d %s", code, b)
	}
	if code, _, b := call(t, http.MethodGet, via+"/secret/moved", ""); code != http.StatusInternalServerError || !strings.Contains(b, "does not decrypt") {
		t.Errorf("GET of a moved value: %d %s; want 500, does not decrypt", code, b)
	}
	if code, ev, b := call(t, http.MethodPut, via+"/secret/moved", "value=new"); code != http.StatusOK || value(ev.Node) != "new" || ev.PrevNode != nil {
		t.Errorf("PUT over a moved value: %d %s; want success without prevNode", code, b)
	}

	// Watches: one event, and a stream whose events arrive one by one as they happen.
	done := make(chan string, 1)
	go func() {
		_, b := do(ctx, cl, http.MethodGet, via+"/secret/w?wait=true", "")
		done <- b
	}()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, _ := http.NewRequestWithContext(sctx, http.MethodGet, via+"/secret/?wait=true&recursive=true&stream=true", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	dec := json.NewDecoder(resp.Body)
	for i, v := range []string{"first", "second"} {
		if i == 0 {
			// The one-event watch must be in place before the first write: write until it has fired.
			eventually(t, ctx, "the one-event watch fires", func() (bool, string) {
				if code, _, b := call(t, http.MethodPut, via+"/secret/w", "value="+v); code >= 300 {
					return false, b
				}
				select {
				case b := <-done:
					done <- b
					return true, ""
				default:
					return false, "no event yet"
				}
			})
		} else if code, _, b := call(t, http.MethodPut, via+"/secret/w", "value="+v); code >= 300 {
			t.Fatal(b)
		}
		var ev event
		for ev.Node == nil || ev.Node.Key != "/secret/w" || value(ev.Node) != v {
			ev = event{}
			if err := dec.Decode(&ev); err != nil {
				t.Fatalf("stream: %v", err)
			}
		}
	}
	if b := <-done; !strings.Contains(b, `"value":"first"`) {
		t.Errorf("one-event watch: %s", b)
	}

	// Rotation of the v2 store: rewrap --api 2 with a new key first; TTLs stay; then the new key alone reads all.
	if code, _, b := call(t, http.MethodPut, via+"/secret/ttl", "value=t&ttl=600"); code != http.StatusCreated {
		t.Fatalf("PUT with a TTL: %d %s", code, b)
	}
	k2 := filepath.Join(filepath.Dir(keyFile), "k2.key")
	if code, out, errOut := runCLI("keygen", "--out", k2, "--name", "k2"); code != 0 {
		t.Fatalf("keygen: %d %s %s", code, out, errOut)
	}
	code, out, errOut := runCLI("rewrap", "--api", "2", "--upstream", c.Members[0].ClientURL, "--prefix", "/secret/",
		"--encryption-key-file", k2, "--encryption-key-file", keyFile)
	if code != 0 || !strings.Contains(out, "scanned 5, stale 5, rewrapped 5,") {
		t.Fatalf("rewrap --api 2: exit %d, %q, %q", code, out, errOut)
	}
	if _, ev, b := call(t, http.MethodGet, member+"/secret/ttl", ""); !strings.HasPrefix(value(ev.Node), "epp:enc:v1:xchacha20poly1305:k2:") ||
		!strings.Contains(b, `"ttl":`) {
		t.Errorf("the member's /secret/ttl after rewrap: %s; want the new key's, with its TTL", b)
	}
	onlyK2, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.EncryptPrefixes, cfg.EncryptionKeyFiles = []string{"/secret/"}, []string{k2}
	}})
	if err != nil {
		t.Fatal(err)
	}
	_, ev, b = call(t, http.MethodGet, onlyK2.Endpoint.URLs[0]+"/v2/keys/secret?recursive=true", "")
	got = map[string]string{}
	if ev.Node != nil {
		walk(ev.Node)
	}
	if len(got) != 5 || got["/secret/a"] != "again" || got["/secret/ttl"] != "t" || got["/secret/w"] != "second" || got["/secret/moved"] != "new" {
		t.Errorf("read with the new key alone: %v (%s)", got, b)
	}
	for k, v := range got {
		if strings.HasPrefix(k, "/secret/queue/") && v != "job" {
			t.Errorf("in-order key %s after rewrap = %q; want job", k, v)
		}
	}
}

// TestEncryptConfig: --encryption-config gives each set of prefixes its keyring; a change of the file is picked
// up while the proxy runs (a new key first: new writes take it, old values still read), and a broken file keeps
// the keys loaded before.
func TestEncryptConfig(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyFile := func(name string) string {
		f := filepath.Join(dir, name+".key")
		if code, out, errOut := runCLI("keygen", "--out", f, "--name", name); code != 0 {
			t.Fatalf("keygen: %d %s %s", code, out, errOut)
		}
		return f
	}
	ka, kb, kc := keyFile("a"), keyFile("b"), keyFile("c")
	conf := filepath.Join(dir, "encryption.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(conf, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("resources:\n- prefixes: [/a/]\n  providers: [{keyFile: " + ka + "}]\n" +
		"- prefixes: [/b/, /a/b/]\n  providers: [{keyFile: " + kb + "}, {identity: {}}]\n" +
		"- prefixes: [/raw/]\n  on-decrypt-error: raw\n  providers: [{keyFile: " + ka + "}]\n")
	p, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.EncryptionConfig = conf
		cfg.CertReloadInterval = 50 * time.Millisecond
	}})
	if err != nil {
		t.Fatal(err)
	}
	cli := v3Client(t, p.Endpoint.URLs...)
	direct := v3Client(t, c.Endpoint().URLs...)
	keyOf := func(k string) string {
		t.Helper()
		r, err := direct.Get(ctx, k)
		if err != nil || len(r.Kvs) != 1 {
			t.Fatalf("member's %s: %v", k, err)
		}
		v := string(r.Kvs[0].Value)
		if !strings.HasPrefix(v, "epp:enc:v1:") {
			return "plaintext"
		}
		return strings.Split(v, ":")[4]
	}
	put := func(k, v string) {
		t.Helper()
		if _, err := cli.Put(ctx, k, v); err != nil {
			t.Fatalf("put %s: %v", k, err)
		}
	}
	get := func(k string) (string, error) {
		r, err := cli.Get(ctx, k)
		if err != nil || len(r.Kvs) != 1 {
			return "", fmt.Errorf("get %s: %v", k, err)
		}
		return string(r.Kvs[0].Value), nil
	}
	put("/a/x", "1")
	put("/a/b/x", "2") // the longest prefix decides
	put("/b/x", "3")
	if _, err := direct.Put(ctx, "/b/plain", "p"); err != nil {
		t.Fatal(err)
	}
	for k, want := range map[string]string{"/a/x": "a", "/a/b/x": "b", "/b/x": "b"} {
		if got := keyOf(k); got != want {
			t.Errorf("%s stored with key %s; want %s", k, got, want)
		}
	}
	if v, err := get("/b/plain"); err != nil || v != "p" {
		t.Errorf("plaintext under an identity provider: %q, %v", v, err)
	}
	// on-decrypt-error: raw passes what does not decrypt as stored (a value of /a/ moved here, plaintext).
	r, err := direct.Get(ctx, "/a/x")
	if err != nil || len(r.Kvs) != 1 {
		t.Fatal(err)
	}
	moved := string(r.Kvs[0].Value)
	for k, v := range map[string]string{"/raw/moved": moved, "/raw/plain": "p"} {
		if _, err := direct.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
		if got, err := get(k); err != nil || got != v {
			t.Errorf("%s under on-decrypt-error: raw: %.40q, %v; want it as stored", k, got, err)
		}
	}
	put("/raw/good", "g")
	if v, err := get("/raw/good"); err != nil || v != "g" || keyOf("/raw/good") != "a" {
		t.Errorf("a good value under on-decrypt-error: raw: %q, %v", v, err)
	}

	// Rotation of /a/: c first, a behind it.
	write("resources:\n- prefixes: [/a/]\n  providers: [{keyFile: " + kc + "}, {keyFile: " + ka + "}]\n")
	eventually(t, ctx, "the new configuration is used", func() (bool, string) {
		put("/a/y", "4")
		k := keyOf("/a/y")
		return k == "c", "stored with " + k
	})
	if v, err := get("/a/x"); err != nil || v != "1" {
		t.Errorf("a value of the old key after the rotation: %q, %v", v, err)
	}
	if v, err := get("/b/x"); err != nil || !strings.HasPrefix(v, "epp:enc:v1:xchacha20poly1305:b:") {
		t.Errorf("/b/ out of the configuration: %.40q, %v; want it passed as stored", v, err)
	}
	// A broken file: the keys loaded before stay.
	write("resources: [oops\n")
	if err := p.Server.ReloadCertificates(); err == nil || !strings.Contains(err.Error(), "encryption-config") {
		t.Errorf("reload of a broken file: %v", err)
	}
	put("/a/z", "5")
	if k := keyOf("/a/z"); k != "c" {
		t.Errorf("after a failed reload /a/z is stored with %s; want c, as before", k)
	}
}

// TestEncryptEtcvault: values etcvault v0.3.1 stored (crypt/testdata/etcvault, made with etcvault itself, both
// forms), in the v3 store and the v2 store, read as their plaintext through a proxy given etcvault's keychain,
// v3 and v2 alike; etcvault's write markers written through it are stored in the new format; rewrap (v3 and
// --api 2) turns every etcvault value into the new format, after which a proxy without the keychain reads them.
func TestEncryptEtcvault(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	keychain := filepath.Join("..", "crypt", "testdata", "etcvault", "keychain")
	data, err := os.ReadFile(filepath.Join("..", "crypt", "testdata", "etcvault", "vectors.json"))
	if err != nil {
		t.Fatal(err)
	}
	var vectors []struct{ Name, Plaintext, Stored string }
	if err := json.Unmarshal(data, &vectors); err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(t.TempDir(), "k1.key")
	if code, out, errOut := runCLI("keygen", "--out", keyFile, "--name", "k1"); code != 0 {
		t.Fatalf("keygen: %d %s %s", code, out, errOut)
	}
	start := func(etcvault string) (*clientv3.Client, string) {
		t.Helper()
		p, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
			cfg.EncryptPrefixes, cfg.EncryptionKeyFiles, cfg.EtcvaultKeychain = []string{"/ev/"}, []string{keyFile}, etcvault
		}})
		if err != nil {
			t.Fatal(err)
		}
		return v3Client(t, p.Endpoint.URLs...), p.Endpoint.URLs[0] + "/v2/keys"
	}
	direct := v3Client(t, c.Endpoint().URLs...)
	hc := &http.Client{Timeout: 10 * time.Second}
	member := c.Members[0].ClientURL + "/v2/keys"
	v2get := func(u string) (int, string) {
		code, b := do(ctx, hc, http.MethodGet, u, "")
		var ev struct {
			Node struct{ Value string } `json:"node"`
		}
		if err := json.Unmarshal([]byte(b), &ev); err != nil || code != http.StatusOK {
			return code, b
		}
		return code, ev.Node.Value
	}
	want := map[string]string{}
	for _, v := range vectors {
		want["/ev/"+v.Name] = v.Plaintext
		if _, err := direct.Put(ctx, "/ev/"+v.Name, v.Stored); err != nil {
			t.Fatal(err)
		}
		if code, b := do(ctx, hc, http.MethodPut, member+"/ev/"+v.Name, url.Values{"value": {v.Stored}}.Encode()); code != http.StatusCreated {
			t.Fatalf("v2 PUT to the member: %d %s", code, b)
		}
	}

	cl, v2 := start(keychain)
	r, err := cl.Get(ctx, "/ev/", clientv3.WithPrefix())
	if err != nil || len(r.Kvs) != len(vectors) {
		t.Fatalf("v3 range through the proxy: %v, %v", err, r)
	}
	for _, kv := range r.Kvs {
		if string(kv.Value) != want[string(kv.Key)] {
			t.Errorf("v3 %s = %.40q; want %.40q", kv.Key, kv.Value, want[string(kv.Key)])
		}
	}
	for k, w := range want {
		if code, got := v2get(v2 + k); code != http.StatusOK || got != w {
			t.Errorf("v2 %s: %d %.60q; want %.40q", k, code, got, w)
		}
	}
	// etcvault's write markers: stored in the new format, read as the plaintext.
	if _, err := cl.Put(ctx, "/ev/marker3", "ETCVAULT::plain:etcvault-test:hello::ETCVAULT"); err != nil {
		t.Fatal(err)
	}
	if code, b := do(ctx, hc, http.MethodPut, v2+"/ev/marker2", url.Values{"value": {"ETCVAULT::plain:etcvault-test:hi::ETCVAULT"}}.Encode()); code != http.StatusCreated {
		t.Fatalf("v2 PUT of a marker: %d %s", code, b)
	}
	want["/ev/marker3"] = "hello"
	if code, got := v2get(v2 + "/ev/marker2"); code != http.StatusOK || got != "hi" {
		t.Errorf("v2 marker read back: %d %q", code, got)
	}
	if code, got := v2get(member + "/ev/marker2"); code != http.StatusOK || !strings.HasPrefix(got, "epp:enc:v1:xchacha20poly1305:k1:") {
		t.Errorf("the member stores the v2 marker as %d %.40q", code, got)
	}

	// Rewrap both stores; then a proxy without the keychain reads everything, and the member holds no
	// etcvault value.
	for _, api := range []string{"3", "2"} {
		code, out, errOut := runCLI("rewrap", "--upstream", c.Endpoint().URLs[0], "--prefix", "/ev/", "--api", api,
			"--encryption-key-file", keyFile, "--etcvault-keychain", keychain)
		if code != 0 || !strings.Contains(out, fmt.Sprintf("stale %d,", len(vectors))) || !strings.Contains(out, "failed to decrypt 0") {
			t.Fatalf("rewrap --api %s: exit %d, %q, %q", api, code, out, errOut)
		}
	}
	plainCli, plainV2 := start("")
	r, err = plainCli.Get(ctx, "/ev/", clientv3.WithPrefix())
	if err != nil || len(r.Kvs) != len(want) {
		t.Fatalf("v3 after rewrap: %v, %v", err, r)
	}
	for _, kv := range r.Kvs {
		if string(kv.Value) != want[string(kv.Key)] {
			t.Errorf("v3 %s after rewrap = %.40q; want %.40q", kv.Key, kv.Value, want[string(kv.Key)])
		}
	}
	for _, v := range vectors {
		if code, got := v2get(plainV2 + "/ev/" + v.Name); code != http.StatusOK || got != v.Plaintext {
			t.Errorf("v2 %s after rewrap: %d %.60q", v.Name, code, got)
		}
		if _, got := v2get(member + "/ev/" + v.Name); !strings.HasPrefix(got, "epp:enc:v1:") {
			t.Errorf("v2 %s is stored as %.40q after rewrap", v.Name, got)
		}
	}
}

// TestEncryptDeterministic: under a resource with deterministic: true, a member stores AES-SIV values and a
// compare on a value works through the proxy against a real member, v3 (Compare EQUAL and NOT_EQUAL in a
// txn) and v2 (prevValue); what still cannot work (GREATER, a compare over a range, a prefix that is not
// deterministic) is refused.
func TestEncryptDeterministic(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "a.key")
	if code, out, errOut := runCLI("keygen", "--out", keyFile, "--name", "a"); code != 0 {
		t.Fatalf("keygen: %d %s %s", code, out, errOut)
	}
	conf := filepath.Join(dir, "encryption.yaml")
	if err := os.WriteFile(conf, []byte("resources:\n- prefixes: [/d/]\n  deterministic: true\n  providers: [{keyFile: "+keyFile+"}]\n"+
		"- prefixes: [/r/]\n  providers: [{keyFile: "+keyFile+"}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) { cfg.EncryptionConfig = conf }})
	if err != nil {
		t.Fatal(err)
	}
	cl := v3Client(t, p.Endpoint.URLs...)
	direct := v3Client(t, c.Endpoint().URLs...)

	if _, err := cl.Put(ctx, "/d/k", "v1"); err != nil {
		t.Fatal(err)
	}
	txn := func(cmp clientv3.Cmp, then string) (bool, error) {
		r, err := cl.Txn(ctx).If(cmp).Then(clientv3.OpPut("/d/k", then)).Commit()
		if err != nil {
			return false, err
		}
		return r.Succeeded, nil
	}
	for _, step := range []struct {
		name string
		cmp  clientv3.Cmp
		then string
		want bool
	}{
		{"equal", clientv3.Compare(clientv3.Value("/d/k"), "=", "v1"), "v2", true},
		{"equal, no longer", clientv3.Compare(clientv3.Value("/d/k"), "=", "v1"), "v3", false},
		{"not equal", clientv3.Compare(clientv3.Value("/d/k"), "!=", "v1"), "v4", true},
		{"not equal, the same", clientv3.Compare(clientv3.Value("/d/k"), "!=", "v4"), "v5", false},
	} {
		if ok, err := txn(step.cmp, step.then); err != nil || ok != step.want {
			t.Errorf("%s: succeeded %v, %v; want %v", step.name, ok, err, step.want)
		}
	}
	r, err := direct.Get(ctx, "/d/k")
	if err != nil || len(r.Kvs) != 1 || !strings.HasPrefix(string(r.Kvs[0].Value), "epp:enc:v1:aes-siv:a:") {
		t.Fatalf("the member stores %v, %v", r, err)
	}
	if g, err := cl.Get(ctx, "/d/k"); err != nil || string(g.Kvs[0].Value) != "v4" {
		t.Fatalf("read through the proxy: %v, %v; want v4", g, err)
	}
	for name, cmp := range map[string]clientv3.Cmp{
		"greater":           clientv3.Compare(clientv3.Value("/d/k"), ">", "a"),
		"over a range":      clientv3.Compare(clientv3.Value("/d/k"), "=", "v4").WithRange("/d/l"),
		"not deterministic": clientv3.Compare(clientv3.Value("/r/k"), "=", "v4"),
	} {
		if _, err := txn(cmp, "x"); status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s: %v; want InvalidArgument", name, err)
		}
	}

	// rewrap --deterministic leaves deterministic values as they are and makes the others so; without it,
	// it makes them random again.
	if _, err := direct.Put(ctx, "/d/plain", "p"); err != nil {
		t.Fatal(err)
	}
	args := []string{"rewrap", "--upstream", c.Endpoint().URLs[0], "--prefix", "/d/", "--encryption-key-file", keyFile, "--encryption-read-plaintext"}
	if code, out, errOut := runCLI(append(args, "--deterministic")...); code != 0 || !strings.Contains(out, "scanned 2, stale 1,") {
		t.Errorf("rewrap --deterministic: %d %q %q", code, out, errOut)
	}
	if ok, err := txn(clientv3.Compare(clientv3.Value("/d/plain"), "=", "p"), "v5"); err != nil || !ok {
		t.Errorf("a compare on a rewrapped value: %v, %v", ok, err)
	}
	if code, out, errOut := runCLI(append(args, "--dry-run")...); code != 0 || !strings.Contains(out, "scanned 2, stale 2,") {
		t.Errorf("rewrap without --deterministic: %d %q %q; want both stale", code, out, errOut)
	}

	// v2: prevValue, the compare-and-swap of etcdctl v2 set --swap-with-value.
	hc := &http.Client{Timeout: 10 * time.Second}
	v2 := p.Endpoint.URLs[0] + "/v2/keys"
	for _, step := range []struct {
		method, path, body string
		want               int
	}{
		{http.MethodPut, "/d/v2", "value=a", http.StatusCreated},
		{http.MethodPut, "/d/v2?prevValue=a", "value=b", http.StatusOK},
		{http.MethodPut, "/d/v2", "value=c&prevValue=a", http.StatusPreconditionFailed},
		{http.MethodDelete, "/d/v2?prevValue=b", "", http.StatusOK},
		{http.MethodPut, "/r/v2?prevValue=a", "value=b", http.StatusBadRequest},
	} {
		if code, b := do(ctx, hc, step.method, v2+step.path, step.body); code != step.want {
			t.Errorf("%s %s %s: %d %s; want %d", step.method, step.path, step.body, code, b, step.want)
		}
	}
}
