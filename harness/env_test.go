package harness

import (
	"cmp"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestNormalize(t *testing.T) {
	t.Parallel()
	e, err := NewEnv(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e.Register("127.0.0.1:41234", "member-0")
	e.Register("127.0.0.1:4123", "member-1") // a prefix of the one above: longest wins
	e.Register("127.0.0.1:41235", "member-0-peer")
	e.Register("8e9e05c52164694d", "member-0-id")
	e.RegisterWord("vm", "$HOSTNAME")
	tests := []struct{ in, want string }{
		{"http://127.0.0.1:41234 http://127.0.0.1:4123/x", "http://member-0 http://member-1/x"},
		{"8e9e05c52164694d: name=member-0 peerURLs=http://127.0.0.1:41235", "member-0-id: name=member-0 peerURLs=http://member-0-peer"},
		{"dial tcp 127.0.0.1:9; localhost:80 [::1]:2379", "dial tcp 127.0.0.1:PORT; localhost:PORT [::1]:PORT"},
		{e.Dir + "/pki/ca.crt", "$DIR/pki/ca.crt"},
		{filepath.Join(os.TempDir(), "x-1/y.log") + " here", "$TMP here"},
		{"member 3a35fe62e391d8f is healthy; 1234567890123456 stays", "member <ID> is healthy; 1234567890123456 stays"},
		{`{"action":"get","node":{"key":"/foo","value":"bar","modifiedIndex":12,"createdIndex":9}}`, `{"action":"get","node":{"key":"/foo","value":"bar","modifiedIndex":<N>,"createdIndex":<N>}}`},
		{`"header":{"revision":7,"raft_term":3}`, `"header":{"revision":<N>,"raft_term":<N>}`},
		{"X-Etcd-Index: 42\nModified-Index: 5", "X-Etcd-Index: <N>\nModified-Index: <N>"},
		{"at 2026-11-22T17:58:08.221592Z took 1.25ms, Date: Sun, 22 Nov 2026 17:58:08 GMT", "at <TIME> took <DUR>, Date: <TIME>"},
		{"endpoints(http://member-2,http://member-0,http://member-1) after", "endpoints(http://member-0,http://member-1,http://member-2) after"},
		{"Cluster-Endpoints: https://member-1, https://member-0\n", "Cluster-Endpoints: https://member-0, https://member-1\n"},
		{"a, started, member-1, http://member-1-peer, http://member-1, false", "a, started, member-1, http://member-1-peer, http://member-1, false"},
		{"0, started, vm, , x; vmstat", "0, started, $HOSTNAME, , x; vmstat"},
	}
	for _, tt := range tests {
		if got := e.Normalize(tt.in); got != tt.want {
			t.Errorf("Normalize(%q)\n got %q\nwant %q", tt.in, got, tt.want)
		}
	}
}

func TestEnvCloseOrder(t *testing.T) {
	t.Parallel()
	e, err := NewEnv(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var order []string
	boom := errors.New("boom")
	e.Defer("a", func() error { order = append(order, "a"); return nil })
	e.Defer("b", func() error { order = append(order, "b"); return boom })
	e.Defer("c", func() error { order = append(order, "c"); return errors.New("bang") })
	err = e.Close()
	if want := []string{"c", "b", "a"}; !reflect.DeepEqual(order, want) {
		t.Errorf("teardown order %v, want %v", order, want)
	}
	if !errors.Is(err, boom) || !strings.Contains(err.Error(), "stop c: bang") || !strings.Contains(err.Error(), "stop b: boom") {
		t.Errorf("Close error = %v, want both failures named", err)
	}
	if err := e.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

func TestGoldenFormat(t *testing.T) {
	t.Parallel()
	r := Result{API: 2, Args: []string{"--endpoints=http://x", "get", "foo"}, Stdout: "bar\n", Exit: 4}
	got := string(Golden(r, strings.ToUpper))
	want := "-- cmd --\nETCDCTL_API=2 ETCDCTL --ENDPOINTS=HTTP://X GET FOO\n-- stdout --\nBAR\n-- stderr --\n-- exit --\n4\n"
	if got != want {
		t.Errorf("Golden =\n%s\nwant\n%s", got, want)
	}
}

// TestMemberRestart: a member of every version (embedded, and processes of the newer lines) stops, refuses
// clients, and restarts on its data.
func TestMemberRestart(t *testing.T) {
	t.Parallel()
	for _, v := range append([]string{""}, EtcdVersions...) {
		t.Run("etcd"+cmp.Or(v, "3.5"), func(t *testing.T) {
			t.Parallel()
			testMemberRestart(t, v)
		})
	}
}

func testMemberRestart(t *testing.T, version string) {
	ctx := testContext(t, 60*time.Second)
	e := NewTestEnv(t)
	c, err := e.StartCluster(ctx, WithMembers(1), WithVersion(version))
	if err != nil {
		t.Fatal(err)
	}
	ctl := e.Etcdctl(3, c.Endpoint())
	if err := ctl.Run(ctx, "put", "k", "v1").Check(); err != nil {
		t.Fatal(err)
	}
	m := c.Members[0]
	if err := m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if m.Running() {
		t.Fatal("member still running after Stop")
	}
	if res := ctl.Run(ctx, "--dial-timeout=500ms", "--command-timeout=1s", "get", "k"); res.Exit == 0 {
		t.Fatalf("get from a stopped member succeeded: %q", res.Stdout)
	}
	if err := m.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	res := ctl.Run(ctx, "get", "--print-value-only", "k")
	if err := res.Check(); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(res.Stdout); got != "v1" {
		t.Errorf("after restart k = %q, want v1", got)
	}
}

// TestProcessClusterLeader: the leader of a cluster of etcd processes is found and moved, as an embedded one's.
func TestProcessClusterLeader(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := NewTestEnv(t)
	v := EtcdVersions[len(EtcdVersions)-1]
	c, err := e.StartCluster(ctx, WithVersion(v), WithTLS())
	if err != nil {
		t.Fatal(err)
	}
	if c.Version != v || c.ID == 0 || len(c.Members) != 3 {
		t.Fatalf("cluster: version %q, ID %x, %d members; want %s, an ID, 3", c.Version, c.ID, len(c.Members), v)
	}
	lead := c.Leader()
	if lead == nil {
		t.Fatal("no leader")
	}
	target := c.Members[0]
	if lead == target {
		target = c.Members[1]
	}
	if err := c.MoveLeader(ctx, slices.Index(c.Members, target)); err != nil {
		t.Fatal(err)
	}
	if got := c.Leader(); got != target {
		t.Errorf("leader after MoveLeader = %v, want %s", got, target.Name)
	}
	res := e.Etcdctl(3, c.Endpoint()).Run(ctx, "endpoint", "status", "-w", "json")
	if err := res.Check(); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(res.Stdout, `"version":"`+v+"."); n != 3 {
		t.Errorf("endpoint status shows version %s.x %d times, want 3:\n%s", v, n, res.Stdout)
	}
}

// TestProcessMemberSignal: a member process of the pinned etcd serves v2 as an embedded member, exits on SIGKILL
// (Exited, Running), and Restart starts a new process on its data.
func TestProcessMemberSignal(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := NewTestEnv(t)
	c, err := e.StartCluster(ctx, WithMembers(1), WithProcesses())
	if err != nil {
		t.Fatal(err)
	}
	m := c.Members[0]
	ctl := e.Etcdctl(2, c.Endpoint())
	if err := ctl.Run(ctx, "set", "k", "v1").Check(); err != nil {
		t.Fatal(err)
	}
	pid := m.Pid()
	if pid == 0 || c.Leader() != m {
		t.Fatalf("pid %d, leader %v; want a pid and %s", pid, c.Leader(), m.Name)
	}
	if err := m.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.Exited():
	case <-ctx.Done():
		t.Fatal("no exit after SIGKILL")
	}
	if m.Running() {
		t.Error("member running after its process exited")
	}
	if err := m.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if got := m.Pid(); got == 0 || got == pid {
		t.Errorf("pid after Restart %d, before %d", got, pid)
	}
	res := ctl.Run(ctx, "get", "k")
	if err := res.Check(); err != nil {
		t.Fatal(err)
	}
	if got := strings.TrimSpace(res.Stdout); got != "v1" {
		t.Errorf("after restart k = %q, want v1", got)
	}
}

func TestTool(t *testing.T) {
	t.Parallel()
	root, err := ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "harness", "env.go")); err != nil {
		t.Errorf("module root %s: %v", root, err)
	}
	ctx := testContext(t, 5*time.Minute)
	for _, name := range []string{"etcd", "etcdctl", "etcd-3.6", "etcd-3.7"} {
		p, err := Tool(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if p2, _ := Tool(ctx, name); p2 != p {
			t.Errorf("Tool(%s) changed from %s to %s", name, p, p2)
		}
	}
	if _, err := Tool(ctx, "etcdutl"); err == nil {
		t.Error("Tool(etcdutl) succeeded; only etcd, etcdctl and the newer etcd lines are pinned")
	}
}
