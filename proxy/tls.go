package proxy

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
)

// serverConfig is the TLS of the https listeners. With a CA file client certificates are verified when given,
// and required with ClientCertAuth.
func (t TLSInfo) serverConfig() (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("loading the server certificate: %w", err)
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	if t.CAFile != "" {
		pool, err := loadPool(t.CAFile)
		if err != nil {
			return nil, err
		}
		c.ClientCAs = pool
		c.ClientAuth = tls.VerifyClientCertIfGiven
		if t.ClientCertAuth {
			c.ClientAuth = tls.RequireAndVerifyClientCert
		}
	}
	if t.CRLFile != "" {
		revoked, err := loadCRL(t.CRLFile)
		if err != nil {
			return nil, err
		}
		c.VerifyConnection = func(cs tls.ConnectionState) error {
			for _, cert := range cs.PeerCertificates {
				if revoked[string(cert.SerialNumber.Bytes())] {
					return fmt.Errorf("client certificate serial %x revoked", cert.SerialNumber.Bytes())
				}
			}
			return nil
		}
	}
	return c, nil
}

// loadCRL returns the serials a revocation list names. As etcd's --client-crl-file, the list is the operator's
// file and its signature is not checked.
func loadCRL(file string) (map[string]bool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading the revocation list: %w", err)
	}
	if block, _ := pem.Decode(b); block != nil {
		b = block.Bytes
	}
	crl, err := x509.ParseRevocationList(b)
	if err != nil {
		return nil, fmt.Errorf("parsing the revocation list %s: %w", file, err)
	}
	revoked := map[string]bool{}
	for _, e := range crl.RevokedCertificateEntries {
		revoked[string(e.SerialNumber.Bytes())] = true
	}
	return revoked, nil
}

func loadPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading the CA bundle: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in the CA bundle %s", file)
	}
	return pool, nil
}
