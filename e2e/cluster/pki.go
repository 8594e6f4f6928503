package cluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// testCA is a throwaway P-256 certificate authority for the harness's TLS
// (the etcd cluster of an HA control plane), valid for a day.
type testCA struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	certPEM []byte
}

func newTestCA(commonName string) (*testCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: commonName},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &testCA{cert: cert, key: key, certPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// issue returns a leaf certificate and its key, both PEM, for 127.0.0.1 and
// localhost, usable for server and client authentication as asked.
func (ca *testCA) issue(commonName string, server, client bool) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: commonName},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	if server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
		tmpl.DNSNames = []string{"localhost"}
	}
	if client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), nil
}

func randomSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

// TLSFiles names a CA certificate and a client (or server) certificate and
// key, PEM files as kubeadm keeps them under /etc/kubernetes/pki/etcd.
type TLSFiles struct {
	CAFile, CertFile, KeyFile string
}

// TLSConfig loads the files into a client TLS configuration.
func (f TLSFiles) TLSConfig() (*tls.Config, error) {
	caPEM, err := os.ReadFile(f.CAFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s: no certificate", f.CAFile)
	}
	pair, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
	if err != nil {
		return nil, err
	}
	return &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}, nil
}

// writeEtcdPKI writes, into dir, an etcd CA (ca.crt), one certificate for
// every member used for both its client and peer listeners (server.crt,
// server.key: server and client authentication, as etcd's peer TLS needs),
// and a client certificate (client.crt, client.key) for kube-apiserver, the
// rotation commands and the tests.
func writeEtcdPKI(dir string) (server, client TLSFiles, err error) {
	ca, err := newTestCA("kms-plugin e2e etcd-ca")
	if err != nil {
		return server, client, err
	}
	serverCert, serverKey, err := ca.issue("kms-plugin e2e etcd member", true, true)
	if err != nil {
		return server, client, err
	}
	clientCert, clientKey, err := ca.issue("kms-plugin e2e etcd client", false, true)
	if err != nil {
		return server, client, err
	}
	path := func(name string) string { return filepath.Join(dir, name) }
	for name, data := range map[string][]byte{
		"ca.crt": ca.certPEM, "server.crt": serverCert, "server.key": serverKey,
		"client.crt": clientCert, "client.key": clientKey,
	} {
		if err := os.WriteFile(path(name), data, 0o600); err != nil {
			return server, client, err
		}
	}
	return TLSFiles{CAFile: path("ca.crt"), CertFile: path("server.crt"), KeyFile: path("server.key")},
		TLSFiles{CAFile: path("ca.crt"), CertFile: path("client.crt"), KeyFile: path("client.key")}, nil
}
