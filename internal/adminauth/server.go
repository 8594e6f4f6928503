package adminauth

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"

	"go.uber.org/zap"
)

// ServerConfig configures the admin server's TLS (ServerTLS) and who it
// admits (NewAuthenticator). One value serves both calls.
type ServerConfig struct {
	// CertFile and KeyFile are the PEM serving certificate (with its
	// chain, leaf first) and its key. Both are re-read on the first
	// handshake after either file changed. Required by ServerTLS.
	CertFile, KeyFile string
	// ClientCAFile is a PEM bundle of the CAs whose client certificates
	// the server verifies; a certificate signed by another CA fails the
	// handshake. Optional: without it the server asks for no client
	// certificate. It is read once.
	ClientCAFile string
	// ClientNames are the client certificate CommonNames admitted; a
	// verified certificate with another name is refused with
	// ErrForbidden. Default: DefaultClientName only.
	ClientNames []string
	// TokenFile holds a bearer token admitted as an alternative to a
	// client certificate; see TokenFile. Optional.
	TokenFile string
	// Logger receives a line when changed certificate files are
	// reloaded, or fail to load. Default: no logging.
	Logger *zap.Logger
}

// ServerTLS returns the admin server's TLS configuration: TLS 1.2 or
// later (1.3 when the client has it; Go's default cipher suites, all
// ECDHE with AEAD), the serving pair from CertFile and KeyFile, re-read
// when they change, and, with ClientCAFile, client certificates verified
// against that CA when a client presents one (tls.VerifyClientCertIfGiven:
// a client may use a bearer token instead). It fails when the pair or the
// CA file does not load.
func ServerTLS(cfg ServerConfig) (*tls.Config, error) {
	if cfg.CertFile == "" || cfg.KeyFile == "" {
		return nil, errors.New("adminauth: a serving certificate needs both a certificate file and a key file")
	}
	kp, err := loadKeyPairFile(cfg.CertFile, cfg.KeyFile, cfg.Logger)
	if err != nil {
		return nil, err
	}
	tc := &tls.Config{
		MinVersion: tls.VersionTLS12,
		NextProtos: []string{"http/1.1"},
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return kp.get()
		},
	}
	if cfg.ClientCAFile != "" {
		pool, err := loadCAPool(cfg.ClientCAFile)
		if err != nil {
			return nil, err
		}
		tc.ClientCAs = pool
		tc.ClientAuth = tls.VerifyClientCertIfGiven
	}
	return tc, nil
}

// loadCAPool reads a PEM bundle of CA certificates.
func loadCAPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("adminauth: CA file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("adminauth: CA file %s holds no PEM certificate", path)
	}
	return pool, nil
}

// Authenticator checks the credentials of requests to the admin server.
type Authenticator struct {
	certs bool     // client certificates are verified (ClientCAFile set)
	names []string // admitted CommonNames
	token *TokenFile
}

// NewAuthenticator returns the Authenticator of cfg: it admits a client
// certificate with an admitted CommonName, when cfg.ClientCAFile is set,
// and the token of cfg.TokenFile, when set. At least one is needed.
func NewAuthenticator(cfg ServerConfig) (*Authenticator, error) {
	if cfg.ClientCAFile == "" && cfg.TokenFile == "" {
		return nil, errors.New("adminauth: no credential to check: set a client CA file or a token file")
	}
	a := &Authenticator{certs: cfg.ClientCAFile != "", names: slices.Clone(cfg.ClientNames)}
	if len(a.names) == 0 {
		a.names = []string{DefaultClientName}
	}
	for _, n := range a.names {
		if n == "" {
			return nil, errors.New("adminauth: an empty client name would admit certificates without a CommonName")
		}
	}
	if cfg.TokenFile != "" {
		var err error
		if a.token, err = NewTokenFile(cfg.TokenFile); err != nil {
			return nil, err
		}
	}
	return a, nil
}

// Authenticate returns nil when r carries a credential the server
// admits: a client certificate that the TLS handshake verified against
// the client CA and whose CommonName is admitted, or the bearer token.
// Either one suffices. Otherwise it returns an error wrapping
// ErrForbidden (a verified certificate with another name, and no valid
// token), ErrBadCredential (a wrong or malformed token) or
// ErrNoCredential (nothing presented), or, when the token file cannot be
// read, an error naming the file.
func (a *Authenticator) Authenticate(r *http.Request) error {
	var certErr error
	if a.certs && r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.VerifiedChains[0]) > 0 {
		cn := r.TLS.VerifiedChains[0][0].Subject.CommonName
		if slices.Contains(a.names, cn) {
			return nil
		}
		certErr = fmt.Errorf("%w: client certificate CommonName %q", ErrForbidden, cn)
	}
	if a.token != nil && len(r.Header.Values("Authorization")) > 0 {
		err := a.token.Check(r)
		if err == nil {
			return nil
		}
		if certErr == nil || !errors.Is(err, ErrBadCredential) {
			return err
		}
	}
	if certErr != nil {
		return certErr
	}
	if a.token == nil && len(r.Header.Values("Authorization")) > 0 {
		return fmt.Errorf("%w: this server admits client certificates only", ErrBadCredential)
	}
	return ErrNoCredential
}
