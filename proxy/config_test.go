package proxy

import (
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

func TestValidateReportsEverything(t *testing.T) {
	t.Parallel()
	missing := filepath.Join(t.TempDir(), "missing.pem")
	cfg := Config{
		Upstreams:           []string{"ftp://10.0.0.1:2379", "http://noport", "http://10.0.0.1:2379/v2"},
		ListenClientURLs:    []string{"https://127.0.0.1:2379", "unix:///tmp/x"},
		AdvertiseClientURLs: []string{"localhost:2379"},
		ListenerTLS:         TLSInfo{CertFile: missing, ClientCertAuth: true},
		UpstreamTLS:         TLSInfo{KeyFile: missing, CAFile: missing},
		MaxRuleBody:         -1,
	}
	err := cfg.Validate()
	if err == nil {
		t.Fatal("no error")
	}
	want := []string{
		`--upstream "ftp://10.0.0.1:2379": scheme must be http or https`,
		`--upstream "http://noport": want host:port`,
		`--upstream "http://10.0.0.1:2379/v2": must not have a path`,
		`--listen-client-urls "unix:///tmp/x": scheme must be http or https`,
		`--advertise-client-urls "localhost:2379"`,
		"--cert-file and --key-file go together",
		"--client-cert-auth needs --trusted-ca-file",
		"--upstream-cert-file and --upstream-key-file go together",
		"--cert-file: no such file or directory",
		"--upstream-key-file: no such file or directory",
		"--upstream-ca-file: no such file or directory",
		"byte limits must not be negative",
	}
	msg := err.Error()
	for _, w := range want {
		if !strings.Contains(msg, w) {
			t.Errorf("missing %q in:\n%s", w, msg)
		}
	}
	if strings.Contains(msg, "is required") {
		t.Errorf("reports --upstream missing although it is set:\n%s", msg)
	}
	// Stable: the same configuration gives the same message (file checks walk a map).
	for range 5 {
		if again := cfg.Validate().Error(); again != msg {
			t.Fatalf("message changed between calls:\n%s\n---\n%s", msg, again)
		}
	}
}

func TestValidate(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	file := filepath.Join(dir, "f.pem")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		cfg  Config
		want string // "" for valid
	}{
		{name: "empty", cfg: Config{}, want: "--upstream or --discovery-srv is required"},
		{name: "minimal", cfg: Config{Upstreams: []string{"http://127.0.0.1:2379"}}},
		{name: "IPv6 and https", cfg: Config{Upstreams: []string{"https://[::1]:2379/", "http://h:1"}}},
		{name: "https listener with cert", cfg: Config{Upstreams: []string{"http://h:1"},
			ListenClientURLs: []string{"https://127.0.0.1:0"}, ListenerTLS: TLSInfo{CertFile: file, KeyFile: file}}},
		{name: "client cert auth with CA", cfg: Config{Upstreams: []string{"http://h:1"}, ListenClientURLs: []string{"https://127.0.0.1:2379"},
			ListenerTLS: TLSInfo{CertFile: file, KeyFile: file, CAFile: file, ClientCertAuth: true}}},
		{name: "default listen URLs are valid", cfg: Config{Upstreams: []string{"http://h:1"},
			UpstreamTLS: TLSInfo{CertFile: file, KeyFile: file, CAFile: file}}},
		{name: "https listener without cert", cfg: Config{Upstreams: []string{"http://h:1"},
			ListenClientURLs: []string{"https://127.0.0.1:0"}}, want: "an https listen URL needs"},
		{name: "CRL without CA", cfg: Config{Upstreams: []string{"http://h:1"}, ListenClientURLs: []string{"https://127.0.0.1:2379"},
			ListenerTLS: TLSInfo{CertFile: file, KeyFile: file, CRLFile: file}}, want: "--client-crl-file needs --trusted-ca-file"},
		{name: "CRL missing", cfg: Config{Upstreams: []string{"http://h:1"}, ListenClientURLs: []string{"https://127.0.0.1:2379"},
			ListenerTLS: TLSInfo{CertFile: file, KeyFile: file, CAFile: file, CRLFile: filepath.Join(dir, "missing")}},
			want: "--client-crl-file: no such file or directory"},
		{name: "snapshot spool dir", cfg: Config{Upstreams: []string{"http://h:1"}, SnapshotSpoolDir: dir, MaxSnapshotBytes: 1}},
		{name: "snapshot spool dir missing", cfg: Config{Upstreams: []string{"http://h:1"},
			SnapshotSpoolDir: filepath.Join(dir, "missing")}, want: "--snapshot-spool-dir: no such file or directory"},
		{name: "snapshot spool dir is a file", cfg: Config{Upstreams: []string{"http://h:1"},
			SnapshotSpoolDir: file}, want: "--snapshot-spool-dir: " + file + " is not a directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.cfg.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("Validate = %v, want nil", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("Validate = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestSetFlagsFromEnv(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		check   func(t *testing.T, c *Config)
		wantErr string
	}{
		{
			name: "env fills unset flags",
			env: map[string]string{
				"ETCD_PROXY_PROXY_UPSTREAM":               "http://10.0.0.1:2379,http://10.0.0.2:2379",
				"ETCD_PROXY_PROXY_LISTEN_CLIENT_URLS":     "http://127.0.0.1:1",
				"ETCD_PROXY_PROXY_NAME":                   "from-env",
				"ETCD_PROXY_PROXY_READONLY":               "true",
				"ETCD_PROXY_PROXY_PROXY_DIAL_TIMEOUT":     "250",
				"ETCD_PROXY_PROXY_FORWARD_MEMBER_CHANGES": "1",
			},
			check: func(t *testing.T, c *Config) {
				if !slices.Equal(c.Upstreams, []string{"http://10.0.0.1:2379", "http://10.0.0.2:2379"}) ||
					!slices.Equal(c.ListenClientURLs, []string{"http://127.0.0.1:1"}) || c.Name != "from-env" ||
					!c.ReadOnly || !c.ForwardMemberChanges || c.DialTimeout != 250*time.Millisecond {
					t.Errorf("config = %+v", c)
				}
			},
		},
		{
			name: "command line wins",
			args: []string{"--name", "from-flag", "--upstream=http://a:1"},
			env:  map[string]string{"ETCD_PROXY_PROXY_NAME": "from-env", "ETCD_PROXY_PROXY_UPSTREAM": "http://b:1"},
			check: func(t *testing.T, c *Config) {
				if c.Name != "from-flag" || !slices.Equal(c.Upstreams, []string{"http://a:1"}) {
					t.Errorf("config = %+v", c)
				}
			},
		},
		{
			name: "unset stays default",
			check: func(t *testing.T, c *Config) {
				if c.Name != DefaultName || c.DialTimeout != DefaultDialTimeout ||
					!slices.Equal(c.ListenClientURLs, []string{"http://localhost:2379", "http://localhost:4001"}) {
					t.Errorf("config = %+v", c)
				}
			},
		},
		{
			name: "alias flags read their own variables",
			env: map[string]string{
				"ETCD_PROXY_PROXY_TRUST_CA_FILE":         "/ca.pem",
				"ETCD_PROXY_PROXY_CLIENT_ADVERTISE_URLS": "http://adv:2379",
			},
			check: func(t *testing.T, c *Config) {
				if c.ListenerTLS.CAFile != "/ca.pem" || !slices.Equal(c.AdvertiseClientURLs, []string{"http://adv:2379"}) {
					t.Errorf("config = %+v", c)
				}
			},
		},
		{
			name: "command line wins over an alias's variable",
			args: []string{"--trusted-ca-file", "/flag.pem", "--advertise-client-urls", "http://flag:2379",
				"-k"},
			env: map[string]string{
				"ETCD_PROXY_PROXY_TRUST_CA_FILE":                     "/env.pem",
				"ETCD_PROXY_PROXY_CLIENT_ADVERTISE_URLS":             "http://env:2379",
				"ETCD_PROXY_PROXY_UPSTREAM_INSECURE_SKIP_TLS_VERIFY": "false",
			},
			check: func(t *testing.T, c *Config) {
				if c.ListenerTLS.CAFile != "/flag.pem" || !slices.Equal(c.AdvertiseClientURLs, []string{"http://flag:2379"}) ||
					!c.UpstreamTLS.InsecureSkipVerify {
					t.Errorf("config = %+v", c)
				}
			},
		},
		{
			name: "single-letter flags have no variable",
			env:  map[string]string{"ETCD_PROXY_PROXY_K": "true"},
			check: func(t *testing.T, c *Config) {
				if c.UpstreamTLS.InsecureSkipVerify {
					t.Error("ETCD_PROXY_PROXY_K set -k")
				}
			},
		},
		{
			name: "bad values are all reported",
			env: map[string]string{
				"ETCD_PROXY_PROXY_PROXY_DIAL_TIMEOUT":  "soon",
				"ETCD_PROXY_PROXY_PROXY_WRITE_TIMEOUT": "-1",
				"ETCD_PROXY_PROXY_READONLY":            "maybe",
			},
			wantErr: "ETCD_PROXY_PROXY_PROXY_DIAL_TIMEOUT=\"soon\"|ETCD_PROXY_PROXY_PROXY_WRITE_TIMEOUT=\"-1\"|ETCD_PROXY_PROXY_READONLY=\"maybe\"",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var cfg Config
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			cfg.AddFlags(fs)
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			err := SetFlagsFromEnv(fs, func(k string) (string, bool) { v, ok := tt.env[k]; return v, ok })
			if tt.wantErr != "" {
				if err == nil {
					t.Fatal("no error")
				}
				for _, w := range strings.Split(tt.wantErr, "|") {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("missing %q in %v", w, err)
					}
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, &cfg)
		})
	}
}

func TestMillisecondsFlag(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"0", 0, true},
		{"250", 250 * time.Millisecond, true},
		{" 1000 ", time.Second, true},
		{"1s", 0, false},
		{"1.5", 0, false},
		{"-1", 0, false},
		{"", 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			t.Parallel()
			var d time.Duration
			err := msFlag{p: &d}.Set(tt.in)
			if (err == nil) != tt.ok || d != tt.want {
				t.Errorf("Set(%q) = %v, %v; want %v, ok %v", tt.in, d, err, tt.want, tt.ok)
			}
		})
	}
}

// --client-cert-auth on a plain listener would serve it without authentication: refused, whatever else is set.
func TestClientCertAuthNeedsHTTPS(t *testing.T) {
	t.Parallel()
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	c := Config{Upstreams: []string{"http://h:1"}, ListenClientURLs: []string{"https://127.0.0.1:1", "http://127.0.0.1:2"},
		ListenerTLS: TLSInfo{CertFile: file, KeyFile: file, CAFile: file, ClientCertAuth: true}}
	err := c.Validate()
	if err == nil || !strings.Contains(err.Error(), "http://127.0.0.1:2 would serve without any authentication") ||
		strings.Contains(err.Error(), "https://127.0.0.1:1") {
		t.Errorf("Validate = %v, want the http listener refused", err)
	}
}

// TestEncryptionFlags: the encryption flags, from the command line and the environment, and every problem with
// them in one message.
func TestEncryptionFlags(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good, bad, dup := filepath.Join(dir, "good.key"), filepath.Join(dir, "bad.key"), filepath.Join(dir, "dup.key")
	data, err := crypt.GenerateKeyFile("k1")
	if err != nil {
		t.Fatal(err)
	}
	for f, d := range map[string][]byte{good: data, bad: []byte("k2:c2hvcnQ="), dup: data} {
		if err := os.WriteFile(f, d, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	parse := func(args []string, env map[string]string) *Config {
		t.Helper()
		c := &Config{}
		fs := flag.NewFlagSet("test", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		c.AddFlags(fs)
		if err := fs.Parse(append([]string{"--upstream", "http://127.0.0.1:1"}, args...)); err != nil {
			t.Fatal(err)
		}
		if err := SetFlagsFromEnv(fs, func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
			t.Fatal(err)
		}
		return c
	}
	c := parse([]string{"--encrypt-prefix", "/a,b/", "--encrypt-prefix", "/c/", "--encryption-key-file", good},
		map[string]string{"ETCD_PROXY_PROXY_ENCRYPTION_READ_PLAINTEXT": "true", "ETCD_PROXY_PROXY_ENCRYPT_PREFIX": "/ignored/"})
	if err := c.Validate(); err != nil || !slices.Equal(c.EncryptPrefixes, []string{"/a,b/", "/c/"}) || !c.EncryptionReadPlaintext ||
		c.EncryptionMaxRequestBytes != 3<<19 {
		t.Errorf("flags: %v, %+v", err, c)
	}
	if c := parse(nil, map[string]string{"ETCD_PROXY_PROXY_ENCRYPT_PREFIX": "/env/",
		"ETCD_PROXY_PROXY_ENCRYPTION_KEY_FILE": good}); c.Validate() != nil || !slices.Equal(c.EncryptPrefixes, []string{"/env/"}) {
		t.Errorf("from the environment: %v, %q", c.Validate(), c.EncryptPrefixes)
	}
	err = parse([]string{"--encrypt-prefix", "/s/", "--encryption-key-file", filepath.Join(dir, "missing.key"),
		"--encryption-key-file", bad, "--encryption-key-file", good, "--encryption-key-file", dup}, nil).Validate()
	want := []string{"--encryption-key-file " + filepath.Join(dir, "missing.key") + ": no such file or directory",
		"--encryption-key-file " + bad + ": key k2: want 32 bytes, got 5",
		"--encryption-key-file " + dup + ": key k1 is also in " + good}
	for _, w := range want {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("missing %q in:\n%v", w, err)
		}
	}
	err = parse([]string{"--encryption-key-file", good, "--encryption-read-plaintext"}, nil).Validate()
	for _, w := range []string{"--encryption-key-file needs --encrypt-prefix", "--encryption-read-plaintext needs --encrypt-prefix"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("missing %q in:\n%v", w, err)
		}
	}
	if err := parse([]string{"--encrypt-prefix", "/s/"}, nil).Validate(); err == nil ||
		!strings.Contains(err.Error(), "--encrypt-prefix needs --encryption-key-file") {
		t.Errorf("a prefix without a key: %v", err)
	}
}

// TestEncryptionConfigFile: --encryption-config's problems, all in one message; the example in the repository
// has the schema the loader reads (only its key files are missing here).
func TestEncryptionConfigFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	key := filepath.Join(dir, "k.key")
	data, _ := crypt.GenerateKeyFile("k")
	if err := os.WriteFile(key, data, 0o600); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "enc.yaml")
	if err := os.WriteFile(conf, []byte(`resources:
- prefixes: [/a/]
  providers: [{keyFile: `+key+`}, {keyFile: `+key+`}]
- prefixes: [/a/, /b/]
  providers: [{identity: {}, keyFile: `+key+`}, {}]
- prefixes: []
  providers: [{keyFile: `+filepath.Join(dir, "missing.key")+`}]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := Config{Upstreams: []string{"http://127.0.0.1:1"}, EncryptionConfig: conf, EncryptPrefixes: []string{"/x/"}}
	err := cfg.Validate()
	for _, w := range []string{"--encryption-config excludes --encrypt-prefix",
		"resources[0]: key k appears twice", `resources[1]: prefix "/a/" is also in resources[0]`,
		"resources[1].providers[0]: want one of keyFile, identity", "resources[1].providers[1]: want one of keyFile, identity",
		"resources[2]: no prefixes", "resources[2].providers[0]: open " + filepath.Join(dir, "missing.key")} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("missing %q in:\n%v", w, err)
		}
	}
	if err := os.WriteFile(conf, []byte("resources:\n- prefixes: [/a/]\n  provider: []\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := (&Config{Upstreams: []string{"http://127.0.0.1:1"}, EncryptionConfig: conf}).Validate(); err == nil ||
		!strings.Contains(err.Error(), `unknown field "provider"`) {
		t.Errorf("a misspelt field: %v", err)
	}
	_, _, errs := loadEncryptionConfig(filepath.Join("..", "examples", "encryption", "encryption.yaml"))
	if len(errs) != 3 {
		t.Errorf("the example: %v; want the three missing key files alone", errs)
	}
	for _, err := range errs {
		if !strings.Contains(err.Error(), "no such file or directory") {
			t.Errorf("the example: %v", err)
		}
	}
}
