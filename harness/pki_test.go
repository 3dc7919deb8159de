package harness

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestPKIUsages(t *testing.T) {
	t.Parallel()
	pki, err := NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		opts   []CertOption
		usages []x509.ExtKeyUsage
		absent []x509.ExtKeyUsage
	}{
		{"both", nil, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, nil},
		{"server", []CertOption{ServerAuth()}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}},
		{"client", []CertOption{ClientAuth()}, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := pki.Cluster.Issue(tt.name, tt.opts...)
			if err != nil {
				t.Fatal(err)
			}
			if f.CAFile != pki.Cluster.CertFile {
				t.Errorf("CAFile = %s, want the issuing CA %s", f.CAFile, pki.Cluster.CertFile)
			}
			cert, err := LoadCert(f.CertFile)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile); err != nil {
				t.Fatalf("key pair: %v", err)
			}
			for _, u := range tt.usages {
				if _, err := cert.Verify(x509.VerifyOptions{Roots: pki.Cluster.Pool(), KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
					t.Errorf("verify for usage %v: %v", u, err)
				}
			}
			for _, u := range tt.absent {
				_, err := cert.Verify(x509.VerifyOptions{Roots: pki.Cluster.Pool(), KeyUsages: []x509.ExtKeyUsage{u}})
				var inv x509.CertificateInvalidError
				if !errors.As(err, &inv) || inv.Reason != x509.IncompatibleUsage {
					t.Errorf("verify for usage %v: got %v, want an incompatible-usage error", u, err)
				}
			}
			if cert.Subject.CommonName != tt.name {
				t.Errorf("CN = %q, want %q", cert.Subject.CommonName, tt.name)
			}
			if !slices.ContainsFunc(cert.IPAddresses, func(ip net.IP) bool { return ip.Equal(net.IPv6loopback) }) ||
				!slices.Contains(cert.DNSNames, "localhost") || cert.VerifyHostname("127.0.0.1") != nil {
				t.Errorf("default hosts: DNS %v IP %v", cert.DNSNames, cert.IPAddresses)
			}
			// Another CA never verifies it.
			_, err = cert.Verify(x509.VerifyOptions{Roots: pki.Other.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
			var unknown x509.UnknownAuthorityError
			if !errors.As(err, &unknown) {
				t.Errorf("verify against Other CA: got %v, want UnknownAuthorityError", err)
			}
		})
	}

	t.Run("expired", func(t *testing.T) {
		f, err := pki.Client.Issue("old", Expired())
		if err != nil {
			t.Fatal(err)
		}
		cert, err := LoadCert(f.CertFile)
		if err != nil {
			t.Fatal(err)
		}
		if !cert.NotAfter.Before(time.Now()) {
			t.Errorf("NotAfter %v is not in the past", cert.NotAfter)
		}
		_, err = cert.Verify(x509.VerifyOptions{Roots: pki.Client.Pool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		var inv x509.CertificateInvalidError
		if !errors.As(err, &inv) || inv.Reason != x509.Expired {
			t.Errorf("verify: got %v, want an expired error", err)
		}
	})
	t.Run("hosts-and-cn", func(t *testing.T) {
		f, err := pki.Client.Issue("odd", Hosts("wrong.example", "10.9.8.7"), CommonName(""))
		if err != nil {
			t.Fatal(err)
		}
		cert, err := LoadCert(f.CertFile)
		if err != nil {
			t.Fatal(err)
		}
		if cert.Subject.CommonName != "" {
			t.Errorf("CN = %q, want empty", cert.Subject.CommonName)
		}
		if cert.VerifyHostname("wrong.example") != nil || cert.VerifyHostname("10.9.8.7") != nil || cert.VerifyHostname("localhost") == nil {
			t.Errorf("hosts: DNS %v IP %v", cert.DNSNames, cert.IPAddresses)
		}
	})
	t.Run("issued-twice", func(t *testing.T) {
		if _, err := pki.Other.Issue("dup"); err != nil {
			t.Fatal(err)
		}
		if _, err := pki.Other.Issue("dup"); err == nil {
			t.Error("second Issue of the same name succeeded")
		}
	})
}

// testContext is t.Context() with a deadline; unlike a deferred cancel it lives until the parallel subtests end.
func testContext(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// tlsRequest does one HTTP/1.1 GET /version over a fresh TLS connection and returns the first error: the
// handshake, or (TLS 1.3, where the server checks the client certificate after the client's handshake is done)
// the first read.
func tlsRequest(ctx context.Context, rawURL string, cfg *tls.Config) error {
	u, err := url.Parse(rawURL)
	if err != nil {
		return err
	}
	d := tls.Dialer{Config: cfg}
	conn, err := d.DialContext(ctx, "tcp", u.Host)
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if _, err := io.WriteString(conn, "GET /version HTTP/1.1\r\nHost: "+u.Host+"\r\nConnection: close\r\n\r\n"); err != nil {
		return err
	}
	b, err := io.ReadAll(conn)
	if err != nil {
		return err
	}
	if !strings.HasPrefix(string(b), "HTTP/1.1 200") {
		return errors.New("unexpected response: " + string(b))
	}
	return nil
}

// TestTLSAgainstMember checks the PKI against a real TLS member: what it accepts and how it refuses the rest.
func TestTLSAgainstMember(t *testing.T) {
	t.Parallel()
	ctx := testContext(t, 60*time.Second)
	e := NewTestEnv(t)
	c, err := e.StartCluster(ctx, WithMembers(1), WithTLS())
	if err != nil {
		t.Fatal(err)
	}
	m := c.Members[0]
	clientCfg := func(t *testing.T, f TLSFiles) *tls.Config {
		t.Helper()
		cfg, err := f.ClientConfig()
		if err != nil {
			t.Fatal(err)
		}
		cfg.RootCAs = e.PKI.Cluster.Pool() // always trust the member; only our certificate varies
		if len(cfg.Certificates) == 1 {
			// Go's client sends a certificate only if its issuer is among the CAs the server asks for; send it
			// regardless, so that the member itself has to refuse a foreign one.
			cert := cfg.Certificates[0]
			cfg.Certificates = nil
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
		}
		return cfg
	}
	issue := func(t *testing.T, ca *CA, name string, opts ...CertOption) TLSFiles {
		t.Helper()
		f, err := ca.Issue(name, opts...)
		if err != nil {
			t.Fatal(err)
		}
		return f
	}

	t.Run("cluster-client-cert-accepted", func(t *testing.T) {
		t.Parallel()
		if err := tlsRequest(ctx, m.ClientURL, clientCfg(t, c.Endpoint().TLS)); err != nil {
			t.Fatalf("GET /version with the cluster's client certificate: %v", err)
		}
		res := e.Etcdctl(3, c.Endpoint()).Run(ctx, "put", "k", "v")
		if err := res.Check(); err != nil {
			t.Fatal(err)
		}
	})
	// Each refusal comes from the member as a TLS alert about our certificate.
	refusals := []struct {
		name  string
		files func(t *testing.T) TLSFiles
		alert []string // any of these remote alerts
	}{
		{"no-client-cert", func(t *testing.T) TLSFiles { return TLSFiles{CAFile: e.PKI.Cluster.CertFile} },
			[]string{"certificate required"}}, // TLS 1.3's alert; 1.2 would say "bad certificate"
		{"client-ca-cert-rejected", func(t *testing.T) TLSFiles {
			return issue(t, e.PKI.Client, "member-client-from-client-ca", ClientAuth())
		},
			[]string{"unknown certificate authority"}},
		{"other-ca-cert-rejected", func(t *testing.T) TLSFiles { return issue(t, e.PKI.Other, "member-client-from-other-ca", ClientAuth()) },
			[]string{"unknown certificate authority"}},
		{"expired-cert-rejected", func(t *testing.T) TLSFiles {
			return issue(t, e.PKI.Cluster, "expired-client", ClientAuth(), Expired())
		}, []string{"expired certificate"}},
		// A certificate without the client-auth usage: Go's server answers with the generic alert.
		{"server-only-cert-rejected", func(t *testing.T) TLSFiles { return issue(t, e.PKI.Cluster, "server-only", ServerAuth()) },
			[]string{"bad certificate"}},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tlsRequest(ctx, m.ClientURL, clientCfg(t, tt.files(t)))
			if err == nil {
				t.Fatal("the member accepted the connection")
			}
			msg := err.Error()
			if !strings.Contains(msg, "remote error: tls: ") || !slices.ContainsFunc(tt.alert, func(a string) bool { return strings.Contains(msg, a) }) {
				t.Fatalf("got %v, want a TLS alert from the member, one of %q", err, tt.alert)
			}
			t.Logf("refused as expected: %v", err)
		})
	}

	t.Run("wrong-san", func(t *testing.T) {
		t.Parallel()
		wc, err := e.StartCluster(ctx, WithMembers(1), WithTLS(), WithMemberCertOptions(Hosts("wrong.example")))
		if err != nil {
			t.Fatal(err)
		}
		err = tlsRequest(ctx, wc.Members[0].ClientURL, clientCfg(t, wc.Endpoint().TLS))
		var verr *tls.CertificateVerificationError
		var host x509.HostnameError
		if !errors.As(err, &verr) || !errors.As(err, &host) {
			t.Fatalf("got %v, want a certificate verification error about the host name", err)
		}
		if host.Host != "127.0.0.1" {
			t.Errorf("hostname error for %q, want 127.0.0.1", host.Host)
		}
		// etcdctl says the same in its own words.
		res := e.Etcdctl(3, wc.Endpoint()).Run(ctx, "--dial-timeout=2s", "--command-timeout=3s", "get", "k")
		if res.Exit == 0 {
			t.Fatalf("etcdctl against a member with a wrong SAN succeeded: %s", res.Stdout)
		}
		t.Logf("etcdctl: exit %d: %s", res.Exit, strings.TrimSpace(res.Stderr))
	})
}
