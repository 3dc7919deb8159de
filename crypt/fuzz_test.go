package crypt_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

// FuzzDecrypt: the decoder takes anything from a member's store. It never panics; what it reads without error
// is either plaintext passed by the identity provider or a value that this key encrypted under this etcd key.
func FuzzDecrypt(f *testing.F) {
	k := newKey(f, "k1", 1)
	strict, lax := newRing(f, k), newRing(f, k, crypt.IdentityKey())
	good, _ := strict.Encrypt([]byte("/a"), []byte("value"))
	inDir, _ := strict.EncryptInDir([]byte("/"), []byte("value"))
	f.Add([]byte("/a"), inDir)
	det, _ := crypt.NewDeterministicKeyring(k)
	sivValue, _ := det.Encrypt([]byte("/a"), []byte("value"))
	f.Add([]byte("/a"), sivValue)
	for _, s := range [][]byte{good, []byte("plain"), []byte("epp:enc:v1:xchacha20poly1305:k1:"), []byte("epp:enc:v1:aes-siv-parent:k1:AAAA"),
		[]byte("epp:enc:v1:xchacha20poly1305:k1:====="), []byte("epp:enc:v1::"), []byte("epp:enc:")} {
		f.Add([]byte("/a"), s)
	}
	f.Fuzz(func(t *testing.T, etcdKey, stored []byte) {
		plain, read, err := strict.Decrypt(etcdKey, stored)
		if err == nil {
			if read.Key != "k1" || !crypt.IsEncrypted(stored) {
				t.Fatalf("strict read %q as %q by %+v", stored, plain, read)
			}
		} else if plain != nil {
			t.Fatalf("a failed read returned %q", plain)
		}
		plain2, read2, err2 := lax.Decrypt(etcdKey, stored)
		switch {
		case !crypt.IsEncrypted(stored):
			if err2 != nil || !bytes.Equal(plain2, stored) || read2.Key != crypt.Identity {
				t.Fatalf("plaintext %q read as %q, %+v, %v", stored, plain2, read2, err2)
			}
		case (err == nil) != (err2 == nil) || !bytes.Equal(plain, plain2):
			t.Fatalf("identity changed the read of an encrypted value: %q %v / %q %v", plain, err, plain2, err2)
		}
	})
}

// FuzzRoundTrip: what is encrypted decrypts under its etcd key only, in both modes; the deterministic one
// writes the same value twice.
func FuzzRoundTrip(f *testing.F) {
	k := newKey(f, "k1", 1)
	det, err := crypt.NewDeterministicKeyring(k)
	if err != nil {
		f.Fatal(err)
	}
	rings := []*crypt.Keyring{newRing(f, k), det}
	f.Add([]byte("/a"), []byte("/b"), []byte("value"))
	f.Add([]byte{}, []byte{0}, []byte{})
	f.Fuzz(func(t *testing.T, key, otherKey, plain []byte) {
		for _, r := range rings {
			stored, err := r.Encrypt(key, plain)
			if err != nil {
				t.Fatal(err)
			}
			got, _, err := r.Decrypt(key, stored)
			if err != nil || !bytes.Equal(got, plain) {
				t.Fatalf("round trip of %q: %q, %v", plain, got, err)
			}
			if !bytes.Equal(key, otherKey) {
				if got, _, err := r.Decrypt(otherKey, stored); err == nil {
					t.Fatalf("a value of %q decrypted under %q: %q", key, otherKey, got)
				}
			}
			if again, _ := r.Encrypt(key, plain); r.Deterministic() != bytes.Equal(again, stored) {
				t.Fatalf("deterministic %v, twice: %q %q", r.Deterministic(), stored, again)
			}
		}
	})
}

// FuzzParseKeyFile: a key file never panics the parser.
func FuzzParseKeyFile(f *testing.F) {
	good, _ := crypt.GenerateKeyFile("k")
	f.Add(good)
	f.Add([]byte("k:"))
	f.Fuzz(func(t *testing.T, data []byte) {
		if k, err := crypt.ParseKeyFile(data); err == nil && k.Name() == "" {
			t.Fatal("a key without a name")
		}
	})
}

// FuzzDecryptEtcvault: etcvault's decoder takes anything from a member's store too. It never panics; with the
// keychain and no identity provider, what reads without error is an etcvault value (read by the keychain) or
// this key's own; with identity, what is neither reads as it is, or as the plaintext of a write marker.
func FuzzDecryptEtcvault(f *testing.F) {
	k := newKey(f, "k1", 1)
	ev := etcvaultKey(f)
	strict, lax := newRing(f, k, ev), newRing(f, k, crypt.IdentityKey(), ev)
	for _, v := range etcvaultVectors(f) {
		f.Add(v.Stored)
	}
	for _, s := range []string{"ETCVAULT::1:", "ETCVAULT::1:::ETCVAULT", "ETCVAULT::1:etcvault-test:long:,::ETCVAULT",
		"ETCVAULT::1:etcvault-test:long:AAAA,AAAAAAAAAAAAAAAAAAAAAA==::ETCVAULT", "ETCVAULT::plain:k:v::ETCVAULT",
		"ETCVAULT::plain1:::ETCVAULT", "ETCVAULT::asis:v::ETCVAULT"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, stored string) {
		plain, read, err := strict.Decrypt([]byte("/a"), []byte(stored))
		if err == nil {
			etc := strings.HasPrefix(stored, "ETCVAULT::1:")
			if etc != (read.Key == crypt.Etcvault) || (!etc && (read.Key != "k1" || !crypt.IsEncrypted([]byte(stored)))) {
				t.Fatalf("strict read %q as %q by %+v", stored, plain, read)
			}
		} else if plain != nil {
			t.Fatalf("a failed read returned %q", plain)
		}
		plain2, read2, err2 := lax.Decrypt([]byte("/a"), []byte(stored))
		switch {
		case strings.HasPrefix(stored, "ETCVAULT::1:") || crypt.IsEncrypted([]byte(stored)):
			if (err == nil) != (err2 == nil) || !bytes.Equal(plain, plain2) {
				t.Fatalf("identity changed the read of an encrypted value: %q %v / %q %v", plain, err, plain2, err2)
			}
		default:
			want, marker := crypt.EtcvaultPlain([]byte(stored))
			if !marker {
				want = []byte(stored)
			}
			if err2 != nil || !bytes.Equal(plain2, want) || read2.Key != crypt.Identity || !read2.Stale {
				t.Fatalf("plaintext %q read as %q, %+v, %v", stored, plain2, read2, err2)
			}
		}
	})
}
