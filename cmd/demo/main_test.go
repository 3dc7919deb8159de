package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The demo empties its directory on start: only one it made itself, never a directory with other files.
func TestDemoRefusesForeignDir(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	keep := filepath.Join(dir, "precious")
	if err := os.WriteFile(keep, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	code := demo([]string{"--dir", dir}, &stdout, &stderr)
	if code != exitUsage || !strings.Contains(stderr.String(), "not made by the demo") {
		t.Errorf("demo --dir with other files: exit %d, %q", code, stderr.String())
	}
	if _, err := os.Stat(keep); err != nil {
		t.Errorf("the demo removed a file it did not make: %v", err)
	}
}
