package cli

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

// TestKeygenEncryptDecrypt: keygen writes a key file only its owner reads, never over another; what encrypt
// prints decrypts with decrypt under the same etcd key only, as the proxy reads it.
func TestKeygenEncryptDecrypt(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "k.key")
	code, stdout, stderr := run("keygen", "--out", keyFile, "--name", "prod-1")
	if code != 0 || !strings.Contains(stdout, "wrote key prod-1 to "+keyFile) {
		t.Fatalf("keygen: exit %d, %q, %q", code, stdout, stderr)
	}
	fi, err := os.Stat(keyFile)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v, %v; want mode 0600", fi, err)
	}
	before, _ := os.ReadFile(keyFile)
	if code, _, stderr := run("keygen", "--out", keyFile); code != 1 || !strings.Contains(stderr, "exists") {
		t.Errorf("keygen over an existing file: exit %d, %q; want 1, file exists", code, stderr)
	}
	if after, _ := os.ReadFile(keyFile); !bytes.Equal(before, after) {
		t.Error("keygen changed an existing key file")
	}
	if code, _, _ := run("keygen"); code != 2 {
		t.Errorf("keygen without --out: exit %d, want 2", code)
	}

	code, stored, stderr := run("encrypt", "--key-file", keyFile, "--key", "/secret/a", "hunter2")
	if code != 0 || !strings.HasPrefix(stored, "epp:enc:v1:xchacha20poly1305:prod-1:") || strings.Contains(stored, "hunter2") {
		t.Fatalf("encrypt: exit %d, %q, %q", code, stored, stderr)
	}
	k, err := crypt.LoadKeyFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	ring, _ := crypt.NewKeyring(k)
	if v, _, err := ring.Decrypt([]byte("/secret/a"), []byte(strings.TrimSuffix(stored, "\n"))); err != nil || string(v) != "hunter2" {
		t.Errorf("the proxy's keyring reads what encrypt printed as %q, %v", v, err)
	}
	code, plain, stderr := run("decrypt", "--key-file", keyFile, "--key", "/secret/a", strings.TrimSuffix(stored, "\n"))
	if code != 0 || plain != "hunter2" {
		t.Errorf("decrypt: exit %d, %q, %q; want hunter2, no newline", code, plain, stderr)
	}
	code, plain, stderr = run("decrypt", "--key-file", keyFile, "--key", "/secret/b", strings.TrimSuffix(stored, "\n"))
	if code != 1 || plain != "" || !strings.Contains(stderr, "does not authenticate") {
		t.Errorf("decrypt under another key: exit %d, %q, %q; want 1 and the reason", code, plain, stderr)
	}
	if code, _, _ := run("decrypt", "--key-file", keyFile, "--key", "/k", "plain"); code != 1 {
		t.Errorf("decrypt of plaintext: exit %d, want 1", code)
	}
	if code, out, _ := run("decrypt", "--key-file", keyFile, "--key", "/k", "--read-plaintext", "plain"); code != 0 || out != "plain" {
		t.Errorf("decrypt --read-plaintext of plaintext: exit %d, %q", code, out)
	}
	if code, _, stderr := run("encrypt", "--key-file", filepath.Join(dir, "missing"), "--key", "/k", "v"); code != 2 || !strings.Contains(stderr, "no such file") {
		t.Errorf("encrypt with a missing key file: exit %d, %q", code, stderr)
	}
	if code, _, _ := run("encrypt", "--key-file", keyFile, "v"); code != 2 {
		t.Errorf("encrypt without --key: exit %d, want 2", code)
	}
}
