package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/types"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// The guides of README.md ("## Guides") replayed end to end: the proxy is the real binary started with the
// README's command line or drop-in, and every etcdctl line of the guide runs as written, its output compared
// with the README's. Only addresses, ports and certificate paths are substituted (guide.subst), and member IDs
// and timings are masked (maskOutput).

// guide is one "### " subsection of README.md's "## Guides": its shell commands, each with the output the README
// shows under it, and the Environment= lines of its systemd drop-in.
type guide struct {
	cmds []guideCmd
	env  []string
}

type guideCmd struct {
	line string   // as in the README, continuation lines joined
	want []string // the lines the README shows under it
}

// readGuide parses the subsection of README.md whose heading is "### "+title.
func readGuide(t *testing.T, title string) guide {
	t.Helper()
	root, err := harness.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(root, "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	var g guide
	in, found, fence, cont := false, false, "", false
	for _, line := range strings.Split(string(b), "\n") {
		switch {
		case fence == "" && strings.HasPrefix(line, "#"):
			in = line == "### "+title
			found = found || in
			continue
		case !in:
			continue
		case strings.HasPrefix(line, "```"):
			if fence == "" {
				fence = strings.TrimPrefix(line, "```")
			} else {
				fence = ""
			}
			continue
		}
		switch fence {
		case "bash":
			switch {
			case cont:
				c := &g.cmds[len(g.cmds)-1]
				c.line += " " + strings.TrimSpace(strings.TrimSuffix(line, `\`))
				cont = strings.HasSuffix(line, `\`)
			case strings.HasPrefix(line, "$ "):
				g.cmds = append(g.cmds, guideCmd{line: strings.TrimSpace(strings.TrimSuffix(strings.TrimPrefix(line, "$ "), `\`))})
				cont = strings.HasSuffix(line, `\`)
			case line != "" && len(g.cmds) > 0:
				c := &g.cmds[len(g.cmds)-1]
				c.want = append(c.want, line)
			}
		case "ini":
			if kv, ok := strings.CutPrefix(line, "Environment="); ok {
				g.env = append(g.env, strings.Trim(kv, `"`))
			}
		}
	}
	if !found || len(g.cmds) == 0 {
		t.Fatalf("README.md: no guide %q with commands", title)
	}
	// Every command is run by the test (systemctl: the test starts the binary with the drop-in's environment),
	// so that none can go untested.
	for _, c := range g.cmds {
		f := strings.Fields(c.line)
		for len(f) > 1 && strings.Contains(f[0], "=") {
			f = f[1:]
		}
		if !slices.Contains([]string{"etcdctl", "etcd-proxy-proxy", "systemctl"}, f[0]) {
			t.Fatalf("README.md, guide %q: the test does not run %q", title, c.line)
		}
	}
	return g
}

// subst replaces each old string by its new one in every command and drop-in line.
func (g guide) subst(pairs ...string) guide {
	r := strings.NewReplacer(pairs...)
	out := guide{env: make([]string, len(g.env))}
	for i, e := range g.env {
		out.env[i] = r.Replace(e)
	}
	for _, c := range g.cmds {
		want := make([]string, len(c.want))
		for i, w := range c.want {
			want[i] = r.Replace(w)
		}
		out.cmds = append(out.cmds, guideCmd{line: r.Replace(c.line), want: want})
	}
	return out
}

// etcdctl returns the guide's etcdctl commands.
func (g guide) etcdctl() (cmds []guideCmd) {
	for _, c := range g.cmds {
		if slices.Contains(strings.Fields(c.line), "etcdctl") {
			cmds = append(cmds, c)
		}
	}
	return cmds
}

// proxyArgs returns the arguments of the guide's etcd-proxy-proxy command.
func (g guide) proxyArgs(t *testing.T) []string {
	t.Helper()
	for _, c := range g.cmds {
		if f := strings.Fields(c.line); f[0] == "etcd-proxy-proxy" {
			return f[1:]
		}
	}
	t.Fatal("the guide has no etcd-proxy-proxy command")
	return nil
}

var (
	maskID   = regexp.MustCompile(`\b[0-9a-f]{8,16}\b`) // etcdctl v2 prints IDs without leading zeros
	maskTook = regexp.MustCompile(`took = \S+`)
)

// maskOutput masks what varies from run to run: member IDs (the proxy's is derived from its advertise URLs,
// whose port the test chooses) and timings.
func maskOutput(s string) string {
	return maskTook.ReplaceAllString(maskID.ReplaceAllString(strings.TrimSpace(s), "<ID>"), "took = <TIME>")
}

// runGuideEtcdctl runs an etcdctl line of a guide in dir (where its certificate files are), with the
// environment assignments in front of it (ETCDCTL_API=2), and compares its output with the README's.
func runGuideEtcdctl(t *testing.T, ctx context.Context, dir string, c guideCmd) {
	t.Helper()
	bin, err := harness.Tool(ctx, "etcdctl")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(c.line)
	env := readmeEnv("ETCDCTL_")
	for len(f) > 0 && f[0] != "etcdctl" {
		env = append(env, f[0])
		f = f[1:]
	}
	want := maskOutput(strings.Join(c.want, "\n"))
	// A member just back under a leader may answer /health with false until it has caught up (etcd's health
	// check is a linearizable read): the line must show what the README shows within a few seconds.
	deadline := time.Now().Add(10 * time.Second)
	for {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		cmd := exec.CommandContext(cctx, bin, f[1:]...)
		cmd.Dir, cmd.Env = dir, env
		out, err := cmd.CombinedOutput()
		cancel()
		if err == nil && maskOutput(string(out)) == want {
			return
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			t.Errorf("$ %s\n%v; printed:\n%s\nREADME.md shows:\n%s", c.line, err, out, strings.Join(c.want, "\n"))
			return
		}
		pause(ctx, 200*time.Millisecond)
	}
}

// guideProxy is the etcd-proxy-proxy binary, started as a guide says.
type guideProxy struct {
	cmd    *exec.Cmd
	exited chan error
	out    *harness.Buffer
}

func startGuideProxy(t *testing.T, ctx context.Context, dir string, args, env []string, endpoint string, tc *tls.Config) *guideProxy {
	t.Helper()
	p := &guideProxy{exited: make(chan error, 1), out: &harness.Buffer{}}
	p.cmd = exec.CommandContext(ctx, proxyBinary(t, ctx), args...)
	p.cmd.Dir = dir
	p.cmd.Env = append(readmeEnv("ETCD_PROXY_PROXY_", "SSL_CERT_"), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
	})
	if err := readmeWait(ctx, endpoint, tc, p.exited); err != nil {
		t.Fatalf("the proxy did not serve: %v\n%s", err, p.out.String())
	}
	return p
}

// copyFiles copies src (name → path) into dir.
func copyFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	for name, src := range files {
		b, err := os.ReadFile(src)
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, name), b, 0o600)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// TestGuideSecureCluster replays "A secure cluster behind a proxy": three TLS members with client-certificate
// auth (Cluster CA), the proxy with a Cluster-CA identity toward them and a Client-CA certificate toward its
// clients, who hold Client-CA certificates. cluster-health, member list and endpoint health --cluster through
// the proxy show the proxy alone, where the guide's output lists the three members.
func TestGuideSecureCluster(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	g := readGuide(t, "A secure cluster behind a proxy")
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithTLS())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	pc := issueCert(t, e.PKI.Cluster, "guide-proxy-client", harness.ClientAuth())
	ps := issueCert(t, e.PKI.Client, "guide-proxy", harness.ServerAuth())
	cl := issueCert(t, e.PKI.Client, "guide-client", harness.ClientAuth())
	copyFiles(t, dir, map[string]string{
		"ca.pem": e.PKI.Cluster.CertFile, "proxy-client.pem": pc.CertFile, "proxy-client-key.pem": pc.KeyFile,
		"client-ca.pem": e.PKI.Client.CertFile, "proxy.pem": ps.CertFile, "proxy-key.pem": ps.KeyFile,
		"client.pem": cl.CertFile, "client-key.pem": cl.KeyFile,
	})
	addr := closedAddr(t)
	pairs := []string{"127.0.0.1:2379", addr}
	for i, m := range c.Members {
		pairs = append(pairs, fmt.Sprintf("10.0.1.1%d:2379", i), strings.TrimPrefix(m.ClientURL, "https://"))
	}
	g = g.subst(pairs...)
	tc, err := harness.TLSFiles{CAFile: e.PKI.Client.CertFile, CertFile: cl.CertFile, KeyFile: cl.KeyFile}.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	startGuideProxy(t, ctx, dir, g.proxyArgs(t), nil, "https://"+addr, tc)
	for _, cmd := range g.etcdctl() {
		runGuideEtcdctl(t, ctx, dir, cmd)
	}
	// The members' own view, for the contrast the README describes: three members.
	res := e.Etcdctl(2, c.Endpoint()).Run(ctx, "--no-sync", "member", "list")
	if err := res.Check(); err != nil || strings.Count(res.Stdout, "clientURLs=https://") != 3 {
		t.Errorf("member list straight from the members: want the three members: %v\n%s", err, res.Stdout)
	}
}

// TestGuideHTTPSMigration replays "Enabling HTTPS in an existing cluster": a plain cluster whose members also
// listen on a plain local port (the guide's 127.0.0.1:4001), the proxy started once from the README's drop-in
// (its defaults: --proxy-refresh-interval 30 s, the probe every 5 s), then each member migrated as the guide says — peer URL to https
// (member update), then a restart with https peer and client URLs, and at the end its plain listener closed
// (restart) — under a load through the proxy: two v2 writers, a v3 writer, an etcdctl
// watch (v3) and a v2 long-poll watcher. Measured: every acknowledged write stored once, each watcher saw every
// event, the longest pause without an acknowledgement, and the proxy talking https to every member without a
// restart or a reload.
func TestGuideHTTPSMigration(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 90*time.Second)
	g := readGuide(t, "Enabling HTTPS in an existing cluster")
	e := harness.NewTestEnv(t)

	// Every member gets its plain local port (the guide's 4001) and, from the start, the guide's 30-certs.conf:
	// TLS files and client-certificate auth, the URLs still plain. (That step is a restart of each member like
	// the later ones; it is applied at start to keep the test short.)
	var mu sync.Mutex
	legacy := map[string]string{} // member name → "http://127.0.0.1:PORT"
	certs := map[string]harness.TLSFiles{}
	c, err := e.StartCluster(ctx, harness.WithMemberConfig(func(m *harness.Member, cfg *embed.Config) {
		mu.Lock()
		defer mu.Unlock()
		if legacy[m.Name] == "" {
			legacy[m.Name] = "http://" + closedAddr(t)
			certs[m.Name] = issueCert(t, e.PKI.Cluster, "guide-"+m.Name)
		}
		cfg.ListenClientUrls = append(cfg.ListenClientUrls, types.MustNewURLs([]string{legacy[m.Name]})...)
		info := certs[m.Name].TLSInfo()
		info.ClientCertAuth = true
		cfg.ClientTLSInfo, cfg.PeerTLSInfo = info, info
	}))
	if err != nil {
		t.Fatal(err)
	}
	waitLeader(t, ctx, c)

	dir := t.TempDir()
	client1 := issueCert(t, e.PKI.Cluster, "client1", harness.ClientAuth())
	copyFiles(t, dir, map[string]string{"ca.pem": e.PKI.Cluster.CertFile, "client1.pem": client1.CertFile,
		"client1-key.pem": client1.KeyFile})
	listen, legacyListen, metricsAddr := closedAddr(t), closedAddr(t), closedAddr(t)
	pairs := []string{"/etc/ssl/etcd/", dir + "/", "127.0.0.1:2379", listen, "127.0.0.1:4001", legacyListen}
	for i, m := range c.Members {
		pairs = append(pairs, fmt.Sprintf("172.16.0.10%d:2379", i+1), strings.TrimPrefix(m.ClientURL, "http://"))
	}
	g = g.subst(pairs...)
	if len(g.env) == 0 {
		t.Fatal("README.md: the guide has no drop-in")
	}
	// The test's own settings: metrics, to see every endpoint probed healthy, and the log of discovery. The
	// refresh interval and the probe keep their defaults: the migration is faster than one 30 s interval, so
	// the proxy must look again when a member stops answering (discovery.go refreshSoon), not only every 30 s.
	env := append(slices.Clone(g.env), "ETCD_PROXY_PROXY_LISTEN_METRICS_URLS=http://"+metricsAddr,
		"ETCD_PROXY_PROXY_LOG_LEVEL=info")
	base := "http://" + listen
	p := startGuideProxy(t, ctx, dir, nil, env, base, nil)
	defer func() {
		if t.Failed() {
			t.Logf("the proxy's log:\n%s", p.out.String())
		}
	}()
	for _, cmd := range g.etcdctl() {
		runGuideEtcdctl(t, ctx, dir, cmd)
	}

	// The load, all through the proxy.
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{listen}, DialTimeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	startRev := guidePut(t, ctx, cli, "/guide/v3/start")
	startIndex := v2Index(t, ctx, base)
	v3watch := make(chan harness.Result, 1)
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	go func() {
		// etcdctl as the hosts' units run it: through the proxy, no --no-sync (v3 has none), from the revision
		// the load starts at, until the end marker arrives.
		v3watch <- e.Etcdctl(3, harness.Endpoint{URLs: []string{base}}).RunWith(wctx, "", "/guide/v3/end",
			"watch", "--prefix", "/guide/v3/", "--rev", strconv.FormatInt(startRev+1, 10))
	}()
	v2w := &v2Watcher{base: base, dir: "guide-v2", next: startIndex + 1}
	v2done := make(chan struct{})
	go func() { defer close(v2done); v2w.run(ctx) }()

	ws := newWriters("v2w", 2, base)
	v3 := &v3Writer{cli: cli}
	done := make(chan struct{})
	var wg sync.WaitGroup
	for _, w := range ws {
		w.pace = 10 * time.Millisecond // the v2 watcher reads one event per request: it must keep up
		wg.Go(func() { w.run(ctx, "guide-v2", done) })
	}
	wg.Go(func() { v3.run(ctx, done) })
	pause(ctx, 500*time.Millisecond)
	began := time.Now()

	migrate := func(step string, m *harness.Member, before func(), change func(*embed.Config)) {
		t.Helper()
		if c.Leader() == m {
			other := slices.IndexFunc(c.Members, func(o *harness.Member) bool { return o != m })
			if err := c.MoveLeader(ctx, other); err != nil {
				t.Fatal(err)
			}
		}
		if before != nil {
			before()
		}
		t0 := time.Now()
		stopMember(t, ctx, m)
		m.Reconfigure(change)
		restartMember(t, ctx, m)
		waitLeader(t, ctx, c)
		t.Logf("%s %s: back under a leader %v after its stop", step, m.Name, time.Since(t0).Round(time.Millisecond))
		// The hosts' etcdctl lines answer the same at every step.
		for _, cmd := range g.etcdctl() {
			runGuideEtcdctl(t, ctx, dir, cmd)
		}
	}
	// 1. Per member: its peer URL to https (member update, on a member's local port as the guide does), then
	// its 40-tls.conf: client and peer URLs on https, the local port kept.
	for _, m := range c.Members {
		id := types.ID(m.ID).String()
		peer := strings.Replace(m.PeerURL, "http://", "https://", 1)
		client := strings.Replace(m.ClientURL, "http://", "https://", 1)
		local := harness.Endpoint{URLs: []string{legacy[c.Members[0].Name]}}
		if m == c.Members[0] {
			local.URLs = []string{legacy[c.Members[1].Name]}
		}
		migrate("https", m, func() {
			if err := e.Etcdctl(3, local).Run(ctx, "member", "update", id, "--peer-urls="+peer).Check(); err != nil {
				t.Fatal(err)
			}
		}, func(cfg *embed.Config) {
			cfg.ListenClientUrls = types.MustNewURLs([]string{client, legacy[m.Name]})
			cfg.AdvertiseClientUrls = types.MustNewURLs([]string{client})
			cfg.ListenPeerUrls = types.MustNewURLs([]string{peer})
			cfg.AdvertisePeerUrls = types.MustNewURLs([]string{peer})
		})
	}
	// 2. The plain local ports closed: only https is left.
	for _, m := range c.Members {
		migrate("plain port closed", m, nil, func(cfg *embed.Config) {
			cfg.ListenClientUrls = cfg.AdvertiseClientUrls
		})
	}
	// A refresh and a probe later the proxy must use the https URLs alone (checked below); the load goes on
	// over them for a moment.
	pause(ctx, time.Second)
	ended := time.Now()
	close(done)
	wg.Wait()
	t.Logf("migration under load: %v", ended.Sub(began).Round(time.Millisecond))

	// The end markers, then every watcher must have seen every acknowledged write.
	hc := &http.Client{Timeout: 5 * time.Second}
	code, body := do(ctx, hc, http.MethodPost, base+"/v2/keys/guide-v2", "value=end")
	var marker struct {
		Node struct {
			Key string `json:"key"`
		} `json:"node"`
	}
	if code/100 != 2 || json.Unmarshal([]byte(body), &marker) != nil {
		t.Errorf("v2 end marker: %d %s", code, body)
	}
	guidePut(t, ctx, cli, "/guide/v3/end")
	select {
	case <-v2done:
	case <-time.After(10 * time.Second):
		t.Errorf("the v2 watcher did not see the end marker within 10 s")
	}
	var watch harness.Result
	select {
	case watch = <-v3watch:
	case <-time.After(10 * time.Second):
		// Needs the stream fix (contract rule 6): a watch whose member stopped must end (gRPC Unavailable), so
		// that etcdctl resumes it on another member from the revision after its last event.
		t.Errorf("etcdctl watch did not print the end marker within 10 s of it being written: its stream hangs")
		wcancel()
		watch = <-v3watch
	}

	r := loadRun{stopAt: began, end: ended}
	var worst time.Duration
	for _, w := range ws {
		_, gap, _ := w.afterStop(r)
		t.Logf("%s: %d acked, %d failed; longest pause without an ack %v; errors: %s", w.name, len(w.acks), len(w.errs),
			gap.Round(time.Millisecond), w.errSummary(r))
		worst = max(worst, gap)
	}
	gap := v3.worstGap(began, ended)
	t.Logf("v3 writer: %d acked, %d failed; longest pause without an ack %v; errors: %v", len(v3.acks), len(v3.errs),
		gap.Round(time.Millisecond), v3.errs[:min(len(v3.errs), 5)])
	worst = max(worst, gap)
	t.Logf("longest pause without an acknowledgement during the migration: %v", worst.Round(time.Millisecond))
	if worst > 3*time.Second {
		t.Errorf("a writer went %v without an acknowledgement during the migration, want ≤ 3s", worst)
	}

	// The read-back counts the writers' values only.
	if code, body := do(ctx, hc, http.MethodDelete, base+"/v2/keys"+marker.Node.Key, ""); code != http.StatusOK {
		t.Errorf("deleting the v2 end marker: %d %s", code, body)
	}
	checkReadBack(t, ctx, base, "guide-v2", ws)
	v3.checkStored(t, ctx, cli)
	var acked []string
	for _, w := range ws {
		for _, a := range w.acks {
			acked = append(acked, a.value)
		}
	}
	checkSeen(t, "v2 watcher", acked, v2w.values)
	// Needs the stream fix too (see the wait for the end marker above): without it the watch stops at the
	// first restart of the member its stream was on.
	checkSeen(t, "etcdctl watch (v3)", v3.keys(), watchedKeys(watch.Stdout))

	// The proxy adopted every https URL by itself: it was started once and never signalled.
	select {
	case err := <-p.exited:
		t.Fatalf("the proxy exited: %v\n%s", err, p.out.String())
	default:
	}
	var want []string
	for _, m := range c.Members {
		want = append(want, m.ClientURL)
		if !strings.HasPrefix(m.ClientURL, "https://") {
			t.Fatalf("%s still advertises %s", m.Name, m.ClientURL)
		}
	}
	slices.Sort(want)
	// Discovery logs every change of the list; the probe then finds each endpoint healthy over TLS.
	actx, cancel := context.WithTimeout(ctx, 7*time.Second)
	defer cancel()
	eventually(t, actx, "the proxy's endpoints to be the members' https URLs", func() (bool, string) {
		got := lastEndpoints(p.out.String())
		return slices.Equal(got, want), fmt.Sprintf("logged last: %v, want %v", got, want)
	})
	eventually(t, actx, "every upstream endpoint probed healthy over https", func() (bool, string) {
		m := scrapeHealthy(ctx, "http://"+metricsAddr+"/metrics")
		return len(m) == len(want) && !slices.Contains(m, false), fmt.Sprintf("upstream_healthy: %v", m)
	})
	for _, cmd := range g.etcdctl() {
		runGuideEtcdctl(t, ctx, dir, cmd)
	}

	// The README's last step, for the proxy's next start: the same drop-in with https in
	// ETCD_PROXY_PROXY_UPSTREAM. A second proxy started from it serves the same commands.
	next := slices.Clone(env)
	for i, kv := range next {
		if strings.HasPrefix(kv, "ETCD_PROXY_PROXY_UPSTREAM=") {
			next[i] = strings.ReplaceAll(kv, "http://", "https://")
		}
	}
	listen2, legacy2, metrics2 := closedAddr(t), closedAddr(t), closedAddr(t)
	r2 := strings.NewReplacer(listen, listen2, legacyListen, legacy2, metricsAddr, metrics2)
	for i, kv := range next {
		next[i] = r2.Replace(kv)
	}
	startGuideProxy(t, ctx, dir, nil, next, "http://"+listen2, nil)
	for _, cmd := range g.etcdctl() {
		cmd.line = r2.Replace(cmd.line)
		for i, w := range cmd.want {
			cmd.want[i] = r2.Replace(w)
		}
		runGuideEtcdctl(t, ctx, dir, cmd)
	}
}

// guidePut writes key and returns the revision it made.
func guidePut(t *testing.T, ctx context.Context, cli *clientv3.Client, key string) int64 {
	t.Helper()
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := cli.Put(pctx, key, key)
	if err != nil {
		t.Fatalf("put %s through the proxy: %v", key, err)
	}
	return resp.Header.Revision
}

// v2Index is the store's X-Etcd-Index: a watch from the next index sees every later change.
func v2Index(t *testing.T, ctx context.Context, base string) uint64 {
	t.Helper()
	resp, _, err := doResp(ctx, &http.Client{Timeout: 5 * time.Second}, http.MethodGet, base+"/v2/keys/", "")
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.ParseUint(resp.Header.Get("X-Etcd-Index"), 10, 64)
	if err != nil {
		t.Fatalf("X-Etcd-Index %q: %v", resp.Header.Get("X-Etcd-Index"), err)
	}
	return n
}

// v2Watcher long-polls a directory through the proxy one event at a time, as etcd's v2 clients do: each poll
// waits from the index after the last event seen, and a poll that fails or outlives its timeout is issued again
// from the same index, so no event can be missed whatever happens to the connection. It stops at the value "end".
type v2Watcher struct {
	base, dir string
	next      uint64
	values    []string
	polls     int
}

func (w *v2Watcher) run(ctx context.Context) {
	cl := &http.Client{Timeout: 2 * time.Second}
	defer cl.CloseIdleConnections()
	for ctx.Err() == nil {
		w.polls++
		u := fmt.Sprintf("%s/v2/keys/%s?wait=true&recursive=true&waitIndex=%d", w.base, w.dir, w.next)
		resp, body, err := doResp(ctx, cl, http.MethodGet, u, "")
		if err != nil || resp.StatusCode != http.StatusOK {
			pause(ctx, 20*time.Millisecond)
			continue
		}
		var ev struct {
			Node struct {
				Value         string `json:"value"`
				ModifiedIndex uint64 `json:"modifiedIndex"`
			} `json:"node"`
		}
		if json.Unmarshal(body, &ev) != nil || ev.Node.ModifiedIndex < w.next {
			pause(ctx, 20*time.Millisecond)
			continue
		}
		w.next = ev.Node.ModifiedIndex + 1
		if ev.Node.Value == "end" {
			return
		}
		w.values = append(w.values, ev.Node.Value)
	}
}

// v3Writer puts in-order keys through the proxy, one at a time, each acknowledged or not.
type v3Writer struct {
	cli  *clientv3.Client
	acks []ack // value: the key
	errs []string
}

func (w *v3Writer) run(ctx context.Context, done <-chan struct{}) {
	for seq := 0; ; seq++ {
		select {
		case <-done:
			return
		case <-ctx.Done():
			return
		default:
		}
		key := fmt.Sprintf("/guide/v3/%06d", seq)
		call := time.Now()
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		_, err := w.cli.Put(pctx, key, key)
		cancel()
		if err != nil {
			w.errs = append(w.errs, err.Error())
		} else {
			w.acks = append(w.acks, ack{key, call, time.Now()})
		}
		pause(ctx, 10*time.Millisecond)
	}
}

func (w *v3Writer) keys() []string {
	var k []string
	for _, a := range w.acks {
		k = append(k, a.value)
	}
	return k
}

// worstGap is the longest time between from and to without an acknowledgement.
func (w *v3Writer) worstGap(from, to time.Time) time.Duration {
	prev, worst := from, time.Duration(0)
	for _, a := range w.acks {
		if a.ret.Before(from) || a.ret.After(to) {
			continue
		}
		worst, prev = max(worst, a.ret.Sub(prev)), a.ret
	}
	return max(worst, to.Sub(prev))
}

// checkStored reads the v3 keys back: every acknowledged key there, each written once (version 1).
func (w *v3Writer) checkStored(t *testing.T, ctx context.Context, cli *clientv3.Client) {
	t.Helper()
	gctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := cli.Get(gctx, "/guide/v3/0", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	version := map[string]int64{}
	for _, kv := range resp.Kvs {
		version[string(kv.Key)] = kv.Version
	}
	bad := 0
	for _, k := range w.keys() {
		if version[k] != 1 {
			if bad++; bad <= 5 {
				t.Errorf("v3 key %s: version %d, want 1 (0: lost, more: written again)", k, version[k])
			}
		}
	}
	t.Logf("v3 read back: %d keys; %d puts acknowledged, %d failed; %d acknowledged keys not stored exactly once",
		len(resp.Kvs), len(w.acks), len(w.errs), bad)
}

// watchedKeys are the keys of etcdctl watch's output (PUT, key, value; the markers left out).
func watchedKeys(out string) []string {
	var keys []string
	sc := bufio.NewScanner(strings.NewReader(out))
	prev := ""
	for sc.Scan() {
		if prev == "PUT" && strings.HasPrefix(sc.Text(), "/guide/v3/0") {
			keys = append(keys, sc.Text())
		}
		prev = sc.Text()
	}
	return keys
}

// checkSeen: a watcher saw every acknowledged write exactly once.
func checkSeen(t *testing.T, who string, acked, seen []string) {
	t.Helper()
	n := map[string]int{}
	for _, v := range seen {
		n[v]++
	}
	missing, twice := 0, 0
	for _, v := range acked {
		switch {
		case n[v] == 0:
			if missing++; missing <= 3 {
				t.Errorf("%s: never saw acknowledged write %s", who, v)
			}
		case n[v] > 1:
			twice++
		}
	}
	t.Logf("%s: %d events seen; of %d acknowledged writes %d missing, %d seen more than once", who, len(seen), len(acked), missing, twice)
	if missing > 0 || twice > 0 {
		t.Errorf("%s: %d acknowledged writes missing, %d seen more than once", who, missing, twice)
	}
}

var endpointsLog = regexp.MustCompile(`upstream endpoints changed" count=\d+ urls="\[([^\]]*)\]"`)

// lastEndpoints is the endpoint list the proxy logged last (discovery logs every change), sorted.
func lastEndpoints(log string) []string {
	m := endpointsLog.FindAllStringSubmatch(log, -1)
	if len(m) == 0 {
		return nil
	}
	urls := strings.Fields(m[len(m)-1][1])
	slices.Sort(urls)
	return urls
}

var healthyMetric = regexp.MustCompile(`(?m)^etcd_proxy_proxy_upstream_healthy\{endpoint="\d+"\} (\d)`)

// scrapeHealthy returns etcd_proxy_proxy_upstream_healthy for each endpoint.
func scrapeHealthy(ctx context.Context, u string) []bool {
	resp, body, err := doResp(ctx, &http.Client{Timeout: 2 * time.Second}, http.MethodGet, u, "")
	if err != nil || resp.StatusCode != http.StatusOK {
		return nil
	}
	var h []bool
	for _, m := range healthyMetric.FindAllStringSubmatch(string(body), -1) {
		h = append(h, m[1] == "1")
	}
	return h
}

// TestGuideOldDropIn: after the migration, a proxy started from the drop-in as it was before (http:// seeds, the
// members now on https on the same ports) still finds the members: a member closes a plain connection to its
// TLS port, and discovery then asks it over https. Without that, every request fails (502) until someone edits
// the drop-in.
func TestGuideOldDropIn(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 30*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithTLS())
	if err != nil {
		t.Fatal(err)
	}
	old := c.Endpoint()
	for i, u := range old.URLs {
		old.URLs[i] = strings.Replace(u, "https://", "http://", 1)
	}
	p, err := e.StartProxyProxy(ctx, old, harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.DiscoverMembers = true
		cfg.RefreshInterval = -1 // once, at start: what is found then is what is used
	}})
	if err != nil {
		t.Fatal(err)
	}
	base := p.Endpoint.URLs[0]
	cl := &http.Client{Timeout: 5 * time.Second}
	if code, body := do(ctx, cl, http.MethodPut, base+"/v2/keys/guide-old-drop-in", "value=1"); code/100 != 2 {
		t.Fatalf("PUT through a proxy started with the old http seeds: %d %s", code, body)
	}
	if code, body := do(ctx, cl, http.MethodGet, base+"/v2/keys/guide-old-drop-in?quorum=true", ""); code != http.StatusOK {
		t.Errorf("GET through a proxy started with the old http seeds: %d %s", code, body)
	}
}

// TestGuideSchemeChangeAdopted: with the default --proxy-refresh-interval (30 s), a member that restarts with its
// client URL moved from http to https on the same port is adopted within moments: the probe finds the old URL
// unreachable, and discovery looks again at once instead of at the next interval. Without that the proxy has
// no usable endpoint for up to 30 s when every member moves within one interval (here: the only one).
func TestGuideSchemeChangeAdopted(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 40*time.Second)
	e := harness.NewTestEnv(t)
	var server harness.TLSFiles
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithMemberConfig(func(m *harness.Member, cfg *embed.Config) {
		if server.IsZero() {
			server = issueCert(t, e.PKI.Cluster, "guide-scheme-"+m.Name)
		}
		info := server.TLSInfo()
		info.ClientCertAuth = true
		cfg.ClientTLSInfo = info
	}))
	if err != nil {
		t.Fatal(err)
	}
	m := c.Members[0]
	ep := c.Endpoint()
	ep.TLS = issueCert(t, e.PKI.Cluster, "guide-scheme-proxy", harness.ClientAuth())
	p, err := e.StartProxyProxy(ctx, ep, harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
		cfg.DiscoverMembers = true
		cfg.RefreshInterval = proxy.DefaultRefreshInterval
		cfg.UpstreamHealthInterval = 250 * time.Millisecond
	}})
	if err != nil {
		t.Fatal(err)
	}
	key := p.Endpoint.URLs[0] + "/v2/keys/guide-scheme"
	cl := &http.Client{Timeout: 2 * time.Second}
	if code, body := do(ctx, cl, http.MethodPut, key, "value=1"); code/100 != 2 {
		t.Fatalf("PUT through the proxy: %d %s", code, body)
	}
	stopMember(t, ctx, m)
	https := strings.Replace(m.ClientURL, "http://", "https://", 1)
	m.Reconfigure(func(cfg *embed.Config) {
		cfg.ListenClientUrls = types.MustNewURLs([]string{https})
		cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	})
	restartMember(t, ctx, m)
	back := time.Now()
	var last string
	for {
		code, body := do(ctx, cl, http.MethodGet, key+"?quorum=true", "")
		if code == http.StatusOK {
			break
		}
		last = fmt.Sprintf("%d %s", code, body)
		if time.Since(back) > 5*time.Second {
			t.Fatalf("no answer through the proxy within 5 s of the member serving on https (refresh interval %v; last: %s)",
				proxy.DefaultRefreshInterval, last)
		}
		pause(ctx, 50*time.Millisecond)
	}
	t.Logf("first answer through the proxy %v after the member served on https (last failure: %s)",
		time.Since(back).Round(time.Millisecond), last)
}
