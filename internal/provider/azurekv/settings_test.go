package azurekv_test

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

func TestAzure(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "azure.yaml")
	body := `
provider: azurekeyvault
azure:
  vaultURL: https://contoso-kms.vault.azure.net
  keyName: kms-kek
  cloud: AzureUSGovernmentCloud
  timeout: 5s
  credential:
    type: clientSecret
    tenantID: 72f988bf-86f1-41af-91ab-2d7cd011db47
    clientID: 0b5bdb30-f5b6-4bb3-9c67-54f3c7cdb0e1
    clientSecretFile: /etc/kubernetes/kms-plugin/client-secret
`
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	stores := registry.Builtin()
	cfg, err := config.Load(p, stores.Default())
	if err != nil {
		t.Fatal(err)
	}
	_, s, err := stores.Settings(cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := azurekv.Settings{
		VaultURL: "https://contoso-kms.vault.azure.net", KeyName: "kms-kek", Cloud: "AzureUSGovernmentCloud", Timeout: config.Duration{Duration: 5 * time.Second},
		Credential: azurekv.CredentialSettings{Type: "clientSecret", TenantID: "72f988bf-86f1-41af-91ab-2d7cd011db47", ClientID: "0b5bdb30-f5b6-4bb3-9c67-54f3c7cdb0e1", ClientSecretFile: "/etc/kubernetes/kms-plugin/client-secret"},
	}
	if a, ok := s.(*azurekv.Settings); cfg.Provider != azurekv.Name || !ok || *a != want {
		t.Fatalf("Load = %+v\nwant %+v", s, want)
	}
	if err := stores.Validate(cfg); err != nil {
		t.Fatal(err)
	}

	valid := func() azurekv.Settings {
		return azurekv.Settings{VaultURL: "https://v.vault.azure.net", KeyName: "k", Credential: azurekv.CredentialSettings{Type: "managedIdentity"}}
	}
	for _, tt := range []struct {
		name   string
		mutate func(*azurekv.Settings)
		field  string // "" means valid
	}{
		{"managed identity", func(a *azurekv.Settings) {}, ""},
		{"vault name", func(a *azurekv.Settings) { a.VaultURL, a.VaultName = "", "contoso-kms" }, ""},
		{"workload identity from env", func(a *azurekv.Settings) { a.Credential = azurekv.CredentialSettings{Type: "workloadIdentity"} }, ""},
		{"azure.json default path", func(a *azurekv.Settings) { a.Credential = azurekv.CredentialSettings{Type: "azureJSON"} }, ""},
		{"no vault", func(a *azurekv.Settings) { a.VaultURL = "" }, "azure.vaultURL:"},
		{"both vault forms", func(a *azurekv.Settings) { a.VaultName = "x" }, "azure.vaultURL:"},
		{"http vault", func(a *azurekv.Settings) { a.VaultURL = "http://v.vault.azure.net" }, "azure.vaultURL:"},
		{"vault path", func(a *azurekv.Settings) { a.VaultURL = "https://v.vault.azure.net/keys/k" }, "azure.vaultURL:"},
		{"bad vault name", func(a *azurekv.Settings) { a.VaultURL, a.VaultName = "", "v" }, "azure.vaultName:"},
		{"stack without suffix", func(a *azurekv.Settings) { a.VaultURL, a.VaultName, a.Cloud = "", "contoso", "AzureStackCloud" }, "azure.vaultSuffix:"},
		{"no key", func(a *azurekv.Settings) { a.KeyName = "" }, "azure.keyName:"},
		{"bad version", func(a *azurekv.Settings) { a.KeyVersion = "../x" }, "azure.keyVersion:"},
		{"bad cloud", func(a *azurekv.Settings) { a.Cloud = "Mars" }, "azure.cloud:"},
		{"http authority", func(a *azurekv.Settings) { a.AuthorityHost = "http://login.example" }, "azure.authorityHost:"},
		{"timeout", func(a *azurekv.Settings) { a.Timeout.Duration = time.Millisecond }, "azure.timeout:"},
		{"no credential", func(a *azurekv.Settings) { a.Credential.Type = "" }, "azure.credential.type:"},
		{"unknown credential", func(a *azurekv.Settings) { a.Credential.Type = "password" }, "azure.credential.type:"},
		{"both identity IDs", func(a *azurekv.Settings) { a.Credential.ClientID, a.Credential.ResourceID = "c", "r" }, "azure.credential.resourceID:"},
		{"secret without file", func(a *azurekv.Settings) {
			a.Credential = azurekv.CredentialSettings{Type: "clientSecret", TenantID: "t", ClientID: "c"}
		}, "azure.credential.clientSecretFile:"},
		{"relative secret file", func(a *azurekv.Settings) {
			a.Credential = azurekv.CredentialSettings{Type: "clientSecret", TenantID: "t", ClientID: "c", ClientSecretFile: "secret"}
		}, "azure.credential.clientSecretFile:"},
		{"certificate without tenant", func(a *azurekv.Settings) {
			a.Credential = azurekv.CredentialSettings{Type: "clientCertificate", ClientID: "c", CertificateFile: "/c.pem"}
		}, "azure.credential.tenantID:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := valid()
			tt.mutate(&c)
			err := c.Validate()
			if tt.field == "" {
				if err != nil {
					t.Fatalf("Validate = %v; want nil", err)
				}
				return
			}
			if err == nil || !strings.HasPrefix(err.Error(), tt.field) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("Validate = %v; want one line starting with %q", err, tt.field)
			}
		})
	}
}

func TestSettingsHostPaths(t *testing.T) {
	for _, tt := range []struct {
		name string
		cred azurekv.CredentialSettings
		want []provider.HostPath
	}{
		{"managed identity", azurekv.CredentialSettings{Type: azurekv.CredentialManagedIdentity}, nil},
		{"azure.json default", azurekv.CredentialSettings{Type: azurekv.CredentialAzureJSON}, []provider.HostPath{{Name: "credential-0", Path: azurekv.DefaultAzureJSONPath}}},
		{"azure.json elsewhere", azurekv.CredentialSettings{Type: azurekv.CredentialAzureJSON, AzureJSONFile: "/etc/azure.json"}, []provider.HostPath{{Name: "credential-0", Path: "/etc/azure.json"}}},
		{"certificate and password", azurekv.CredentialSettings{Type: azurekv.CredentialClientCertificate, CertificateFile: "/c.pfx", CertificatePasswordFile: "/c.pw"},
			[]provider.HostPath{{Name: "credential-0", Path: "/c.pfx"}, {Name: "credential-1", Path: "/c.pw"}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := &azurekv.Settings{Credential: tt.cred}
			got := s.HostPaths()
			if !reflect.DeepEqual(got, provider.HostPaths{Read: tt.want}) {
				t.Fatalf("HostPaths() = %+v; want Read %+v", got, tt.want)
			}
		})
	}
}

func TestSettingsDescribe(t *testing.T) {
	for _, tt := range []struct {
		s    azurekv.Settings
		want string
	}{
		{azurekv.Settings{VaultURL: "https://v.vault.azure.net", KeyName: "k"}, "vault https://v.vault.azure.net, key k"},
		{azurekv.Settings{VaultName: "v", ManagedHSM: true, KeyName: "k", KeyVersion: "abc"}, "vault https://v.managedhsm.azure.net, key k (pinned version abc)"},
		{azurekv.Settings{VaultName: "v", Cloud: "Mars", KeyName: "k"}, `vault (azurekv: unknown cloud "Mars"`},
	} {
		if got := tt.s.Describe(); !strings.HasPrefix(got, tt.want) {
			t.Errorf("Describe() = %q; want %q", got, tt.want)
		}
	}
}
