package crypt_test

import (
	"bytes"
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
	for _, s := range [][]byte{good, []byte("plain"), []byte("epp:enc:v1:xchacha20poly1305:k1:"),
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

// FuzzRoundTrip: what is encrypted decrypts under its etcd key only.
func FuzzRoundTrip(f *testing.F) {
	r := newRing(f, newKey(f, "k1", 1))
	f.Add([]byte("/a"), []byte("/b"), []byte("value"))
	f.Add([]byte{}, []byte{0}, []byte{})
	f.Fuzz(func(t *testing.T, key, otherKey, plain []byte) {
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
