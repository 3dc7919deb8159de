package proxy

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// --tunnel-listen and tunnel:// upstreams: every problem in one message.
func TestTunnelListenValidate(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	files := TLSInfo{CAFile: filepath.Join(dir, "ca"), CertFile: filepath.Join(dir, "c"), KeyFile: filepath.Join(dir, "k")}
	for _, f := range []string{files.CAFile, files.CertFile, files.KeyFile} {
		if err := os.WriteFile(f, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		cfg  Config
		want []string
	}{
		{Config{Upstreams: []string{"tunnel://a1/http://m1:2379"}},
			[]string{"needs --tunnel-listen"}},
		{Config{Upstreams: []string{"tunnel:///http://m1:2379", "tunnel://a1/ftp://m1", "http://m2:2379"},
			TunnelConfig: TunnelConfig{TunnelListen: "http://h", UpstreamVia: "http-connect://h:1"}},
			[]string{"want tunnel://AGENT-ID/http(s)://HOST:PORT", "the URL behind the agent: scheme must be http or https",
				"do not mix", "--tunnel-listen: want https://HOST:PORT", "exclude each other",
				"--tunnel-listen needs --tunnel-cert-file"}},
		{Config{Upstreams: []string{"http://m1:2379"}, TunnelConfig: TunnelConfig{TunnelListen: "https://h:1", TunnelTLS: files}},
			[]string{"--tunnel-listen needs upstreams named through an agent"}},
	} {
		err := tc.cfg.Validate()
		if err == nil {
			t.Errorf("%+v: no error", tc.cfg.Upstreams)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%q does not say %q", err, w)
			}
		}
	}
	ok := Config{Upstreams: []string{"tunnel://a1/https://m1:2379", "tunnel://a2/http://m2:2379"},
		TunnelConfig: TunnelConfig{TunnelListen: "https://0.0.0.0:8132", TunnelTLS: files}}
	if err := ok.Validate(); err != nil {
		t.Errorf("valid: %v", err)
	}
	if u, err := parseUpstream("tunnel://a1/https://m1:2379"); err != nil || u.Scheme != "https" || u.Host != "m1:2379" {
		t.Errorf("parseUpstream: %v %v", u, err)
	}
}
