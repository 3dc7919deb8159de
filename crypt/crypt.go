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
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path"
	"regexp"
	"sort"
	"strings"
	"sync/atomic"

	"golang.org/x/crypto/chacha20poly1305"
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
	// Identity is the provider that stores values as they are.
	Identity = "identity"
	// KeySize is the size of a key's secret.
	KeySize = chacha20poly1305.KeySize
	// Overhead is what encryption adds to a value before base64: the nonce and the tag.
	Overhead = chacha20poly1305.NonceSizeX + chacha20poly1305.Overhead
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
	stats                keyStats
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
	return &Key{name: name, provider: XChaCha, aead: aead, header: Prefix + XChaCha + ":" + name + ":",
		parentHeader: Prefix + XChaCha + ParentSuffix + ":" + name + ":"}, nil
}

// IdentityKey is the identity provider.
func IdentityKey() *Key { return &Key{name: Identity, provider: Identity} }

// Name is the key's name ("identity" for the identity provider).
func (k *Key) Name() string { return k.name }

// Provider is the key's provider: XChaCha or Identity.
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
		if k.provider == Identity {
			r.identity = k
		}
	}
	return r, nil
}

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
	k := r.keys[0]
	k.stats.encryptions.Add(1)
	if k.aead == nil {
		return plaintext, nil
	}
	header := k.header
	if parent {
		header = k.parentHeader
	}
	raw := make([]byte, chacha20poly1305.NonceSizeX, Overhead+len(plaintext))
	if _, err := rand.Read(raw); err != nil {
		k.stats.failures.Add(1)
		return nil, fmt.Errorf("nonce: %w", err)
	}
	raw = k.aead.Seal(raw, raw, plaintext, ad)
	out := make([]byte, len(header)+base64.StdEncoding.EncodedLen(len(raw)))
	copy(out, header)
	base64.StdEncoding.Encode(out[len(header):], raw)
	return out, nil
}

// EncryptedLen is the length of what Encrypt stores for a plaintext of n bytes.
func (r *Keyring) EncryptedLen(n int) int {
	k := r.keys[0]
	if k.aead == nil {
		return n
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
func (r *Keyring) Decrypt(etcdKey, stored []byte) ([]byte, Read, error) {
	if !bytes.HasPrefix(stored, []byte(family)) {
		if r.identity == nil {
			r.unattributed.Add(1)
			return nil, Read{}, ErrNotEncrypted
		}
		k := r.identity
		k.stats.decryptions.Add(1)
		stale := k != r.keys[0]
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
	if p, ok := bytes.CutSuffix(provider, []byte(ParentSuffix)); ok {
		provider, ad = p, []byte(path.Dir(string(etcdKey)))
	}
	k := r.byHeader[string(provider)+":"+string(name)]
	if k == nil || k.aead == nil {
		r.unattributed.Add(1)
		return nil, Read{}, fmt.Errorf("%w: %q", ErrUnknownKey, string(provider)+":"+string(name))
	}
	raw := make([]byte, base64.StdEncoding.DecodedLen(len(payload)))
	n, err := base64.StdEncoding.Strict().Decode(raw, payload)
	if err != nil || n < Overhead {
		k.stats.failures.Add(1)
		return nil, Read{}, fmt.Errorf("%w: bad base64 or too short", ErrMalformed)
	}
	raw = raw[:n]
	nonce, ct := raw[:chacha20poly1305.NonceSizeX], raw[chacha20poly1305.NonceSizeX:]
	plain, err := k.aead.Open(ct[:0], nonce, ct, ad)
	if err != nil {
		k.stats.failures.Add(1)
		return nil, Read{}, ErrAuth
	}
	k.stats.decryptions.Add(1)
	stale := k != r.keys[0]
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
