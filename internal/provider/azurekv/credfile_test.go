package azurekv

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

// TestCredentialFilePermissions starts credentials from files others may
// read or another user owns: each start fails naming the file and the fix.
func TestCredentialFilePermissions(t *testing.T) {
	pemData, _ := pemCertificate(t)
	pfx, pfxPassword, _ := pfxCertificate(t)
	secret := func() string { return writeFile(t, "secret", []byte("s3cret")) }
	token := func() string { return writeFile(t, "token", []byte("eyJ.token.sig")) }
	base := func(kind string) CredentialConfig {
		return CredentialConfig{Kind: kind, TenantID: "t", ClientID: "c", AuthorityHost: "https://login.kvtest.example/", LookupEnv: envMap(nil)}
	}
	type fileCase struct {
		name string
		cfg  func(bad func(string) string) CredentialConfig
	}
	files := []fileCase{
		{"client secret", func(bad func(string) string) CredentialConfig {
			c := base(CredentialClientSecret)
			c.ClientSecretFile = bad(secret())
			return c
		}},
		{"client certificate", func(bad func(string) string) CredentialConfig {
			c := base(CredentialClientCertificate)
			c.CertificateFile = bad(writeFile(t, "c.pem", pemData))
			return c
		}},
		{"certificate password", func(bad func(string) string) CredentialConfig {
			c := base(CredentialClientCertificate)
			c.CertificateFile = writeFile(t, "c.pfx", pfx)
			c.CertificatePasswordFile = bad(writeFile(t, "pw", []byte(pfxPassword)))
			return c
		}},
		{"federated token", func(bad func(string) string) CredentialConfig {
			c := base(CredentialWorkloadIdentity)
			c.FederatedTokenFile = bad(token())
			return c
		}},
		{"azure.json with a secret", func(bad func(string) string) CredentialConfig {
			c := base(CredentialAzureJSON)
			c.AzureJSONFile = bad(jsonFile(t, map[string]any{"tenantId": "t", "aadClientId": "c", "aadClientSecret": "s3cret"}))
			return c
		}},
		{"azure.json's certificate", func(bad func(string) string) CredentialConfig {
			c := base(CredentialAzureJSON)
			c.AzureJSONFile = jsonFile(t, map[string]any{"tenantId": "t", "aadClientId": "c",
				"aadClientCertPath": bad(writeFile(t, "c.pfx", pfx)), "aadClientCertPassword": pfxPassword})
			return c
		}},
		{"azure.json's federated token", func(bad func(string) string) CredentialConfig {
			c := base(CredentialAzureJSON)
			c.AzureJSONFile = jsonFile(t, map[string]any{"tenantId": "t", "aadClientId": "c",
				"useFederatedWorkloadIdentityExtension": true, "aadFederatedTokenFile": bad(token())})
			return c
		}},
	}
	chmod := func(mode os.FileMode) func(string) string {
		return func(path string) string {
			if err := os.Chmod(path, mode); err != nil {
				panic(err)
			}
			return path
		}
	}
	for _, f := range files {
		t.Run(f.name, func(t *testing.T) {
			if _, _, err := NewCredential(f.cfg(chmod(0o400))); err != nil {
				t.Fatalf("mode 0400: %v", err)
			}
			for _, tt := range []struct {
				name string
				bad  func(string) string
				want string
			}{
				{"world-readable", chmod(0o644), "chmod 600"},
				{"group-readable", chmod(0o640), "chmod 600"},
				{"world-writable", chmod(0o602), "chmod 600"},
				{"another user's", func(path string) string {
					if err := os.Chown(path, 65534, 65534); err != nil {
						panic(err)
					}
					return path
				}, "owned by uid 65534"},
			} {
				t.Run(tt.name, func(t *testing.T) {
					if tt.name == "another user's" && os.Geteuid() != 0 {
						t.Skip("needs root to give a file away")
					}
					var path string
					cfg := f.cfg(func(p string) string { path = p; return tt.bad(p) })
					_, _, err := NewCredential(cfg)
					if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), tt.want) {
						t.Fatalf("NewCredential with a %s %s file = %v; want an error naming %s and %q", tt.name, f.name, err, path, tt.want)
					}
				})
			}
		})
	}
	t.Run("azure.json without a secret", func(t *testing.T) {
		c := base(CredentialAzureJSON)
		c.AzureJSONFile = chmod(0o644)(jsonFile(t, map[string]any{"tenantId": "t", "useManagedIdentityExtension": true}))
		if _, _, err := NewCredential(c); err != nil {
			t.Fatalf("a readable azure.json that holds no secret: %v", err)
		}
	})
	t.Run("a directory", func(t *testing.T) {
		c := base(CredentialClientSecret)
		c.ClientSecretFile = t.TempDir()
		if _, _, err := NewCredential(c); err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("NewCredential with a directory = %v", err)
		}
	})
}

var scopeN atomic.Int64

// newScope returns a token scope no credential has a token for yet, so
// the next GetToken asks Entra.
func newScope() policy.TokenRequestOptions {
	return policy.TokenRequestOptions{Scopes: []string{fmt.Sprintf("https://scope-%d.kvtest.example/.default", scopeN.Add(1))}}
}

// TestClientSecretRotation rewrites the client secret file after the
// secret was rotated in Entra: the next token request uses the new one,
// without a restart.
func TestClientSecretRotation(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	if _, err := srv.CreateKey("k", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	app, old, next := randomID(t), "old-"+randomID(t), "next-"+randomID(t)
	srv.AddClientSecret(app, old)
	file := writeFile(t, "secret", []byte(old+"\n"))
	cred, _, err := NewCredential(CredentialConfig{Kind: CredentialClientSecret, TenantID: srv.TenantID(), ClientID: app,
		ClientSecretFile: file, AuthorityHost: srv.AuthorityHost(), Transport: srv.HTTPClient()})
	if err != nil {
		t.Fatal(err)
	}
	p, err := New(testConfig(srv, cred, "k"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := p.CurrentVersion(ctx); err != nil {
		t.Fatal(err)
	}
	if got := srv.LastClientSecret(app); got != old {
		t.Fatalf("Entra got secret %q; want the old one", got)
	}

	srv.AddClientSecret(app, next) // rotated in Entra: the old one is gone
	if err := os.WriteFile(file, []byte(next+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := cred.GetToken(ctx, newScope()); err != nil {
		t.Fatalf("token request after the file changed: %v", err)
	}
	if got := srv.LastClientSecret(app); got != next {
		t.Fatalf("Entra got secret %q after the file changed; want the new one", got)
	}

	// Mid-rewrite (empty): the last secret stays in service.
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := cred.GetToken(ctx, newScope()); err != nil {
		t.Fatalf("token request while the file is empty: %v", err)
	}
	// Made readable by others: token requests fail, naming the fix.
	if err := os.WriteFile(file, []byte(next), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(file, 0o644); err != nil {
		t.Fatal(err)
	}
	fresh, err := New(testConfig(srv, cred, "k"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = fresh.CurrentVersion(ctx)
	var e *Error
	if !errors.Is(err, provider.ErrPermissionDenied) || !errors.As(err, &e) || e.Op != "token" || !strings.Contains(err.Error(), file) {
		t.Fatalf("CurrentVersion with a world-readable secret file = %v; want a token error naming the file", err)
	}
	if r := Remedy(err); !strings.Contains(r, "chmod 600 "+file) {
		t.Fatalf("Remedy = %q; want the chmod", r)
	}
}

// TestClientCertificateRotation replaces the certificate file after a new
// certificate was registered and the old one removed: the next token
// request is signed with the new one.
func TestClientCertificateRotation(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	app := randomID(t)
	oldPEM, oldCert := pemCertificate(t)
	newPEM, newCert := pemCertificate(t)
	srv.AddClientCertificate(app, oldCert)
	file := writeFile(t, "client.pem", oldPEM)
	cred, _, err := NewCredential(CredentialConfig{Kind: CredentialClientCertificate, TenantID: srv.TenantID(), ClientID: app,
		CertificateFile: file, AuthorityHost: srv.AuthorityHost(), Transport: srv.HTTPClient()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := cred.GetToken(ctx, newScope()); err != nil {
		t.Fatal(err)
	}
	if got := srv.LastClientCertificate(app); got == nil || !got.Equal(oldCert) {
		t.Fatal("the first token was not signed with the old certificate")
	}
	srv.SetClientCertificates(app, newCert)
	if err := os.WriteFile(file, newPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := cred.GetToken(ctx, newScope()); err != nil {
		t.Fatalf("token request after the certificate file changed: %v", err)
	}
	if got := srv.LastClientCertificate(app); got == nil || !got.Equal(newCert) {
		t.Fatal("the token request after the change was not signed with the new certificate")
	}
}

var _ azcore.TokenCredential = (*reloadingCredential)(nil)
