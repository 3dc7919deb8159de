package cli

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/proxy"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/harness"
)

func TestVersionSaysWhatItSpeaks(t *testing.T) {
	t.Parallel()
	_, stdout, _ := run("version")
	for _, want := range []string{"etcd-proxy-proxy " + Version, runtime.Version(), "v2 (HTTP)", "v3 (gRPC and the JSON gateway /v3)", "etcd 3.5.35"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("version output lacks %q:\n%s", want, stdout)
		}
	}
}

func TestLogFlags(t *testing.T) {
	t.Parallel()
	var cfg proxy.Config
	var lf logFlags
	if _, err := parseAllFlags("x", []string{"--upstream", "http://127.0.0.1:1", "--log-level", "debug", "--log-format", "json"}, &cfg, &lf, io.Discard); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	lf.logger(&buf).Debug("hello", "k", "v")
	var line map[string]any
	if err := json.Unmarshal(buf.Bytes(), &line); err != nil || line["msg"] != "hello" || line["level"] != "DEBUG" {
		t.Errorf("json debug line %q: %v", buf.String(), err)
	}
	for args, want := range map[string]string{"--log-level=loud": "log-level", "--log-format=xml": `--log-format "xml"`} {
		_, err := parseAllFlags("x", []string{"--upstream", "http://127.0.0.1:1", args}, &cfg, &logFlags{}, io.Discard)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", args, err)
		}
	}
}

// The serve loop tells systemd READY=1 once listening, reloads on SIGHUP, and says STOPPING=1 on SIGTERM.
func TestServeSystemdAndSignals(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(200) }))
	defer up.Close()

	sig := make(chan os.Signal, 1)
	stderr := &harness.Buffer{}
	done := make(chan int, 1)
	go func() {
		done <- serveUntil([]string{"etcd-proxy-proxy", "--upstream", up.URL, "--listen-client-urls", "http://127.0.0.1:0",
			"--listen-metrics-urls", "http://127.0.0.1:0", "--log-format", "json"}, io.Discard, stderr, sig)
	}()
	readState := func() string {
		_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		b := make([]byte, 256)
		n, err := conn.Read(b)
		if err != nil {
			t.Fatalf("no sd_notify datagram: %v\n%s", err, stderr.String())
		}
		return string(b[:n])
	}
	if got := readState(); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	if !strings.Contains(stderr.String(), `"msg":"metrics listening"`) {
		t.Errorf("READY=1 before the metrics listener was open:\n%s", stderr.String())
	}
	sig <- syscall.SIGHUP
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(stderr.String(), "SIGHUP: certificates reloaded") {
		if time.Now().After(deadline) {
			t.Fatalf("SIGHUP not handled:\n%s", stderr.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	sig <- syscall.SIGTERM
	if got := readState(); got != "STOPPING=1" {
		t.Errorf("notification at shutdown %q, want STOPPING=1", got)
	}
	select {
	case code := <-done:
		if code != exitOK {
			t.Errorf("exit status %d\n%s", code, stderr.String())
		}
	case <-time.After(15 * time.Second):
		t.Fatal("did not stop on SIGTERM")
	}
	sc := bufio.NewScanner(strings.NewReader(stderr.String()))
	for sc.Scan() {
		if !json.Valid(sc.Bytes()) {
			t.Errorf("--log-format json wrote a line that is not JSON: %q", sc.Text())
		}
	}
}

// checkFlags parses args and env as the command does and validates them, with every file flag pointing at a
// file that exists under root (the path with prefix replaced by root): the examples must be valid
// configurations of this very binary.
func checkFlags(t *testing.T, args []string, env map[string]string, prefix, root string) {
	t.Helper()
	var cfg proxy.Config
	var lf logFlags
	fs := flag.NewFlagSet("etcd-proxy-proxy", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	cfg.AddFlags(fs)
	lf.addFlags(fs)
	if err := fs.Parse(args); err != nil {
		t.Fatalf("flags %q: %v", args, err)
	}
	if err := proxy.SetFlagsFromEnv(fs, func(k string) (string, bool) { v, ok := env[k]; return v, ok }); err != nil {
		t.Fatalf("environment: %v", err)
	}
	for _, p := range []*string{&cfg.UpstreamTLS.CAFile, &cfg.UpstreamTLS.CertFile, &cfg.UpstreamTLS.KeyFile,
		&cfg.ListenerTLS.CAFile, &cfg.ListenerTLS.CertFile, &cfg.ListenerTLS.KeyFile} {
		if *p == "" {
			continue
		}
		if !strings.HasPrefix(*p, prefix) {
			t.Errorf("file %s is not under %s", *p, prefix)
			continue
		}
		*p = filepath.Join(root, strings.TrimPrefix(*p, prefix))
		if err := os.MkdirAll(filepath.Dir(*p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(*p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := cfg.Validate(); err != nil {
		t.Errorf("invalid configuration: %v", err)
	}
	if err := lf.validate(); err != nil {
		t.Error(err)
	}
	if len(cfg.Upstreams) == 0 || len(cfg.ListenMetricsURLs) == 0 {
		t.Errorf("no upstream or no metrics listener: %+v", cfg)
	}
}

func TestKubernetesDaemonSet(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../examples/kubernetes/daemonset.yaml")
	if err != nil {
		t.Fatal(err)
	}
	type probe struct {
		HTTPGet struct {
			Path string `json:"path"`
			Port string `json:"port"`
		} `json:"httpGet"`
	}
	var ds struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Spec       struct {
			Template struct {
				Spec struct {
					HostNetwork bool `json:"hostNetwork"`
					Containers  []struct {
						Args  []string `json:"args"`
						Ports []struct {
							Name          string `json:"name"`
							ContainerPort int    `json:"containerPort"`
							HostPort      int    `json:"hostPort"`
						} `json:"ports"`
						LivenessProbe  probe `json:"livenessProbe"`
						ReadinessProbe probe `json:"readinessProbe"`
						VolumeMounts   []struct {
							Name      string `json:"name"`
							MountPath string `json:"mountPath"`
							ReadOnly  bool   `json:"readOnly"`
						} `json:"volumeMounts"`
					} `json:"containers"`
					Volumes []struct {
						Name   string `json:"name"`
						Secret *struct {
							SecretName string `json:"secretName"`
							Items      []struct {
								Key, Path string
							} `json:"items"`
						} `json:"secret"`
					} `json:"volumes"`
				} `json:"spec"`
			} `json:"template"`
		} `json:"spec"`
	}
	if err := yaml.UnmarshalStrict(b, &ds); err != nil && !strings.Contains(err.Error(), "unknown field") {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &ds); err != nil {
		t.Fatal(err)
	}
	pod := ds.Spec.Template.Spec
	if ds.APIVersion != "apps/v1" || ds.Kind != "DaemonSet" || !pod.HostNetwork || len(pod.Containers) != 1 {
		t.Fatalf("want an apps/v1 DaemonSet on the host network with one container: %+v", ds)
	}
	c := pod.Containers[0]
	var ports []int
	for _, p := range c.Ports {
		if p.HostPort != p.ContainerPort {
			t.Errorf("port %s: hostPort %d != containerPort %d", p.Name, p.HostPort, p.ContainerPort)
		}
		ports = append(ports, p.ContainerPort)
	}
	if !slices.Contains(ports, 2379) || !slices.Contains(ports, 2381) {
		t.Errorf("ports %v, want 2379 (client) and 2381 (metrics)", ports)
	}
	if c.LivenessProbe.HTTPGet.Path != "/livez" || c.ReadinessProbe.HTTPGet.Path != "/readyz" || c.ReadinessProbe.HTTPGet.Port != "metrics" {
		t.Errorf("probes: %+v %+v", c.LivenessProbe, c.ReadinessProbe)
	}
	if len(c.VolumeMounts) != 1 || len(pod.Volumes) != 1 || pod.Volumes[0].Secret == nil ||
		pod.Volumes[0].Name != c.VolumeMounts[0].Name || !c.VolumeMounts[0].ReadOnly {
		t.Fatalf("want one read-only volume from a Secret: %+v %+v", c.VolumeMounts, pod.Volumes)
	}
	mount := c.VolumeMounts[0].MountPath
	var files []string
	for _, it := range pod.Volumes[0].Secret.Items {
		files = append(files, filepath.Join(mount, it.Path))
	}
	for _, f := range []string{"--upstream-ca-file=", "--upstream-cert-file=", "--upstream-key-file="} {
		i := slices.IndexFunc(c.Args, func(a string) bool { return strings.HasPrefix(a, f) })
		if i < 0 || !slices.Contains(files, strings.TrimPrefix(c.Args[i], f)) {
			t.Errorf("%s does not name a file of the Secret volume %v: %v", f, files, c.Args)
		}
	}
	checkFlags(t, c.Args, nil, mount, t.TempDir())
}

// readUnit returns the Environment= assignments and the ExecStart/ExecReload/Type values of a systemd file.
func readUnit(t *testing.T, path string, env map[string]string, keys map[string]string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), "=")
		if !ok || strings.HasPrefix(line, "#") {
			continue
		}
		if k == "Environment" {
			ek, ev, _ := strings.Cut(v, "=")
			env[ek] = ev // a drop-in's later assignment wins, as in systemd
			continue
		}
		keys[k] = v
	}
}

func TestSystemdUnit(t *testing.T) {
	t.Parallel()
	env, keys := map[string]string{}, map[string]string{}
	readUnit(t, "../examples/systemd/etcd-proxy-proxy.service", env, keys)
	drop, err := filepath.Glob("../examples/systemd/etcd-proxy-proxy.service.d/*.conf")
	if err != nil || len(drop) == 0 {
		t.Fatalf("no drop-in: %v", err)
	}
	for _, d := range drop {
		readUnit(t, d, env, map[string]string{})
	}
	if keys["Type"] != "notify" || !strings.Contains(keys["ExecReload"], "-HUP $MAINPID") ||
		!strings.HasSuffix(strings.Fields(keys["ExecStart"])[0], "/etcd-proxy-proxy") {
		t.Errorf("unit: %v", keys)
	}
	for k := range env {
		if !strings.HasPrefix(k, proxy.EnvPrefix) {
			t.Errorf("variable %s is not one of the proxy's", k)
		}
	}
	if env[proxy.EnvPrefix+"LISTEN_CLIENT_URLS"] != "http://localhost:2379,http://localhost:4001" {
		t.Errorf("the drop-in does not keep etcd's proxy ports: %v", env)
	}
	// Every variable must be a flag: SetFlagsFromEnv ignores unknown ones, so compare with the flag names.
	var cfg proxy.Config
	var lf logFlags
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	cfg.AddFlags(fs)
	lf.addFlags(fs)
	for k := range env {
		name := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(k, proxy.EnvPrefix), "_", "-"))
		if fs.Lookup(name) == nil {
			t.Errorf("%s sets no flag (--%s)", k, name)
		}
	}
	checkFlags(t, strings.Fields(keys["ExecStart"])[1:], env, "/etc/ssl/etcd", t.TempDir())
}
