package harness

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/tools/txtar"
)

// Update makes CheckGolden rewrite golden files instead of comparing: `go test ./... -update`. It is registered
// on the default FlagSet, so a package that imports harness must not define its own "update" flag, and a
// program that imports harness must not pass -update to flag.Parse by mistake.
var Update = flag.Bool("update", false, "rewrite golden files")

// Golden formats a result as a txtar archive with the sections cmd, stdout, stderr and exit, each passed
// through norm (nil: unchanged).
func Golden(r Result, norm func(string) string) []byte {
	if norm == nil {
		norm = func(s string) string { return s }
	}
	exit := fmt.Sprint(r.Exit)
	if r.Err != nil {
		exit += " (" + r.Err.Error() + ")"
	}
	a := &txtar.Archive{Files: []txtar.File{
		{Name: "cmd", Data: section(norm(r.CommandLine()))},
		{Name: "stdout", Data: section(norm(r.Stdout))},
		{Name: "stderr", Data: section(norm(r.Stderr))},
		{Name: "exit", Data: section(norm(exit))},
	}}
	return txtar.Format(a)
}

// section ends non-empty text with exactly one newline, as txtar stores it.
func section(s string) []byte {
	if s == "" {
		return nil
	}
	return []byte(strings.TrimRight(s, "\n") + "\n")
}

// CheckGolden compares got, normalised by norm, with the golden txtar file at path; with -update it writes the
// file instead (creating directories). On a mismatch it reports cmp.Diff(want, got).
func CheckGolden(t testing.TB, path string, got Result, norm func(string) string) {
	t.Helper()
	data := Golden(got, norm)
	if *Update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatalf("golden: %v", err)
		}
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatalf("golden: %v", err)
		}
		t.Logf("golden: wrote %s", path)
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("golden: %v (run with -update to create it)", err)
	}
	if diff := cmp.Diff(string(want), string(data)); diff != "" {
		t.Errorf("golden %s mismatch (-want +got):\n%s", path, diff)
	}
}
