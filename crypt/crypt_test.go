package crypt_test

import (
	"bytes"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

func newKey(t testing.TB, name string, fill byte) *crypt.Key {
	t.Helper()
	k, err := crypt.NewKey(name, bytes.Repeat([]byte{fill}, crypt.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func newRing(t testing.TB, keys ...*crypt.Key) *crypt.Keyring {
	t.Helper()
	r, err := crypt.NewKeyring(keys...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestRoundTripAndFormat(t *testing.T) {
	t.Parallel()
	r := newRing(t, newKey(t, "k1", 1))
	for _, plain := range []string{"", "v", strings.Repeat("x", 1024)} {
		stored, err := r.Encrypt([]byte("/secret/a"), []byte(plain))
		if err != nil {
			t.Fatal(err)
		}
		const head = "epp:enc:v1:xchacha20poly1305:k1:"
		if !strings.HasPrefix(string(stored), head) {
			t.Fatalf("stored %q; want it to start with %q", stored, head)
		}
		raw, err := base64.StdEncoding.DecodeString(string(stored[len(head):]))
		if err != nil || len(raw) != 24+len(plain)+16 {
			t.Fatalf("payload: %d bytes, %v; want base64 of nonce (24) ‖ ciphertext (%d) ‖ tag (16)", len(raw), err, len(plain))
		}
		if len(stored) != r.EncryptedLen(len(plain)) {
			t.Errorf("EncryptedLen(%d) = %d; stored %d", len(plain), r.EncryptedLen(len(plain)), len(stored))
		}
		if len(plain) > 8 && bytes.Contains(stored, []byte(plain)) {
			t.Errorf("stored value holds the plaintext")
		}
		got, read, err := r.Decrypt([]byte("/secret/a"), stored)
		if err != nil || string(got) != plain || read.Key != "k1" || read.Stale {
			t.Errorf("Decrypt = %q, %+v, %v; want %q by k1, fresh", got, read, err, plain)
		}
	}
	a, _ := r.Encrypt([]byte("k"), []byte("same"))
	b, _ := r.Encrypt([]byte("k"), []byte("same"))
	if bytes.Equal(a, b) {
		t.Error("two encryptions of one value are equal: the nonce is not random")
	}
}

// TestFailClosed: every way a value can fail to decrypt is an error, never a value.
func TestFailClosed(t *testing.T) {
	t.Parallel()
	k1, k2 := newKey(t, "k1", 1), newKey(t, "k2", 2)
	r := newRing(t, k1)
	stored, err := r.Encrypt([]byte("/secret/a"), []byte("hunter2"))
	if err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Clone(stored) // one base64 digit of the ciphertext changed: still valid base64
	i := len("epp:enc:v1:xchacha20poly1305:k1:") + 30
	tampered[i] = map[bool]byte{true: 'B', false: 'A'}[tampered[i] == 'A']
	other, _ := newRing(t, k2).Encrypt([]byte("/secret/a"), []byte("hunter2"))
	sameNameOtherSecret, _ := newRing(t, newKey(t, "k1", 9)).Encrypt([]byte("/secret/a"), []byte("hunter2"))
	for _, c := range []struct {
		name   string
		key    string
		stored []byte
		want   error
	}{
		{"moved to another key", "/public/a", stored, crypt.ErrAuth},
		{"tampered", "/secret/a", tampered, crypt.ErrAuth},
		{"another secret under the same name", "/secret/a", sameNameOtherSecret, crypt.ErrAuth},
		{"unknown key", "/secret/a", other, crypt.ErrUnknownKey},
		{"plaintext", "/secret/a", []byte("hunter2"), crypt.ErrNotEncrypted},
		{"empty plaintext", "/secret/a", []byte{}, crypt.ErrNotEncrypted},
		{"truncated", "/secret/a", stored[:len(stored)-10], crypt.ErrMalformed},
		{"no payload", "/secret/a", []byte("epp:enc:v1:xchacha20poly1305:k1"), crypt.ErrMalformed},
		{"short payload", "/secret/a", []byte("epp:enc:v1:xchacha20poly1305:k1:AAAA"), crypt.ErrMalformed},
		{"another version", "/secret/a", []byte("epp:enc:v2:xchacha20poly1305:k1:AAAA"), crypt.ErrMalformed},
		{"identity named", "/secret/a", []byte("epp:enc:v1:identity:identity:aGk="), crypt.ErrUnknownKey},
	} {
		got, _, err := r.Decrypt([]byte(c.key), c.stored)
		if !errors.Is(err, c.want) || got != nil {
			t.Errorf("%s: Decrypt = %q, %v; want nil, %v", c.name, got, err, c.want)
		}
	}
	if s := r.Stats()[0]; s.Failures != 5 || s.Decryptions != 0 || r.UnattributedFailures() != 6 {
		t.Errorf("stats %+v, %d unattributed; want 5 failures (the values that named k1), no decryption, 6 others", s, r.UnattributedFailures())
	}
}

// TestRotation: the first key encrypts, every key decrypts, and what another than the first reads is stale;
// plaintext reads only with the identity provider, stale unless identity is first (turning encryption off).
func TestRotation(t *testing.T) {
	t.Parallel()
	old, cur := newKey(t, "old", 1), newKey(t, "new", 2)
	before, _ := newRing(t, old).Encrypt([]byte("k"), []byte("v1"))
	r := newRing(t, cur, old, crypt.IdentityKey())
	after, _ := r.Encrypt([]byte("k"), []byte("v2"))
	if !strings.HasPrefix(string(after), "epp:enc:v1:xchacha20poly1305:new:") {
		t.Errorf("encrypted with %q; want the first key", after)
	}
	for _, c := range []struct {
		stored, want []byte
		key          string
		stale        bool
	}{
		{before, []byte("v1"), "old", true},
		{after, []byte("v2"), "new", false},
		{[]byte("plain"), []byte("plain"), "identity", true},
	} {
		got, read, err := r.Decrypt([]byte("k"), c.stored)
		if err != nil || !bytes.Equal(got, c.want) || read.Key != c.key || read.Stale != c.stale {
			t.Errorf("Decrypt(%.30q) = %q, %+v, %v; want %q by %s, stale %v", c.stored, got, read, err, c.want, c.key, c.stale)
		}
	}
	out := newRing(t, crypt.IdentityKey(), cur)
	if stored, _ := out.Encrypt([]byte("k"), []byte("v3")); string(stored) != "v3" {
		t.Errorf("identity first stores %q; want the plaintext", stored)
	}
	if got, read, err := out.Decrypt([]byte("k"), after); err != nil || string(got) != "v2" || !read.Stale {
		t.Errorf("identity first reads an encrypted value as %q, %+v, %v; want v2, stale", got, read, err)
	}
	if _, err := crypt.NewKeyring(cur, newKey(t, "new", 3)); err == nil {
		t.Error("a keyring with two keys of one name was made")
	}
}

func TestKeyFile(t *testing.T) {
	t.Parallel()
	data, err := crypt.GenerateKeyFile("prod-2026")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(data), "prod-2026:") || !strings.HasSuffix(string(data), "\n") {
		t.Fatalf("key file %q; want prod-2026:<base64>", data)
	}
	k, err := crypt.ParseKeyFile(data)
	if err != nil || k.Name() != "prod-2026" || k.Provider() != crypt.XChaCha {
		t.Fatalf("ParseKeyFile = %v, %v", k, err)
	}
	again, _ := crypt.GenerateKeyFile("prod-2026")
	if bytes.Equal(again, data) {
		t.Error("two generated keys are equal")
	}
	for _, bad := range []string{"", "nocolon", "a:" + base64.StdEncoding.EncodeToString(make([]byte, 16)),
		"a:not base64!", "a b:" + base64.StdEncoding.EncodeToString(make([]byte, 32)),
		"identity:" + base64.StdEncoding.EncodeToString(make([]byte, 32)),
		"a:" + base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\nb:" + base64.StdEncoding.EncodeToString(make([]byte, 32))} {
		if _, err := crypt.ParseKeyFile([]byte(bad)); err == nil {
			t.Errorf("ParseKeyFile(%q) succeeded", bad)
		} else if strings.Contains(err.Error(), base64.StdEncoding.EncodeToString(make([]byte, 32))) {
			t.Errorf("ParseKeyFile(%q): the error shows the secret: %v", bad, err)
		}
	}
}

func BenchmarkEncrypt1KiB(b *testing.B) {
	r := newRing(b, newKey(b, "k1", 1))
	plain := bytes.Repeat([]byte("x"), 1024)
	b.SetBytes(1024)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := r.Encrypt([]byte("/secret/key"), plain); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkDecrypt1KiB(b *testing.B) {
	r := newRing(b, newKey(b, "k1", 1))
	stored, _ := r.Encrypt([]byte("/secret/key"), bytes.Repeat([]byte("x"), 1024))
	b.SetBytes(1024)
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := r.Decrypt([]byte("/secret/key"), stored); err != nil {
			b.Fatal(err)
		}
	}
}

// TestEncryptInDir: a value bound to a v2 directory (an in-order create) decrypts under any key of it, and under
// no other; the flag cannot be added to a value bound to its own key.
func TestEncryptInDir(t *testing.T) {
	t.Parallel()
	r := newRing(t, newKey(t, "k1", 1))
	stored, err := r.EncryptInDir([]byte("/queue"), []byte("job"))
	if err != nil || !strings.HasPrefix(string(stored), "epp:enc:v1:xchacha20poly1305-parent:k1:") {
		t.Fatalf("EncryptInDir = %q, %v", stored, err)
	}
	for _, k := range []string{"/queue/00000000000000000012", "/queue/other"} {
		if v, _, err := r.Decrypt([]byte(k), stored); err != nil || string(v) != "job" {
			t.Errorf("under %s: %q, %v; want job", k, v, err)
		}
	}
	for _, k := range []string{"/queue", "/elsewhere/1", "/queue/a/b"} {
		if _, _, err := r.Decrypt([]byte(k), stored); !errors.Is(err, crypt.ErrAuth) {
			t.Errorf("under %s: %v; want ErrAuth", k, err)
		}
	}
	own, _ := r.Encrypt([]byte("/queue/1"), []byte("v"))
	flagged := strings.Replace(string(own), "xchacha20poly1305:", "xchacha20poly1305-parent:", 1)
	if _, _, err := r.Decrypt([]byte("/queue/1"), []byte(flagged)); !errors.Is(err, crypt.ErrAuth) {
		t.Errorf("a value bound to its key, flagged as bound to its directory: %v; want ErrAuth", err)
	}
}
