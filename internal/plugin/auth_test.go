package plugin

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/adminauth/adminauthtest"
)

// TestRefusesOpenAdminPortOffLoopback: the shipped assembly will not serve
// /status and /refresh on a network address without HTTPS and a credential.
func TestRefusesOpenAdminPortOffLoopback(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:0", "[::]:0", ":0"} {
		_, err := New(Config{Provider: newLocal(t), Endpoint: "unix://" + t.TempDir() + "/kms.sock", HTTPAddr: addr})
		if err == nil || !strings.Contains(err.Error(), "httpTLS.certFile") {
			t.Errorf("New with httpAddr %s and no TLS = %v; want a refusal naming httpTLS.certFile", addr, err)
		}
	}
}

// TestAuthenticatedAdminPort runs the assembly with HTTPS and a token off
// loopback: unauthenticated /refresh and /status get 401, the token gets
// 200, and kubelet's probes stay open.
func TestAuthenticatedAdminPort(t *testing.T) {
	dir := t.TempDir()
	ca := adminauthtest.NewCA(t, "cluster-ca", adminauthtest.RSAPKCS1)
	certPEM, keyPEM := ca.Server(t)
	token := "s3cr3t-admin-token-0123456789abcdef"
	sc := adminauth.ServerConfig{
		CertFile:  adminauthtest.WriteFile(t, dir, "tls.crt", certPEM, 0o600),
		KeyFile:   adminauthtest.WriteFile(t, dir, "tls.key", keyPEM, 0o600),
		TokenFile: adminauthtest.WriteFile(t, dir, "token", []byte(token+"\n"), 0o600),
	}
	p, err := New(Config{Provider: newLocal(t), Endpoint: "unix://" + dir + "/kms.sock", HTTPAddr: "0.0.0.0:0", AdminTLS: sc})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := start(t, ctx, p)
	defer func() { cancel(); _ = wait(t, done) }()

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca.CertPEM)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "localhost"}}}
	port := p.HTTPAddr()[strings.LastIndex(p.HTTPAddr(), ":"):]
	base := "https://127.0.0.1" + port
	do := func(method, path, bearer string) int {
		t.Helper()
		req, _ := http.NewRequest(method, base+path, nil)
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for _, tc := range []struct {
		method, path, bearer string
		want                 int
	}{
		{http.MethodPost, "/refresh", "", http.StatusUnauthorized},
		{http.MethodGet, "/status", "", http.StatusUnauthorized},
		{http.MethodPost, "/refresh", token[:len(token)-1] + "X", http.StatusUnauthorized},
		{http.MethodGet, "/status", token, http.StatusOK},
		{http.MethodPost, "/refresh", token, http.StatusOK},
		{http.MethodGet, "/livez", "", http.StatusOK},
		{http.MethodGet, "/readyz", "", http.StatusOK},
	} {
		if got := do(tc.method, tc.path, tc.bearer); got != tc.want {
			t.Errorf("%s %s (token %v) = %d; want %d", tc.method, tc.path, tc.bearer != "", got, tc.want)
		}
	}
	// Plain HTTP to the port never reaches a handler.
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Get("http://127.0.0.1" + port + "/status")
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatal("plain HTTP /status answered 200")
		}
	}
}
