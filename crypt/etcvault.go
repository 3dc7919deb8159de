package crypt

// etcvault's values, read for migration (decrypt-only): github.com/sorah/etcvault v0.3.1 stored
// ETCVAULT::1:<keyname>::<base64(RSA-OAEP-SHA256(plaintext))>::ETCVAULT (the short form) or, when the plaintext
// is too long for the RSA key, ETCVAULT::1:<keyname>:long:<base64(RSA-OAEP-SHA256(aes key))>,<base64(AES-ECB(
// PKCS7(plaintext)))>::ETCVAULT, with an empty OAEP label and the private keys in a keychain directory as
// <keyname>.pem. Clients wrote ETCVAULT::plain:<keyname>:<plaintext>::ETCVAULT and etcvault stored it
// encrypted. Nothing binds such a value to its etcd key and ECB has no MAC: they read as stale, and rewrap
// turns them into this package's format. Written here, not imported: etcvault is a program (its engine
// returns an empty value on a bad padding, and pulls in an old CLI library); the format is a few lines of the
// standard library.

import (
	"bytes"
	"crypto/aes"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

const (
	// Etcvault is the provider that reads etcvault's values.
	Etcvault = "etcvault"
	// etcvaultV1 starts etcvault's encrypted values, etcvaultEnd ends all its containers.
	etcvaultV1  = "ETCVAULT::1:"
	etcvaultEnd = "::ETCVAULT"
)

// etcvault's write markers: plain (and plain1, its other spelling) hold a plaintext to encrypt.
var etcvaultPlain = []string{"ETCVAULT::plain:", "ETCVAULT::plain1:"}

// LoadEtcvaultKeychain reads etcvault's keychain directory: every <name>.pem in it is the RSA private key of
// that name (PKCS#1, in a block that etcvault types PRIVATE KEY; PKCS#8 is taken too). The key returned is the
// etcvault provider of a keyring: it decrypts etcvault's values and never encrypts.
func LoadEtcvaultKeychain(dir string) (*Key, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.pem"))
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(dir); err != nil {
		return nil, err
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("%s: no <name>.pem key in the keychain", dir)
	}
	keys := map[string]*rsa.PrivateKey{}
	var errs []error
	for _, f := range files {
		k, err := parseEtcvaultKey(f)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		keys[strings.TrimSuffix(filepath.Base(f), ".pem")] = k
	}
	if errs != nil {
		return nil, errors.Join(errs...)
	}
	return &Key{name: Etcvault, provider: Etcvault, etcvault: keys}, nil
}

func parseEtcvaultKey(file string) (*rsa.PrivateKey, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	if k, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, errors.New("not an RSA private key (PKCS#1 or PKCS#8)")
	}
	rk, ok := k.(*rsa.PrivateKey)
	if !ok {
		return nil, errors.New("not an RSA private key")
	}
	return rk, nil
}

// isEtcvault reports whether a stored value is one of etcvault's encrypted values (or claims to be).
func isEtcvault(stored []byte) bool { return bytes.HasPrefix(stored, []byte(etcvaultV1)) }

// EtcvaultPlain returns the plaintext of etcvault's write marker ETCVAULT::plain:<keyname>:<plaintext>::ETCVAULT
// (the key name is not used: the keyring of the etcd key encrypts), and whether v is one.
func EtcvaultPlain(v []byte) ([]byte, bool) {
	for _, p := range etcvaultPlain {
		if !bytes.HasPrefix(v, []byte(p)) || !bytes.HasSuffix(v, []byte(etcvaultEnd)) ||
			len(v) < len(p)+len(etcvaultEnd) {
			continue
		}
		_, plain, ok := bytes.Cut(v[len(p):len(v)-len(etcvaultEnd)], []byte(":"))
		if ok {
			return plain, true
		}
	}
	return nil, false
}

// openEtcvault decrypts one of etcvault's values with the keychain of k.
func (k *Key) openEtcvault(stored []byte) ([]byte, error) {
	if !bytes.HasSuffix(stored, []byte(etcvaultEnd)) || len(stored) < len(etcvaultV1)+len(etcvaultEnd) {
		return nil, fmt.Errorf("%w: etcvault value without its end", ErrMalformed)
	}
	inner := string(stored[len(etcvaultV1) : len(stored)-len(etcvaultEnd)])
	parts := strings.SplitN(inner, ":", 3) // key name, form, content
	if len(parts) != 3 {
		return nil, fmt.Errorf("%w: want %s<key>:<form>:<content>%s", ErrMalformed, etcvaultV1, etcvaultEnd)
	}
	name, form, content := parts[0], parts[1], parts[2]
	priv := k.etcvault[name]
	if priv == nil {
		return nil, fmt.Errorf("%w: etcvault key %q", ErrUnknownKey, name)
	}
	b64 := base64.StdEncoding.Strict()
	switch form {
	case "": // short: the plaintext under RSA alone
		ct, err := b64.DecodeString(content)
		if err != nil {
			return nil, fmt.Errorf("%w: bad base64", ErrMalformed)
		}
		plain, err := rsa.DecryptOAEP(sha256.New(), nil, priv, ct, nil)
		if err != nil {
			return nil, ErrAuth
		}
		return plain, nil
	case "long": // an AES key under RSA, the plaintext under AES-ECB with PKCS7 padding
		wrapped, body, ok := strings.Cut(content, ",")
		if !ok {
			return nil, fmt.Errorf("%w: etcvault long form without its content", ErrMalformed)
		}
		wk, err1 := b64.DecodeString(wrapped)
		ct, err2 := b64.DecodeString(body)
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("%w: bad base64", ErrMalformed)
		}
		aesKey, err := rsa.DecryptOAEP(sha256.New(), nil, priv, wk, nil)
		if err != nil {
			return nil, ErrAuth
		}
		block, err := aes.NewCipher(aesKey)
		if err != nil || len(ct) == 0 || len(ct)%aes.BlockSize != 0 {
			return nil, ErrAuth
		}
		plain := make([]byte, len(ct))
		for i := 0; i < len(ct); i += aes.BlockSize { // ECB: etcvault's mode, read only
			block.Decrypt(plain[i:i+aes.BlockSize], ct[i:i+aes.BlockSize])
		}
		pad := int(plain[len(plain)-1])
		if pad == 0 || pad > aes.BlockSize {
			return nil, ErrAuth
		}
		for _, b := range plain[len(plain)-pad:] {
			if int(b) != pad {
				return nil, ErrAuth
			}
		}
		return plain[:len(plain)-pad], nil
	}
	return nil, fmt.Errorf("%w: etcvault form %q", ErrMalformed, form)
}

// Fresh is the same key with counts of its own, for another keyring: a keyring counts what its keys do, and
// one key in two keyrings would be counted twice where they are added up.
func (k *Key) Fresh() *Key {
	return &Key{name: k.name, provider: k.provider, aead: k.aead, header: k.header, parentHeader: k.parentHeader,
		siv: k.siv, sivHeader: k.sivHeader, etcvault: k.etcvault}
}
