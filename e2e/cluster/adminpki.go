package cluster

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// AdminClientName is the client certificate CommonName the plugins' admin
// port admits by default.
const AdminClientName = "kms-plugin-admin"

// AdminPKI is what the plugins' admin port needs to serve HTTPS with
// authentication, and what its clients present: a CA, a serving
// certificate for 127.0.0.1 and localhost (shared by every node's plugin,
// all on loopback here), a client certificate of the CA with CommonName
// AdminClientName, and a bearer token. All are files, mode 0600.
type AdminPKI struct {
	CAFile                        string
	ServerCertFile, ServerKeyFile string
	ClientCertFile, ClientKeyFile string
	TokenFile                     string
}

// WriteAdminPKI creates dir and writes a fresh AdminPKI into it.
func WriteAdminPKI(dir string) (*AdminPKI, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ca, err := newTestCA("kms-plugin e2e admin CA")
	if err != nil {
		return nil, err
	}
	srvCert, srvKey, err := ca.issue("kms-plugin", true, false)
	if err != nil {
		return nil, err
	}
	cliCert, cliKey, err := ca.issue(AdminClientName, false, true)
	if err != nil {
		return nil, err
	}
	path := func(name string) string { return filepath.Join(dir, name) }
	p := &AdminPKI{
		CAFile:         path("ca.crt"),
		ServerCertFile: path("server.crt"), ServerKeyFile: path("server.key"),
		ClientCertFile: path("client.crt"), ClientKeyFile: path("client.key"),
		TokenFile: path("token"),
	}
	for file, data := range map[string][]byte{
		p.CAFile: ca.certPEM, p.ServerCertFile: srvCert, p.ServerKeyFile: srvKey,
		p.ClientCertFile: cliCert, p.ClientKeyFile: cliKey, p.TokenFile: []byte(RandomHex(24) + "\n"),
	} {
		if err := os.WriteFile(file, data, 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// ServeArgs are `kms-plugin serve`'s flags for p: HTTPS with the serving
// certificate, admitting client certificates of the CA and the token.
// The plugin then checks every request to /status and /refresh, on
// loopback too.
func (p *AdminPKI) ServeArgs() []string {
	return []string{
		"--http-tls-cert-file", p.ServerCertFile, "--http-tls-key-file", p.ServerKeyFile,
		"--http-client-ca-file", p.CAFile, "--http-token-file", p.TokenFile,
	}
}

// CertArgs are the flags of rotate, status and verify that verify the
// plugins with the CA and present the client certificate.
func (p *AdminPKI) CertArgs() []string {
	return []string{"--plugin-ca-file", p.CAFile, "--plugin-cert-file", p.ClientCertFile, "--plugin-key-file", p.ClientKeyFile}
}

// TokenArgs are the flags that verify the plugins with the CA and present
// the bearer token.
func (p *AdminPKI) TokenArgs() []string {
	return []string{"--plugin-ca-file", p.CAFile, "--plugin-token-file", p.TokenFile}
}

// HTTPClient returns a client that verifies the plugins with the CA and,
// withCert, presents the client certificate.
func (p *AdminPKI) HTTPClient(withCert bool) (*http.Client, error) {
	caPEM, err := os.ReadFile(p.CAFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s: no certificate", p.CAFile)
	}
	tc := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if withCert {
		pair, err := tls.LoadX509KeyPair(p.ClientCertFile, p.ClientKeyFile)
		if err != nil {
			return nil, err
		}
		tc.Certificates = []tls.Certificate{pair}
	}
	return &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tc}}, nil
}
