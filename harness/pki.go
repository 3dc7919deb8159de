package harness

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
)

// PKI is three independent certificate authorities whose certificates and keys are written as PEM files under
// Dir, one folder per CA.
type PKI struct {
	// Dir is the root of the PEM files.
	Dir string
	// Cluster signs the members' server and peer certificates and the client certificates used toward members
	// (by a proxy or by etcdctl talking to members directly).
	Cluster *CA
	// Client signs the certificates of listeners that clients see and the clients' own certificates.
	Client *CA
	// Other is unrelated to every part; its certificates must be rejected everywhere (negative tests).
	Other *CA
}

// NewPKI creates the three CAs under dir.
func NewPKI(dir string) (*PKI, error) {
	p := &PKI{Dir: dir}
	var err error
	if p.Cluster, err = NewCA(filepath.Join(dir, "cluster"), "cluster-ca"); err != nil {
		return nil, err
	}
	if p.Client, err = NewCA(filepath.Join(dir, "client"), "client-ca"); err != nil {
		return nil, err
	}
	if p.Other, err = NewCA(filepath.Join(dir, "other"), "other-ca"); err != nil {
		return nil, err
	}
	return p, nil
}

// CA is a self-signed ECDSA P-256 certificate authority held in memory; its certificate is also at CertFile.
type CA struct {
	// Name is the CA's common name.
	Name string
	// CertFile is the PEM file of the CA certificate: what a peer trusts.
	CertFile string
	// Dir holds CertFile and every certificate issued by this CA.
	Dir string
	// Cert is the parsed CA certificate.
	Cert *x509.Certificate

	key    crypto.Signer
	mu     sync.Mutex
	issued map[string]bool
}

// NewCA creates a CA named name and writes its certificate to dir/ca.crt.
func NewCA(dir, name string) (*CA, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("harness: create CA dir: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("harness: CA %s key: %w", name, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"etcd-proxy-proxy harness"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("harness: CA %s certificate: %w", name, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("harness: CA %s certificate: %w", name, err)
	}
	ca := &CA{Name: name, Dir: dir, CertFile: filepath.Join(dir, "ca.crt"), Cert: cert, key: key, issued: map[string]bool{}}
	if err := writePEM(ca.CertFile, "CERTIFICATE", der, 0o644); err != nil {
		return nil, err
	}
	return ca, nil
}

// Pool returns a pool holding only this CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
}

// TLSFiles is what one side of a TLS connection needs, as PEM file paths. The zero value means plain TCP.
type TLSFiles struct {
	// CAFile is the CA to trust for the peer's certificate. Empty: the system roots.
	CAFile string
	// CertFile and KeyFile are this side's certificate and key. Empty: no certificate.
	CertFile, KeyFile string
}

// IsZero reports whether f describes a plain connection.
func (f TLSFiles) IsZero() bool { return f == TLSFiles{} }

// Scheme is "https" for TLS files and "http" for the zero value.
func (f TLSFiles) Scheme() string {
	if f.IsZero() {
		return "http"
	}
	return "https"
}

// TLSInfo converts f to etcd's transport.TLSInfo (client or server side: TrustedCAFile is CAFile).
func (f TLSFiles) TLSInfo() transport.TLSInfo {
	return transport.TLSInfo{CertFile: f.CertFile, KeyFile: f.KeyFile, TrustedCAFile: f.CAFile}
}

// ClientConfig is a client-side tls.Config: trust CAFile, present CertFile if set. Nil for the zero value.
func (f TLSFiles) ClientConfig() (*tls.Config, error) {
	if f.IsZero() {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if f.CAFile != "" {
		pem, err := os.ReadFile(f.CAFile)
		if err != nil {
			return nil, fmt.Errorf("harness: read CA file: %w", err)
		}
		cfg.RootCAs = x509.NewCertPool()
		if !cfg.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("harness: no certificate in CA file %s", f.CAFile)
		}
	}
	if f.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("harness: load client key pair: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

type certConfig struct {
	server, client bool
	hosts          []string
	expired        bool
	cn             *string
}

// CertOption changes a certificate issued by CA.Issue.
type CertOption func(*certConfig)

// ServerAuth gives the certificate the server-auth usage. Without ServerAuth and ClientAuth it gets both.
func ServerAuth() CertOption { return func(c *certConfig) { c.server = true } }

// ClientAuth gives the certificate the client-auth usage. Without ServerAuth and ClientAuth it gets both.
func ClientAuth() CertOption { return func(c *certConfig) { c.client = true } }

// Hosts sets the DNS names and IP addresses the certificate is valid for; default localhost, 127.0.0.1, ::1.
func Hosts(hosts ...string) CertOption {
	return func(c *certConfig) { c.hosts = append([]string(nil), hosts...) }
}

// Expired makes a certificate whose validity ended a day ago.
func Expired() CertOption { return func(c *certConfig) { c.expired = true } }

// CommonName sets the subject common name; the default is the name given to Issue. CommonName("") leaves it
// empty, which the grpc-proxy requires of its client certificate toward members (etcd issue 11970).
func CommonName(cn string) CertOption { return func(c *certConfig) { c.cn = &cn } }

// Issue signs a new ECDSA key for name and writes name.crt and name.key into the CA's folder. The returned
// CAFile is this CA. Each name can be issued once per CA.
func (ca *CA) Issue(name string, opts ...CertOption) (TLSFiles, error) {
	cfg := certConfig{hosts: []string{"localhost", "127.0.0.1", "::1"}}
	for _, o := range opts {
		o(&cfg)
	}
	if !cfg.server && !cfg.client {
		cfg.server, cfg.client = true, true
	}
	cn := name
	if cfg.cn != nil {
		cn = *cfg.cn
	}
	ca.mu.Lock()
	dup := ca.issued[name]
	ca.issued[name] = true
	ca.mu.Unlock()
	if dup {
		return TLSFiles{}, fmt.Errorf("harness: CA %s: certificate %q issued twice", ca.Name, name)
	}

	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return TLSFiles{}, fmt.Errorf("harness: key for %s: %w", name, err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"etcd-proxy-proxy harness"}},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
	}
	if cfg.expired {
		tmpl.NotBefore, tmpl.NotAfter = now.Add(-48*time.Hour), now.Add(-24*time.Hour)
	}
	if cfg.server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if cfg.client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	for _, h := range cfg.hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.key)
	if err != nil {
		return TLSFiles{}, fmt.Errorf("harness: sign %s with %s: %w", name, ca.Name, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return TLSFiles{}, fmt.Errorf("harness: marshal key for %s: %w", name, err)
	}
	f := TLSFiles{
		CAFile:   ca.CertFile,
		CertFile: filepath.Join(ca.Dir, name+".crt"),
		KeyFile:  filepath.Join(ca.Dir, name+".key"),
	}
	if err := writePEM(f.CertFile, "CERTIFICATE", der, 0o644); err != nil {
		return TLSFiles{}, err
	}
	if err := writePEM(f.KeyFile, "PRIVATE KEY", keyDER, 0o600); err != nil {
		return TLSFiles{}, err
	}
	return f, nil
}

// RevocationList writes a certificate revocation list signed by the CA to name.crl in its folder, revoking the
// certificates in the given files, and returns its path.
func (ca *CA) RevocationList(name string, revoked ...string) (string, error) {
	now := time.Now()
	tmpl := &x509.RevocationList{Number: serial(), ThisUpdate: now.Add(-time.Hour), NextUpdate: now.Add(24 * time.Hour)}
	for _, f := range revoked {
		c, err := LoadCert(f)
		if err != nil {
			return "", err
		}
		tmpl.RevokedCertificateEntries = append(tmpl.RevokedCertificateEntries,
			x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: now.Add(-time.Minute)})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tmpl, ca.Cert, ca.key)
	if err != nil {
		return "", fmt.Errorf("harness: revocation list %s of %s: %w", name, ca.Name, err)
	}
	path := filepath.Join(ca.Dir, name+".crl")
	return path, writePEM(path, "X509 CRL", der, 0o644)
}

// LoadCert parses the first certificate of a PEM file.
func LoadCert(file string) (*x509.Certificate, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("harness: read certificate: %w", err)
	}
	block, _ := pem.Decode(b)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("harness: no PEM certificate in " + file)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("harness: parse %s: %w", file, err)
	}
	return c, nil
}

func writePEM(path, typ string, der []byte, mode os.FileMode) error {
	b := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	if err := os.WriteFile(path, b, mode); err != nil {
		return fmt.Errorf("harness: write %s: %w", path, err)
	}
	return nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err) // crypto/rand never fails on supported platforms
	}
	return n
}
