package main

import (
	"errors"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const module = "github.com/etcd-proxy-proxy/etcd-proxy-proxy"

// notLinked are the packages of the test rig that the product binary must not link: the demo (go run ./cmd/demo)
// and the tests use them. A package counts with every package below it.
var notLinked = []struct{ pkg, why string }{
	{"go.etcd.io/etcd/server/v3/embed", "the embedded etcd server"},
	{"go.etcd.io/etcd/raft/v3", "raft (etcd 3.5's module)"},
	{"go.etcd.io/raft/v3", "raft (etcd 3.6's module)"},
	{"testing", "the standard library's test framework"},
	{module + "/harness", "the test harness, with the goldens' -update flag on the default FlagSet"},
}

// TestNoHarnessLinked asserts that `go list -deps ./cmd/etcd-proxy-proxy` names none of notLinked, and on
// failure prints the import chain that brings each in.
func TestNoHarnessLinked(t *testing.T) {
	t.Parallel()
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("this test runs `go list`: %v", err)
	}
	// One line per package: its import path, then its imports. The test runs in cmd/etcd-proxy-proxy.
	out, err := exec.Command(goCmd, "list", "-deps", "-f", "{{.ImportPath}}{{range .Imports}} {{.}}{{end}}", ".").Output()
	if err != nil {
		if ee := (*exec.ExitError)(nil); errors.As(err, &ee) {
			t.Fatalf("go list -deps: %v\n%s", err, ee.Stderr)
		}
		t.Fatalf("go list -deps: %v", err)
	}
	imports := map[string][]string{}
	root := ""
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		imports[f[0]] = f[1:]
		root = f[0] // -deps lists a package after its dependencies: the last is the command
	}
	// The list must be this module's, or a renamed module would make the harness check pass for nothing.
	if root != module+"/cmd/etcd-proxy-proxy" || !slices.Contains(imports[root], module+"/cli") {
		t.Fatalf("go list -deps lists %d packages ending with %q, want the command %s importing %s/cli",
			len(imports), root, module+"/cmd/etcd-proxy-proxy", module)
	}
	linked := false
	for _, n := range notLinked {
		var found []string
		for pkg := range imports {
			if pkg == n.pkg || strings.HasPrefix(pkg, n.pkg+"/") {
				found = append(found, pkg)
			}
		}
		if len(found) == 0 {
			continue
		}
		linked = true
		slices.Sort(found) // the package itself first, if it is linked
		t.Errorf("etcd-proxy-proxy links %s, %s (%d package(s)): %s",
			n.pkg, n.why, len(found), strings.Join(importChain(imports, root, found[0]), " → "))
	}
	if linked {
		t.Log("The product binary must not link the test rig: the demo is cmd/demo; test helpers belong in harness/ or _test.go files.")
	}
}

// importChain is a shortest chain of imports from root to pkg.
func importChain(imports map[string][]string, root, pkg string) []string {
	from := map[string]string{root: ""}
	for queue := []string{root}; len(queue) > 0; queue = queue[1:] {
		p := queue[0]
		if p == pkg {
			var chain []string
			for ; p != ""; p = from[p] {
				chain = append(chain, p)
			}
			slices.Reverse(chain)
			return chain
		}
		for _, q := range imports[p] {
			if _, seen := from[q]; !seen {
				from[q] = p
				queue = append(queue, q)
			}
		}
	}
	return []string{root, "…", pkg}
}
