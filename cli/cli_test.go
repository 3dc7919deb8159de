package cli

import (
	"bytes"
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"
)

// These tests read the real environment (parseFlags takes unset flags from it); none of them sets it.

func tempFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f.pem")
	if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func run(args ...string) (code int, stdout, stderr string) {
	var out, errb bytes.Buffer
	code = Main(append([]string{"etcd-proxy-proxy"}, args...), &out, &errb)
	return code, out.String(), errb.String()
}

func TestBadFlagsAllReported(t *testing.T) {
	t.Parallel()
	code, stdout, stderr := run("--bogus", "--listen-client-urls", "ftp://0.0.0.0:2379", "--cert-file", tempFile(t),
		"-also-unknown=1")
	if code != 2 {
		t.Errorf("exit status = %d, want 2", code)
	}
	if stdout != "" {
		t.Errorf("stdout = %q, want nothing", stdout)
	}
	for _, want := range []string{
		"unknown flag --bogus",
		"unknown flag -also-unknown=1",
		`--listen-client-urls "ftp://0.0.0.0:2379": scheme must be http or https`,
		"--upstream or --discovery-srv is required",
		"--cert-file and --key-file go together",
	} {
		if !strings.Contains(stderr, want) {
			t.Errorf("missing %q in:\n%s", want, stderr)
		}
	}
	if n := strings.Count(stderr, "invalid configuration"); n != 1 {
		t.Errorf("%d messages, want one:\n%s", n, stderr)
	}
}

func TestBadFlagValues(t *testing.T) {
	t.Parallel()
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--upstream", "http://127.0.0.1:2379", "--proxy-dial-timeout", "1s"}, "proxy-dial-timeout"},
		{[]string{"--upstream", "http://127.0.0.1:2379", "--readonly=maybe"}, "readonly"},
		{[]string{"--upstream", "http://127.0.0.1:2379", "extra"}, "unexpected arguments: extra"},
		{[]string{"--upstream"}, "flag needs an argument"},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			t.Parallel()
			// parseFlags, not Main: a regression that accepted the flags would serve until the test times out.
			var cfg proxy.Config
			_, err := parseFlags("etcd-proxy-proxy", tt.args, &cfg, io.Discard)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("parseFlags = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestHelp(t *testing.T) {
	t.Parallel()
	for _, arg := range []string{"--help", "-h", "-help"} {
		t.Run(arg, func(t *testing.T) {
			t.Parallel()
			code, stdout, stderr := run(arg)
			if code != 0 {
				t.Errorf("exit status = %d, want 0", code)
			}
			help := stdout + stderr
			if n := strings.Count(help, "Usage:"); n != 1 {
				t.Errorf("the usage is printed %d times, want once", n)
			}
			var cfg proxy.Config
			fs := flag.NewFlagSet("x", flag.ContinueOnError)
			cfg.AddFlags(fs)
			var names []string
			fs.VisitAll(func(f *flag.Flag) {
				names = append(names, f.Name)
				if !strings.Contains(help, "-"+f.Name+" ") && !strings.Contains(help, "-"+f.Name+"\n") {
					t.Errorf("flag -%s not listed", f.Name)
				}
				if f.DefValue != "" && f.DefValue != "false" && f.DefValue != "0" && !strings.Contains(help, f.DefValue) {
					t.Errorf("default %q of -%s not listed", f.DefValue, f.Name)
				}
			})
			// The documented flags (DESIGN.md "Flags") stay.
			for _, want := range []string{"upstream", "upstream-ca-file", "upstream-cert-file", "upstream-key-file", "k",
				"upstream-insecure-skip-tls-verify", "listen-client-urls", "advertise-client-urls", "client-advertise-urls",
				"cert-file", "key-file", "trusted-ca-file", "trust-ca-file", "client-cert-auth", "name"} {
				if !slices.Contains(names, want) {
					t.Errorf("flag -%s is not defined", want)
				}
			}
			for _, want := range []string{"http://localhost:2379,http://localhost:4001", `"etcd-proxy-proxy"`, "-version",
				proxy.EnvPrefix + "LISTEN_CLIENT_URLS"} {
				if !strings.Contains(help, want) {
					t.Errorf("help does not mention %q", want)
				}
			}
		})
	}
}

func TestVersion(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{{"version"}, {"--version"}} {
		code, stdout, stderr := run(args...)
		if code != 0 || !strings.Contains(stdout, "etcd-proxy-proxy "+Version) || stderr != "" {
			t.Errorf("%q: exit %d, stdout %q, stderr %q", args, code, stdout, stderr)
		}
	}
}

func TestSeedSpellings(t *testing.T) {
	t.Parallel()
	ca := tempFile(t)
	tests := []struct {
		name  string
		args  []string
		check func(t *testing.T, c *proxy.Config)
	}{
		{
			name: "single dash upstream",
			args: []string{"-upstream", "http://10.0.0.1:2379"},
			check: func(t *testing.T, c *proxy.Config) {
				if !slices.Equal(c.Upstreams, []string{"http://10.0.0.1:2379"}) {
					t.Errorf("Upstreams = %q", c.Upstreams)
				}
			},
		},
		{
			name: "upstream list",
			args: []string{"--upstream=http://10.0.0.1:2379, http://10.0.0.2:2379"},
			check: func(t *testing.T, c *proxy.Config) {
				if !slices.Equal(c.Upstreams, []string{"http://10.0.0.1:2379", "http://10.0.0.2:2379"}) {
					t.Errorf("Upstreams = %q", c.Upstreams)
				}
			},
		},
		{
			name: "trust-ca-file",
			args: []string{"-upstream", "http://10.0.0.1:2379", "-trust-ca-file", ca, "-client-cert-auth",
				"-cert-file", ca, "-key-file", ca, "-listen-client-urls", "https://127.0.0.1:2379"},
			check: func(t *testing.T, c *proxy.Config) {
				if c.ListenerTLS.CAFile != ca || !c.ListenerTLS.ClientCertAuth || c.UpstreamTLS.CAFile != "" {
					t.Errorf("ListenerTLS = %+v, UpstreamTLS = %+v", c.ListenerTLS, c.UpstreamTLS)
				}
			},
		},
		{
			name: "client-advertise-urls",
			args: []string{"-upstream", "http://10.0.0.1:2379", "-client-advertise-urls", "http://a:2379,https://b:2379"},
			check: func(t *testing.T, c *proxy.Config) {
				if !slices.Equal(c.AdvertiseClientURLs, []string{"http://a:2379", "https://b:2379"}) {
					t.Errorf("AdvertiseClientURLs = %q", c.AdvertiseClientURLs)
				}
			},
		},
		{
			name: "-k",
			args: []string{"-k", "-upstream", "https://10.0.0.1:2379"},
			check: func(t *testing.T, c *proxy.Config) {
				if !c.UpstreamTLS.InsecureSkipVerify {
					t.Error("-k did not set InsecureSkipVerify")
				}
			},
		},
		{
			name: "defaults",
			args: []string{"--upstream", "http://10.0.0.1:2379"},
			check: func(t *testing.T, c *proxy.Config) {
				if !slices.Equal(c.ListenClientURLs, []string{"http://localhost:2379", "http://localhost:4001"}) ||
					!slices.Equal(c.AdvertiseClientURLs, []string{"http://localhost:2379"}) || c.Name != proxy.DefaultName ||
					c.UpstreamTLS.InsecureSkipVerify || c.ReadOnly || c.ForwardMemberChanges {
					t.Errorf("config = %+v", c)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var cfg proxy.Config
			showVersion, err := parseFlags("etcd-proxy-proxy", tt.args, &cfg, io.Discard)
			if err != nil || showVersion {
				t.Fatalf("parseFlags = %v, %v", showVersion, err)
			}
			tt.check(t, &cfg)
		})
	}
}

func TestSplitUnknown(t *testing.T) {
	t.Parallel()
	var cfg proxy.Config
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	cfg.AddFlags(fs)
	known, unknown := splitUnknown(fs, []string{"-k", "--nope", "--name", "-weird-name", "--x=1", "--bogus", "value",
		"--upstream=http://a:1", "--", "--after"})
	if want := []string{"-k", "--name", "-weird-name", "--upstream=http://a:1", "--", "--after"}; !slices.Equal(known, want) {
		t.Errorf("known = %q, want %q", known, want)
	}
	if want := []string{"--nope", "--x=1", "--bogus"}; !slices.Equal(unknown, want) {
		t.Errorf("unknown = %q, want %q", unknown, want)
	}
}

// The demo is cmd/demo now: the old subcommand says so in one line and exits 2, whatever follows it. (The
// directory holds a file so that a binary that still ran the demo refuses it at once instead of starting.)
func TestDemoMoved(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "precious"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr := run("demo", "--dir", dir)
	if code != exitUsage || stdout != "" || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, "go run ./cmd/demo") {
		t.Errorf("etcd-proxy-proxy demo: exit %d, stdout %q, stderr %q; want 2 and one line naming go run ./cmd/demo", code, stdout, stderr)
	}
}
