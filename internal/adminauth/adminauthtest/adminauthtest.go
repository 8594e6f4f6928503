// Package adminauthtest makes throwaway CAs and certificates for tests of
// code that serves or calls the admin endpoint over TLS.
package adminauthtest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
)

// KeyKind selects a CA key's algorithm and PEM encoding.
type KeyKind int

// The key kinds of kubeadm CAs and of the usual openssl commands.
const (
	ECDSAPKCS8 KeyKind = iota // "PRIVATE KEY" holding ECDSA P-256
	ECDSASEC1                 // "EC PRIVATE KEY"
	RSAPKCS1                  // "RSA PRIVATE KEY", 2048 bits (kubeadm's ca.key)
	RSAPKCS8                  // "PRIVATE KEY" holding RSA 2048
)

// CA is a test certificate authority.
type CA struct {
	CertPEM, KeyPEM []byte
	Cert            *x509.Certificate
}

// NewCA returns a CA named name, valid from an hour ago for a day.
func NewCA(t testing.TB, name string, kind KeyKind) *CA {
	t.Helper()
	var (
		key    crypto.Signer
		keyPEM []byte
		err    error
	)
	switch kind {
	case ECDSAPKCS8, ECDSASEC1:
		k, kerr := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if kerr != nil {
			t.Fatal(kerr)
		}
		key = k
		if kind == ECDSASEC1 {
			der, merr := x509.MarshalECPrivateKey(k)
			if merr != nil {
				t.Fatal(merr)
			}
			keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der})
		}
	case RSAPKCS1, RSAPKCS8:
		k, kerr := rsa.GenerateKey(rand.Reader, 2048)
		if kerr != nil {
			t.Fatal(kerr)
		}
		key = k
		if kind == RSAPKCS1 {
			keyPEM = pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)})
		}
	default:
		t.Fatalf("adminauthtest: unknown key kind %d", kind)
	}
	if keyPEM == nil {
		der, merr := x509.MarshalPKCS8PrivateKey(key)
		if merr != nil {
			t.Fatal(merr)
		}
		keyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &CA{CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), KeyPEM: keyPEM, Cert: cert}
}

// Issue issues a certificate with adminauth.Issue.
func (ca *CA) Issue(t testing.TB, req adminauth.CertRequest) (certPEM, keyPEM []byte) {
	t.Helper()
	certPEM, keyPEM, err := adminauth.Issue(ca.CertPEM, ca.KeyPEM, req)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, keyPEM
}

// Server issues a serving certificate for 127.0.0.1, ::1 and localhost.
func (ca *CA) Server(t testing.TB) (certPEM, keyPEM []byte) {
	t.Helper()
	return ca.Issue(t, adminauth.CertRequest{
		CommonName: "kms-plugin", DNSNames: []string{"localhost"},
		IPs: []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}, Server: true,
	})
}

// Client issues a client certificate with CommonName cn.
func (ca *CA) Client(t testing.TB, cn string) (certPEM, keyPEM []byte) {
	t.Helper()
	return ca.Issue(t, adminauth.CertRequest{CommonName: cn, Client: true})
}

// WriteFile writes data to dir/name with mode perm, atomically (a rename
// over the old file, as a renewal should), and returns the path.
func WriteFile(t testing.TB, dir, name string, data []byte, perm os.FileMode) string {
	t.Helper()
	path := filepath.Join(dir, name)
	tmp, err := os.CreateTemp(dir, "."+name+".*")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tmp.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := tmp.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(tmp.Name(), perm); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		t.Fatal(err)
	}
	return path
}
