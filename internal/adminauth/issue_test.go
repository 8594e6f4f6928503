package adminauth_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/adminauth/adminauthtest"
)

func parseCert(t *testing.T, certPEM []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(certPEM)
	if b == nil || b.Type != "CERTIFICATE" {
		t.Fatalf("not a PEM certificate: %q", certPEM)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestIssue issues server, client and dual certificates from CAs with
// every supported key kind and checks each one verifies against its CA
// for exactly the usages asked, with the SANs asked.
func TestIssue(t *testing.T) {
	kinds := []struct {
		name string
		kind adminauthtest.KeyKind
	}{
		{"ECDSA PKCS#8", adminauthtest.ECDSAPKCS8},
		{"ECDSA SEC1", adminauthtest.ECDSASEC1},
		{"RSA PKCS#1", adminauthtest.RSAPKCS1},
		{"RSA PKCS#8", adminauthtest.RSAPKCS8},
	}
	reqs := []struct {
		name     string
		req      adminauth.CertRequest
		wantEKUs []x509.ExtKeyUsage
	}{
		{"server", adminauth.CertRequest{CommonName: "kms-plugin", DNSNames: []string{"node-1", "node-1.example"}, IPs: []net.IP{net.ParseIP("10.0.0.5"), net.ParseIP("fd00::5")}, Server: true}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}},
		{"client", adminauth.CertRequest{CommonName: adminauth.DefaultClientName, Organization: []string{"kms-plugin"}, Client: true, Validity: time.Hour}, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}},
		{"both", adminauth.CertRequest{CommonName: "x", IPs: []net.IP{net.ParseIP("127.0.0.1")}, Server: true, Client: true}, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}},
	}
	for _, k := range kinds {
		ca := adminauthtest.NewCA(t, "test CA "+k.name, k.kind)
		roots := x509.NewCertPool()
		roots.AddCert(ca.Cert)
		for _, r := range reqs {
			t.Run(k.name+"/"+r.name, func(t *testing.T) {
				certPEM, keyPEM, err := adminauth.Issue(ca.CertPEM, ca.KeyPEM, r.req)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
					t.Fatalf("certificate and key do not pair: %v", err)
				}
				if b, _ := pem.Decode(keyPEM); b == nil || b.Type != "PRIVATE KEY" {
					t.Errorf("key PEM type = %v; want PRIVATE KEY", b)
				}
				c := parseCert(t, certPEM)
				pub, ok := c.PublicKey.(*ecdsa.PublicKey)
				if !ok || pub.Curve != elliptic.P256() {
					t.Errorf("public key = %T; want ECDSA P-256", c.PublicKey)
				}
				for _, eku := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
					_, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{eku}})
					if want := slices.Contains(r.wantEKUs, eku); (err == nil) != want {
						t.Errorf("verify for usage %v: err = %v; want ok = %v", eku, err, want)
					}
				}
				if !slices.Equal(c.ExtKeyUsage, r.wantEKUs) {
					t.Errorf("ExtKeyUsage = %v; want %v", c.ExtKeyUsage, r.wantEKUs)
				}
				if c.KeyUsage != x509.KeyUsageDigitalSignature {
					t.Errorf("KeyUsage = %v; want digital signature only", c.KeyUsage)
				}
				if c.IsCA {
					t.Error("issued certificate is a CA")
				}
				if c.Subject.CommonName != r.req.CommonName || !slices.Equal(c.Subject.Organization, r.req.Organization) {
					t.Errorf("subject = %v; want CN=%s O=%v", c.Subject, r.req.CommonName, r.req.Organization)
				}
				if !slices.Equal(c.DNSNames, r.req.DNSNames) {
					t.Errorf("DNSNames = %v; want %v", c.DNSNames, r.req.DNSNames)
				}
				if len(c.IPAddresses) != len(r.req.IPs) {
					t.Errorf("IPAddresses = %v; want %v", c.IPAddresses, r.req.IPs)
				}
				for i, ip := range r.req.IPs {
					if i < len(c.IPAddresses) && !c.IPAddresses[i].Equal(ip) {
						t.Errorf("IPAddresses[%d] = %v; want %v", i, c.IPAddresses[i], ip)
					}
				}
				for _, name := range r.req.DNSNames {
					if err := c.VerifyHostname(name); err != nil {
						t.Errorf("VerifyHostname(%s): %v", name, err)
					}
				}
				if c.SerialNumber.Sign() <= 0 || c.SerialNumber.BitLen() > 129 {
					t.Errorf("serial %v is not a positive 128-bit number", c.SerialNumber)
				}
			})
		}
	}
}

// TestIssueClockAndSerial checks the validity window against an injected
// clock, the clamp to the CA's expiry, and that the serial comes from the
// injected randomness (and differs between real issues).
func TestIssueClockAndSerial(t *testing.T) {
	ca := adminauthtest.NewCA(t, "test CA", adminauthtest.ECDSAPKCS8)
	now := time.Now().Truncate(time.Second)
	req := adminauth.CertRequest{CommonName: "c", Client: true, Validity: 2 * time.Hour}
	issue := func(is adminauth.Issuer, req adminauth.CertRequest) *x509.Certificate {
		t.Helper()
		certPEM, _, err := is.Issue(ca.CertPEM, ca.KeyPEM, req)
		if err != nil {
			t.Fatal(err)
		}
		return parseCert(t, certPEM)
	}
	fixed := func() adminauth.Issuer {
		return adminauth.Issuer{Now: func() time.Time { return now }, Rand: bytes.NewReader(bytes.Repeat([]byte{7}, 64))}
	}
	a, b := issue(fixed(), req), issue(fixed(), req)
	if a.SerialNumber.Cmp(b.SerialNumber) != 0 {
		t.Errorf("serials from the same randomness differ: %v, %v", a.SerialNumber, b.SerialNumber)
	}
	if want := now.Add(-5 * time.Minute); !a.NotBefore.Equal(want) {
		t.Errorf("NotBefore = %v; want %v", a.NotBefore, want)
	}
	if want := now.Add(2 * time.Hour); !a.NotAfter.Equal(want) {
		t.Errorf("NotAfter = %v; want %v", a.NotAfter, want)
	}
	if c, d := issue(adminauth.Issuer{}, req), issue(adminauth.Issuer{}, req); c.SerialNumber.Cmp(d.SerialNumber) == 0 {
		t.Errorf("two issues with crypto/rand share serial %v", c.SerialNumber)
	}
	long := issue(fixed(), adminauth.CertRequest{CommonName: "c", Client: true}) // DefaultValidity: a year, the CA lasts a day
	if !long.NotAfter.Equal(ca.Cert.NotAfter) {
		t.Errorf("NotAfter = %v; want the CA's %v", long.NotAfter, ca.Cert.NotAfter)
	}
}

func TestIssueErrors(t *testing.T) {
	ca := adminauthtest.NewCA(t, "test CA", adminauthtest.RSAPKCS1)
	other := adminauthtest.NewCA(t, "other CA", adminauthtest.ECDSASEC1)
	leafPEM, leafKeyPEM := ca.Client(t, "not-a-ca")
	client := adminauth.CertRequest{CommonName: "c", Client: true}
	encrypted := pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1, 2, 3}})
	tests := []struct {
		name          string
		caCert, caKey []byte
		req           adminauth.CertRequest
		now           time.Time
		want          string
	}{
		{"garbage CA certificate", []byte("hello"), ca.KeyPEM, client, time.Time{}, "CA certificate: no PEM CERTIFICATE block"},
		{"CA certificate PEM of garbage", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte("junk")}), ca.KeyPEM, client, time.Time{}, "CA certificate: parse certificate"},
		{"garbage CA key", ca.CertPEM, []byte("-----BEGIN NONSENSE-----\n-----END NONSENSE-----\n"), client, time.Time{}, "CA key: no PEM private key block"},
		{"CA key PEM of garbage", ca.CertPEM, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: []byte("junk")}), client, time.Time{}, "CA key: parse RSA PRIVATE KEY"},
		{"encrypted CA key", ca.CertPEM, encrypted, client, time.Time{}, "encrypted"},
		{"key of another CA", ca.CertPEM, other.KeyPEM, client, time.Time{}, "is not the key of CA certificate"},
		{"not a CA", leafPEM, leafKeyPEM, client, time.Time{}, "is not a CA"},
		{"CA expired", ca.CertPEM, ca.KeyPEM, client, time.Now().Add(48 * time.Hour), "not now"},
		{"neither server nor client", ca.CertPEM, ca.KeyPEM, adminauth.CertRequest{CommonName: "c"}, time.Time{}, "neither a server nor a client"},
		{"client without a name", ca.CertPEM, ca.KeyPEM, adminauth.CertRequest{Client: true}, time.Time{}, "needs a CommonName"},
		{"server without SANs", ca.CertPEM, ca.KeyPEM, adminauth.CertRequest{CommonName: "s", Server: true}, time.Time{}, "at least one DNS name or IP"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var is adminauth.Issuer
			if !tt.now.IsZero() {
				is.Now = func() time.Time { return tt.now }
			}
			_, _, err := is.Issue(tt.caCert, tt.caKey, tt.req)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), "adminauth: ") {
				t.Fatalf("Issue error = %v; want one starting adminauth: and containing %q", err, tt.want)
			}
		})
	}
}

// TestIssueOpenSSLECParameters accepts openssl ecparam -genkey output: an
// EC PARAMETERS block before the key.
func TestIssueOpenSSLECParameters(t *testing.T) {
	ca := adminauthtest.NewCA(t, "test CA", adminauthtest.ECDSASEC1)
	params := pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}})
	if _, _, err := adminauth.Issue(ca.CertPEM, append(params, ca.KeyPEM...), adminauth.CertRequest{CommonName: "c", Client: true}); err != nil {
		t.Fatal(err)
	}
}

func TestIsLoopback(t *testing.T) {
	tests := []struct {
		addr    string
		want    bool
		wantErr bool
	}{
		{"127.0.0.1:8787", true, false},
		{"127.1.2.3:8787", true, false},
		{"[::1]:8787", true, false},
		{"[::ffff:127.0.0.1]:8787", true, false},
		{"localhost:8787", true, false},
		{"LocalHost:0", true, false},
		{":8787", false, false},
		{"0.0.0.0:8787", false, false},
		{"[::]:8787", false, false},
		{"10.0.0.5:8787", false, false},
		{"[fe80::1%eth0]:8787", false, false},
		{"node-1:8787", false, false},
		{"localhost.evil.example:8787", false, false},
		{"127.0.0.1", false, true},
		{"", false, true},
	}
	for _, tt := range tests {
		got, err := adminauth.IsLoopback(tt.addr)
		if got != tt.want || (err != nil) != tt.wantErr {
			t.Errorf("IsLoopback(%q) = %v, %v; want %v, error %v", tt.addr, got, err, tt.want, tt.wantErr)
		}
	}
}

func pkixName(cn string) pkix.Name { return pkix.Name{CommonName: cn} }
