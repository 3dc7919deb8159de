// Package crypt encrypts etcd values bound to the etcd keys they are stored under: the stored format, key files,
// and keyrings of ordered keys (the first encrypts, all decrypt).
//
// A stored value reads epp:enc:v1:<provider>:<keyname>:<base64(nonce‖ciphertext)>. The provider is
// xchacha20poly1305 (XChaCha20-Poly1305, golang.org/x/crypto: 24-byte random nonces, which cannot repeat in
// practice, unlike AES-GCM's 12 bytes) with a named 256-bit key; the etcd key is the associated data, so a value
// copied to another key does not decrypt there. The identity provider stores values as they are: in a keyring it
// lets plaintext be read (turning encryption on over existing data), and first in one it writes plaintext
// (turning encryption off), as Kubernetes' encryption at rest does.
package crypt

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"regexp"
	"sort"
	"strings"
	"sync/atomic"

	"github.com/tink-crypto/tink-go/v2/daead/subtle"
	"golang.org/x/crypto/chacha20poly1305"
	"golang.org/x/crypto/hkdf"
)

const (
	// Prefix starts every value this package encrypts.
	Prefix = "epp:enc:v1:"
	// family starts the values of every version of the format: one of another version is not plaintext.
	family = "epp:enc:"
	// XChaCha is the provider of XChaCha20-Poly1305 keys.
	XChaCha = "xchacha20poly1305"
	// ParentSuffix flags, after the provider, a value bound to the parent of its key (EncryptInDir).
	ParentSuffix = "-parent"
	// SIV is the deterministic provider (AES-SIV, RFC 5297, tink-go's): a value encrypts to the same bytes
	// under the same etcd key, so a compare on a value can be made on its ciphertext. Every key has it, with a
	// 512-bit secret derived from its own by HKDF-SHA256; a keyring made by NewDeterministicKeyring writes it.
	SIV = "aes-siv"
	// sivInfo is the HKDF info that derives a key's AES-SIV secret from its XChaCha20-Poly1305 one.
	sivInfo = "etcd-proxy-proxy aes-siv v1"
	// Identity is the provider that stores values as they are.
	Identity = "identity"
	// KeySize is the size of a key's secret.
	KeySize = chacha20poly1305.KeySize
	// Overhead is what encryption adds to a value before base64: the nonce and the tag.
	Overhead = chacha20poly1305.NonceSizeX + chacha20poly1305.Overhead
	// sivOverhead is what SIV adds: its synthetic IV.
	sivOverhead = 16
)

// Errors of Decrypt. Each read that fails says which, wrapped.
var (
	// ErrNotEncrypted: a plaintext value, and the keyring has no identity provider to read it as it is.
	ErrNotEncrypted = errors.New("value is not encrypted")
	// ErrUnknownKey: the value names a key (or provider) the keyring does not hold.
	ErrUnknownKey = errors.New("value is encrypted with a key the keyring does not hold")
	// ErrMalformed: the value starts as an encrypted one but is not one.
	ErrMalformed = errors.New("malformed encrypted value")
	// ErrAuth: the ciphertext does not authenticate: tampered with, or moved from another etcd key.
	ErrAuth = errors.New("value does not authenticate (tampered with, or moved from another key)")
)

// validName is a key name: it sits between colons in the stored format and in key files.
var validName = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)

// Key is one provider of a keyring: an XChaCha20-Poly1305 key with its name, or the identity provider.
type Key struct {
	name     string
	provider string
	aead     interface {
		Seal(dst, nonce, plaintext, ad []byte) []byte
		Open(dst, nonce, ciphertext, ad []byte) ([]byte, error)
	}
	// header is Prefix + provider + ":" + name + ":", what every value it encrypts starts with; parentHeader
	// the same with ParentSuffix.
	header, parentHeader string
	// siv is the key's deterministic AEAD (SIV), with sivHeader, what its values start with.
	siv interface {
		EncryptDeterministically(plaintext, ad []byte) ([]byte, error)
		DecryptDeterministically(ciphertext, ad []byte) ([]byte, error)
	}
	sivHeader string
	// etcvault holds the RSA keys of etcvault's keychain by name, for the Etcvault provider (etcvault.go).
	etcvault map[string]*rsa.PrivateKey
	stats    keyStats
}

// keyStats counts what a key did.
type keyStats struct{ encryptions, decryptions, stale, failures atomic.Uint64 }

// NewKey makes an XChaCha20-Poly1305 key of a 32-byte secret.
func NewKey(name string, secret []byte) (*Key, error) {
	if !validName.MatchString(name) {
		return nil, fmt.Errorf("key name %q: want 1 to 64 of A-Z a-z 0-9 . _ -", name)
	}
	if name == Identity {
		return nil, fmt.Errorf("key name %q is the identity provider's", name)
	}
	aead, err := chacha20poly1305.NewX(secret)
	if err != nil {
		return nil, fmt.Errorf("key %s: want %d bytes, got %d", name, KeySize, len(secret))
	}
	sivSecret := make([]byte, subtle.AESSIVKeySize)
	if _, err := io.ReadFull(hkdf.New(sha256.New, secret, nil, []byte(sivInfo)), sivSecret); err != nil {
		return nil, fmt.Errorf("key %s: %w", name, err)
	}
	siv, err := subtle.NewAESSIV(sivSecret)
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", name, err)
	}
	return &Key{name: name, provider: XChaCha, aead: aead, header: Prefix + XChaCha + ":" + name + ":",
		parentHeader: Prefix + XChaCha + ParentSuffix + ":" + name + ":", siv: siv,
		sivHeader: Prefix + SIV + ":" + name + ":"}, nil
}

// IdentityKey is the identity provider.
func IdentityKey() *Key { return &Key{name: Identity, provider: Identity} }

// Name is the key's name ("identity" for the identity provider).
func (k *Key) Name() string { return k.name }

// Provider is the key's provider: XChaCha, Identity or Etcvault.
func (k *Key) Provider() string { return k.provider }

// GenerateKeyFile returns the content of a key file holding a new random key called name.
func GenerateKeyFile(name string) ([]byte, error) {
	secret := make([]byte, KeySize)
	if _, err := rand.Read(secret); err != nil {
		return nil, err
	}
	if _, err := NewKey(name, secret); err != nil {
		return nil, err
	}
	return []byte(name + ":" + base64.StdEncoding.EncodeToString(secret) + "\n"), nil
}

// ParseKeyFile reads a key file: one line, <name>:<base64 of 32 bytes> (standard base64, padded).
func ParseKeyFile(data []byte) (*Key, error) {
	line := strings.TrimSpace(string(data))
	name, b64, ok := strings.Cut(line, ":")
	if !ok || strings.ContainsAny(line, "\r\n") {
		return nil, errors.New("want one line <name>:<base64 of a 32-byte key>")
	}
	secret, err := base64.StdEncoding.Strict().DecodeString(b64)
	if err != nil {
		return nil, fmt.Errorf("key %q: not standard base64", name)
	}
	return NewKey(name, secret)
}

// LoadKeyFile reads the key file at path.
func LoadKeyFile(path string) (*Key, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	k, err := ParseKeyFile(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return k, nil
}

// Keyring is an ordered list of providers: the first encrypts, all decrypt; a value read with any but the
// first is stale (rewrap it).
type Keyring struct {
	keys     []*Key
	byHeader map[string]*Key // provider:name
	identity *Key            // nil: plaintext does not read
	etcvault *Key            // nil: etcvault's values are plaintext to this keyring
	// deterministic: the first key writes SIV values (NewDeterministicKeyring).
	deterministic bool
	// unattributed counts the failed reads that name no key of the keyring (plaintext refused, unknown key or
	// version, malformed header).
	unattributed atomic.Uint64
}

// NewKeyring makes a keyring of keys, the first of which encrypts. Names must differ.
func NewKeyring(keys ...*Key) (*Keyring, error) {
	if len(keys) == 0 {
		return nil, errors.New("a keyring needs a key")
	}
	r := &Keyring{keys: keys, byHeader: make(map[string]*Key, len(keys))}
	for _, k := range keys {
		id := k.provider + ":" + k.name
		if _, dup := r.byHeader[id]; dup {
			return nil, fmt.Errorf("key %s appears twice", k.name)
		}
		r.byHeader[id] = k
		if k.siv != nil {
			r.byHeader[SIV+":"+k.name] = k
		}
		switch k.provider {
		case Identity:
			r.identity = k
		case Etcvault:
			if k == keys[0] {
				return nil, errors.New("etcvault's keychain decrypts only: it cannot be the first provider")
			}
			r.etcvault = k
		}
	}
	return r, nil
}

// NewDeterministicKeyring makes a keyring whose first key, which must be an XChaCha20-Poly1305 one, writes
// deterministic values (SIV, bound to their etcd keys as the others): Encrypt gives the same value for the same
// plaintext under the same etcd key, which a compare on a value needs. Values in the other format, or of another
// key, read as stale.
func NewDeterministicKeyring(keys ...*Key) (*Keyring, error) {
	r, err := NewKeyring(keys...)
	if err != nil {
		return nil, err
	}
	if r.keys[0].siv == nil {
		return nil, fmt.Errorf("the deterministic mode needs a key first, not %s", r.keys[0].provider)
	}
	r.deterministic = true
	return r, nil
}

// Deterministic reports whether the keyring writes deterministic values (NewDeterministicKeyring).
func (r *Keyring) Deterministic() bool { return r.deterministic }

// Keys are the keyring's providers, the encrypting one first.
func (r *Keyring) Keys() []*Key { return r.keys }

// Encrypt returns what is stored for plaintext under the etcd key etcdKey (v3: the key's bytes; v2: the
// node's path).
func (r *Keyring) Encrypt(etcdKey, plaintext []byte) ([]byte, error) {
	return r.seal(etcdKey, plaintext, false)
}

// EncryptInDir returns what is stored for plaintext under a key of the v2 directory dir that is not known yet
// (an in-order create, POST, which the member names): the value is bound to dir, flagged with ParentSuffix, and
// decrypts under any key of dir (path.Dir of the key).
func (r *Keyring) EncryptInDir(dir, plaintext []byte) ([]byte, error) {
	return r.seal(dir, plaintext, true)
}

func (r *Keyring) seal(ad, plaintext []byte, parent bool) ([]byte, error) {
	if r.etcvault != nil { // etcvault's clients write a plaintext to encrypt in a marker
		if plain, ok := EtcvaultPlain(plaintext); ok {
			plaintext = plain
		}
	}
	k := r.keys[0]
	k.stats.encryptions.Add(1)
	if k.aead == nil {
		return plaintext, nil
	}
	header := k.header
	if parent {
		header = k.parentHeader
	} else if r.deterministic {
		raw, err := k.siv.EncryptDeterministically(plaintext, ad)
		if err != nil {
			k.stats.failures.Add(1)
			return nil, err
		}
		return encode(k.sivHeader, raw), nil
	}
	raw := make([]byte, chacha20poly1305.NonceSizeX, Overhead+len(plaintext))
	if _, err := rand.Read(raw); err != nil {
		k.stats.failures.Add(1)
		return nil, fmt.Errorf("nonce: %w", err)
	}
	raw = k.aead.Seal(raw, raw, plaintext, ad)
	return encode(header, raw), nil
}

// encode is header‖base64(raw).
func encode(header string, raw []byte) []byte {
	out := make([]byte, len(header)+base64.StdEncoding.EncodedLen(len(raw)))
	copy(out, header)
	base64.StdEncoding.Encode(out[len(header):], raw)
	return out
}

// EncryptedLen is the length of what Encrypt stores for a plaintext of n bytes.
func (r *Keyring) EncryptedLen(n int) int {
	k := r.keys[0]
	if k.aead == nil {
		return n
	}
	if r.deterministic {
		return len(k.sivHeader) + base64.StdEncoding.EncodedLen(sivOverhead+n)
	}
	return len(k.header) + base64.StdEncoding.EncodedLen(Overhead+n)
}

// Read says how a value was read.
type Read struct {
	// Key is the name of the key that decrypted it, "identity" for plaintext.
	Key string
	// Stale: read with another provider than the encrypting one; rewrapping it would change it.
	Stale bool
}

// Decrypt returns the plaintext of a value stored under etcdKey. A value that does not decrypt is an error,
// never the value as it is, unless it is plaintext and the keyring has the identity provider.
//
// With the etcvault provider, etcvault's encrypted values decrypt (stale, whatever the etcd key: etcvault bound
// them to none), and its write markers stored as they are read as the plaintext they hold where plaintext reads.
func (r *Keyring) Decrypt(etcdKey, stored []byte) ([]byte, Read, error) {
	if r.etcvault != nil && isEtcvault(stored) {
		k := r.etcvault
		plain, err := k.openEtcvault(stored)
		if err != nil {
			k.stats.failures.Add(1)
			return nil, Read{}, err
		}
		k.stats.decryptions.Add(1)
		k.stats.stale.Add(1)
		if plain == nil {
			plain = []byte{}
		}
		return plain, Read{Key: k.name, Stale: true}, nil
	}
	if !bytes.HasPrefix(stored, []byte(family)) {
		if r.identity == nil {
			r.unattributed.Add(1)
			return nil, Read{}, ErrNotEncrypted
		}
		k := r.identity
		marker := false
		if r.etcvault != nil {
			var plain []byte
			if plain, marker = EtcvaultPlain(stored); marker {
				stored = plain
			}
		}
		k.stats.decryptions.Add(1)
		stale := k != r.keys[0] || marker
		if stale {
			k.stats.stale.Add(1)
		}
		return stored, Read{Key: k.name, Stale: stale}, nil
	}
	if !bytes.HasPrefix(stored, []byte(Prefix)) {
		r.unattributed.Add(1)
		return nil, Read{}, fmt.Errorf("%w: unknown version", ErrMalformed)
	}
	rest := stored[len(Prefix):]
	provider, rest, ok1 := bytes.Cut(rest, []byte(":"))
	name, payload, ok2 := bytes.Cut(rest, []byte(":"))
	if !ok1 || !ok2 {
		r.unattributed.Add(1)
		return nil, Read{}, fmt.Errorf("%w: want %s<provider>:<key>:<base64>", ErrMalformed, Prefix)
	}
	ad := etcdKey
	parent := false
	if p, ok := bytes.CutSuffix(provider, []byte(ParentSuffix)); ok {
		provider, ad, parent = p, []byte(path.Dir(string(etcdKey))), true
	}
	k := r.byHeader[string(provider)+":"+string(name)]
	deterministic := string(provider) == SIV
	if k == nil || k.aead == nil || (deterministic && parent) {
		r.unattributed.Add(1)
		return nil, Read{}, fmt.Errorf("%w: %q", ErrUnknownKey, string(provider)+":"+string(name))
	}
	min := Overhead
	if deterministic {
		min = sivOverhead
	}
	raw := make([]byte, base64.StdEncoding.DecodedLen(len(payload)))
	n, err := base64.StdEncoding.Strict().Decode(raw, payload)
	if err != nil || n < min {
		k.stats.failures.Add(1)
		return nil, Read{}, fmt.Errorf("%w: bad base64 or too short", ErrMalformed)
	}
	raw = raw[:n]
	var plain []byte
	if deterministic {
		plain, err = k.siv.DecryptDeterministically(raw, ad)
	} else {
		nonce, ct := raw[:chacha20poly1305.NonceSizeX], raw[chacha20poly1305.NonceSizeX:]
		plain, err = k.aead.Open(ct[:0], nonce, ct, ad)
	}
	if err != nil {
		k.stats.failures.Add(1)
		return nil, Read{}, ErrAuth
	}
	k.stats.decryptions.Add(1)
	// Stale: another key, or the other format than the keyring writes (a parent-bound value is what an
	// in-order create writes in either mode).
	stale := k != r.keys[0] || (deterministic != r.deterministic && !parent)
	if stale {
		k.stats.stale.Add(1)
	}
	if plain == nil {
		plain = []byte{}
	}
	return plain, Read{Key: k.name, Stale: stale}, nil
}

// IsEncrypted reports whether a stored value has the form of an encrypted one (of any version).
func IsEncrypted(stored []byte) bool { return bytes.HasPrefix(stored, []byte(family)) }

// Stats are the counts of one key.
type Stats struct {
	Key                                       string
	Encryptions, Decryptions, Stale, Failures uint64
}

// UnattributedFailures counts the reads that failed naming no key of the keyring: plaintext it does not read, a
// key or version it does not know, a malformed header.
func (r *Keyring) UnattributedFailures() uint64 { return r.unattributed.Load() }

// Stats returns the counts of every key, by name.
func (r *Keyring) Stats() []Stats {
	out := make([]Stats, 0, len(r.keys))
	for _, k := range r.keys {
		out = append(out, Stats{Key: k.name, Encryptions: k.stats.encryptions.Load(), Decryptions: k.stats.decryptions.Load(),
			Stale: k.stats.stale.Load(), Failures: k.stats.failures.Load()})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key < out[j].Key })
	return out
}
