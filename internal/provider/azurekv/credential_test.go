package azurekv

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"net/http"
	"net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

// pemCertificate returns a self-signed client certificate and its key in
// one PEM file.
func pemCertificate(t *testing.T) ([]byte, *x509.Certificate) {
	t.Helper()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "kms-plugin pem client"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pk, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	out := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	out = append(out, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: pk})...)
	return out, cert
}

// pfxCertificate returns the PKCS#12 test fixture, its password and its
// certificate.
func pfxCertificate(t *testing.T) ([]byte, string, *x509.Certificate) {
	t.Helper()
	data, err := os.ReadFile("testdata/client.pfx")
	if err != nil {
		t.Fatal(err)
	}
	pw, err := os.ReadFile("testdata/client.pfx.password")
	if err != nil {
		t.Fatal(err)
	}
	certs, _, err := azidentity.ParseCertificates(data, pw)
	if err != nil {
		t.Fatal(err)
	}
	return data, string(pw), certs[0]
}

func jsonFile(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return writeFile(t, "azure.json", b)
}

func envMap(m map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := m[k]; return v, ok }
}

// TestCredentialsEndToEnd runs every credential kind, with the real
// azidentity credentials, against the loopback Entra and IMDS endpoints,
// and checks the vault saw the expected identity.
func TestCredentialsEndToEnd(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	if _, err := srv.CreateKey("creds", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	tenant := srv.TenantID()
	miClient := randomID(t)
	miResource := "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/kms-" + miClient[:8]
	srv.AddManagedIdentity(miClient, miResource)
	secretApp, secret := randomID(t), "secret-"+randomID(t)
	srv.AddClientSecret(secretApp, secret)
	secretFile := writeFile(t, "secret", []byte(secret+"\n"))
	pemApp := randomID(t)
	pemData, pemCert := pemCertificate(t)
	srv.AddClientCertificate(pemApp, pemCert)
	pemFile := writeFile(t, "client.pem", pemData)
	pfxApp := randomID(t)
	pfxData, pfxPassword, pfxCert := pfxCertificate(t)
	srv.AddClientCertificate(pfxApp, pfxCert)
	pfxFile := writeFile(t, "client.pfx", pfxData)
	pfxPasswordFile := writeFile(t, "client.pfx.password", []byte(pfxPassword))
	wiApp, saToken := randomID(t), "eyJhbGciOiJSUzI1NiJ9.service-account-token."+randomID(t)
	srv.AddFederatedToken(wiApp, saToken)
	tokenFile := writeFile(t, "token", []byte(saToken))
	stackEnv := jsonFile(t, map[string]string{"name": "AzureStackCloud", "activeDirectoryEndpoint": srv.AuthorityHost(), "keyVaultDNSSuffix": "vault.local.azurestack.external"})

	for _, tt := range []struct {
		name      string
		cfg       CredentialConfig
		env       map[string]string
		principal string
	}{
		{"managed identity, system-assigned", CredentialConfig{Kind: CredentialManagedIdentity}, nil, kvtest.SystemIdentity},
		{"managed identity, client ID", CredentialConfig{Kind: CredentialManagedIdentity, ClientID: miClient}, nil, kvtest.ManagedIdentity(miClient)},
		{"managed identity, resource ID", CredentialConfig{Kind: CredentialManagedIdentity, ResourceID: miResource}, nil, kvtest.ManagedIdentity(miClient)},
		{"workload identity", CredentialConfig{Kind: CredentialWorkloadIdentity, TenantID: tenant, ClientID: wiApp, FederatedTokenFile: tokenFile}, nil, kvtest.App(wiApp)},
		{"workload identity from the environment", CredentialConfig{Kind: CredentialWorkloadIdentity},
			map[string]string{"AZURE_TENANT_ID": tenant, "AZURE_CLIENT_ID": wiApp, "AZURE_FEDERATED_TOKEN_FILE": tokenFile}, kvtest.App(wiApp)},
		{"client secret", CredentialConfig{Kind: CredentialClientSecret, TenantID: tenant, ClientID: secretApp, ClientSecretFile: secretFile}, nil, kvtest.App(secretApp)},
		{"client certificate PEM", CredentialConfig{Kind: CredentialClientCertificate, TenantID: tenant, ClientID: pemApp, CertificateFile: pemFile}, nil, kvtest.App(pemApp)},
		{"client certificate PFX", CredentialConfig{Kind: CredentialClientCertificate, TenantID: tenant, ClientID: pfxApp, CertificateFile: pfxFile, CertificatePasswordFile: pfxPasswordFile}, nil, kvtest.App(pfxApp)},
		{"azure.json managed identity by client ID", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{
			"cloud": "AzurePublicCloud", "tenantId": tenant, "useManagedIdentityExtension": true, "userAssignedIdentityID": miClient,
			"aadClientId": secretApp, "aadClientSecret": secret, // lower precedence
		})}, nil, kvtest.ManagedIdentity(miClient)},
		{"azure.json managed identity by resource ID", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{
			"tenantId": tenant, "useManagedIdentityExtension": true, "userAssignedIdentityID": miResource,
		})}, nil, kvtest.ManagedIdentity(miClient)},
		{"azure.json system identity", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{
			"tenantId": tenant, "useManagedIdentityExtension": true,
		})}, nil, kvtest.SystemIdentity},
		{"azure.json client secret", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{
			"tenantId": tenant, "aadClientId": secretApp, "aadClientSecret": secret,
			"aadClientCertPath": pfxFile, "aadClientCertPassword": pfxPassword, // lower precedence
		})}, nil, kvtest.App(secretApp)},
		{"azure.json client certificate", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{
			"tenantId": tenant, "aadClientId": pfxApp, "aadClientCertPath": pfxFile, "aadClientCertPassword": pfxPassword,
		})}, nil, kvtest.App(pfxApp)},
		{"azure.json workload identity", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{
			"tenantId": tenant, "aadClientId": wiApp, "useFederatedWorkloadIdentityExtension": true, "aadFederatedTokenFile": tokenFile,
			"useManagedIdentityExtension": true, // lower precedence
		})}, nil, kvtest.App(wiApp)},
		{"azure.json overridden by the workload identity environment", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{
			"tenantId": "11111111-1111-1111-1111-111111111111", "aadClientId": secretApp, "aadClientSecret": secret,
		})}, map[string]string{"AZURE_TENANT_ID": tenant, "AZURE_CLIENT_ID": wiApp, "AZURE_FEDERATED_TOKEN_FILE": tokenFile}, kvtest.App(wiApp)},
		{"azure.json on Azure Stack Hub", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{
			"cloud": "AzureStackCloud", "tenantId": tenant, "aadClientId": secretApp, "aadClientSecret": secret,
		})}, map[string]string{"AZURE_ENVIRONMENT_FILEPATH": stackEnv}, kvtest.App(secretApp)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.Transport = srv.HTTPClient()
			if cfg.Kind != CredentialAzureJSON || !strings.Contains(tt.name, "Stack") {
				cfg.AuthorityHost = srv.AuthorityHost()
			}
			cfg.LookupEnv = envMap(tt.env)
			cred, desc, err := NewCredential(cfg)
			if err != nil {
				t.Fatalf("NewCredential: %v", err)
			}
			if strings.Contains(desc, secret) || strings.Contains(desc, pfxPassword) || strings.Contains(desc, saToken) {
				t.Fatalf("description %q contains a secret", desc)
			}
			p, err := New(testConfig(srv, cred, "creds"))
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			key := []byte("0123456789abcdef0123456789abcdef")
			w, err := p.Wrap(ctx, key)
			if err != nil {
				t.Fatalf("Wrap: %v", err)
			}
			if got, err := p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
				t.Fatalf("Unwrap: %v", err)
			}
			if got := srv.LastPrincipal(); got != tt.principal {
				t.Fatalf("the vault saw %q; want %q (%s)", got, tt.principal, desc)
			}
		})
	}
}

// TestThroughProxy reaches the vault, Entra and IMDS through an HTTP proxy
// only, as a node behind HTTPS_PROXY does.
func TestThroughProxy(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	if _, err := srv.CreateKey("proxied", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	proxyURL, err := url.Parse(srv.ProxyURL())
	if err != nil {
		t.Fatal(err)
	}
	transport := &http.Client{Transport: &http.Transport{
		Proxy:           http.ProxyURL(proxyURL),
		TLSClientConfig: &tls.Config{RootCAs: srv.CertPool(), MinVersion: tls.VersionTLS12},
	}}
	mi := randomID(t)
	srv.AddManagedIdentity(mi, "")
	app, secret := randomID(t), "secret-"+randomID(t)
	srv.AddClientSecret(app, secret)
	for _, cc := range []CredentialConfig{
		{Kind: CredentialManagedIdentity, ClientID: mi},
		{Kind: CredentialClientSecret, TenantID: srv.TenantID(), ClientID: app, ClientSecretFile: writeFile(t, "s", []byte(secret)), AuthorityHost: srv.AuthorityHost()},
	} {
		t.Run(cc.Kind, func(t *testing.T) {
			cc.Transport = transport
			cred, _, err := NewCredential(cc)
			if err != nil {
				t.Fatal(err)
			}
			cfg := testConfig(srv, cred, "proxied")
			cfg.Transport = transport
			p, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			before := srv.Calls("connect")
			if _, err := p.CurrentVersion(context.Background()); err != nil {
				t.Fatal(err)
			}
			if srv.Calls("connect") == before {
				t.Fatal("no CONNECT went through the proxy")
			}
		})
	}
	if srv.Calls("imds") == 0 {
		t.Fatal("IMDS was not reached through the proxy")
	}
}

func TestCredentialErrors(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	if _, err := srv.CreateKey("k", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	app, secret := randomID(t), "right-"+randomID(t)
	srv.AddClientSecret(app, secret)
	certApp := randomID(t)
	pemData, cert := pemCertificate(t)
	srv.AddClientCertificate(certApp, cert)
	wiApp := randomID(t)
	srv.AddFederatedToken(wiApp, "the-trusted-token")
	wrong := "wrong-" + randomID(t)
	fast := policy.RetryOptions{MaxRetries: 1, RetryDelay: time.Millisecond}
	for _, tt := range []struct {
		name   string
		cfg    CredentialConfig
		inject func()
		kind   error
		code   string
		remedy string
	}{
		{"wrong secret", CredentialConfig{Kind: CredentialClientSecret, TenantID: srv.TenantID(), ClientID: app, ClientSecretFile: writeFile(t, "s", []byte(wrong))},
			nil, provider.ErrPermissionDenied, "AADSTS7000215", "client secret is wrong"},
		{"unknown app", CredentialConfig{Kind: CredentialClientSecret, TenantID: srv.TenantID(), ClientID: randomID(t), ClientSecretFile: writeFile(t, "s", []byte(wrong))},
			nil, provider.ErrPermissionDenied, "AADSTS700016", "client ID"},
		{"untrusted federated token", CredentialConfig{Kind: CredentialWorkloadIdentity, TenantID: srv.TenantID(), ClientID: wiApp, FederatedTokenFile: writeFile(t, "t", []byte("another-token"))},
			nil, provider.ErrPermissionDenied, "AADSTS70021", "federated identity credential"},
		{"clock skew", CredentialConfig{Kind: CredentialClientCertificate, TenantID: srv.TenantID(), ClientID: certApp, CertificateFile: writeFile(t, "c.pem", pemData)},
			func() { srv.SetClockSkew(time.Hour) }, provider.ErrPermissionDenied, "AADSTS700024", "clock"},
		{"identity not on this VM", CredentialConfig{Kind: CredentialManagedIdentity, ClientID: randomID(t)},
			nil, provider.ErrPermissionDenied, "", "not assigned to this VM"},
		{"credential for another tenant", CredentialConfig{Kind: CredentialClientSecret, TenantID: randomID(t), ClientID: app, ClientSecretFile: writeFile(t, "s", []byte(secret))},
			nil, provider.ErrPermissionDenied, "", "tenant"},
		{"token endpoint down", CredentialConfig{Kind: CredentialClientSecret, TenantID: srv.TenantID(), ClientID: app, ClientSecretFile: writeFile(t, "s", []byte(secret))},
			func() { srv.SetTokenOutage(true) }, provider.ErrUnavailable, "", "identity endpoint"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Cleanup(func() { srv.SetClockSkew(0); srv.SetTokenOutage(false) })
			if tt.inject != nil {
				tt.inject()
			}
			cfg := tt.cfg
			cfg.Transport, cfg.AuthorityHost, cfg.Retry = srv.HTTPClient(), srv.AuthorityHost(), fast
			cred, _, err := NewCredential(cfg)
			if err != nil {
				t.Fatal(err)
			}
			p, err := New(testConfig(srv, cred, "k"))
			if err != nil {
				t.Fatal(err)
			}
			_, err = p.CurrentVersion(context.Background())
			var e *Error
			if !errors.Is(err, tt.kind) || !errors.As(err, &e) {
				t.Fatalf("CurrentVersion = %v; want %v", err, tt.kind)
			}
			if e.Op != "token" || (tt.code != "" && e.InnerCode != tt.code) {
				t.Fatalf("error = %+v; want op token, code %q", e, tt.code)
			}
			if strings.Contains(err.Error(), wrong) || strings.Contains(err.Error(), secret) {
				t.Fatalf("error %q contains a secret", err)
			}
			if r := Remedy(err); !strings.Contains(r, tt.remedy) {
				t.Fatalf("Remedy(%v) = %q; want it to mention %q", err, r, tt.remedy)
			}
		})
	}
}

func TestNewCredentialErrors(t *testing.T) {
	empty := writeFile(t, "empty", nil)
	pfx, _, _ := pfxCertificate(t)
	pfxFile := writeFile(t, "c.pfx", pfx)
	wrongPassword := writeFile(t, "pw", []byte("not-the-password"))
	for _, tt := range []struct {
		name string
		cfg  CredentialConfig
		want string
	}{
		{"no kind", CredentialConfig{}, "no credential kind"},
		{"unknown kind", CredentialConfig{Kind: "password"}, `unknown credential kind "password"`},
		{"both managed identity IDs", CredentialConfig{Kind: CredentialManagedIdentity, ClientID: "a", ResourceID: "b"}, "not both"},
		{"secret without file", CredentialConfig{Kind: CredentialClientSecret, TenantID: "t", ClientID: "c"}, "secret file"},
		{"missing secret file", CredentialConfig{Kind: CredentialClientSecret, TenantID: "t", ClientID: "c", ClientSecretFile: "/nonexistent/secret"}, "no such file"},
		{"empty secret file", CredentialConfig{Kind: CredentialClientSecret, TenantID: "t", ClientID: "c", ClientSecretFile: empty}, "is empty"},
		{"secret without tenant", CredentialConfig{Kind: CredentialClientSecret, ClientID: "c", ClientSecretFile: wrongPassword}, "tenant ID"},
		{"wrong PFX password", CredentialConfig{Kind: CredentialClientCertificate, TenantID: "t", ClientID: "c", CertificateFile: pfxFile, CertificatePasswordFile: wrongPassword}, "c.pfx"},
		{"workload identity without token", CredentialConfig{Kind: CredentialWorkloadIdentity, TenantID: "t", ClientID: "c"}, "federated token file"},
		{"unknown cloud", CredentialConfig{Kind: CredentialWorkloadIdentity, Cloud: "Mars"}, `unknown cloud "Mars"`},
		{"http authority", CredentialConfig{Kind: CredentialClientSecret, AuthorityHost: "http://login.example"}, "https"},
		{"stack without environment file", CredentialConfig{Kind: CredentialWorkloadIdentity, Cloud: CloudStack}, "AZURE_ENVIRONMENT_FILEPATH"},
		{"missing azure.json", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: "/nonexistent/azure.json"}, "no such file"},
		{"azure.json without credential", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{"tenantId": "t"})}, "sets no credential"},
		{"azure.json certificate without password", CredentialConfig{Kind: CredentialAzureJSON, AzureJSONFile: jsonFile(t, map[string]any{"tenantId": "t", "aadClientId": "c", "aadClientCertPath": pfxFile})}, "sets no credential"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.LookupEnv = envMap(nil)
			_, _, err := NewCredential(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("NewCredential = %v; want an error containing %q", err, tt.want)
			}
			if strings.Contains(err.Error(), "not-the-password") {
				t.Fatalf("error %q contains the password", err)
			}
		})
	}
}

func TestVaultSuffix(t *testing.T) {
	for _, tt := range []struct {
		cloud string
		hsm   bool
		want  string
	}{
		{"", false, "vault.azure.net"},
		{"AzurePublicCloud", true, "managedhsm.azure.net"},
		{"azurechinacloud", false, "vault.azure.cn"},
		{"AzureUSGovernmentCloud", false, "vault.usgovcloudapi.net"},
	} {
		if got, err := VaultSuffix(tt.cloud, tt.hsm); err != nil || got != tt.want {
			t.Fatalf("VaultSuffix(%q, %v) = %q, %v; want %q", tt.cloud, tt.hsm, got, err, tt.want)
		}
	}
	if _, err := VaultSuffix("AzureStackCloud", false); err == nil {
		t.Fatal("VaultSuffix of Azure Stack succeeded; its suffix is per stamp")
	}
}
