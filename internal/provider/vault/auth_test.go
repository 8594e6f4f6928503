package vault_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault"
)

func enableAuth(t *testing.T, f *fixture, typ string) {
	t.Helper()
	root := f.srv.Root(t)
	auths, err := root.Sys().ListAuth()
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := auths[typ+"/"]; !ok {
		if err := root.Sys().EnableAuthWithOptions(typ, &api.EnableAuthOptions{Type: typ}); err != nil {
			t.Fatal(err)
		}
	}
}

// TLS certificate auth over HTTPS with the settings' CA and client
// certificate: login, round trip.
func TestCertAuth(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	dir := t.TempDir()
	certFile, keyFile, certPEM := clientCert(t, dir)
	f := newFixture(t, srv, fixtureOpts{
		settings: func(s *vault.Settings) {
			s.ClientCertFile, s.ClientKeyFile = certFile, keyFile
			s.Auth = vault.AuthSettings{Method: vault.AuthCert}
		},
		method: func(f *fixture) vault.Method {
			enableAuth(t, f, "cert")
			rootWrite(t, f.srv, "auth/cert/certs/"+f.key, map[string]any{"certificate": string(certPEM), "token_policies": "plugin-" + f.key, "token_ttl": "1h"})
			return vault.Cert{Mount: "cert", Role: f.key}
		},
	})
	key := randomKey(t)
	w, err := f.p.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("Wrap with cert auth: %v", err)
	}
	if got, err := f.p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap with cert auth: %v", err)
	}
	if ti := f.p.Token(); ti.Method != "cert" || ti.Logins != 1 || !ti.Renewable {
		t.Fatalf("token = %+v", ti)
	}
}

// JWT auth with a token from a file, verified by Vault against a public
// key; a JWT for another audience is refused as permission denied.
func TestJWTAuth(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&priv.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER})
	var jwtFile string
	f := newFixture(t, srv, fixtureOpts{method: func(f *fixture) vault.Method {
		enableAuth(t, f, "jwt")
		rootWrite(t, f.srv, "auth/jwt/config", map[string]any{"jwt_validation_pubkeys": []string{string(pubPEM)}})
		rootWrite(t, f.srv, "auth/jwt/role/"+f.key, map[string]any{
			"role_type": "jwt", "user_claim": "sub", "bound_audiences": []string{"kms-plugin"},
			"token_policies": "plugin-" + f.key, "token_ttl": "1h",
		})
		jwtFile = writeSecret(t, "jwt", signJWT(t, priv, map[string]any{"sub": "node-1", "aud": "kms-plugin"}))
		return vault.JWT{Mount: "jwt", Role: f.key, JWTFile: jwtFile}
	}})
	key := randomKey(t)
	w, err := f.p.Wrap(ctx, key)
	if err != nil {
		t.Fatalf("Wrap with jwt auth: %v", err)
	}
	if got, err := f.p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap with jwt auth: %v", err)
	}
	// A JWT for another audience: Vault refuses the login.
	bad := vault.JWT{Mount: "jwt", Role: f.key, JWTFile: writeSecret(t, "bad-jwt", signJWT(t, priv, map[string]any{"sub": "node-1", "aud": "other"}))}
	c, err := srv.Client("")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bad.Login(ctx, c); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("login with a JWT for another audience = %v; want ErrPermissionDenied", err)
	}
}

// AppRole credentials are read at each login, from files whose mode is
// checked: a world-readable secret ID is refused.
func TestAppRoleSecretIDFileMode(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	var secretIDFile string
	f := newFixture(t, srv, fixtureOpts{method: func(f *fixture) vault.Method {
		var r string
		r, secretIDFile = setupAppRole(t, f, "role-"+f.key, nil)
		return vault.AppRole{Mount: "approle", RoleIDFile: r, SecretIDFile: secretIDFile}
	}})
	if err := os.Chmod(secretIDFile, 0o640); err != nil {
		t.Fatal(err)
	}
	_, err := f.p.CurrentVersion(ctx)
	if err == nil || !strings.Contains(err.Error(), "mode 0640") {
		t.Fatalf("login with a 0640 secret ID file = %v", err)
	}
	sid, _ := os.ReadFile(secretIDFile)
	if strings.Contains(err.Error(), strings.TrimSpace(string(sid))) {
		t.Fatal("the error holds the secret ID")
	}
}

func signJWT(t *testing.T, priv *ecdsa.PrivateKey, claims map[string]any) string {
	t.Helper()
	now := time.Now()
	claims["iat"], claims["nbf"], claims["exp"] = now.Unix(), now.Add(-time.Minute).Unix(), now.Add(time.Hour).Unix()
	enc := func(v any) string {
		b, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		return base64.RawURLEncoding.EncodeToString(b)
	}
	signing := enc(map[string]string{"alg": "ES256", "typ": "JWT"}) + "." + enc(claims)
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, priv, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// clientCert writes a self-signed client certificate and its key.
func clientCert(t *testing.T, dir string) (certFile, keyFile string, certPEM []byte) {
	t.Helper()
	priv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7),
		Subject:      pkix.Name{CommonName: "kms-plugin node-1"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &priv.PublicKey, priv)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	certFile, keyFile = filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-key.pem")
	if err := os.WriteFile(certFile, certPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return certFile, keyFile, certPEM
}

// TLS settings: the CA file, the server name checked against Vault's
// certificate, and VAULT_CACERT honoured as the official client does.
func TestTLSSettings(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	f := newFixture(t, srv, fixtureOpts{})
	tests := []struct {
		name   string
		change func(s *vault.Settings)
		env    map[string]string
		ok     bool
	}{
		{"ca file", func(s *vault.Settings) {}, nil, true},
		{"server name in the certificate", func(s *vault.Settings) { s.TLSServerName = "vault.test" }, nil, true},
		{"server name not in the certificate", func(s *vault.Settings) { s.TLSServerName = "other.test" }, nil, false},
		{"no CA", func(s *vault.Settings) { s.CAFile = "" }, nil, false},
		{"VAULT_CACERT", func(s *vault.Settings) { s.CAFile = "" }, map[string]string{"VAULT_CACERT": srv.CAFile}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k, v := range tt.env {
				t.Setenv(k, v)
			}
			s := &vault.Settings{Address: srv.Addr, CAFile: srv.CAFile, KeyName: f.key, Auth: vault.AuthSettings{Method: "token", TokenFile: f.tokenFile}}
			tt.change(s)
			p, err := s.Open(ctx, provider.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer p.(*vault.Provider).Close()
			_, err = p.CurrentVersion(ctx)
			switch {
			case tt.ok && err != nil:
				t.Fatalf("CurrentVersion = %v", err)
			case !tt.ok && (err == nil || !errors.Is(err, provider.ErrUnavailable) || !strings.Contains(vault.Remedy(err), "caFile")):
				t.Fatalf("CurrentVersion = %v (remedy %q); want an untrusted certificate naming vault.caFile", err, vault.Remedy(err))
			}
		})
	}
}
