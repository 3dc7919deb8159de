package e2e

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// v3Topologies are the chains the v3 API (gRPC) is checked through. The grpc-proxy does not advertise itself,
// so it forwards MemberList and returns the members: only the proxy-proxy's rewrite hides them.
var v3Topologies = []topology{
	{"pp-members", func(tls bool) []harness.Hop { return []harness.Hop{pp(tls)} }},
	{"pp-grpc-proxy", func(tls bool) []harness.Hop {
		return []harness.Hop{harness.GRPCProxyHop{TLS: tls, Advertise: false}, pp(tls)}
	}},
	{"pp-pp-members", func(tls bool) []harness.Hop { return []harness.Hop{pp(tls), pp(tls)} }},
}

// v3Case is one etcdctl run. Arguments may name $SNAPSHOT (a file in the Env's directory) and $LEASE (the
// lease that 07-lease-grant granted). stdin, if set, is the command's standard input; until, if set, is the
// last stdout line of a command that runs until interrupted (it gets SIGINT once that line is out).
type v3Case struct {
	name  string
	args  []string
	stdin string
	until string
}

// v3Cases run in order against one topology: each may depend on what the ones before it wrote. Auth comes
// last: it changes the cluster's state for every later command.
var v3Cases = []v3Case{
	{name: "01-put", args: []string{"put", "foo", "bar"}},
	{name: "02-put-more", args: []string{"put", "fool", "hardy"}},
	{name: "03-get", args: []string{"get", "foo"}},
	{name: "04-get-prefix", args: []string{"get", "--prefix", "foo"}},
	{name: "05-get-json", args: []string{"get", "foo", "-w", "json"}},
	{name: "06-del", args: []string{"del", "foo"}},
	{name: "07-txn", args: []string{"txn", "--interactive=false"},
		stdin: "mod(\"txn\") = \"0\"\n\nput txn created\n\nput txn existed\n\n"},
	{name: "08-lease-grant", args: []string{"lease", "grant", "600"}},
	{name: "09-lease-keep-alive", args: []string{"lease", "keep-alive", "--once", "$LEASE"}},
	{name: "10-lease-revoke", args: []string{"lease", "revoke", "$LEASE"}},
	{name: "11-lock", args: []string{"lock", "mylock", "--", "echo", "locked"}},
	// elect campaigns, prints its key and value once elected, and resigns and exits 0 on SIGINT.
	{name: "12-elect", args: []string{"elect", "myelection", "p1"}, until: "p1"},
	{name: "13-member-list", args: []string{"member", "list"}},
	{name: "14-endpoint-status", args: []string{"endpoint", "status", "--cluster"}},
	{name: "15-endpoint-health", args: []string{"endpoint", "health", "--cluster"}},
	{name: "16-member-add", args: []string{"member", "add", "intruder", "--peer-urls=http://127.0.0.1:1"}},
	{name: "17-snapshot-save", args: []string{"snapshot", "save", "$SNAPSHOT"}},
	{name: "18-user-add", args: []string{"user", "add", "root", "--new-user-password=secret", "--interactive=false"}},
	{name: "19-role-add", args: []string{"role", "add", "root"}},
	{name: "20-grant-role", args: []string{"user", "grant-role", "root", "root"}},
	{name: "21-auth-enable", args: []string{"auth", "enable"}},
	{name: "22-get-auth", args: []string{"--user=root:secret", "get", "txn"}},
	// Without a token the members take the user from the client certificate of the hop below them (Cluster CA,
	// empty common name): "user name is empty" in plain, "permission denied" with TLS.
	{name: "23-get-noauth", args: []string{"get", "txn"}},
	{name: "24-auth-disable", args: []string{"--user=root:secret", "auth", "disable"}},
	// The proxy is the one member a client sees, and the leader: moving leadership to it can only fail.
	{name: "25-move-leader", args: []string{"move-leader", "$PROXY_ID"}},
}

var v3Goldens goldens

var (
	// reLease is the ID in etcdctl's lease answers ("lease 694d7a1b2c3d4e5f granted with TTL(600s)").
	reLease = regexp.MustCompile(`^lease ([0-9a-f]+) granted`)
	// reStatusLine is a line of `endpoint status` in etcdctl's simple format, up to the raft numbers: the
	// members' version (checked apart, one golden file serves every version), the db size and the raft term and
	// indexes vary.
	reStatusLine = regexp.MustCompile(`(?m)^([^,\n]+, [^,\n]+), (\d+\.\d+)\.\d+, [\d.]+ [kMGT]?B, (true|false), (true|false), \d+, \d+, \d+,`)
	// reSnapshotSize and reSnapshotTook are the size and the humanized time ("now", "1 second ago") in the
	// JSON log lines of `snapshot save`.
	reSnapshotSize = regexp.MustCompile(`"size":"[\d.]+ [kMGT]?B"`)
	reSnapshotTook = regexp.MustCompile(`"took":"[^"]*"`)
	// reClientTarget is the gRPC target in clientv3's log lines: it holds the address of the client's resolver.
	reClientTarget = regexp.MustCompile(`etcd-endpoints://0x[0-9a-f]+/`)
	// reRetryLog is clientv3's warning before it retries a failed call. It repeats the error that etcdctl prints
	// next, with the gRPC code, which etcd's grpc-proxy turns into Unknown for every etcdserver error.
	reRetryLog = regexp.MustCompile(`(?m)^\{"level":"warn".*"msg":"retrying of unary invoker failed".*\n`)
	// reHeaderMember is the member_id of a response header naming a member of the cluster. The proxy rewrites
	// it only in MemberList and Status answers; every other answer carries the ID of whichever member (or
	// grpc-proxy's member) served it. The golden files mark it instead of naming a member; once the proxy
	// stamps every header, they will show proxy-id and must be rewritten.
	reHeaderMember = regexp.MustCompile(`"member_id":member-\d+-id\b`)
	// reSnapshotCaller is the source line in those log lines (caller positions move between builds).
	reSnapshotCaller = regexp.MustCompile(`"caller":"[^"]+"`)
)

// v3Run is a topology of v3Topologies on members of one etcd version ("": embedded v3.5.35).
type v3Run struct {
	topo    topology
	version string
}

// v3Runs are every topology on members of every version.
func v3Runs() []v3Run {
	var runs []v3Run
	for _, v := range append([]string{""}, harness.EtcdVersions...) {
		for _, topo := range v3Topologies {
			runs = append(runs, v3Run{topo, v})
		}
	}
	return runs
}

func (r v3Run) String() string {
	if r.version == "" {
		return r.topo.name
	}
	return r.topo.name + "-" + r.version
}

// TestV3 runs the same golden cases through every v3 run: etcdctl 3.5.35 sees the same answers whatever etcd
// version the members run.
func TestV3(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"plain", "tls"} {
		for _, run := range v3Runs() {
			topo := run.topo
			t.Run(mode+"/"+run.String(), func(t *testing.T) {
				t.Parallel()
				ctx := testContext(t, 3*time.Minute)
				s := startVersion(t, ctx, topo, mode == "tls", run.version)
				self := rules.NewSelf("etcd-proxy-proxy", s.top.URLs)
				s.env.Register(fmt.Sprint(self.ID), "proxy-id") // decimal, as -w json prints IDs
				ctl := s.env.Etcdctl(3, s.top)
				norm := v3Norm(s.env)
				snapshot := filepath.Join(s.env.Dir, "snapshot.db")
				lease := ""
				for _, c := range v3Cases {
					args := slices.Clone(c.args)
					for i, a := range args {
						a = strings.ReplaceAll(a, "$SNAPSHOT", snapshot)
						a = strings.ReplaceAll(a, "$PROXY_ID", self.IDString())
						args[i] = strings.ReplaceAll(a, "$LEASE", lease)
					}
					var res harness.Result
					if c.stdin != "" || c.until != "" {
						res = ctl.RunWith(ctx, c.stdin, c.until, args...)
					} else {
						res = ctl.Run(ctx, args...)
					}
					if res.Err != nil {
						t.Fatalf("%s: %v", c.name, res.Err)
					}
					switch c.name {
					case "08-lease-grant":
						m := reLease.FindStringSubmatch(res.Stdout)
						if m == nil {
							t.Fatalf("no lease ID in %q", res.Stdout)
						}
						lease = m[1]
						s.env.Register(lease, "lease-id")
					case "13-member-list":
						checkOneMember(t, res, s.top.URLs[0], self)
					case "14-endpoint-status":
						want := cmp.Or(run.version, "3.5")
						if m := reStatusLine.FindStringSubmatch(res.Stdout); m == nil || m[2] != want {
							t.Errorf("endpoint status %q: want the members' version %s.x", res.Stdout, want)
						}
					case "16-member-add":
						if res.Exit == 0 || !strings.Contains(res.Stderr, "code = PermissionDenied desc = etcd-proxy-proxy: ") {
							t.Errorf("member add: exit %d, stderr %q; want the proxy's PermissionDenied", res.Exit, res.Stderr)
						}
					case "17-snapshot-save":
						if err := ctl.Run(ctx, "snapshot", "status", snapshot, "-w", "table").Check(); err != nil {
							t.Errorf("the saved snapshot: %v", err)
						}
					}
					v3Goldens.check(t, filepath.Join("testdata", "v3", mode, c.name+".txtar"), res, norm)
				}
				t.Run("watch", func(t *testing.T) { testV3Watch(t, ctx, s, ctl) })
			})
		}
	}
}

// v3Norm normalises etcdctl v3 output for the golden files: env's placeholders, then what varies per run.
func v3Norm(env *harness.Env) func(string) string {
	return func(str string) string {
		str = env.Normalize(str)
		str = reStatusLine.ReplaceAllString(str, "$1, <ETCD-VERSION>, <SIZE>, $3, $4, <N>, <N>, <N>,")
		str = reSnapshotSize.ReplaceAllString(str, `"size":"<SIZE>"`)
		str = reSnapshotTook.ReplaceAllString(str, `"took":"<AGO>"`)
		str = reClientTarget.ReplaceAllString(str, "etcd-endpoints://<PTR>/")
		str = reRetryLog.ReplaceAllString(str, "")
		str = reHeaderMember.ReplaceAllString(str, `"member_id":<UPSTREAM-MEMBER-ID>`)
		return reSnapshotCaller.ReplaceAllString(str, `"caller":"<CALLER>"`)
	}
}

// checkOneMember: `etcdctl member list` names exactly one member, the proxy-proxy the client talks to.
func checkOneMember(t *testing.T, res harness.Result, url string, self rules.Self) {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
	if len(lines) != 1 {
		t.Fatalf("member list shows %d members, want only the proxy:\n%s", len(lines), res.Stdout)
	}
	want := fmt.Sprintf("%s, started, etcd-proxy-proxy, , %s, false", self.IDString(), url)
	if lines[0] != want {
		t.Errorf("member list = %q, want %q", lines[0], want)
	}
}

// testV3Watch: `etcdctl watch --rev` through the proxy prints an event that a second client puts. Watching
// from the revision after a put the test made puts the event in etcd's history whenever the watch reaches the
// member, so nothing waits for the watch to be established.
func testV3Watch(t *testing.T, ctx context.Context, s *started, ctl *harness.Etcdctl) {
	put := ctl.Run(ctx, "put", "watched", "before", "-w", "json")
	if err := put.Check(); err != nil {
		t.Fatal(err)
	}
	var resp struct {
		Header struct{ Revision int64 }
	}
	if err := json.Unmarshal([]byte(put.Stdout), &resp); err != nil || resp.Header.Revision == 0 {
		t.Fatalf("no revision in %q (%v)", put.Stdout, err)
	}
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	done := make(chan harness.Result, 1)
	go func() {
		done <- ctl.RunWith(wctx, "", "after", "watch", "watched", fmt.Sprintf("--rev=%d", resp.Header.Revision+1))
	}()
	if err := s.env.Etcdctl(3, s.top).Run(ctx, "put", "watched", "after").Check(); err != nil {
		t.Fatal(err)
	}
	res := <-done
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	if want := "PUT\nwatched\nafter\n"; res.Stdout != want {
		t.Errorf("watch printed %q, want %q (stderr %q)", res.Stdout, want, res.Stderr)
	}
}

// TestAutoSync: a real clientv3 with AutoSyncInterval on top of a chain of proxy-proxies keeps exactly the
// proxy it was given: every sync learns the proxy alone, so the client never dials past it. Members of every
// etcd version ("": embedded v3.5.35).
func TestAutoSync(t *testing.T) {
	t.Parallel()
	for _, version := range append([]string{""}, harness.EtcdVersions...) {
		for _, mode := range []string{"plain", "tls"} {
			name := mode
			if version != "" {
				name += "-" + version
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				testAutoSync(t, mode == "tls", version)
			})
		}
	}
}

func testAutoSync(t *testing.T, tls bool, version string) {
	ctx := testContext(t, 2*time.Minute)
	topo := topology{"pp-pp-members", func(tls bool) []harness.Hop { return []harness.Hop{pp(tls), pp(tls)} }}
	s := startVersion(t, ctx, topo, tls, version)
	tc, err := s.top.TLS.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	proxyURL := s.top.URLs[0]
	// A second endpoint that a sync must drop: it proves that a sync happened.
	dead := s.top.TLS.Scheme() + "://127.0.0.1:1"
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:        []string{proxyURL, dead},
		TLS:              tc,
		DialTimeout:      5 * time.Second,
		AutoSyncInterval: 100 * time.Millisecond,
		Logger:           zap.NewNop(),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()

	if err := cli.Sync(ctx); err != nil {
		t.Fatalf("sync: %v", err)
	}
	if got := cli.Endpoints(); !slices.Equal(got, []string{proxyURL}) {
		t.Fatalf("after Sync, endpoints = %v, want only the proxy %s", got, proxyURL)
	}

	cli.SetEndpoints(proxyURL, dead)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(10 * time.Second)
	for !slices.Equal(cli.Endpoints(), []string{proxyURL}) {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("no auto sync within 10s: endpoints = %v, want only the proxy %s", cli.Endpoints(), proxyURL)
		}
	}

	if _, err := cli.Put(ctx, "synced", "yes"); err != nil {
		t.Fatalf("put after sync: %v", err)
	}
	resp, err := cli.Get(ctx, "synced")
	if err != nil {
		t.Fatalf("get after sync: %v", err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != "yes" {
		t.Errorf("get after sync = %v, want synced=yes", resp.Kvs)
	}
	if got := cli.Endpoints(); !slices.Equal(got, []string{proxyURL}) {
		t.Errorf("endpoints = %v after the requests, want only the proxy %s", got, proxyURL)
	}

}
