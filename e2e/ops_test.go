package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// eventually polls cond every 20 ms until it holds or ctx ends; what is the failure message.
func eventually(t *testing.T, ctx context.Context, what string, cond func() (bool, string)) {
	t.Helper()
	last := ""
	for {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		select {
		case <-ctx.Done():
			t.Fatalf("%s: not reached before the deadline (last: %s)", what, last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// TestOps runs the operational features against one real member behind a TLS proxy-proxy: metrics after real
// traffic, certificate rotation under an open watch, a broken certificate, and /readyz following the upstream.
func TestOps(t *testing.T) {
	ctx := testContext(t, 60*time.Second)
	e := harness.NewTestEnv(t)
	c, err := e.StartCluster(ctx, harness.WithMembers(1))
	if err != nil {
		t.Fatal(err)
	}
	logs := &harness.Buffer{}
	pp, err := e.StartProxyProxy(ctx, c.Endpoint(), harness.ProxyProxyHop{
		TLS: true,
		Configure: func(cfg *proxy.Config) {
			cfg.ListenMetricsURLs = []string{"http://127.0.0.1:0"}
			cfg.UpstreamHealthInterval = 100 * time.Millisecond
			cfg.CertReloadInterval = 100 * time.Millisecond
			cfg.AccessLog = true
		},
		Options: []proxy.Option{proxy.WithLogger(slog.New(slog.NewTextHandler(logs, nil)))},
	})
	if err != nil {
		t.Fatal(err)
	}
	metricsURL := pp.Server.MetricsURLs()[0]
	clientTLS, err := pp.Endpoint.TLS.ClientConfig()
	if err != nil {
		t.Fatal(err)
	}
	httpc := &http.Client{Transport: &http.Transport{TLSClientConfig: clientTLS}, Timeout: 10 * time.Second}
	t.Cleanup(httpc.CloseIdleConnections)
	ready := func() (bool, string) {
		code, body := httpGet(t, http.DefaultClient, metricsURL+"/readyz")
		return code == http.StatusOK && strings.Contains(body, `"ready":true`), fmt.Sprintf("%d %s", code, body)
	}
	eventually(t, ctx, "ready", ready)

	t.Run("metrics", func(t *testing.T) {
		v3 := e.Etcdctl(3, pp.Endpoint)
		for i := range 3 {
			if err := v3.Run(ctx, "put", "ops-key", fmt.Sprint(i)).Check(); err != nil {
				t.Fatal(err)
			}
		}
		if err := v3.Run(ctx, "member", "list").Check(); err != nil {
			t.Fatal(err)
		}
		code, body := httpGet(t, httpc, pp.Endpoint.URLs[0]+"/metrics")
		if code != http.StatusOK || !strings.Contains(body, "etcd_server_") || strings.Contains(body, "etcd_proxy_proxy_") {
			t.Errorf("the client port's /metrics is not the upstream's alone: %d, %d bytes", code, len(body))
		}

		mf := scrape(t, metricsURL)
		for _, want := range []struct {
			name   string
			labels map[string]string
			value  float64
		}{
			{"etcd_proxy_proxy_requests_total", map[string]string{"api": "grpc", "method": "etcdserverpb.KV/Put", "code": "OK"}, 3},
			{"etcd_proxy_proxy_requests_total", map[string]string{"api": "grpc", "method": "etcdserverpb.Cluster/MemberList", "code": "OK"}, 1},
			{"etcd_proxy_proxy_requests_total", map[string]string{"api": "other", "method": "GET", "code": "200"}, -1}, // /version, /metrics
			{"etcd_proxy_proxy_request_duration_seconds", map[string]string{"api": "grpc", "method": "etcdserverpb.KV/Put"}, 3},
			{"etcd_proxy_proxy_rule_actions_total", map[string]string{"rule": "members"}, -1},
			{"etcd_proxy_proxy_errors_total", map[string]string{"reason": "no_endpoint"}, 0},
			{"etcd_proxy_proxy_upstream_healthy", map[string]string{"endpoint": "0"}, 1},
			{"etcd_proxy_proxy_active_streams", nil, -2}, // no stream yet: no series or 0
			{"etcd_proxy_proxy_client_received_bytes_total", nil, -1},
			{"etcd_proxy_proxy_client_sent_bytes_total", nil, -1},
			{"etcd_proxy_proxy_ready", nil, 1},
		} {
			got, ok := metricValue(mf, want.name, want.labels)
			switch {
			case want.value == -2:
				if ok && got != 0 {
					t.Errorf("%s%v = %v, want 0", want.name, want.labels, got)
				}
			case !ok:
				t.Errorf("%s%v missing", want.name, want.labels)
			case want.value == -1 && got <= 0, want.value >= 0 && got != want.value:
				t.Errorf("%s%v = %v, want %v", want.name, want.labels, got, want.value)
			}
		}
		if l := logs.String(); !strings.Contains(l, "path=/etcdserverpb.KV/Put") || !strings.Contains(l, "grpc_code=OK") {
			t.Errorf("no access line for the puts in:\n%s", l)
		}
	})

	t.Run("certificate rotation", func(t *testing.T) {
		certFile, keyFile := pp.Config.ListenerTLS.CertFile, pp.Config.ListenerTLS.KeyFile
		oldSerial := handshakeSerial(t, pp.Endpoint.URLs[0], clientTLS)

		// A watch stream through the JSON gateway on one HTTP/1.1 connection: if that connection dropped, the
		// body would end.
		watchCtx, stopWatch := context.WithCancel(ctx)
		defer stopWatch()
		key := base64.StdEncoding.EncodeToString([]byte("rotated-key"))
		req, _ := http.NewRequestWithContext(watchCtx, http.MethodPost, pp.Endpoint.URLs[0]+"/v3/watch",
			strings.NewReader(`{"create_request":{"key":"`+key+`"}}`))
		watchc := &http.Client{Transport: &http.Transport{TLSClientConfig: clientTLS}}
		t.Cleanup(watchc.CloseIdleConnections)
		resp, err := watchc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if got := resp.TLS.PeerCertificates[0].SerialNumber; got.Cmp(oldSerial) != 0 {
			t.Fatalf("watch connection serial %x, want %x", got, oldSerial)
		}
		lines := make(chan string, 16)
		go func() {
			defer close(lines)
			sc := bufio.NewScanner(resp.Body)
			sc.Buffer(nil, 1<<20)
			for sc.Scan() {
				lines <- sc.Text()
			}
		}()
		if l := <-lines; !strings.Contains(l, `"created":true`) {
			t.Fatalf("first watch message %q, want created", l)
		}

		rotated, err := e.PKI.Client.Issue("pp-rotated", harness.ServerAuth())
		if err != nil {
			t.Fatal(err)
		}
		newCert, err := harness.LoadCert(rotated.CertFile)
		if err != nil {
			t.Fatal(err)
		}
		replaceFile(t, keyFile, rotated.KeyFile)
		replaceFile(t, certFile, rotated.CertFile)
		eventually(t, ctx, "the rotated certificate served", func() (bool, string) {
			got := handshakeSerial(t, pp.Endpoint.URLs[0], clientTLS)
			return got.Cmp(newCert.SerialNumber) == 0, fmt.Sprintf("serial %x", got)
		})

		if err := e.Etcdctl(3, pp.Endpoint).Run(ctx, "put", "rotated-key", "after-rotation").Check(); err != nil {
			t.Fatal(err)
		}
		select {
		case l, ok := <-lines:
			if !ok || !strings.Contains(l, base64.StdEncoding.EncodeToString([]byte("after-rotation"))) {
				t.Fatalf("watch after rotation: %q (open %v)", l, ok)
			}
		case <-ctx.Done():
			t.Fatal("the open watch delivered nothing after the rotation")
		}

		t.Run("broken file keeps the old certificate", func(t *testing.T) {
			if err := os.WriteFile(certFile, []byte("-----BEGIN CERTIFICATE-----\nbroken\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			eventually(t, ctx, "the failed reload logged", func() (bool, string) {
				return strings.Contains(logs.String(), "certificate reload failed"), "no log line"
			})
			if got := handshakeSerial(t, pp.Endpoint.URLs[0], clientTLS); got.Cmp(newCert.SerialNumber) != 0 {
				t.Errorf("serial after a broken file %x, want the previous %x", got, newCert.SerialNumber)
			}
			if err := e.Etcdctl(3, pp.Endpoint).Run(ctx, "get", "rotated-key").Check(); err != nil {
				t.Error(err)
			}
			mf := scrape(t, metricsURL)
			if v, _ := metricValue(mf, "etcd_proxy_proxy_cert_reloads_total", map[string]string{"side": "listener", "result": "failure"}); v < 1 {
				t.Errorf("cert_reloads_total{failure} = %v, want ≥ 1", v)
			}
		})
	})

	t.Run("readyz follows the upstream", func(t *testing.T) {
		m := c.Members[0]
		if err := m.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		var reason string
		eventually(t, ctx, "not ready", func() (bool, string) {
			code, body := httpGet(t, http.DefaultClient, metricsURL+"/readyz")
			var r struct {
				Ready  bool   `json:"ready"`
				Reason string `json:"reason"`
			}
			_ = json.Unmarshal([]byte(body), &r)
			reason = r.Reason
			return code == http.StatusServiceUnavailable && !r.Ready && r.Reason != "", fmt.Sprintf("%d %s", code, body)
		})
		u, _ := url.Parse(m.ClientURL)
		if strings.Contains(reason, u.Host) || strings.Contains(reason, u.Port()) || strings.Contains(reason, "127.0.0.1") {
			t.Errorf("reason %q names the upstream", reason)
		}
		if code, _ := httpGet(t, httpc, pp.Endpoint.URLs[0]+"/version"); code != http.StatusServiceUnavailable {
			t.Errorf("GET /version with the upstream down: %d, want 503", code)
		}
		mf := scrape(t, metricsURL)
		for name, want := range map[string]float64{"etcd_proxy_proxy_upstream_healthy": 0, "etcd_proxy_proxy_errors_total": 1} {
			labels := map[string]string{"endpoint": "0"}
			if name == "etcd_proxy_proxy_errors_total" {
				labels = map[string]string{"reason": "no_endpoint"}
			}
			if v, ok := metricValue(mf, name, labels); !ok || v != want {
				t.Errorf("%s%v = %v, want %v", name, labels, v, want)
			}
		}
		if code, body := httpGet(t, http.DefaultClient, metricsURL+"/livez"); code != http.StatusOK {
			t.Errorf("/livez with the upstream down: %d %s", code, body)
		}
		if err := m.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		eventually(t, ctx, "ready again", ready)
	})
}

func httpGet(t *testing.T, c *http.Client, u string) (int, string) {
	t.Helper()
	return do(context.Background(), c, http.MethodGet, u, "")
}

// handshakeSerial opens a new TLS connection and returns the serial of the certificate the server presented.
func handshakeSerial(t *testing.T, rawURL string, cfg *tls.Config) *big.Int {
	t.Helper()
	u, _ := url.Parse(rawURL)
	conn, err := tls.Dial("tcp", u.Host, cfg.Clone())
	if err != nil {
		t.Fatalf("handshake: %v", err)
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber
}

// replaceFile puts src's content at dst atomically (a rename, as a deployment tool or a kubelet does).
func replaceFile(t *testing.T, dst, src string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	tmp := dst + ".new"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		t.Fatal(err)
	}
}

func scrape(t *testing.T, metricsURL string) map[string]*dto.MetricFamily {
	t.Helper()
	code, body := httpGet(t, http.DefaultClient, metricsURL+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation) // the zero TextParser panics since prometheus/common 0.66
	mf, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return mf
}

// metricValue is the value of the series of name whose labels include labels (a histogram's sample count),
// summed when several match.
func metricValue(mf map[string]*dto.MetricFamily, name string, labels map[string]string) (float64, bool) {
	f, ok := mf[name]
	if !ok {
		return 0, false
	}
	var sum float64
	found := false
next:
	for _, m := range f.Metric {
		for k, v := range labels {
			match := false
			for _, lp := range m.Label {
				if lp.GetName() == k && lp.GetValue() == v {
					match = true
				}
			}
			if !match {
				continue next
			}
		}
		found = true
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Histogram != nil:
			sum += float64(m.Histogram.GetSampleCount())
		case m.Untyped != nil:
			sum += m.Untyped.GetValue()
		}
	}
	return sum, found
}
