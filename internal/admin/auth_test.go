package admin

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/adminauth/adminauthtest"
	"github.com/kms-plugin/kms-plugin/internal/clocktest"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/logthrottle"
)

const testToken = "0123456789abcdef0123456789abcdef"

// authCounts records ObserveRefresh and ObserveAuthFailure calls.
type authCounts struct {
	results
	mu       sync.Mutex
	failures map[string]int
}

func (a *authCounts) ObserveAuthFailure(endpoint string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.failures == nil {
		a.failures = map[string]int{}
	}
	a.failures[endpoint]++
}

func (a *authCounts) count(endpoint string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.failures[endpoint]
}

var _ AuthObserver = (*authCounts)(nil)

// fixture is a CA, a serving pair and a token on disk, and a CA the
// server does not trust.
type fixture struct {
	ca, other                           *adminauthtest.CA
	dir, certFile, keyFile, caFile, tok string
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{
		ca:    adminauthtest.NewCA(t, "cluster CA", adminauthtest.RSAPKCS1),
		other: adminauthtest.NewCA(t, "attacker CA", adminauthtest.ECDSAPKCS8),
		dir:   t.TempDir(),
	}
	certPEM, keyPEM := f.ca.Server(t)
	f.certFile = adminauthtest.WriteFile(t, f.dir, "tls.crt", certPEM, 0o644)
	f.keyFile = adminauthtest.WriteFile(t, f.dir, "tls.key", keyPEM, 0o600)
	f.caFile = adminauthtest.WriteFile(t, f.dir, "ca.crt", f.ca.CertPEM, 0o644)
	f.tok = adminauthtest.WriteFile(t, f.dir, "token", []byte(testToken+"\n"), 0o600)
	return f
}

// running is a Server serving over real TLS on loopback.
type running struct {
	srv  *Server
	url  string // https://127.0.0.1:PORT
	ks   *keyStore
	obs  *authCounts
	logs *observer.ObservedLogs
}

// start serves with the fixture's TLS and authenticator (client
// certificates and the token), after mut edits the Config.
func (f *fixture) start(t *testing.T, mut func(*Config)) *running {
	t.Helper()
	sc := adminauth.ServerConfig{CertFile: f.certFile, KeyFile: f.keyFile, ClientCAFile: f.caFile, TokenFile: f.tok}
	tc, err := adminauth.ServerTLS(sc)
	if err != nil {
		t.Fatal(err)
	}
	auth, err := adminauth.NewAuthenticator(sc)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "test_metric"}, func() float64 { return 1 }))
	r := &running{ks: &keyStore{}, obs: &authCounts{}, logs: logs}
	cfg := Config{
		Addr: "127.0.0.1:0", Stats: r.ks.Stats, Refresh: r.ks.Refresh, RefreshMinInterval: time.Nanosecond,
		Gatherer: reg, Observer: r.obs, Logger: zap.New(core),
		TLS: tc, Authenticate: auth.Authenticate,
	}
	if mut != nil {
		mut(&cfg)
	}
	r.srv, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.srv.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.srv.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve = %v", err)
		}
	})
	r.url = "https://" + r.srv.Addr()
	return r
}

// client is how an attacker or rotate talks to the server.
type client struct {
	roots      *adminauthtest.CA // verifies the server; nil: the fixture's CA
	certCA     *adminauthtest.CA // signs the client certificate; nil: none
	cn         string
	token      string
	maxVersion uint16
}

func (f *fixture) httpClient(t *testing.T, c client) *http.Client {
	t.Helper()
	roots := x509.NewCertPool()
	if c.roots == nil {
		c.roots = f.ca
	}
	roots.AddCert(c.roots.Cert)
	// MinVersion 1.0 so that an old maxVersion reaches the server, which
	// must refuse it itself.
	tc := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS10, MaxVersion: c.maxVersion}
	if c.certCA != nil {
		certPEM, keyPEM := c.certCA.Client(t, c.cn)
		pair, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		// Sent whatever CAs the server names: Go's client would otherwise
		// keep quiet a certificate of a CA the server does not name.
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &pair, nil }
	}
	var rt http.RoundTripper = &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true}
	if c.token != "" {
		rt = withToken{rt, c.token}
	}
	return &http.Client{Transport: rt, Timeout: 10 * time.Second}
}

type withToken struct {
	next  http.RoundTripper
	token string
}

func (w withToken) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Header.Set("Authorization", "Bearer "+w.token)
	return w.next.RoundTrip(r)
}

// do sends one request and returns the code and body, or the error.
func do(t *testing.T, c *http.Client, method, url string) (int, http.Header, string, error) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		return 0, nil, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b), nil
}

// TestAuthOverTLS attacks a server on real TLS with every kind of
// missing, wrong and right credential.
func TestAuthOverTLS(t *testing.T) {
	f := newFixture(t)
	r := f.start(t, nil)
	oneByte := []byte(testToken)
	oneByte[7] ^= 0x01
	tests := []struct {
		name      string
		client    client
		method    string
		path      string
		wantCode  int  // 0 with wantErr
		wantErr   bool // the TLS handshake must fail
		wantCalls int  // Refresh calls the request may cause
	}{
		{"no credential: status", client{}, "GET", "/status", 401, false, 0},
		{"no credential: refresh", client{}, "POST", "/refresh", 401, false, 0},
		{"wrong token: status", client{token: "nope"}, "GET", "/status", 401, false, 0},
		{"wrong token: refresh", client{token: "nope"}, "POST", "/refresh", 401, false, 0},
		{"token differing in one byte", client{token: string(oneByte)}, "GET", "/status", 401, false, 0},
		{"token missing its last byte", client{token: testToken[:len(testToken)-1]}, "POST", "/refresh", 401, false, 0},
		{"certificate of another CA", client{certCA: f.other, cn: adminauth.DefaultClientName}, "GET", "/status", 0, true, 0},
		{"certificate of another CA with the token", client{certCA: f.other, cn: adminauth.DefaultClientName, token: testToken}, "POST", "/refresh", 0, true, 0},
		{"certificate of the CA, wrong name: status", client{certCA: f.ca, cn: "system:node:node-1"}, "GET", "/status", 403, false, 0},
		{"certificate of the CA, wrong name: refresh", client{certCA: f.ca, cn: "kube-apiserver-kubelet-client"}, "POST", "/refresh", 403, false, 0},
		{"server not trusted by the client", client{roots: f.other, token: testToken}, "GET", "/status", 0, true, 0},
		{"TLS 1.1", client{token: testToken, maxVersion: tls.VersionTLS11}, "GET", "/status", 0, true, 0},
		{"right certificate: status", client{certCA: f.ca, cn: adminauth.DefaultClientName}, "GET", "/status", 200, false, 0},
		{"right certificate: refresh", client{certCA: f.ca, cn: adminauth.DefaultClientName}, "POST", "/refresh", 200, false, 1},
		{"right token: status", client{token: testToken}, "GET", "/status", 200, false, 0},
		{"right token: refresh", client{token: testToken}, "POST", "/refresh", 200, false, 1},
		{"livez open", client{}, "GET", "/livez", 200, false, 0},
		{"readyz open", client{}, "GET", "/readyz", 200, false, 0},
		{"metrics open unless protected", client{}, "GET", "/metrics", 200, false, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := r.ks.calls
			code, hdr, body, err := do(t, f.httpClient(t, tt.client), tt.method, r.url+tt.path)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("%s %s = %d %q; want the TLS handshake to fail", tt.method, tt.path, code, body)
				}
				t.Logf("refused: %v", err)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if code != tt.wantCode {
				t.Fatalf("%s %s = %d %q; want %d", tt.method, tt.path, code, body, tt.wantCode)
			}
			if got := r.ks.calls - before; got != tt.wantCalls {
				t.Errorf("Refresh calls = %d; want %d", got, tt.wantCalls)
			}
			if code == 401 || code == 403 {
				if strings.Count(body, "\n") != 1 || strings.Contains(body, "keyID") || strings.Contains(body, "kp1.") {
					t.Errorf("refusal body %q; want one line without status", body)
				}
				if strings.Contains(body, testToken[:8]) {
					t.Errorf("refusal body %q holds the token", body)
				}
			}
			if got := hdr.Get("WWW-Authenticate"); (code == 401) != strings.HasPrefix(got, "Bearer") {
				t.Errorf("WWW-Authenticate = %q with %d", got, code)
			}
		})
	}
	// Every refusal above that reached HTTP was counted by endpoint.
	for endpoint, want := range map[string]int{"status": 4, "refresh": 4, "metrics": 0} {
		if got := r.obs.count(endpoint); got != want {
			t.Errorf("auth failures counted for %s = %d; want %d", endpoint, got, want)
		}
	}
	for _, e := range r.logs.All() {
		for k, v := range e.ContextMap() {
			if s, ok := v.(string); ok && strings.Contains(s, testToken[:8]) {
				t.Errorf("log %q field %s holds the token: %q", e.Message, k, s)
			}
		}
	}
}

// TestPlainHTTPToTLSPort sends plain HTTP to the HTTPS port: nothing is
// served but the TLS library's refusal.
func TestPlainHTTPToTLSPort(t *testing.T) {
	f := newFixture(t)
	r := f.start(t, nil)
	plain := &http.Client{Timeout: 5 * time.Second}
	for _, path := range []string{"/status", "/livez", "/readyz"} {
		req, _ := http.NewRequest("GET", "http://"+r.srv.Addr()+path, nil)
		req.Header.Set("Authorization", "Bearer "+testToken)
		resp, err := plain.Do(req)
		if err != nil {
			continue
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "HTTPS") {
			t.Errorf("plain GET %s = %d %q; want 400 from the TLS layer", path, resp.StatusCode, b)
		}
	}
	if r.ks.calls != 0 {
		t.Errorf("Refresh calls = %d", r.ks.calls)
	}
}

func TestProtectMetrics(t *testing.T) {
	f := newFixture(t)
	r := f.start(t, func(c *Config) { c.ProtectMetrics = true })
	tests := []struct {
		name     string
		client   client
		wantCode int
	}{
		{"no credential", client{}, 401},
		{"wrong token", client{token: "nope"}, 401},
		{"wrong name", client{certCA: f.ca, cn: "someone"}, 403},
		{"token", client{token: testToken}, 200},
		{"certificate", client{certCA: f.ca, cn: adminauth.DefaultClientName}, 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, body, err := do(t, f.httpClient(t, tt.client), "GET", r.url+"/metrics")
			if err != nil {
				t.Fatal(err)
			}
			if code != tt.wantCode || (code == 200) != strings.Contains(body, "test_metric 1") {
				t.Fatalf("GET /metrics = %d %q; want %d", code, body, tt.wantCode)
			}
		})
	}
	if got := r.obs.count("metrics"); got != 3 {
		t.Errorf("auth failures counted for metrics = %d; want 3", got)
	}
	for _, path := range []string{"/livez", "/readyz"} {
		if code, _, body, err := do(t, f.httpClient(t, client{}), "GET", r.url+path); err != nil || code != 200 {
			t.Errorf("GET %s without credentials = %d %q %v; want 200", path, code, body, err)
		}
	}
}

// TestRenewalWithoutRestart changes the token and the serving pair on
// disk while the server runs.
func TestRenewalWithoutRestart(t *testing.T) {
	f := newFixture(t)
	r := f.start(t, nil)
	status := func(tok string) int {
		t.Helper()
		code, _, _, err := do(t, f.httpClient(t, client{token: tok}), "GET", r.url+"/status")
		if err != nil {
			t.Fatal(err)
		}
		return code
	}
	if got := status(testToken); got != 200 {
		t.Fatalf("first token = %d; want 200", got)
	}
	const next = "fedcba9876543210fedcba9876543210"
	adminauthtest.WriteFile(t, f.dir, "token", []byte(next), 0o600)
	if got := status(next); got != 200 {
		t.Errorf("new token = %d; want 200", got)
	}
	if got := status(testToken); got != 401 {
		t.Errorf("old token after the change = %d; want 401", got)
	}

	served := func() *big.Int {
		t.Helper()
		resp, err := f.httpClient(t, client{}).Get(r.url + "/livez")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.TLS.PeerCertificates[0].SerialNumber
	}
	old := served()
	certPEM, keyPEM := f.ca.Server(t)
	adminauthtest.WriteFile(t, f.dir, "tls.key", keyPEM, 0o600)
	adminauthtest.WriteFile(t, f.dir, "tls.crt", certPEM, 0o644)
	want := parsePEMCert(t, certPEM).SerialNumber
	if got := served(); got.Cmp(want) != 0 {
		t.Errorf("served serial %x after renewal; want the new %x (old %x)", got, want, old)
	}
}

func parsePEMCert(t *testing.T, certPEM []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(certPEM)
	if b == nil {
		t.Fatal("no PEM block")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestBrokenTokenFileFailsClosed makes the token file world-readable
// while the server runs: every token request is refused with 500 and the
// log names the fix; the certificate still works.
func TestBrokenTokenFileFailsClosed(t *testing.T) {
	f := newFixture(t)
	r := f.start(t, nil)
	if err := os.Chmod(f.tok, 0o644); err != nil {
		t.Fatal(err)
	}
	code, _, body, err := do(t, f.httpClient(t, client{token: testToken}), "GET", r.url+"/status")
	if err != nil || code != 500 || strings.Contains(body, f.tok) {
		t.Fatalf("GET /status = %d %q %v; want 500 with no file name", code, body, err)
	}
	if lines := r.logs.FilterMessage("request refused: credentials could not be checked").All(); len(lines) != 1 || !strings.Contains(lines[0].ContextMap()["error"].(string), "chmod 600") {
		t.Errorf("log = %v; want one line naming the fix", lines)
	}
	if code, _, _, _ := do(t, f.httpClient(t, client{certCA: f.ca, cn: adminauth.DefaultClientName}), "GET", r.url+"/status"); code != 200 {
		t.Errorf("certificate while the token file is broken = %d; want 200", code)
	}
}

func TestNewExposure(t *testing.T) {
	f := newFixture(t)
	tc, err := adminauth.ServerTLS(adminauth.ServerConfig{CertFile: f.certFile, KeyFile: f.keyFile})
	if err != nil {
		t.Fatal(err)
	}
	auth := func(*http.Request) error { return nil }
	stats := func() envelope.Stats { return envelope.Stats{} }
	tests := []struct {
		name    string
		cfg     Config
		want    []string // in the error; nil: New succeeds
		notWant []string
	}{
		{"all interfaces, nothing set", Config{Addr: "0.0.0.0:8787"}, []string{"0.0.0.0:8787", "httpTLS.certFile", "httpTLS.keyFile", "httpTLS.clientCAFile", "httpAuth.tokenFile"}, nil},
		{"empty host", Config{Addr: ":8787"}, []string{"httpTLS.certFile", "httpAuth.tokenFile"}, nil},
		{"IPv6 any", Config{Addr: "[::]:8787"}, []string{"httpTLS.certFile"}, nil},
		{"node IP", Config{Addr: "10.0.0.5:8787"}, []string{"httpTLS.certFile"}, nil},
		{"host name", Config{Addr: "node-1:8787"}, []string{"httpTLS.certFile"}, nil},
		{"TLS without auth", Config{Addr: "0.0.0.0:8787", TLS: tc}, []string{"httpTLS.clientCAFile or httpAuth.tokenFile"}, []string{"certFile"}},
		{"auth without TLS", Config{Addr: "0.0.0.0:8787", Authenticate: auth}, []string{"httpTLS.certFile and httpTLS.keyFile"}, []string{"tokenFile"}},
		{"TLS and auth", Config{Addr: "0.0.0.0:8787", TLS: tc, Authenticate: auth}, nil, nil},
		{"TLS without a certificate", Config{Addr: "0.0.0.0:8787", TLS: &tls.Config{}, Authenticate: auth}, []string{"no certificate", "httpTLS.certFile"}, nil},
		{"protected metrics without auth", Config{Addr: "127.0.0.1:8787", ProtectMetrics: true}, []string{"httpAuth.tokenFile"}, nil},
		{"no port", Config{Addr: "127.0.0.1"}, []string{"missing port"}, nil},
		{"loopback", Config{Addr: "127.0.0.1:8787"}, nil, nil},
		{"loopback IPv6", Config{Addr: "[::1]:8787"}, nil, nil},
		{"localhost", Config{Addr: "localhost:8787"}, nil, nil},
		{"loopback with TLS only", Config{Addr: "127.0.0.1:8787", TLS: tc}, nil, nil},
		{"loopback with auth only", Config{Addr: "127.0.0.1:8787", Authenticate: auth}, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.Stats = stats
			_, err := New(tt.cfg)
			if tt.want == nil {
				if err != nil {
					t.Fatalf("New = %v; want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatal("New succeeded; want an error")
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Errorf("error %q is not one line", msg)
			}
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q lacks %q", msg, w)
				}
			}
			for _, w := range tt.notWant {
				if strings.Contains(msg, w) {
					t.Errorf("error %q names %q, which is set", msg, w)
				}
			}
		})
	}
}

// TestNewCopiesTLS changes the caller's tls.Config after New: the server
// does not see it.
func TestNewCopiesTLS(t *testing.T) {
	f := newFixture(t)
	tc, err := adminauth.ServerTLS(adminauth.ServerConfig{CertFile: f.certFile, KeyFile: f.keyFile})
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(Config{Addr: "127.0.0.1:0", Stats: func() envelope.Stats { return envelope.Stats{} }, TLS: tc, Authenticate: func(*http.Request) error { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	tc.MinVersion = tls.VersionTLS10
	if s.cfg.TLS == tc || s.cfg.TLS.MinVersion != tls.VersionTLS12 {
		t.Errorf("server TLS config = %p min %x; want a copy with TLS 1.2", s.cfg.TLS, s.cfg.TLS.MinVersion)
	}
}

// TestReadyzWithAuth keeps the key store's error (URL, key name) out of
// the open /readyz once the server authenticates, and leaves it there on
// an unauthenticated loopback server as before.
func TestReadyzWithAuth(t *testing.T) {
	lastError := "azurekv: get key https://prod-vault.vault.azure.net/keys/etcd-kek: permission denied"
	stats := func() envelope.Stats { return envelope.Stats{KeyID: "kp1.abc", LastError: lastError} }
	tests := []struct {
		name       string
		auth       func(*http.Request) error
		wantDetail bool
	}{
		{"loopback without auth", nil, true},
		{"with auth", func(*http.Request) error { return adminauth.ErrNoCredential }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, err := New(Config{Addr: "127.0.0.1:0", Stats: stats, Authenticate: tt.auth})
			if err != nil {
				t.Fatal(err)
			}
			rec := httptest.NewRecorder()
			s.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/readyz", nil))
			body := rec.Body.String()
			if rec.Code != 503 || !strings.Contains(body, "key store poll failed") {
				t.Fatalf("GET /readyz = %d %q; want 503 saying the poll failed", rec.Code, body)
			}
			for _, secret := range []string{"prod-vault", "etcd-kek", "kp1.abc"} {
				if got := strings.Contains(body, secret); got != (tt.wantDetail && secret != "kp1.abc") {
					t.Errorf("body %q contains %q = %v", body, secret, got)
				}
			}
		})
	}
}

// TestAuthFailureLogRateLimited floods /status and /refresh with bad
// tokens: one line per endpoint per interval, the next one with the
// count held back, every failure counted, the token never logged.
func TestAuthFailureLogRateLimited(t *testing.T) {
	dir := t.TempDir()
	tf, err := adminauth.NewTokenFile(adminauthtest.WriteFile(t, dir, "token", []byte(testToken), 0o600))
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	clock := clocktest.New(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	obs := &authCounts{}
	ks := &keyStore{}
	s, err := New(Config{Addr: "127.0.0.1:0", Stats: ks.Stats, Refresh: ks.Refresh, Observer: obs, Logger: zap.New(core), Now: clock.Now, Authenticate: tf.Check})
	if err != nil {
		t.Fatal(err)
	}
	h := s.Handler()
	bad := strings.Repeat("x", len(testToken)-4) + testToken[len(testToken)-4:]
	send := func(method, path string) {
		rec := httptest.NewRecorder()
		req := httptest.NewRequest(method, path, nil)
		req.Header.Set("Authorization", "Bearer "+bad)
		h.ServeHTTP(rec, req)
		if rec.Code != 401 {
			t.Fatalf("%s %s = %d; want 401", method, path, rec.Code)
		}
	}
	for range 5 {
		send("GET", "/status")
	}
	send("POST", "/refresh")
	send("POST", "/refresh")
	clock.Add(DefaultAuthFailureLogInterval)
	send("GET", "/status")

	lines := logs.FilterMessage("request refused: authentication failed").All()
	type line struct {
		endpoint   string
		suppressed any
	}
	var got []line
	for _, l := range lines {
		m := l.ContextMap()
		got = append(got, line{m["endpoint"].(string), m["similarSinceLastLine"]})
		for k, v := range m {
			if s, ok := v.(string); ok && (strings.Contains(s, bad) || strings.Contains(s, testToken)) {
				t.Errorf("log field %s holds a token: %q", k, s)
			}
		}
	}
	want := []line{{"status", nil}, {"refresh", nil}, {"status", uint64(4)}}
	if len(got) != len(want) {
		t.Fatalf("log lines = %v; want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("log line %d = %v; want %v", i, got[i], want[i])
		}
	}
	if obs.count("status") != 6 || obs.count("refresh") != 2 {
		t.Errorf("counted status %d, refresh %d; want 6, 2", obs.count("status"), obs.count("refresh"))
	}
	if ks.calls != 0 {
		t.Errorf("Refresh calls = %d; want 0", ks.calls)
	}
}

// TestHandshakeErrorsRateLimited feeds the http.Server's error log: TLS
// handshake failures are logged once per interval, other lines as is.
func TestHandshakeErrorsRateLimited(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	clock := clocktest.New(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
	w := &errorLogWriter{log: zap.New(core), failures: logthrottle.New(time.Second, clock.Now)}
	for range 3 {
		_, _ = w.Write([]byte("http: TLS handshake error from 10.0.0.9:4242: EOF\n"))
	}
	_, _ = w.Write([]byte("http: Accept error: too many open files\n"))
	clock.Add(time.Second)
	_, _ = w.Write([]byte("http: TLS handshake error from 10.0.0.9:4243: remote error: tls: bad certificate\n"))
	var got []string
	for _, e := range logs.All() {
		got = append(got, e.Message)
	}
	want := []string{"TLS handshake failed", "http: Accept error: too many open files", "TLS handshake failed"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("log = %q; want %q", got, want)
	}
	if n := logs.All()[2].ContextMap()["similarSinceLastLine"]; n != uint64(2) {
		t.Errorf("similarSinceLastLine = %v; want 2", n)
	}
}
