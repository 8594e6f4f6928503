// Package kvtest is a stand-in for Azure Key Vault, Managed HSM and
// Microsoft Entra ID, for tests only. It lets the real azkeys and azidentity
// clients run unmodified against loopback servers:
//
//   - an HTTPS server that speaks Key Vault's REST protocol as azkeys v1.5
//     sends it (api-version 2025-07-01): the bearer challenge (401 with
//     WWW-Authenticate naming authorization and resource) before the first
//     authorized request, base64url without padding, GET /keys/{name}/ and
//     /keys/{name}/{version}, list versions with paging, wrapkey, unwrapkey,
//     encrypt and decrypt on a versioned or unversioned key, create, rotate,
//     PATCH (enable, disable), and Key Vault's error bodies
//     {"error":{"code","message","innererror"}}. Keys are real: RSA 2048/3072
//     (RSA-OAEP-256, RSA-OAEP) and AES-256 oct-HSM keys (A256KW, RFC 3394;
//     A256GCM for encrypt/decrypt), held in memory;
//   - on the same listener, an Entra-style token endpoint (instance and
//     tenant discovery, client secret, client certificate assertion,
//     federated workload identity assertion);
//   - a plain-HTTP IMDS-style endpoint for managed identities (system, or
//     user-assigned by client ID or resource ID);
//   - an HTTP proxy (CONNECT for HTTPS, plain forwarding to IMDS), so that a
//     separate process reaches the fake vault under its real-looking host
//     name with only HTTPS_PROXY, HTTP_PROXY and SSL_CERT_FILE set.
//
// In-process clients use HTTPClient, whose transport dials every HTTPS host
// to the TLS listener and 169.254.169.254:80 to the IMDS listener, and trusts
// the server's CA. Tokens are HMAC-signed by a fixed test key, so a token
// cached by one test (MSAL caches managed identity tokens per process) is
// still valid against another Server.
//
// Fault knobs: latency, 429 with Retry-After, 5xx, a total outage (the
// connection is dropped), a skewed Date header; per-operation call counters,
// permissions per principal and per key, and which client secret or
// certificate each application last presented.
// AdminHandler exposes the same over HTTP for tests driving another process
// (see kvtestd).
package kvtest

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Defaults for Options fields left zero.
const (
	DefaultTenantID  = "72f988bf-0000-4000-8000-00000000c0de"
	DefaultVaultHost = "kvtest.vault.azure.net"
	DefaultHSMHost   = "kvtest.managedhsm.azure.net"
	DefaultLoginHost = "login.kvtest.example"
	// VaultResource and HSMResource are the token audiences of Key Vault
	// and Managed HSM.
	VaultResource = "https://vault.azure.net"
	HSMResource   = "https://managedhsm.azure.net"
	// IMDSHost is where managed identity tokens are requested.
	IMDSHost = "169.254.169.254"
	// APIVersion is the Key Vault REST API version azkeys v1.5 sends.
	APIVersion = "2025-07-01"
)

// Options configures a Server. The zero value is a Key Vault in the default
// tenant with access-policy error messages.
type Options struct {
	// TenantID is the vault's tenant. Default DefaultTenantID.
	TenantID string
	// ManagedHSM makes the server a Managed HSM: resource
	// https://managedhsm.azure.net, host DefaultHSMHost, RSA keys are
	// RSA-HSM and oct-HSM keys can be created.
	ManagedHSM bool
	// VaultHost is the vault's DNS name. Default DefaultVaultHost or
	// DefaultHSMHost.
	VaultHost string
	// LoginHost is the Entra authority host. Default DefaultLoginHost.
	LoginHost string
	// Resource is the challenge resource and token audience. Default
	// VaultResource or HSMResource.
	Resource string
	// RBAC makes 403 answers look like Azure RBAC denials (inner code
	// ForbiddenByRbac and the data action) instead of access-policy ones.
	RBAC bool
	// DisabledGetForbidden makes GET of a disabled key version answer 403
	// KeyDisabled instead of 200 with attributes.enabled false.
	DisabledGetForbidden bool
	// PageSize is the number of versions per list page. Default 25.
	PageSize int
	// ExtraHosts are added to the TLS certificate.
	ExtraHosts []string
}

// Server is the fake Key Vault, Entra ID and IMDS. Its methods are safe for
// concurrent use.
type Server struct {
	opts Options

	ca      *x509.Certificate
	caPEM   []byte
	pool    *x509.CertPool
	tlsLn   net.Listener
	imdsLn  net.Listener
	proxyLn net.Listener
	servers []*http.Server
	client  *http.Client

	mu        sync.Mutex
	keys      map[string]*key // by lower-case name
	secrets   map[string]string
	certs     map[string][]*x509.Certificate
	federated map[string]map[string]bool
	identity  map[string]managedIdentity // by client ID
	systemOff bool
	perms     map[string]map[Permission]bool            // by principal
	keyPerms  map[string]map[string]map[Permission]bool // by principal, then lower-case key name
	presented map[string]presentedCredential            // by client ID
	faults    faults
	calls     map[string]int64
	lastSeen  string // principal of the last authorized vault request
}

type managedIdentity struct {
	clientID, resourceID string
}

// Start starts the server's listeners on 127.0.0.1. Call Close when done.
func Start(opts Options) (*Server, error) {
	if opts.TenantID == "" {
		opts.TenantID = DefaultTenantID
	}
	if opts.VaultHost == "" {
		opts.VaultHost = DefaultVaultHost
		if opts.ManagedHSM {
			opts.VaultHost = DefaultHSMHost
		}
	}
	if opts.LoginHost == "" {
		opts.LoginHost = DefaultLoginHost
	}
	if opts.Resource == "" {
		opts.Resource = VaultResource
		if opts.ManagedHSM {
			opts.Resource = HSMResource
		}
	}
	if opts.PageSize <= 0 {
		opts.PageSize = 25
	}
	s := &Server{
		opts:      opts,
		keys:      map[string]*key{},
		secrets:   map[string]string{},
		certs:     map[string][]*x509.Certificate{},
		federated: map[string]map[string]bool{},
		identity:  map[string]managedIdentity{},
		perms:     map[string]map[Permission]bool{},
		keyPerms:  map[string]map[string]map[Permission]bool{},
		presented: map[string]presentedCredential{},
		calls:     map[string]int64{},
	}
	leaf, err := s.makeCertificates()
	if err != nil {
		return nil, err
	}
	listen := func() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }
	if s.tlsLn, err = listen(); err != nil {
		return nil, fmt.Errorf("kvtest: listen: %w", err)
	}
	if s.imdsLn, err = listen(); err != nil {
		s.tlsLn.Close()
		return nil, fmt.Errorf("kvtest: listen: %w", err)
	}
	if s.proxyLn, err = listen(); err != nil {
		s.tlsLn.Close()
		s.imdsLn.Close()
		return nil, fmt.Errorf("kvtest: listen: %w", err)
	}
	tlsSrv := &http.Server{
		Handler:           http.HandlerFunc(s.serveTLS),
		TLSConfig:         &tls.Config{Certificates: []tls.Certificate{leaf}, MinVersion: tls.VersionTLS12},
		ReadHeaderTimeout: 10 * time.Second,
		// HTTP/1.1 only, so that an outage can drop the connection.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
	}
	imdsSrv := &http.Server{Handler: http.HandlerFunc(s.serveIMDS), ReadHeaderTimeout: 10 * time.Second}
	proxySrv := &http.Server{Handler: http.HandlerFunc(s.serveProxy), ReadHeaderTimeout: 10 * time.Second}
	s.servers = []*http.Server{tlsSrv, imdsSrv, proxySrv}
	go tlsSrv.ServeTLS(s.tlsLn, "", "") //nolint:errcheck // ends with Close
	go imdsSrv.Serve(s.imdsLn)          //nolint:errcheck // ends with Close
	go proxySrv.Serve(s.proxyLn)        //nolint:errcheck // ends with Close

	dialer := &net.Dialer{Timeout: 5 * time.Second}
	s.client = &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, port, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			switch {
			case host == IMDSHost && port == "80":
				return dialer.DialContext(ctx, network, s.imdsLn.Addr().String())
			case port == "443" && s.serves(host):
				return dialer.DialContext(ctx, network, s.tlsLn.Addr().String())
			case host == "127.0.0.1" || host == "localhost":
				return dialer.DialContext(ctx, network, addr)
			}
			return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
		},
		TLSClientConfig:     &tls.Config{RootCAs: s.pool, MinVersion: tls.VersionTLS12},
		ForceAttemptHTTP2:   true,
		MaxIdleConnsPerHost: 16,
		IdleConnTimeout:     30 * time.Second,
	}}
	return s, nil
}

// Close stops every listener and drops open connections.
func (s *Server) Close() {
	for _, srv := range s.servers {
		_ = srv.Close()
	}
	if t, ok := s.client.Transport.(*http.Transport); ok {
		t.CloseIdleConnections()
	}
}

// serves reports whether host is one of the names the TLS listener answers.
func (s *Server) serves(host string) bool {
	host = strings.ToLower(host)
	if host == strings.ToLower(s.opts.VaultHost) || host == strings.ToLower(s.opts.LoginHost) {
		return true
	}
	for _, h := range s.opts.ExtraHosts {
		if strings.EqualFold(h, host) {
			return true
		}
	}
	return false
}

// VaultURL is the vault's URL, as a user would configure it.
func (s *Server) VaultURL() string { return "https://" + s.opts.VaultHost }

// VaultHost is the vault's DNS name.
func (s *Server) VaultHost() string { return s.opts.VaultHost }

// AuthorityHost is the Entra authority host URL, with a trailing slash.
func (s *Server) AuthorityHost() string { return "https://" + s.opts.LoginHost + "/" }

// TenantID is the vault's tenant.
func (s *Server) TenantID() string { return s.opts.TenantID }

// Resource is the vault's token audience.
func (s *Server) Resource() string { return s.opts.Resource }

// TLSAddr is the HOST:PORT of the HTTPS listener (vault and Entra).
func (s *Server) TLSAddr() string { return s.tlsLn.Addr().String() }

// IMDSAddr is the HOST:PORT of the plain-HTTP IMDS listener.
func (s *Server) IMDSAddr() string { return s.imdsLn.Addr().String() }

// ProxyURL is the URL of the HTTP proxy in front of every listener, for
// HTTPS_PROXY and HTTP_PROXY.
func (s *Server) ProxyURL() string { return "http://" + s.proxyLn.Addr().String() }

// CACertPEM is the PEM certificate of the CA that signed the TLS
// certificate, for SSL_CERT_FILE.
func (s *Server) CACertPEM() []byte { return append([]byte(nil), s.caPEM...) }

// CertPool trusts the server's CA.
func (s *Server) CertPool() *x509.CertPool { return s.pool }

// HTTPClient returns a client that reaches the server under its host names
// and trusts its CA. It is shared: do not modify it.
func (s *Server) HTTPClient() *http.Client { return s.client }

// serveTLS routes a request on the HTTPS listener to the vault or to Entra
// by host name.
func (s *Server) serveTLS(w http.ResponseWriter, r *http.Request) {
	host := r.Host
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	switch {
	case strings.EqualFold(host, s.opts.LoginHost):
		s.serveEntra(w, r)
	case strings.EqualFold(host, s.opts.VaultHost):
		s.serveVault(w, r)
	default:
		writeVaultError(w, http.StatusNotFound, "NotFound", "no such host "+host, "")
	}
}
