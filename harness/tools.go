package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
)

// EtcdVersion is the version of the pinned etcd modules the tools are built from.
const EtcdVersion = "v3.5.35"

// ModulePath is this project's module path.
const ModulePath = "github.com/etcd-proxy-proxy/etcd-proxy-proxy"

// toolSpec is a tool's main package and the module it is built in: a directory under the module root, "" for
// the root itself. Newer etcd lines have their own modules under tools/ (their dependencies fight ours).
type toolSpec struct{ pkg, dir string }

var toolPackages = map[string]toolSpec{
	"etcd":     {"go.etcd.io/etcd/server/v3", ""},
	"etcdctl":  {"go.etcd.io/etcd/etcdctl/v3", ""},
	"etcd-3.6": {"go.etcd.io/etcd/server/v3", "tools/etcd36"},
	"etcd-3.7": {"go.etcd.io/etcd/server/v3", "tools/etcd37"},
	// The stock konnectivity server and agent (the tunnel interop tests of issue 16).
	"konnectivity-server": {"sigs.k8s.io/apiserver-network-proxy/cmd/server", "tools/konnectivity"},
	"konnectivity-agent":  {"sigs.k8s.io/apiserver-network-proxy/cmd/agent", "tools/konnectivity"},
}

type toolResult struct {
	once sync.Once
	path string
	err  error
}

var tools sync.Map // name → *toolResult

// Tool returns the path of a pinned tool binary: "etcd" or "etcdctl" (v3.5.35), "etcd-3.6" or "etcd-3.7" (the
// versions tools/etcd36 and tools/etcd37 pin), "konnectivity-server" or "konnectivity-agent" (tools/konnectivity). If $EPP_TOOLS_DIR holds it, that one is used; otherwise it is
// built once per process with `go build` in its module (fast from the Go build cache) into
// os.UserCacheDir()/etcd-proxy-proxy/v3.5.35/, renamed into place atomically so that test binaries running side
// by side share it. A failed build is not retried within the process.
func Tool(ctx context.Context, name string) (string, error) {
	spec, ok := toolPackages[name]
	if !ok {
		return "", fmt.Errorf("harness: unknown tool %q", name)
	}
	v, _ := tools.LoadOrStore(name, &toolResult{})
	r := v.(*toolResult)
	r.once.Do(func() { r.path, r.err = buildTool(ctx, name, spec) })
	return r.path, r.err
}

func buildTool(ctx context.Context, name string, spec toolSpec) (string, error) {
	if dir := os.Getenv("EPP_TOOLS_DIR"); dir != "" {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	cache, err := os.UserCacheDir()
	if err != nil {
		cache = os.TempDir()
	}
	dir := filepath.Join(cache, "etcd-proxy-proxy", EtcdVersion)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", fmt.Errorf("harness: tool cache dir: %w", err)
	}
	tmp, err := os.CreateTemp(dir, name+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("harness: build %s: %w", name, err)
	}
	tmp.Close()
	defer os.Remove(tmp.Name()) // no-op after the rename

	ctx, cancel := withDefaultTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goCommand(), "build", "-o", tmp.Name(), spec.pkg)
	cmd.Dir = filepath.Join(root, spec.dir)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("harness: go build %s in %s: %w\n%s", spec.pkg, cmd.Dir, err, out.Bytes())
	}
	final := filepath.Join(dir, name)
	if err := os.Rename(tmp.Name(), final); err != nil {
		return "", fmt.Errorf("harness: install %s: %w", name, err)
	}
	return final, nil
}

// goCommand is the go tool that is running the tests ($GOROOT/bin/go, set by `go test`), else go from $PATH.
func goCommand() string {
	if root := os.Getenv("GOROOT"); root != "" {
		if p := filepath.Join(root, "bin", "go"); fileExists(p) {
			return p
		}
	}
	return "go"
}

// ModuleRoot finds this project's module root: walking up from the working directory, then from this source
// file (for a demo binary run elsewhere on the machine it was built on).
func ModuleRoot() (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		starts = append(starts, filepath.Dir(file))
	}
	for _, d := range starts {
		for {
			b, err := os.ReadFile(filepath.Join(d, "go.mod"))
			if err == nil && isOurModule(b) {
				return d, nil
			}
			parent := filepath.Dir(d)
			if parent == d {
				break
			}
			d = parent
		}
	}
	return "", errors.New("harness: module root of " + ModulePath + " not found (run from inside the repository)")
}

func isOurModule(gomod []byte) bool {
	for _, line := range strings.Split(string(gomod), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "module" {
			return strings.Trim(f[1], `"`) == ModulePath
		}
	}
	return false
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
