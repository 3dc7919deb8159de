package crypt_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

// etcvaultVector is one value of testdata/etcvault/vectors.json, made by etcvault v0.3.1 itself (see the
// README beside it).
type etcvaultVector struct{ Name, Plaintext, Stored string }

func etcvaultVectors(t testing.TB) []etcvaultVector {
	t.Helper()
	data, err := os.ReadFile("testdata/etcvault/vectors.json")
	if err != nil {
		t.Fatal(err)
	}
	var vs []etcvaultVector
	if err := json.Unmarshal(data, &vs); err != nil {
		t.Fatal(err)
	}
	return vs
}

func etcvaultKey(t testing.TB) *crypt.Key {
	t.Helper()
	k, err := crypt.LoadEtcvaultKeychain("testdata/etcvault/keychain")
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestEtcvaultVectors: every value etcvault stored, short and long form, reads as its plaintext under any etcd
// key (etcvault bound them to none), stale, counted under the etcvault provider; a changed one does not.
func TestEtcvaultVectors(t *testing.T) {
	t.Parallel()
	ev := etcvaultKey(t)
	r := newRing(t, newKey(t, "k1", 1), ev)
	vs := etcvaultVectors(t)
	long := 0
	for _, v := range vs {
		if strings.Contains(v.Stored, ":long:") {
			long++
		}
		got, read, err := r.Decrypt([]byte("/any/"+v.Name), []byte(v.Stored))
		if err != nil || string(got) != v.Plaintext || read.Key != crypt.Etcvault || !read.Stale {
			t.Errorf("%s: got %q, %+v, %v; want %q, stale", v.Name, got, read, err, v.Plaintext)
		}
	}
	if long == 0 || long == len(vs) {
		t.Fatalf("want both forms among the vectors, %d of %d long", long, len(vs))
	}
	st := statsOf(r, crypt.Etcvault)
	if st.Decryptions != uint64(len(vs)) || st.Stale != uint64(len(vs)) {
		t.Fatalf("etcvault stats %+v, want %d decryptions, all stale", st, len(vs))
	}

	// Without the etcvault provider they are what they look like: plaintext, refused or read as it is.
	if _, _, err := newRing(t, newKey(t, "k1", 1)).Decrypt([]byte("/a"), []byte(vs[0].Stored)); !errors.Is(err, crypt.ErrNotEncrypted) {
		t.Fatalf("without the keychain: %v, want ErrNotEncrypted", err)
	}

	// Tampered with: a bit of the RSA part, a block of the AES part, the padding; a key not in the keychain;
	// half-formed containers. None reads, none is taken for plaintext (the keyring has identity).
	lax := newRing(t, newKey(t, "k1", 1), crypt.IdentityKey(), ev)
	flip := func(s string, at int) string {
		b := []byte(s)
		raw, _ := base64.StdEncoding.DecodeString(string(b[at : at+4]))
		raw[0] ^= 1
		copy(b[at:], base64.StdEncoding.EncodeToString(raw))
		return string(b)
	}
	var short, lng etcvaultVector
	for _, v := range vs {
		switch v.Name {
		case "short":
			short = v
		case "long-blocks":
			lng = v
		}
	}
	comma := strings.Index(lng.Stored, ",")
	bad := map[string]string{
		"short bit":    flip(short.Stored, len("ETCVAULT::1:etcvault-test::")),
		"long key bit": flip(lng.Stored, len("ETCVAULT::1:etcvault-test:long:")),
		"long padding": flip(lng.Stored, len(lng.Stored)-len("::ETCVAULT")-8),
		"other key":    strings.Replace(short.Stored, "etcvault-test", "other", 1),
		"no end":       strings.TrimSuffix(short.Stored, "::ETCVAULT"),
		"no form":      "ETCVAULT::1:etcvault-test::ETCVAULT",
		"other form":   strings.Replace(short.Stored, "etcvault-test::", "etcvault-test:medium:", 1),
		"no comma":     strings.Replace(lng.Stored, ",", "", 1),
		"bad base64":   "ETCVAULT::1:etcvault-test::%%%%::ETCVAULT",
		"empty body":   "ETCVAULT::1:etcvault-test:long:" + lng.Stored[len("ETCVAULT::1:etcvault-test:long:"):comma+1] + "::ETCVAULT",
	}
	// ECB with no MAC: a changed block of the body that keeps the padding is not detected. That is etcvault's
	// format (why its values read as stale); it is only read, never written.
	if got, _, err := lax.Decrypt([]byte("/a"), []byte(flip(lng.Stored, comma+1))); err != nil || string(got) == lng.Plaintext {
		t.Errorf("a changed first block: %q, %v", got, err)
	}
	for name, s := range bad {
		if got, _, err := lax.Decrypt([]byte("/a"), []byte(s)); err == nil || got != nil {
			t.Errorf("%s: read as %q, %v", name, got, err)
		}
	}
	if _, _, err := lax.Decrypt([]byte("/a"), []byte(bad["other key"])); !errors.Is(err, crypt.ErrUnknownKey) {
		t.Errorf("a key not in the keychain: %v, want ErrUnknownKey", err)
	}
	if st := statsOf(lax, crypt.Etcvault); st.Failures != uint64(len(bad))+1 /* other key twice */ {
		t.Errorf("etcvault failures %d, want %d", st.Failures, len(bad)+1)
	}
}

// TestEtcvaultPlainMarker: etcvault's write marker is encrypted as the plaintext it holds (the name in it is
// not used); a marker found stored reads as that plaintext, stale, where plaintext reads, and is refused where
// it does not; without the keychain a marker is a value like any other.
func TestEtcvaultPlainMarker(t *testing.T) {
	t.Parallel()
	ev := etcvaultKey(t)
	k1 := newKey(t, "k1", 1)
	r := newRing(t, k1, ev)
	for marker, want := range map[string]string{
		"ETCVAULT::plain:etcvault-test:hello::ETCVAULT":     "hello",
		"ETCVAULT::plain1:anyname:a:b::c::ETCVAULT":         "a:b::c",
		"ETCVAULT::plain:etcvault-test:::ETCVAULT":          "",
		"ETCVAULT::plain:no-colon::ETCVAULT":                "ETCVAULT::plain:no-colon::ETCVAULT",
		"ETCVAULT::plain:etcvault-test:no end":              "ETCVAULT::plain:etcvault-test:no end",
		"ETCVAULT::asis:kept as it is, encrypted::ETCVAULT": "ETCVAULT::asis:kept as it is, encrypted::ETCVAULT",
	} {
		stored, err := r.Encrypt([]byte("/a"), []byte(marker))
		if err != nil {
			t.Fatal(err)
		}
		got, read, err := r.Decrypt([]byte("/a"), stored)
		if err != nil || string(got) != want || read.Key != "k1" || read.Stale {
			t.Errorf("%q: stored and read as %q, %+v, %v; want %q", marker, got, read, err, want)
		}
		plain, _, _ := newRing(t, k1).Decrypt([]byte("/a"), stored)
		if string(plain) != want {
			t.Errorf("%q: stored %q, not the plaintext of the marker", marker, plain)
		}
	}
	m := []byte("ETCVAULT::plain:etcvault-test:hello::ETCVAULT")
	if _, _, err := r.Decrypt([]byte("/a"), m); !errors.Is(err, crypt.ErrNotEncrypted) {
		t.Fatalf("a stored marker without identity: %v, want ErrNotEncrypted", err)
	}
	for _, lax := range []*crypt.Keyring{newRing(t, k1, crypt.IdentityKey(), ev), newRing(t, crypt.IdentityKey(), ev)} {
		if got, read, err := lax.Decrypt([]byte("/a"), m); err != nil || string(got) != "hello" || !read.Stale {
			t.Fatalf("a stored marker with identity: %q, %+v, %v", got, read, err)
		}
	}
	plainRing := newRing(t, k1, crypt.IdentityKey())
	if got, _, _ := plainRing.Decrypt([]byte("/a"), m); !bytes.Equal(got, m) {
		t.Fatalf("without the keychain a stored marker reads %q", got)
	}
	stored, _ := newRing(t, k1).Encrypt([]byte("/a"), m)
	if got, _, _ := newRing(t, k1).Decrypt([]byte("/a"), stored); !bytes.Equal(got, m) {
		t.Fatalf("without the keychain a marker is stored as %q", got)
	}
}

func TestEtcvaultKeychain(t *testing.T) {
	t.Parallel()
	if _, err := crypt.NewKeyring(etcvaultKey(t), newKey(t, "k1", 1)); err == nil {
		t.Fatal("etcvault's keychain took the encrypting place")
	}
	for name, dir := range map[string]string{"missing": t.TempDir() + "/nope", "empty": t.TempDir()} {
		if _, err := crypt.LoadEtcvaultKeychain(dir); err == nil {
			t.Errorf("%s keychain loaded", name)
		}
	}
	dir := t.TempDir()
	if err := os.WriteFile(dir+"/bad.pem", []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := crypt.LoadEtcvaultKeychain(dir); err == nil || !strings.Contains(err.Error(), "bad.pem") {
		t.Fatalf("a bad key: %v", err)
	}
}

func statsOf(r *crypt.Keyring, name string) crypt.Stats {
	for _, s := range r.Stats() {
		if s.Key == name {
			return s
		}
	}
	return crypt.Stats{}
}
