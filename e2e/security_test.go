package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	pb "go.etcd.io/etcd/api/v3/etcdserverpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/rules"
)

// The contract's third point: no upstream URL, host, IP or port appears in any response byte. These tests crawl
// every client-API endpoint through every topology and look for the addresses of everything below the top.

// leakTopologies are the chains the crawler runs through, each plain and with TLS on every part. The grpc-proxy
// advertises itself when plain (MemberList answered by the grpc-proxy with its own address) and forwards
// MemberList to the members with TLS (the members' URLs): both must come out as the proxy-proxy alone.
var leakTopologies = []topology{
	{"pp-members", func(tls bool) []harness.Hop { return []harness.Hop{pp(tls)} }},
	{"pp-stock", func(tls bool) []harness.Hop { return []harness.Hop{harness.StockV2Hop{TLS: tls}, pp(tls)} }},
	{"pp-pp-stock", func(tls bool) []harness.Hop {
		return []harness.Hop{harness.StockV2Hop{TLS: tls}, pp(tls), pp(tls)}
	}},
	{"pp-grpc", func(tls bool) []harness.Hop {
		return []harness.Hop{harness.GRPCProxyHop{TLS: tls, Advertise: !tls}, pp(tls)}
	}},
}

// leakSet is what must never reach a client of the top: every URL and host:port of every layer below it and of
// the members' peer side, and their ports as ":PORT" (not followed by another digit).
type leakSet struct {
	needles []string
	ports   *regexp.Regexp
}

func newLeakSet(r *harness.Running, extra ...string) *leakSet {
	var urls []string
	if r != nil {
		for _, l := range r.Layers[:len(r.Layers)-1] {
			urls = append(urls, l.URLs...)
		}
		for _, m := range r.Cluster.Members {
			urls = append(urls, m.ClientURL, m.PeerURL)
		}
	}
	urls = append(urls, extra...)
	return leakSetOf(urls)
}

func leakSetOf(urls []string) *leakSet {
	l := &leakSet{}
	var ports []string
	for _, raw := range urls {
		u, err := url.Parse(raw)
		if err != nil || u.Host == "" {
			panic(fmt.Sprintf("leakSet: bad URL %q", raw))
		}
		l.needles = append(l.needles, raw, u.Host)
		ports = append(ports, regexp.QuoteMeta(u.Port()))
	}
	slices.Sort(l.needles)
	l.needles = slices.Compact(l.needles)
	slices.Sort(ports)
	l.ports = regexp.MustCompile(`:(?:` + strings.Join(slices.Compact(ports), "|") + `)(?:[^0-9]|$)`)
	return l
}

// find returns what of the set s contains, with some context around the first hit.
func (l *leakSet) find(s string) (hits []string, context string) {
	first := -1
	for _, n := range l.needles {
		if i := strings.Index(s, n); i >= 0 {
			hits = append(hits, n)
			if first < 0 || i < first {
				first = i
			}
		}
	}
	for _, m := range l.ports.FindAllStringIndex(s, -1) {
		hits = append(hits, strings.TrimRight(s[m[0]:m[1]], "\"',;/) \n]}"))
		if first < 0 || m[0] < first {
			first = m[0]
		}
	}
	if first < 0 {
		return nil, ""
	}
	from, to := max(0, first-120), min(len(s), first+120)
	return hits, s[from:to]
}

func leaksOf(l *leakSet, s string) []string {
	hits, _ := l.find(s)
	return hits
}

// check fails t when s contains an upstream address.
func (l *leakSet) check(t *testing.T, what, s string) {
	t.Helper()
	if hits, ctx := l.find(s); hits != nil {
		t.Errorf("LEAK in %s: %q\n…%s…", what, hits, ctx)
	}
}

// dumpResponse is every byte a client gets of resp: status, headers, body and trailers.
func dumpResponse(resp *http.Response, body []byte) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s\n", resp.Proto, resp.Status)
	dumpHeader(&b, resp.Header)
	b.WriteString("\n")
	b.Write(body)
	dumpHeader(&b, resp.Trailer)
	return b.String()
}

func dumpHeader(b *strings.Builder, h http.Header) {
	keys := make([]string, 0, len(h))
	for k := range h {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		for _, v := range h[k] {
			fmt.Fprintf(b, "%s: %s\n", k, v)
		}
	}
}

// secProbe is one request of the crawler.
type secProbe struct {
	method, path, body, ctype string
	header                    map[string]string
	// want lists acceptable statuses when the topology serves that API; nil accepts any.
	want []int
	// api is "v2" (etcd's HTTP API: v2, /version …, which the grpc-proxy does not serve), "v3" (the JSON
	// gateway, which needs gRPC upstream: nothing through the stock v2 proxy) or "" (every topology).
	api string
	// stream: the answer does not end by itself; it is read until a short deadline.
	stream bool
	// mayEnd: a stream that the hops below may end by themselves (checked for its bytes only).
	mayEnd bool
}

// secResult is a crawled answer.
type secResult struct {
	status int
	header http.Header
	body   []byte
	dump   string
	err    error
	// open: a stream was still open when the client's deadline ended the read.
	open bool
}

// secDo sends p to base and returns everything the client got. Redirects are not followed: their Location is
// part of what is checked.
func secDo(ctx context.Context, c *http.Client, base string, p secProbe) secResult {
	if p.stream {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Second)
		defer cancel()
	}
	var body io.Reader
	if p.body != "" {
		body = strings.NewReader(p.body)
	}
	req, err := http.NewRequestWithContext(ctx, p.method, base+p.path, body)
	if err != nil {
		return secResult{err: err}
	}
	if p.ctype != "" {
		req.Header.Set("Content-Type", p.ctype)
	}
	for k, v := range p.header {
		req.Header.Set(k, v)
	}
	cl := *c
	cl.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	resp, err := cl.Do(req)
	if err != nil {
		return secResult{err: err, dump: err.Error()}
	}
	defer resp.Body.Close()
	if p.stream {
		b, all, open, rerr := readStream(ctx, resp.Body)
		res := secResult{status: resp.StatusCode, header: resp.Header, body: b, dump: dumpResponse(resp, all), open: open, err: rerr}
		if rerr != nil {
			res.dump += rerr.Error()
		}
		return res
	}
	b, rerr := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	if rerr != nil {
		return secResult{status: resp.StatusCode, header: resp.Header, body: b, err: rerr, dump: dumpResponse(resp, b) + rerr.Error()}
	}
	return secResult{status: resp.StatusCode, header: resp.Header, body: b, dump: dumpResponse(resp, b)}
}

// readStream reads a streamed answer until it ends or ctx does: open reports the latter. before is what came
// before ctx ended, all is every byte read (for the leak check). What a read returns after the deadline may be
// the server's answer to the client's own hang-up: closing a TLS connection sends close_notify before the
// socket closes, the server sees its client go and ends the stream ("context canceled" and a clean end), and
// the client can still read that, which net/http then returns as io.EOF, not as the cancellation.
func readStream(ctx context.Context, r io.Reader) (before, all []byte, open bool, err error) {
	buf := make([]byte, 32<<10)
	for len(all) < 8<<20 {
		n, rerr := r.Read(buf)
		all = append(all, buf[:n]...)
		if ctx.Err() != nil {
			return before, all, true, nil
		}
		before = all
		if rerr == io.EOF {
			return before, all, false, nil
		}
		if rerr != nil {
			return before, all, false, rerr
		}
	}
	return before, all, false, nil
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

// leakSetup writes what the probes read, directly on the members: v2 keys (not on members of 3.6 and later,
// which have no v2), and v3 revisions of "foo" of which the first ones are compacted away. It returns the
// modified index of /leak/a (for a wait that answers at once).
func leakSetup(t *testing.T, ctx context.Context, r *harness.Running) (waitIndex uint64) {
	t.Helper()
	members := r.Cluster.Endpoint()
	c := httpClient(t, members)
	base := members.URLs[0] + "/v2/keys"
	var v2Keys []struct{ path, form string }
	if r.Cluster.Version == "" {
		v2Keys = []struct{ path, form string }{
			{"/leak/a", "value=1"}, {"/leak/b", "value=2"}, {"/leak/del", "value=3"}, {"/leakdir/x", "value=4"},
		}
	}
	for _, w := range v2Keys {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPut, base+w.path, strings.NewReader(w.form))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var got struct {
			Node struct{ ModifiedIndex uint64 }
		}
		err = json.NewDecoder(resp.Body).Decode(&got)
		resp.Body.Close()
		if err != nil || resp.StatusCode/100 != 2 {
			t.Fatalf("setup PUT %s: %s %v", w.path, resp.Status, err)
		}
		if w.path == "/leak/a" {
			waitIndex = got.Node.ModifiedIndex
		}
	}
	cli := secV3Client(t, members)
	var rev int64
	for i := range 3 {
		resp, err := cli.Put(ctx, "foo", "bar"+strconv.Itoa(i))
		if err != nil {
			t.Fatal(err)
		}
		rev = resp.Header.Revision
	}
	if _, err := cli.Compact(ctx, rev); err != nil {
		t.Fatal(err)
	}
	return waitIndex
}

// secV3Client is a clientv3 client of ep (no auto-sync: it stays on ep).
func secV3Client(t *testing.T, ep harness.Endpoint) *clientv3.Client {
	t.Helper()
	tc, err := ep.TLS.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: ep.URLs, TLS: tc, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// secGRPCConn is a raw gRPC connection to the first URL of ep, for reading headers and trailers.
func secGRPCConn(t *testing.T, ep harness.Endpoint) *grpc.ClientConn {
	t.Helper()
	u, err := url.Parse(ep.URLs[0])
	if err != nil {
		t.Fatal(err)
	}
	creds := insecure.NewCredentials()
	if !ep.TLS.IsZero() {
		tc, err := ep.TLS.ClientConfig()
		if err != nil {
			t.Fatal(err)
		}
		creds = credentials.NewTLS(tc)
	}
	conn, err := grpc.NewClient("passthrough:///"+u.Host, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// leakProbes is the crawl: every client-API endpoint a client could hit.
func leakProbes(waitIndex uint64, memberID uint64) []secProbe {
	form := "application/x-www-form-urlencoded"
	js := "application/json"
	ok, created := []int{http.StatusOK}, []int{http.StatusCreated}
	id := strconv.FormatUint(memberID, 16)
	return []secProbe{
		// v2 keys
		{method: "PUT", path: "/v2/keys/leak/put", body: "value=1", ctype: form, want: created, api: "v2"},
		{method: "GET", path: "/v2/keys/leak/a", want: ok, api: "v2"},
		{method: "HEAD", path: "/v2/keys/leak/a", want: ok, api: "v2"},
		{method: "POST", path: "/v2/keys/leak/queue", body: "value=x", ctype: form, want: created, api: "v2"},
		{method: "DELETE", path: "/v2/keys/leak/del", want: ok, api: "v2"},
		{method: "GET", path: "/v2/keys/leak/a?wait=true&waitIndex=" + strconv.FormatUint(waitIndex, 10), want: ok, api: "v2"},
		{method: "GET", path: "/v2/keys/leak?recursive=true", want: ok, api: "v2"},
		{method: "GET", path: "/v2/keys/leak?recursive=true&sorted=true", want: ok, api: "v2"},
		{method: "GET", path: "/v2/keys/leakdir", want: ok, api: "v2"},
		{method: "GET", path: "/v2/keys/leak-missing", want: []int{http.StatusNotFound}, api: "v2"},
		{method: "PUT", path: "/v2/keys/leak/a?prevExist=false", body: "value=9", ctype: form, want: []int{http.StatusPreconditionFailed}, api: "v2"},
		{method: "GET", path: "/v2/keys", api: "v2"},
		{method: "GET", path: "/v2/keys/", want: ok, api: "v2"},
		{method: "OPTIONS", path: "/v2/keys", header: map[string]string{"Origin": "http://example.com", "Access-Control-Request-Method": "PUT"}},
		{method: "OPTIONS", path: "/v2/keys/leak/a", header: map[string]string{"Origin": "http://example.com"}},
		// redirect-inducing paths: the members' ServeMux cleans paths and adds trailing slashes with a 301
		{method: "GET", path: "/v2//keys/leak/a"},
		{method: "GET", path: "/v2/keys/../machines"},
		{method: "GET", path: "/v2/auth"},
		{method: "GET", path: "/v2/stats"},
		{method: "GET", path: "/v2/members/"},
		{method: "GET", path: "/./version"},
		// membership views
		{method: "GET", path: "/v2/members", want: ok, api: "v2"},
		{method: "GET", path: "/v2/members/leader", want: ok, api: "v2"},
		{method: "GET", path: "/v2/machines", want: ok, api: "v2"},
		{method: "HEAD", path: "/v2/members"},
		{method: "PUT", path: "/v2/members/" + id, body: `{"peerURLs":["http://127.0.0.1:1"]}`, ctype: js, want: []int{http.StatusForbidden}},
		{method: "DELETE", path: "/v2/members/" + id, want: []int{http.StatusForbidden}},
		{method: "POST", path: "/v2/members", body: `{"peerURLs":["http://127.0.0.1:1"]}`, ctype: js, want: []int{http.StatusForbidden}},
		// stats, auth, misc
		{method: "GET", path: "/v2/stats/self", want: ok, api: "v2"},
		{method: "GET", path: "/v2/stats/leader", want: ok, api: "v2"}, // the proxy leads, whichever member answered
		{method: "GET", path: "/v2/stats/store", want: ok, api: "v2"},
		{method: "GET", path: "/v2/auth/enable", want: ok, api: "v2"},
		{method: "GET", path: "/v2/auth/users", api: "v2"},
		{method: "GET", path: "/v2/auth/roles", api: "v2"},
		{method: "GET", path: "/version", want: ok, api: "v2"},
		{method: "GET", path: "/health"},
		{method: "GET", path: "/metrics"},
		{method: "GET", path: "/debug/vars", want: []int{http.StatusNotFound}},
		{method: "GET", path: "/debug/pprof/", want: []int{http.StatusNotFound}},
		{method: "GET", path: "/debug/pprof/cmdline", want: []int{http.StatusNotFound}},
		{method: "GET", path: "/debug", want: []int{http.StatusNotFound}},
		{method: "GET", path: "/v2/config/local/proxy", want: []int{http.StatusNotFound}},
		{method: "GET", path: "/v2/config/local/log"},
		{method: "GET", path: "/config/local/log"},
		{method: "GET", path: "/v2/peers"},
		{method: "GET", path: "/v2/leader"},
		{method: "GET", path: "/livez"},
		{method: "GET", path: "/readyz"},
		{method: "GET", path: "/leak/not/found", want: []int{http.StatusNotFound}, api: "v2"},
		// the v3 JSON gateway
		{method: "POST", path: "/v3/kv/range", body: `{"key":"` + b64("foo") + `"}`, ctype: js, want: ok, api: "v3"},
		{method: "POST", path: "/v3beta/kv/range", body: `{"key":"` + b64("foo") + `"}`, ctype: js, want: ok, api: "v3"},
		{method: "POST", path: "/v3/kv/range", body: `{"key":"` + b64("foo") + `","revision":"1"}`, ctype: js, api: "v3"},
		{method: "POST", path: "/v3/kv/put", body: `{"key":"` + b64("leak3") + `","value":"` + b64("v") + `"}`, ctype: js, want: ok, api: "v3"},
		{method: "POST", path: "/v3/cluster/member/list", body: `{}`, ctype: js, want: ok, api: "v3"},
		{method: "POST", path: "/v3/cluster/member/add", body: `{"peerURLs":["http://127.0.0.1:1"]}`, ctype: js, want: []int{http.StatusForbidden}, api: "v3"},
		{method: "POST", path: "/v3/maintenance/status", body: `{}`, ctype: js, want: ok, api: "v3"},
		{method: "POST", path: "/v3/maintenance/alarm", body: `{"action":"GET"}`, ctype: js, want: ok, api: "v3"},
		{method: "POST", path: "/v3/auth/status", body: `{}`, ctype: js, api: "v3"},
		// From a compacted revision the watcher is cancelled at once; whether the stream then stays open is the
		// hop's own business (etcd's grpc-proxy sometimes ends it), so only the bytes are checked.
		{method: "POST", path: "/v3/watch", body: `{"create_request":{"key":"` + b64("foo") + `","start_revision":"1"}}`, ctype: js, want: ok, api: "v3", stream: true, mayEnd: true},
		{method: "POST", path: "/v3/watch", body: `{"create_request":{"key":"` + b64("foo") + `"}}`, ctype: js, want: ok, api: "v3", stream: true},
		{method: "POST", path: "/v3/nothing", body: `{}`, ctype: js},
	}
}

// leakCaps is what a topology serves.
type leakCaps struct {
	// v2: etcd's HTTP API (not through the grpc-proxy); v3: gRPC and the gateway (not through the stock v2
	// proxy); grpcProxy: the stock grpc-proxy is below, with its own ways (errors as Unknown, waiting for members).
	v2, v3, grpcProxy bool
}

func (c leakCaps) serves(api string) bool {
	return api == "" || (api == "v2" && c.v2) || (api == "v3" && c.v3)
}

// crawlHTTP sends every probe through the top, a few at a time, and checks each answer.
func crawlHTTP(t *testing.T, ctx context.Context, s *started, leaks *leakSet, waitIndex uint64, caps leakCaps) {
	c := httpClient(t, s.top)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for _, p := range leakProbes(waitIndex, s.run.Cluster.Members[0].ID) {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			what := p.method + " " + p.path
			res := secDo(ctx, c, s.top.URLs[0], p)
			leaks.check(t, what, res.dump)
			switch {
			case !caps.serves(p.api):
				return // a watch through the gateway gets no answer at all from a stock v2 proxy
			case res.err != nil:
				t.Errorf("%s: %v", what, res.err)
				return
			}
			if p.want != nil && !slices.Contains(p.want, res.status) {
				t.Errorf("%s: status %d, want %v\n%s", what, res.status, p.want, res.dump)
			}
			if p.stream && !p.mayEnd && (!res.open || !bytes.Contains(res.body, []byte(`"created":true`)) || bytes.Contains(res.body, []byte(`"error"`))) {
				t.Errorf("%s: want a created watch still open at the client's deadline, got (open=%v)\n%s", what, res.open, res.dump)
			}
		})
	}
	wg.Wait()
}

// crawlGRPC calls the v3 API through the top with a raw client (headers, trailers, status messages) and with
// clientv3 (what applications see).
func crawlGRPC(t *testing.T, ctx context.Context, s *started, leaks *leakSet, caps leakCaps) {
	v3 := caps.v3
	// Without gRPC upstream, calls fail or hang (clientv3 retries Unavailable until its deadline): keep it short.
	timeout := 5 * time.Second
	if !v3 {
		timeout = time.Second
	}
	// The grpc-proxy returns etcd's errors as Unknown (it passes clientv3's errors on as they are).
	rangeErr := codes.OutOfRange
	if caps.grpcProxy {
		rangeErr = codes.Unknown
	}
	conn := secGRPCConn(t, s.top)
	kv, cluster, maint, watch := pb.NewKVClient(conn), pb.NewClusterClient(conn), pb.NewMaintenanceClient(conn), pb.NewWatchClient(conn)
	call := func(name string, wantCode codes.Code, fn func(ctx context.Context, opts ...grpc.CallOption) (fmt.Stringer, error)) {
		t.Helper()
		cctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		var hdr, trl metadata.MD
		resp, err := fn(cctx, grpc.Header(&hdr), grpc.Trailer(&trl))
		var b strings.Builder
		if resp != nil && err == nil {
			b.WriteString(resp.String())
		}
		st := status.Convert(err)
		fmt.Fprintf(&b, "\nerror: %v\ncode: %s\nmessage: %s\ndetails: %v\nheader: %v\ntrailer: %v\n", err, st.Code(), st.Message(), st.Details(), hdr, trl)
		leaks.check(t, "gRPC "+name, b.String())
		if v3 && st.Code() != wantCode {
			t.Errorf("gRPC %s: %v, want code %s", name, err, wantCode)
		}
	}
	call("Range", codes.OK, func(ctx context.Context, o ...grpc.CallOption) (fmt.Stringer, error) {
		return kv.Range(ctx, &pb.RangeRequest{Key: []byte("foo")}, o...)
	})
	call("Range(compacted)", rangeErr, func(ctx context.Context, o ...grpc.CallOption) (fmt.Stringer, error) {
		return kv.Range(ctx, &pb.RangeRequest{Key: []byte("foo"), Revision: 1}, o...)
	})
	call("Range(future)", rangeErr, func(ctx context.Context, o ...grpc.CallOption) (fmt.Stringer, error) {
		return kv.Range(ctx, &pb.RangeRequest{Key: []byte("foo"), Revision: 1 << 40}, o...)
	})
	call("Put", codes.OK, func(ctx context.Context, o ...grpc.CallOption) (fmt.Stringer, error) {
		return kv.Put(ctx, &pb.PutRequest{Key: []byte("leak-grpc"), Value: []byte("v")}, o...)
	})
	call("MemberList", codes.OK, func(ctx context.Context, o ...grpc.CallOption) (fmt.Stringer, error) {
		return cluster.MemberList(ctx, &pb.MemberListRequest{Linearizable: true}, o...)
	})
	call("MemberAdd", codes.PermissionDenied, func(ctx context.Context, o ...grpc.CallOption) (fmt.Stringer, error) {
		return cluster.MemberAdd(ctx, &pb.MemberAddRequest{PeerURLs: []string{"http://127.0.0.1:1"}}, o...)
	})
	call("Status", codes.OK, func(ctx context.Context, o ...grpc.CallOption) (fmt.Stringer, error) {
		return maint.Status(ctx, &pb.StatusRequest{}, o...)
	})
	call("Alarm", codes.OK, func(ctx context.Context, o ...grpc.CallOption) (fmt.Stringer, error) {
		return maint.Alarm(ctx, &pb.AlarmRequest{Action: pb.AlarmRequest_GET}, o...)
	})
	call("Watch(compacted)", codes.OK, func(ctx context.Context, o ...grpc.CallOption) (fmt.Stringer, error) {
		w, err := watch.Watch(ctx, o...)
		if err != nil {
			return nil, err
		}
		if err := w.Send(&pb.WatchRequest{RequestUnion: &pb.WatchRequest_CreateRequest{
			CreateRequest: &pb.WatchCreateRequest{Key: []byte("foo"), StartRevision: 1}}}); err != nil {
			return nil, err
		}
		var b strings.Builder
		for range 2 { // created, then the compaction cancel
			resp, err := w.Recv()
			if err != nil {
				return nil, err
			}
			b.WriteString(resp.String() + "\n")
			if resp.Canceled {
				break
			}
		}
		_ = w.CloseSend()
		return stringer(b.String()), nil
	})

	// What an application sees through clientv3.
	cli := secV3Client(t, s.top)
	cctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var b strings.Builder
	ml, err := cli.MemberList(cctx)
	fmt.Fprintf(&b, "MemberList: %v %v\n", ml, err)
	if v3 && (err != nil || len(ml.Members) != 1 || !slices.Equal(ml.Members[0].ClientURLs, s.top.URLs)) {
		t.Errorf("clientv3 MemberList through the top = %v, %v; want the top alone", ml, err)
	}
	st, err := cli.Status(cctx, s.top.URLs[0])
	fmt.Fprintf(&b, "Status: %v %v\n", st, err)
	get, err := cli.Get(cctx, "foo")
	fmt.Fprintf(&b, "Get: %v %v\n", get, err)
	if v3 && (err != nil || len(get.Kvs) != 1) {
		t.Errorf("clientv3 Get foo: %v, %v", get, err)
	}
	_, err = cli.Get(cctx, "foo", clientv3.WithRev(1))
	fmt.Fprintf(&b, "Get(compacted): %v\n", err)
	if v3 && err == nil {
		t.Error("clientv3 Get at a compacted revision succeeded")
	}
	leaks.check(t, "clientv3", b.String())
}

type stringer string

func (s stringer) String() string { return string(s) }

// upstreamDown stops every member and checks that the failures of every layer come out as etcd-style errors
// without addresses.
func upstreamDown(t *testing.T, ctx context.Context, s *started, leaks *leakSet, caps leakCaps) {
	// The followers first, then the leader: a leader stops at once when no follower is left to hand its
	// leadership to, but waits for a transfer to a follower that is itself stopping.
	var wg sync.WaitGroup
	leader := s.run.Cluster.Leader()
	t0 := time.Now()
	// A plain member's Close waits for every connection its cmux accepted to be matched: a connection that a
	// layer above opened and left idle without sending a byte (a Go transport's dial race) holds it until that
	// transport's idle timeout (90 s). Its servers are shut down by then; the test goes on without waiting.
	stop := func(m *harness.Member) {
		sctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if err := m.Stop(sctx); err != nil {
			t.Logf("%s still closing after %v: %v", m.Name, time.Since(t0).Round(time.Millisecond), err)
		}
	}
	for _, m := range s.run.Cluster.Members {
		if m != leader {
			wg.Go(func() { stop(m) })
		}
	}
	wg.Wait()
	if leader != nil {
		stop(leader)
	}
	c := httpClient(t, s.top)
	for _, p := range []secProbe{
		{method: "GET", path: "/v2/keys/leak/a", api: "v2"},
		{method: "PUT", path: "/v2/keys/leak/a", body: "value=2", ctype: "application/x-www-form-urlencoded", api: "v2"},
		{method: "GET", path: "/v2/members", api: "v2"},
		{method: "GET", path: "/v2/members/leader", api: "v2"},
		{method: "GET", path: "/v2/machines", api: "v2"},
		{method: "GET", path: "/v2/stats/self", api: "v2"},
		{method: "GET", path: "/version"},
		{method: "GET", path: "/health"},
		{method: "GET", path: "/metrics"},
		{method: "POST", path: "/v3/kv/range", body: `{"key":"` + b64("foo") + `"}`, ctype: "application/json", api: "v3"},
		{method: "POST", path: "/v3/cluster/member/list", body: `{}`, ctype: "application/json", api: "v3"},
	} {
		wg.Go(func() {
			what := "members down: " + p.method + " " + p.path
			// The grpc-proxy waits for its members for as long as the call may last: a client deadline ends
			// those calls, with nothing received.
			cctx, cancel := context.WithTimeout(ctx, 4*time.Second)
			defer cancel()
			res := secDo(cctx, c, s.top.URLs[0], p)
			leaks.check(t, what, res.dump)
			if res.err != nil {
				if !caps.grpcProxy || cctx.Err() == nil {
					t.Errorf("%s: %v", what, res.err)
				}
				return
			}
			if p.api == "v2" && caps.v2 {
				var e struct{ Message string }
				if (res.status != http.StatusBadGateway && res.status != http.StatusServiceUnavailable && res.status != http.StatusGatewayTimeout) ||
					json.Unmarshal(res.body, &e) != nil || e.Message == "" {
					t.Errorf("%s: want 502/503/504 with an etcd-style {\"message\"}, got\n%s", what, res.dump)
				}
			}
			// (An advertising grpc-proxy answers MemberList itself, members or not.)
			if p.api == "v3" && caps.v3 && !caps.grpcProxy && res.status == http.StatusOK {
				t.Errorf("%s: succeeded with every member down:\n%s", what, res.dump)
			}
		})
	}
	conn := secGRPCConn(t, s.top)
	for _, name := range []string{"Range", "MemberList"} {
		wg.Go(func() {
			cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
			defer cancel()
			var hdr, trl metadata.MD
			var err error
			if name == "Range" {
				_, err = pb.NewKVClient(conn).Range(cctx, &pb.RangeRequest{Key: []byte("foo")}, grpc.Header(&hdr), grpc.Trailer(&trl))
			} else {
				_, err = pb.NewClusterClient(conn).MemberList(cctx, &pb.MemberListRequest{}, grpc.Header(&hdr), grpc.Trailer(&trl))
			}
			st := status.Convert(err)
			leaks.check(t, "members down: gRPC "+name, fmt.Sprintf("%v\n%s\n%v\n%v", err, st.Message(), hdr, trl))
			switch {
			case !caps.v3:
			case caps.grpcProxy && (st.Code() == codes.DeadlineExceeded || (name == "MemberList" && st.Code() == codes.OK)):
			case st.Code() != codes.Unavailable:
				t.Errorf("members down: gRPC %s: %v, want Unavailable", name, err)
			}
		})
	}
	// A call whose deadline (grpc-timeout) is shorter than the client's wait, so that the layers below answer
	// it themselves: the grpc-proxy's "latest balancer error: … dial tcp HOST:PORT …" must come out replaced.
	wg.Go(func() {
		dump, msg, err := rawGRPCRange(ctx, s.top, "1S")
		leaks.check(t, "members down: gRPC Range (grpc-timeout 1S)", dump)
		if err != nil && strings.Contains(err.Error(), "; CANCEL; received from peer") {
			// grpc-go's server (the proxy-proxy's, and a member's on a plain listener) resets a stream whose
			// deadline passed rather than answering it: nothing from below reaches the client. (net/http's client
			// does not export the error's type.)
			t.Logf("members down: gRPC Range with grpc-timeout 1S: reset at its deadline")
			return
		}
		if err != nil {
			t.Errorf("members down: gRPC Range (grpc-timeout 1S): %v", err)
		}
		if !rules.KnownGRPCMessage(msg) {
			t.Errorf("members down: gRPC Range: message %q is not one the top proxy-proxy lets through", msg)
		}
		t.Logf("members down: gRPC Range with grpc-timeout 1S: %q", msg)
	})
	wg.Go(func() {
		cli := secV3Client(t, s.top)
		cctx, cancel := context.WithTimeout(ctx, 1500*time.Millisecond)
		defer cancel()
		_, err := cli.Get(cctx, "foo")
		if err == nil {
			t.Error("members down: clientv3 Get succeeded")
		}
		leaks.check(t, "members down: clientv3 Get", fmt.Sprint(err))
	})
	wg.Wait()
}

// rawGRPCRange calls KV.Range over plain HTTP/2 with the given grpc-timeout and no deadline of its own for the
// layers below to see (the client gives up after 10 s). It returns every byte of the answer's head and
// trailers, and the grpc-message.
func rawGRPCRange(ctx context.Context, ep harness.Endpoint, timeout string) (dump, msg string, err error) {
	tc, err := ep.TLS.ClientConfig()
	if err != nil {
		return "", "", err
	}
	tr := &http.Transport{TLSClientConfig: tc, Protocols: new(http.Protocols)}
	tr.Protocols.SetHTTP2(true)
	tr.Protocols.SetUnencryptedHTTP2(true)
	defer tr.CloseIdleConnections()
	payload, err := (&pb.RangeRequest{Key: []byte("foo")}).Marshal()
	if err != nil {
		return "", "", err
	}
	frame := make([]byte, 5, 5+len(payload))
	frame[1], frame[2], frame[3], frame[4] = byte(len(payload)>>24), byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	frame = append(frame, payload...)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, ep.URLs[0]+"/etcdserverpb.KV/Range", bytes.NewReader(frame))
	if err != nil {
		return "", "", err
	}
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	req.Header.Set("Grpc-Timeout", timeout)
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return err.Error(), "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	dump = dumpResponse(resp, body)
	if err != nil {
		return dump, "", err
	}
	msg = resp.Trailer.Get("Grpc-Message")
	if msg == "" {
		msg = resp.Header.Get("Grpc-Message")
	}
	if m, uerr := url.PathUnescape(msg); uerr == nil {
		msg = m
	}
	return dump, msg, nil
}

// TestLeak crawls every client-API endpoint, over HTTP and gRPC, through every topology (and a proxy-proxy on
// members of each newer etcd line), then stops the members and checks every failure: no byte of any answer
// names anything below the top.
func TestLeak(t *testing.T) {
	t.Parallel()
	type leakRun struct {
		topo    topology
		version string
	}
	var runs []leakRun
	for _, topo := range leakTopologies {
		runs = append(runs, leakRun{topo, ""})
	}
	for _, v := range harness.EtcdVersions {
		runs = append(runs, leakRun{leakTopologies[0], v})
	}
	for _, mode := range []string{"plain", "tls"} {
		for _, run := range runs {
			topo := run.topo
			name := mode + "/" + topo.name
			if run.version != "" {
				name += "-" + run.version
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				ctx := testContext(t, 2*time.Minute)
				s := startVersion(t, ctx, topo, mode == "tls", run.version)
				leaks := newLeakSet(s.run)
				// The stock v2 proxy carries no gRPC (so neither v3 nor the gateway works through it); the
				// grpc-proxy serves no HTTP API; members of 3.6 and later serve no v2.
				caps := leakCaps{v2: topo.name != "pp-grpc" && run.version == "", v3: !strings.HasSuffix(topo.name, "-stock"), grpcProxy: topo.name == "pp-grpc"}
				waitIndex := leakSetup(t, ctx, s.run)
				// The detector works: the members' own membership view names them.
				view := secProbe{method: "GET", path: "/v2/members"}
				if run.version != "" {
					view = secProbe{method: "POST", path: "/v3/cluster/member/list", body: `{}`, ctype: "application/json"}
				}
				if res := secDo(ctx, httpClient(t, s.run.Layers[0]), s.run.Layers[0].URLs[0], view); leaksOf(leaks, res.dump) == nil {
					t.Fatalf("the leak detector finds nothing in the members' own %s:\n%s", view.path, res.dump)
				}
				t.Run("http", func(t *testing.T) { crawlHTTP(t, ctx, s, leaks, waitIndex, caps) })
				t.Run("grpc", func(t *testing.T) { crawlGRPC(t, ctx, s, leaks, caps) })
				t.Run("members-down", func(t *testing.T) { upstreamDown(t, ctx, s, leaks, caps) })
			})
		}
	}
	t.Run("closed-port", func(t *testing.T) {
		t.Parallel()
		ctx := testContext(t, time.Minute)
		for _, scheme := range []string{"http", "https"} {
			closed := scheme + "://" + closedAddr(t)
			u := startRawProxy(t, proxy.Config{Upstreams: []string{closed}}, false)
			leaks := leakSetOf([]string{closed})
			top := harness.Endpoint{Name: "raw", URLs: []string{u}}
			c := httpClient(t, top)
			for _, p := range []secProbe{
				{method: "GET", path: "/v2/keys/foo", want: []int{http.StatusServiceUnavailable}},
				{method: "PUT", path: "/v2/keys/foo", body: "value=1", ctype: "application/x-www-form-urlencoded", want: []int{http.StatusServiceUnavailable}},
				{method: "GET", path: "/v2/members", want: []int{http.StatusServiceUnavailable}},
				{method: "GET", path: "/health", want: []int{http.StatusServiceUnavailable}},
				{method: "POST", path: "/v3/kv/range", body: `{"key":"` + b64("foo") + `"}`, ctype: "application/json", want: []int{http.StatusServiceUnavailable}},
			} {
				what := scheme + " closed port: " + p.method + " " + p.path
				res := secDo(ctx, c, u, p)
				leaks.check(t, what, res.dump)
				var e struct{ Message string }
				if !slices.Contains(p.want, res.status) || json.Unmarshal(res.body, &e) != nil || e.Message == "" {
					t.Errorf("%s: want %v with an etcd-style {\"message\"}, got\n%s", what, p.want, res.dump)
				}
			}
			conn := secGRPCConn(t, top)
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			var trl metadata.MD
			_, err := pb.NewKVClient(conn).Range(cctx, &pb.RangeRequest{Key: []byte("foo")}, grpc.Trailer(&trl))
			cancel()
			leaks.check(t, scheme+" closed port: gRPC Range", fmt.Sprintf("%v %v", err, trl))
			if status.Code(err) != codes.Unavailable {
				t.Errorf("%s closed port: gRPC Range: %v, want Unavailable", scheme, err)
			}
		}
	})
}

// closedAddr is a loopback host:port nobody listens on.
func closedAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr
}

// startRawProxy runs a proxy-proxy from cfg without the harness's wait for a working upstream (a proxy whose
// upstream is broken on purpose never answers /version with 200). Listen and advertise URLs are filled in.
func startRawProxy(t *testing.T, cfg proxy.Config, tlsListener bool) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := "http://" + l.Addr().String()
	if tlsListener {
		u = "https://" + l.Addr().String()
	}
	cfg.ListenClientURLs, cfg.AdvertiseClientURLs = []string{u}, []string{u}
	srv, err := proxy.New(cfg, proxy.WithLogger(slog.New(slog.DiscardHandler)), proxy.WithListener(u, l))
	if err != nil {
		_ = l.Close()
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	return u
}

// tlsAlert returns the alert a TLS peer sent, from an error anywhere in err's chain ("" when none): crypto/tls
// reports a received alert as a *net.OpError with Op "remote error".
func tlsAlert(err error) string {
	for e := err; e != nil; e = errors.Unwrap(e) {
		var op *net.OpError
		if errors.As(e, &op) && op.Op == "remote error" {
			return op.Err.Error()
		}
	}
	return ""
}

// forcedCert makes a client present cert whatever CAs the server asks for (Go's client otherwise sends
// nothing when the issuer is not in the server's list, and the test would not test the verification).
func forcedCert(t *testing.T, f harness.TLSFiles) func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	t.Helper()
	cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	return func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
}

// tlsGet does GET /version with tc (no connection reuse) and returns the status or the error.
func tlsGet(ctx context.Context, u string, tc *tls.Config) (int, error) {
	tr := &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, u+"/version", nil)
	resp, err := (&http.Client{Transport: tr, Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// TestListenerTLS: client-certificate auth on the listener really verifies, and TLS 1.2 is the minimum.
func TestListenerTLS(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, time.Minute)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	auth, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{TLS: true})
	if err != nil {
		t.Fatal(err)
	}
	noAuth, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{TLS: true, Configure: func(cfg *proxy.Config) {
		cfg.ListenerTLS.ClientCertAuth, cfg.ListenerTLS.CAFile = false, ""
	}})
	if err != nil {
		t.Fatal(err)
	}
	verifyIfGiven, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{TLS: true, Configure: func(cfg *proxy.Config) {
		cfg.ListenerTLS.ClientCertAuth = false // --trusted-ca-file alone: a certificate is verified when given
	}})
	if err != nil {
		t.Fatal(err)
	}
	other := issueCert(t, e.PKI.Other, "intruder", harness.ClientAuth())
	expired := issueCert(t, e.PKI.Client, "expired-client", harness.ClientAuth(), harness.Expired())
	revoked := issueCert(t, e.PKI.Client, "revoked-client", harness.ClientAuth())
	crl, err := e.PKI.Client.RevocationList("revoked", revoked.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	withCRL, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{TLS: true, Configure: func(cfg *proxy.Config) {
		cfg.ListenerTLS.CRLFile = crl // --client-crl-file
	}})
	if err != nil {
		t.Fatal(err)
	}
	serverOnly := issueCert(t, e.PKI.Client, "server-only", harness.ServerAuth())
	valid := auth.Endpoint.TLS // a Client-CA client certificate
	roots := e.PKI.Client.Pool()

	cases := []struct {
		name  string
		url   string
		cert  *harness.TLSFiles
		max   uint16
		alert string // "" means 200
	}{
		{"no-cert", auth.Endpoint.URLs[0], nil, 0, "tls: certificate required"},
		{"other-ca", auth.Endpoint.URLs[0], &other, 0, "tls: unknown certificate authority"},
		{"expired", auth.Endpoint.URLs[0], &expired, 0, "tls: expired certificate"},
		{"server-usage-only", auth.Endpoint.URLs[0], &serverOnly, 0, "tls: bad certificate"},
		{"valid", auth.Endpoint.URLs[0], &valid, 0, ""},
		{"valid-tls1.2", auth.Endpoint.URLs[0], &valid, tls.VersionTLS12, ""},
		{"other-ca-tls1.2", auth.Endpoint.URLs[0], &other, tls.VersionTLS12, "tls: unknown certificate authority"},
		{"no-cert-tls1.2", auth.Endpoint.URLs[0], nil, tls.VersionTLS12, "tls: handshake failure"},
		{"tls1.1", auth.Endpoint.URLs[0], &valid, tls.VersionTLS11, "tls: protocol version not supported"},
		{"no-auth/no-cert", noAuth.Endpoint.URLs[0], nil, 0, ""},
		{"no-auth/tls1.1", noAuth.Endpoint.URLs[0], nil, tls.VersionTLS11, "tls: protocol version not supported"},
		{"verify-if-given/no-cert", verifyIfGiven.Endpoint.URLs[0], nil, 0, ""},
		{"verify-if-given/other-ca", verifyIfGiven.Endpoint.URLs[0], &other, 0, "tls: unknown certificate authority"},
		{"verify-if-given/valid", verifyIfGiven.Endpoint.URLs[0], &valid, 0, ""},
		{"crl/revoked", withCRL.Endpoint.URLs[0], &revoked, 0, "tls: bad certificate"},
		{"crl/revoked-tls1.2", withCRL.Endpoint.URLs[0], &revoked, tls.VersionTLS12, "tls: bad certificate"},
		{"crl/valid", withCRL.Endpoint.URLs[0], &valid, 0, ""},
		{"no-crl/revoked", auth.Endpoint.URLs[0], &revoked, 0, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12, MaxVersion: tc.max}
			if tc.max != 0 && tc.max < tls.VersionTLS12 {
				cfg.MinVersion = tls.VersionTLS10 //nolint:gosec // the point: an old client must be refused
			}
			if tc.cert != nil {
				cfg.GetClientCertificate = forcedCert(t, *tc.cert)
			}
			code, err := tlsGet(ctx, tc.url, cfg)
			switch {
			case tc.alert == "" && (err != nil || code != http.StatusOK):
				t.Errorf("want 200, got %d %v", code, err)
			case tc.alert != "" && err == nil:
				t.Errorf("want the TLS alert %q, got a %d answer", tc.alert, code)
			case tc.alert != "" && tlsAlert(err) != tc.alert:
				t.Errorf("want the TLS alert %q from the server, got %v", tc.alert, err)
			}
		})
	}
}

// TestUpstreamTLS: the upstream side verifies the upstream's certificate (502 in etcd's style when it cannot,
// without addresses), -k skips that, TLS 1.2 is the minimum toward the upstream too, and a TLS proxy-proxy
// chains behind a TLS proxy-proxy with a separate identity on each side.
func TestUpstreamTLS(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 90*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1), harness.WithTLS())
	if err != nil {
		t.Fatal(err)
	}
	members := c.Endpoint()
	leaks := leakSetOf(append(slices.Clone(members.URLs), c.Members[0].PeerURL))

	// A TLS 1.1-only upstream: the handshake must fail on our side.
	old := oldTLSServer(t, e)
	oldLeaks := leakSetOf([]string{old})

	failures := []struct {
		name  string
		cfg   proxy.Config
		leaks *leakSet
	}{
		{"wrong-ca", proxy.Config{Upstreams: members.URLs, UpstreamTLS: proxy.TLSInfo{
			CAFile: e.PKI.Other.CertFile, CertFile: members.TLS.CertFile, KeyFile: members.TLS.KeyFile}}, leaks},
		{"system-roots", proxy.Config{Upstreams: members.URLs, UpstreamTLS: proxy.TLSInfo{
			CertFile: members.TLS.CertFile, KeyFile: members.TLS.KeyFile}}, leaks},
		{"no-client-cert", proxy.Config{Upstreams: members.URLs, UpstreamTLS: proxy.TLSInfo{CAFile: members.TLS.CAFile}}, leaks},
		{"tls1.1-upstream", proxy.Config{Upstreams: []string{old}, UpstreamTLS: proxy.TLSInfo{InsecureSkipVerify: true}}, oldLeaks},
	}
	for _, f := range failures {
		t.Run(f.name, func(t *testing.T) {
			u := startRawProxy(t, f.cfg, false)
			top := harness.Endpoint{URLs: []string{u}}
			hc := httpClient(t, top)
			for _, p := range []secProbe{
				{method: "GET", path: "/v2/keys/foo"},
				{method: "GET", path: "/v2/members"},
				{method: "GET", path: "/version"},
				{method: "POST", path: "/v3/kv/range", body: `{"key":"` + b64("foo") + `"}`, ctype: "application/json"},
			} {
				what := f.name + ": " + p.method + " " + p.path
				res := secDo(ctx, hc, u, p)
				f.leaks.check(t, what, res.dump)
				// The JSON gateway gets the failure as gRPC Unavailable, which grpc-gateway answers with 503.
				want := []int{http.StatusBadGateway}
				if strings.HasPrefix(p.path, "/v3/") {
					want = []int{http.StatusBadGateway, http.StatusServiceUnavailable}
				}
				var e struct{ Message string }
				if res.err != nil || !slices.Contains(want, res.status) || json.Unmarshal(res.body, &e) != nil || e.Message == "" {
					t.Errorf("%s: want %v with an etcd-style {\"message\"}, got %v\n%s", what, want, res.err, res.dump)
				}
			}
			conn := secGRPCConn(t, top)
			cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			var trl metadata.MD
			_, err := pb.NewKVClient(conn).Range(cctx, &pb.RangeRequest{Key: []byte("foo")}, grpc.Trailer(&trl))
			f.leaks.check(t, f.name+": gRPC Range", fmt.Sprintf("%v %v", err, trl))
			if status.Code(err) != codes.Unavailable {
				t.Errorf("%s: gRPC Range: %v, want Unavailable", f.name, err)
			}
		})
	}

	t.Run("insecure-skip-verify", func(t *testing.T) {
		// The harness's start waits for GET /version through the proxy: with the wrong CA and -k it must work.
		p, err := e.StartProxyProxy(ctx, members, harness.ProxyProxyHop{Configure: func(cfg *proxy.Config) {
			cfg.UpstreamTLS.CAFile, cfg.UpstreamTLS.InsecureSkipVerify = e.PKI.Other.CertFile, true
		}})
		if err != nil {
			t.Fatal(err)
		}
		ctl := e.Etcdctl(3, p.Endpoint)
		if err := ctl.Run(ctx, "put", "k", "insecure").Check(); err != nil {
			t.Fatal(err)
		}
		if res := ctl.Run(ctx, "get", "--print-value-only", "k"); res.Check() != nil || strings.TrimSpace(res.Stdout) != "insecure" {
			t.Errorf("get through -k: %q %v", res.Stdout, res.Check())
		}
	})

	t.Run("pp-tls-behind-pp-tls", func(t *testing.T) {
		lower, err := e.StartProxyProxy(ctx, members, harness.ProxyProxyHop{TLS: true})
		if err != nil {
			t.Fatal(err)
		}
		upper, err := e.StartProxyProxy(ctx, lower.Endpoint, harness.ProxyProxyHop{TLS: true})
		if err != nil {
			t.Fatal(err)
		}
		// Two identities: the upper presents the lower's Client-CA client certificate upstream, and serves its
		// own certificate to its clients.
		if got, want := upper.Config.UpstreamTLS.CertFile, lower.Endpoint.TLS.CertFile; got != want {
			t.Errorf("upper's upstream certificate %s, want the lower's client certificate %s", got, want)
		}
		served := servedCert(t, upper.Endpoint)
		own, err := harness.LoadCert(upper.Config.ListenerTLS.CertFile)
		if err != nil {
			t.Fatal(err)
		}
		lowerOwn, err := harness.LoadCert(lower.Config.ListenerTLS.CertFile)
		if err != nil {
			t.Fatal(err)
		}
		if !served.Equal(own) || served.Equal(lowerOwn) {
			t.Errorf("the upper serves %q, want its own %q (not the lower's %q)", served.Subject, own.Subject, lowerOwn.Subject)
		}
		v3 := e.Etcdctl(3, upper.Endpoint)
		if err := v3.Run(ctx, "put", "chained", "tls").Check(); err != nil {
			t.Fatal(err)
		}
		if res := v3.Run(ctx, "get", "--print-value-only", "chained"); res.Check() != nil || strings.TrimSpace(res.Stdout) != "tls" {
			t.Errorf("v3 get through the chain: %q %v", res.Stdout, res.Check())
		}
		v2 := e.Etcdctl(2, upper.Endpoint)
		if err := v2.Run(ctx, "set", "/chained", "tls2").Check(); err != nil {
			t.Fatal(err)
		}
		if res := v2.Run(ctx, "get", "/chained"); res.Check() != nil || strings.TrimSpace(res.Stdout) != "tls2" {
			t.Errorf("v2 get through the chain: %q %v", res.Stdout, res.Check())
		}

		// The lower really verifies the upper's client certificate: without one, or with a stranger's, the
		// upper gets a 502.
		other, err := e.PKI.Other.Issue("upper-intruder", harness.ClientAuth())
		if err != nil {
			t.Fatal(err)
		}
		lowerLeaks := leakSetOf(append(slices.Clone(lower.Endpoint.URLs), members.URLs...))
		for name, up := range map[string]proxy.TLSInfo{
			"no-client-cert": {CAFile: lower.Endpoint.TLS.CAFile},
			"other-ca-cert":  {CAFile: lower.Endpoint.TLS.CAFile, CertFile: other.CertFile, KeyFile: other.KeyFile},
		} {
			u := startRawProxy(t, proxy.Config{Upstreams: lower.Endpoint.URLs, UpstreamTLS: up}, false)
			res := secDo(ctx, httpClient(t, harness.Endpoint{URLs: []string{u}}), u, secProbe{method: "GET", path: "/v2/keys/chained"})
			lowerLeaks.check(t, name, res.dump)
			if res.status != http.StatusBadGateway {
				t.Errorf("%s toward a client-cert-auth proxy-proxy: want 502, got\n%s", name, res.dump)
			}
		}
	})
}

// servedCert is the leaf certificate ep's listener presents.
func servedCert(t *testing.T, ep harness.Endpoint) *x509.Certificate {
	t.Helper()
	tc, err := ep.TLS.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(ep.URLs[0])
	conn, err := tls.Dial("tcp", u.Host, tc)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0]
}

// oldTLSServer is an https server that speaks TLS 1.0–1.1 only; it returns its URL.
func oldTLSServer(t *testing.T, e *harness.Env) string {
	t.Helper()
	f, err := e.PKI.Cluster.Issue("tls11-upstream", harness.ServerAuth())
	if err != nil {
		t.Fatal(err)
	}
	cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	l, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS10, //nolint:gosec // the point: an upstream we must refuse
		MaxVersion:   tls.VersionTLS11,
	})
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		_, _ = w.Write([]byte(`{"etcdserver":"3.5.35","etcdcluster":"3.5.0"}`))
	}), ErrorLog: log.New(io.Discard, "", 0), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(func() { _ = srv.Close() })
	return "https://" + l.Addr().String()
}
