package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestDefaultIsValid(t *testing.T) {
	t.Setenv("KMS_PLUGIN_STATE_DIR", "/tmp/kms-plugin-test-state")
	cfg := Default()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
	if cfg.Endpoint != "unix:///tmp/kms-plugin-test-state/socket.sock" || cfg.Local.KeysetPath != "/tmp/kms-plugin-test-state/keyset.json" {
		t.Fatalf("defaults do not use the state dir: %+v", cfg)
	}
	if !strings.HasPrefix(cfg.HTTPAddr, "127.0.0.1:") {
		t.Fatalf("default httpAddr %q is not loopback", cfg.HTTPAddr)
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	full := write("full.yaml", `
endpoint: unix:///var/run/kmsplugin/socket.sock
socketGroup: kms
provider: local
local:
  keysetPath: /etc/kubernetes/kms-plugin/keyset.json
httpAddr: 127.0.0.1:9000
providerPollInterval: 30s
kek:
  maxAge: 24h
  maxUses: 1000
  cacheSize: 50
log:
  format: console
  level: debug
shutdownTimeout: 5s
`)
	cfg, err := Load(full)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Endpoint: ProductionEndpoint, SocketGroup: "kms", Provider: "local",
		Local:                LocalConfig{KeysetPath: ProductionKeysetPath},
		HTTPAddr:             "127.0.0.1:9000",
		ProviderPollInterval: Duration{30 * time.Second},
		KEK:                  KEKConfig{MaxAge: Duration{24 * time.Hour}, MaxUses: 1000, CacheSize: 50},
		Log:                  LogConfig{Format: "console", Level: "debug"},
		ShutdownTimeout:      Duration{5 * time.Second},
	}
	if cfg != want {
		t.Fatalf("Load = %+v\nwant %+v", cfg, want)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}

	partial, err := Load(write("partial.yaml", "providerPollInterval: 5s\n"))
	if err != nil {
		t.Fatal(err)
	}
	if partial.ProviderPollInterval.Duration != 5*time.Second || partial.Provider != "local" || partial.KEK.CacheSize != 10000 {
		t.Fatalf("partial file did not keep defaults: %+v", partial)
	}
	if _, err := Load(write("empty.yaml", "")); err != nil {
		t.Fatalf("empty file: %v", err)
	}

	for _, tt := range []struct{ name, body, want string }{
		{"unknown field", "endpiont: unix:///x\n", `unknown field "endpiont"`},
		{"bad duration", "providerPollInterval: soon\n", "invalid duration"},
		{"numeric duration", "providerPollInterval: 60\n", "duration must be a string"},
		{"not yaml", "endpoint: [\n", "parse YAML"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Load(write(tt.name+".yaml", tt.body))
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Load error = %v; want it to contain %q", err, tt.want)
			}
		})
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml")); err == nil {
		t.Fatal("Load of a missing file succeeded")
	}
}

func TestValidateNamesTheField(t *testing.T) {
	for _, tt := range []struct {
		name   string
		mutate func(*Config)
		field  string
	}{
		{"tcp endpoint", func(c *Config) { c.Endpoint = "tcp://127.0.0.1:1" }, "endpoint:"},
		{"relative socket", func(c *Config) { c.Endpoint = "unix://sock" }, "endpoint:"},
		{"long socket", func(c *Config) { c.Endpoint = "unix:///" + strings.Repeat("a", 120) }, "endpoint:"},
		{"unknown provider", func(c *Config) { c.Provider = "gcp" }, "provider:"},
		{"empty provider", func(c *Config) { c.Provider = "" }, "provider:"},
		{"relative keyset", func(c *Config) { c.Local.KeysetPath = "keyset.json" }, "local.keysetPath:"},
		{"bad http addr", func(c *Config) { c.HTTPAddr = "8080" }, "httpAddr:"},
		{"poll too fast", func(c *Config) { c.ProviderPollInterval.Duration = time.Millisecond }, "providerPollInterval:"},
		{"max uses zero", func(c *Config) { c.KEK.MaxUses = 0 }, "kek.maxUses:"},
		{"cache zero", func(c *Config) { c.KEK.CacheSize = 0 }, "kek.cacheSize:"},
		{"max age", func(c *Config) { c.KEK.MaxAge.Duration = time.Second }, "kek.maxAge:"},
		{"log format", func(c *Config) { c.Log.Format = "xml" }, "log.format:"},
		{"log level", func(c *Config) { c.Log.Level = "loud" }, "log.level:"},
		{"shutdown", func(c *Config) { c.ShutdownTimeout.Duration = 0 }, "shutdownTimeout:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Default()
			tt.mutate(&cfg)
			err := cfg.Validate()
			if err == nil || !strings.HasPrefix(err.Error(), tt.field) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("Validate = %v; want one line starting with %q", err, tt.field)
			}
		})
	}
}

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
	cfg, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	want := AzureConfig{
		VaultURL: "https://contoso-kms.vault.azure.net", KeyName: "kms-kek", Cloud: "AzureUSGovernmentCloud", Timeout: Duration{5 * time.Second},
		Credential: AzureCredentialConfig{Type: "clientSecret", TenantID: "72f988bf-86f1-41af-91ab-2d7cd011db47", ClientID: "0b5bdb30-f5b6-4bb3-9c67-54f3c7cdb0e1", ClientSecretFile: "/etc/kubernetes/kms-plugin/client-secret"},
	}
	if cfg.Provider != ProviderAzureKeyVault || cfg.Azure != want {
		t.Fatalf("Load = %+v\nwant %+v", cfg.Azure, want)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}

	valid := func() Config {
		c := Default()
		c.Provider = ProviderAzureKeyVault
		c.Azure = AzureConfig{VaultURL: "https://v.vault.azure.net", KeyName: "k", Credential: AzureCredentialConfig{Type: "managedIdentity"}}
		return c
	}
	for _, tt := range []struct {
		name   string
		mutate func(*AzureConfig)
		field  string // "" means valid
	}{
		{"managed identity", func(a *AzureConfig) {}, ""},
		{"vault name", func(a *AzureConfig) { a.VaultURL, a.VaultName = "", "contoso-kms" }, ""},
		{"workload identity from env", func(a *AzureConfig) { a.Credential = AzureCredentialConfig{Type: "workloadIdentity"} }, ""},
		{"azure.json default path", func(a *AzureConfig) { a.Credential = AzureCredentialConfig{Type: "azureJSON"} }, ""},
		{"no vault", func(a *AzureConfig) { a.VaultURL = "" }, "azure.vaultURL:"},
		{"both vault forms", func(a *AzureConfig) { a.VaultName = "x" }, "azure.vaultURL:"},
		{"http vault", func(a *AzureConfig) { a.VaultURL = "http://v.vault.azure.net" }, "azure.vaultURL:"},
		{"vault path", func(a *AzureConfig) { a.VaultURL = "https://v.vault.azure.net/keys/k" }, "azure.vaultURL:"},
		{"bad vault name", func(a *AzureConfig) { a.VaultURL, a.VaultName = "", "v" }, "azure.vaultName:"},
		{"stack without suffix", func(a *AzureConfig) { a.VaultURL, a.VaultName, a.Cloud = "", "contoso", "AzureStackCloud" }, "azure.vaultSuffix:"},
		{"no key", func(a *AzureConfig) { a.KeyName = "" }, "azure.keyName:"},
		{"bad version", func(a *AzureConfig) { a.KeyVersion = "../x" }, "azure.keyVersion:"},
		{"bad cloud", func(a *AzureConfig) { a.Cloud = "Mars" }, "azure.cloud:"},
		{"http authority", func(a *AzureConfig) { a.AuthorityHost = "http://login.example" }, "azure.authorityHost:"},
		{"timeout", func(a *AzureConfig) { a.Timeout.Duration = time.Millisecond }, "azure.timeout:"},
		{"no credential", func(a *AzureConfig) { a.Credential.Type = "" }, "azure.credential.type:"},
		{"unknown credential", func(a *AzureConfig) { a.Credential.Type = "password" }, "azure.credential.type:"},
		{"both identity IDs", func(a *AzureConfig) { a.Credential.ClientID, a.Credential.ResourceID = "c", "r" }, "azure.credential.resourceID:"},
		{"secret without file", func(a *AzureConfig) {
			a.Credential = AzureCredentialConfig{Type: "clientSecret", TenantID: "t", ClientID: "c"}
		}, "azure.credential.clientSecretFile:"},
		{"relative secret file", func(a *AzureConfig) {
			a.Credential = AzureCredentialConfig{Type: "clientSecret", TenantID: "t", ClientID: "c", ClientSecretFile: "secret"}
		}, "azure.credential.clientSecretFile:"},
		{"certificate without tenant", func(a *AzureConfig) {
			a.Credential = AzureCredentialConfig{Type: "clientCertificate", ClientID: "c", CertificateFile: "/c.pem"}
		}, "azure.credential.tenantID:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := valid()
			tt.mutate(&c.Azure)
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
