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

// faults are the knobs that make the vault misbehave.
type faults struct {
	latency       time.Duration
	throttle      int // remaining 429 answers; <0 means until cleared
	retryAfter    time.Duration
	failStatus    int
	failRemaining int // <0 means until cleared
	outage        bool
	dateOffset    time.Duration
	tokenOutage   bool
	assertionSkew time.Duration
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

func (s *Server) makeCertificates() (tls.Certificate, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kvtest CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("kvtest: CA certificate: %w", err)
	}
	if s.ca, err = x509.ParseCertificate(caDER); err != nil {
		return tls.Certificate{}, err
	}
	s.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
	s.pool = x509.NewCertPool()
	s.pool.AddCert(s.ca)

	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	names := append([]string{s.opts.VaultHost, s.opts.LoginHost, "localhost"}, s.opts.ExtraHosts...)
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: s.opts.VaultHost},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		DNSNames:     names,
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, s.ca, &leafKey.PublicKey, caKey)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("kvtest: server certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: leafKey}, nil
}

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

// count records one call of op.
func (s *Server) count(op string) {
	s.mu.Lock()
	s.calls[op]++
	s.mu.Unlock()
}

// Calls returns how many requests of op the server received, whatever their
// outcome. Vault operations: get, list, wrapkey, unwrapkey, encrypt,
// decrypt, create, rotate, update. Others: token (Entra token endpoint),
// discovery (Entra metadata), imds, connect (proxy tunnels).
func (s *Server) Calls(op string) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls[op]
}

// AllCalls returns a copy of every counter.
func (s *Server) AllCalls() map[string]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int64, len(s.calls))
	for k, v := range s.calls {
		out[k] = v
	}
	return out
}

// VaultCalls is the number of requests the vault received, all operations
// together (unauthenticated challenge requests and failed ones included).
func (s *Server) VaultCalls() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var n int64
	for _, op := range vaultOps {
		n += s.calls[op]
	}
	return n
}

// ResetCalls sets every counter to zero.
func (s *Server) ResetCalls() {
	s.mu.Lock()
	defer s.mu.Unlock()
	clear(s.calls)
}

// LastPrincipal is the identity of the last authorized vault request:
// App(clientID), SystemIdentity or ManagedIdentity(clientID).
func (s *Server) LastPrincipal() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastSeen
}

// SetLatency delays every vault answer by d.
func (s *Server) SetLatency(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.latency = d
}

// Throttle answers the next n vault requests with 429 and a Retry-After of
// retryAfter (whole seconds in Retry-After when it is a whole number of
// seconds, else retry-after-ms as well). n < 0 throttles until Throttle(0, 0).
func (s *Server) Throttle(n int, retryAfter time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.throttle, s.faults.retryAfter = n, retryAfter
}

// Fail answers the next n vault requests with status (500, 502, 503...).
// n < 0 fails until Fail(0, 0).
func (s *Server) Fail(n, status int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.failRemaining, s.faults.failStatus = n, status
}

// SetOutage drops every vault connection without an answer while on, as an
// unreachable vault does.
func (s *Server) SetOutage(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.outage = on
}

// SetTokenOutage makes Entra and IMDS answer 503 while on.
func (s *Server) SetTokenOutage(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.tokenOutage = on
}

// SetClockSkew makes the server's clock run d ahead of the client's: the
// Date header says so, and Entra judges client assertions by it.
func (s *Server) SetClockSkew(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.dateOffset = d
	s.faults.assertionSkew = d
}

func (s *Server) now() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return time.Now().Add(s.faults.dateOffset)
}

func (s *Server) setDate(w http.ResponseWriter) {
	w.Header().Set("Date", s.now().UTC().Format(http.TimeFormat))
}

// errClosed is returned by a hijacked connection that was dropped.
var errClosed = errors.New("kvtest: connection dropped")

// drop closes the client connection without an answer.
func drop(w http.ResponseWriter) error {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler) // aborts the stream
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		return err
	}
	_ = conn.Close()
	return errClosed
}
