package adminauth_test

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/adminauth/adminauthtest"
)

// files writes a serving pair of ca, and the CA certificate, to a temp dir.
type files struct {
	dir, cert, key, ca string
}

func writeServerFiles(t *testing.T, ca *adminauthtest.CA) files {
	t.Helper()
	dir := t.TempDir()
	certPEM, keyPEM := ca.Server(t)
	return files{
		dir:  dir,
		cert: adminauthtest.WriteFile(t, dir, "tls.crt", certPEM, 0o644),
		key:  adminauthtest.WriteFile(t, dir, "tls.key", keyPEM, 0o600),
		ca:   adminauthtest.WriteFile(t, dir, "ca.crt", ca.CertPEM, 0o644),
	}
}

// tlsListen serves TLS handshakes with tc on loopback until the test ends.
func tlsListen(t *testing.T, tc *tls.Config) string {
	t.Helper()
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.(*tls.Conn).Handshake()
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	return lis.Addr().String()
}

// dial returns the serial of the certificate served at addr, verified
// against ca, and the negotiated version.
func dial(t *testing.T, addr string, ca *x509.Certificate, maxVersion uint16) (*big.Int, uint16, error) {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	c, err := tls.Dial("tcp", addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS10, MaxVersion: maxVersion})
	if err != nil {
		return nil, 0, err
	}
	defer c.Close()
	st := c.ConnectionState()
	return st.PeerCertificates[0].SerialNumber, st.Version, nil
}

// TestServerTLSReload replaces the serving pair on disk: the next
// handshake serves the new certificate, with no new tls.Config; a pair
// half-written (new certificate, old key) keeps the old one in service.
func TestServerTLSReload(t *testing.T) {
	ca := adminauthtest.NewCA(t, "test CA", adminauthtest.ECDSAPKCS8)
	f := writeServerFiles(t, ca)
	tc, err := adminauth.ServerTLS(adminauth.ServerConfig{CertFile: f.cert, KeyFile: f.key})
	if err != nil {
		t.Fatal(err)
	}
	addr := tlsListen(t, tc)
	first, _, err := dial(t, addr, ca.Cert, 0)
	if err != nil {
		t.Fatal(err)
	}

	certPEM, keyPEM := ca.Server(t)
	adminauthtest.WriteFile(t, f.dir, "tls.crt", certPEM, 0o644)
	got, _, err := dial(t, addr, ca.Cert, 0)
	if err != nil {
		t.Fatalf("handshake with the certificate renewed but not its key: %v", err)
	}
	if got.Cmp(first) != 0 {
		t.Errorf("half-written pair: served serial %x; want the previous %x", got, first)
	}

	adminauthtest.WriteFile(t, f.dir, "tls.key", keyPEM, 0o600)
	got, _, err = dial(t, addr, ca.Cert, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := parseCert(t, certPEM).SerialNumber; got.Cmp(want) != 0 {
		t.Errorf("after renewal: served serial %x; want the new %x (old %x)", got, want, first)
	}
}

func TestServerTLSVersions(t *testing.T) {
	ca := adminauthtest.NewCA(t, "test CA", adminauthtest.ECDSAPKCS8)
	f := writeServerFiles(t, ca)
	tc, err := adminauth.ServerTLS(adminauth.ServerConfig{CertFile: f.cert, KeyFile: f.key})
	if err != nil {
		t.Fatal(err)
	}
	addr := tlsListen(t, tc)
	tests := []struct {
		name       string
		maxVersion uint16
		want       uint16 // 0: the handshake fails
	}{
		{"TLS 1.3 preferred", 0, tls.VersionTLS13},
		{"TLS 1.2 allowed", tls.VersionTLS12, tls.VersionTLS12},
		{"TLS 1.1 refused", tls.VersionTLS11, 0},
		{"TLS 1.0 refused", tls.VersionTLS10, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, got, err := dial(t, addr, ca.Cert, tt.maxVersion)
			if tt.want == 0 {
				if err == nil || !strings.Contains(err.Error(), "protocol version") {
					t.Fatalf("handshake with max version %x = %x, %v; want the server to refuse the version", tt.maxVersion, got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("version = %x, %v; want %x", got, err, tt.want)
			}
		})
	}
	// A client that trusts another CA refuses the server.
	other := adminauthtest.NewCA(t, "other CA", adminauthtest.ECDSAPKCS8)
	if _, _, err := dial(t, addr, other.Cert, 0); err == nil {
		t.Error("a client trusting another CA accepted the server")
	}
}

func TestServerTLSErrors(t *testing.T) {
	ca := adminauthtest.NewCA(t, "test CA", adminauthtest.ECDSAPKCS8)
	f := writeServerFiles(t, ca)
	garbage := adminauthtest.WriteFile(t, f.dir, "garbage", []byte("not PEM"), 0o644)
	tests := []struct {
		name string
		cfg  adminauth.ServerConfig
		want string
	}{
		{"no key file", adminauth.ServerConfig{CertFile: f.cert}, "both a certificate file and a key file"},
		{"missing certificate", adminauth.ServerConfig{CertFile: filepath.Join(f.dir, "nope"), KeyFile: f.key}, "nope"},
		{"garbage certificate", adminauth.ServerConfig{CertFile: garbage, KeyFile: f.key}, "garbage"},
		{"key of another pair", adminauth.ServerConfig{CertFile: f.cert, KeyFile: writeServerFiles(t, ca).key}, "private key does not match"},
		{"garbage client CA", adminauth.ServerConfig{CertFile: f.cert, KeyFile: f.key, ClientCAFile: garbage}, "holds no PEM certificate"},
		{"missing client CA", adminauth.ServerConfig{CertFile: f.cert, KeyFile: f.key, ClientCAFile: filepath.Join(f.dir, "nope")}, "no such file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := adminauth.ServerTLS(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("ServerTLS error = %v; want one containing %q", err, tt.want)
			}
		})
	}
}

// TestAuthenticate checks the decision on requests whose TLS state says
// which client certificate the handshake verified.
func TestAuthenticate(t *testing.T) {
	dir := t.TempDir()
	token := adminauthtest.WriteFile(t, dir, "token", []byte(testToken), 0o600)
	verified := func(cn string) *tls.ConnectionState {
		return &tls.ConnectionState{VerifiedChains: [][]*x509.Certificate{{{Subject: pkixName(cn)}}}}
	}
	both := adminauth.ServerConfig{ClientCAFile: "ca.crt", TokenFile: token}
	tests := []struct {
		name   string
		cfg    adminauth.ServerConfig
		tls    *tls.ConnectionState
		header string
		want   error // nil: admitted
	}{
		{"allowed certificate", both, verified(adminauth.DefaultClientName), "", nil},
		{"certificate with another name", both, verified("system:node:node-1"), "", adminauth.ErrForbidden},
		{"certificate with another name and the token", both, verified("system:node:node-1"), "Bearer " + testToken, nil},
		{"certificate with another name and a wrong token", both, verified("system:node:node-1"), "Bearer nope", adminauth.ErrForbidden},
		{"allowed certificate and a wrong token", both, verified(adminauth.DefaultClientName), "Bearer nope", nil},
		{"TLS without a client certificate", both, &tls.ConnectionState{}, "", adminauth.ErrNoCredential},
		{"token over TLS", both, &tls.ConnectionState{}, "Bearer " + testToken, nil},
		{"wrong token", both, nil, "Bearer nope", adminauth.ErrBadCredential},
		{"nothing", both, nil, "", adminauth.ErrNoCredential},
		{"custom names", adminauth.ServerConfig{ClientCAFile: "ca.crt", ClientNames: []string{"rotate", "status"}}, verified("status"), "", nil},
		{"custom names exclude the default", adminauth.ServerConfig{ClientCAFile: "ca.crt", ClientNames: []string{"rotate"}}, verified(adminauth.DefaultClientName), "", adminauth.ErrForbidden},
		{"certificates not enabled", adminauth.ServerConfig{TokenFile: token}, verified(adminauth.DefaultClientName), "", adminauth.ErrNoCredential},
		{"token not enabled", adminauth.ServerConfig{ClientCAFile: "ca.crt"}, nil, "Bearer " + testToken, adminauth.ErrBadCredential},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, err := adminauth.NewAuthenticator(tt.cfg)
			if err != nil {
				t.Fatal(err)
			}
			r := httptest.NewRequest(http.MethodGet, "/status", nil)
			r.TLS = tt.tls
			if tt.header != "" {
				r.Header.Set("Authorization", tt.header)
			}
			err = a.Authenticate(r)
			if tt.want == nil && err != nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("Authenticate = %v; want %v", err, tt.want)
			}
		})
	}
	for _, cfg := range []adminauth.ServerConfig{{}, {ClientCAFile: "ca.crt", ClientNames: []string{""}}, {TokenFile: filepath.Join(dir, "nope")}} {
		if _, err := adminauth.NewAuthenticator(cfg); err == nil {
			t.Errorf("NewAuthenticator(%+v) succeeded", cfg)
		}
	}
}

// TestHTTPClient checks where the client sends its token and that it
// presents its certificate.
func TestHTTPClient(t *testing.T) {
	ca := adminauthtest.NewCA(t, "test CA", adminauthtest.ECDSAPKCS8)
	f := writeServerFiles(t, ca)
	token := adminauthtest.WriteFile(t, f.dir, "token", []byte(testToken), 0o600)
	clientCert, clientKey := ca.Client(t, adminauth.DefaultClientName)
	certFile := adminauthtest.WriteFile(t, f.dir, "client.crt", clientCert, 0o644)
	keyFile := adminauthtest.WriteFile(t, f.dir, "client.key", clientKey, 0o600)

	seen := make(chan string, 1) // "Authorization header|client CN"
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		cn := ""
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			cn = r.TLS.PeerCertificates[0].Subject.CommonName
		}
		seen <- r.Header.Get("Authorization") + "|" + cn
		if r.URL.Path == "/redirect" {
			http.Redirect(w, r, "/elsewhere", http.StatusFound)
		}
	})
	tc, err := adminauth.ServerTLS(adminauth.ServerConfig{CertFile: f.cert, KeyFile: f.key, ClientCAFile: f.ca})
	if err != nil {
		t.Fatal(err)
	}
	// Not httptest's StartTLS: it adds its own certificate, which Go then
	// serves instead of GetCertificate's to clients sending no SNI.
	lis, err := tls.Listen("tcp", "127.0.0.1:0", tc)
	if err != nil {
		t.Fatal(err)
	}
	tlsSrv := &http.Server{Handler: handler}
	go func() { _ = tlsSrv.Serve(lis) }()
	t.Cleanup(func() { tlsSrv.Close() })
	tlsURL := "https://" + lis.Addr().String()
	plainSrv := httptest.NewServer(handler)
	t.Cleanup(plainSrv.Close)

	tests := []struct {
		name     string
		cfg      adminauth.ClientConfig
		url      string
		wantSeen string // "" when the request must fail before it is sent
	}{
		{"token over verified https", adminauth.ClientConfig{CAFile: f.ca, TokenFile: token}, tlsURL + "/status", "Bearer " + testToken + "|"},
		{"certificate over https", adminauth.ClientConfig{CAFile: f.ca, CertFile: certFile, KeyFile: keyFile}, tlsURL + "/status", "|" + adminauth.DefaultClientName},
		{"token over http to loopback", adminauth.ClientConfig{TokenFile: token}, plainSrv.URL + "/status", "Bearer " + testToken + "|"},
		{"token over http elsewhere", adminauth.ClientConfig{CAFile: f.ca, TokenFile: token}, "http://192.0.2.1:8787/status", ""},
		{"token over https without a CA", adminauth.ClientConfig{TokenFile: token}, tlsURL + "/status", ""},
		{"redirect not followed", adminauth.ClientConfig{CAFile: f.ca, TokenFile: token}, tlsURL + "/redirect", "Bearer " + testToken + "|"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := adminauth.HTTPClient(tt.cfg)
			if err != nil {
				t.Fatal(err)
			}
			resp, err := c.Get(tt.url)
			if tt.wantSeen == "" {
				if err == nil {
					resp.Body.Close()
					t.Fatal("request succeeded; want it refused before it is sent")
				}
				if strings.Contains(err.Error(), testToken) {
					t.Errorf("error %q holds the token", err)
				}
				select {
				case got := <-seen:
					t.Fatalf("server saw %q", got)
				default:
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if got := <-seen; got != tt.wantSeen {
				t.Errorf("server saw %q; want %q", got, tt.wantSeen)
			}
			select {
			case got := <-seen:
				t.Errorf("a second request reached the server: %q", got)
			default:
			}
		})
	}
	bad := []adminauth.ClientConfig{
		{CertFile: certFile, KeyFile: keyFile},              // a certificate without a CA
		{CAFile: f.ca, CertFile: certFile},                  // no key
		{CAFile: filepath.Join(f.dir, "nope")},              // missing CA
		{CAFile: f.ca, TokenFile: f.cert},                   // token file readable by all
		{CAFile: f.ca, CertFile: keyFile, KeyFile: keyFile}, // not a pair
	}
	for _, cfg := range bad {
		if _, err := adminauth.HTTPClient(cfg); err == nil {
			t.Errorf("HTTPClient(%+v) succeeded", cfg)
		}
	}
}

// TestTokenFileOwner refuses a file another user owns (needs root to
// make one).
func TestTokenFileOwner(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root to chown")
	}
	path := adminauthtest.WriteFile(t, t.TempDir(), "token", []byte(testToken), 0o600)
	if err := os.Chown(path, 12345, 12345); err != nil {
		t.Fatal(err)
	}
	// Root may read it, but the file belongs to someone else who could
	// have written any token into it.
	_, err := adminauth.NewTokenFile(path)
	if err == nil || !strings.Contains(err.Error(), "owned by uid 12345") {
		t.Fatalf("NewTokenFile = %v; want refused as owned by uid 12345", err)
	}
}
