// Package config holds the settings of `kms-plugin serve`: their defaults,
// the YAML file that carries them, and their validation. Flags are applied by
// cmd/kms-plugin on top of a loaded Config.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// Provider names.
const (
	ProviderLocal         = "local"
	ProviderAzureKeyVault = "azurekeyvault"
)

// Production paths used by the manifests in manifests/.
const (
	ProductionEndpoint   = "unix:///var/run/kmsplugin/socket.sock"
	ProductionKeysetPath = "/etc/kubernetes/kms-plugin/keyset.json"
)

// Config is the whole configuration of `kms-plugin serve`. Its YAML form uses
// the json field names.
type Config struct {
	// Endpoint is the gRPC listen address, unix:///ABSOLUTE/PATH, as in
	// kube-apiserver's EncryptionConfiguration.
	Endpoint string `json:"endpoint"`
	// SocketGroup, when set, is the group name or numeric gid given to the
	// socket, which then gets mode 0660 instead of 0600.
	SocketGroup string `json:"socketGroup,omitempty"`
	// Provider selects the key store: "local".
	Provider string `json:"provider"`
	// Local configures the local keyset provider.
	Local LocalConfig `json:"local"`
	// Azure configures the Azure Key Vault / Managed HSM provider.
	Azure AzureConfig `json:"azure"`
	// HTTPAddr is where /livez, /readyz, /metrics, /status and /refresh listen.
	// Empty disables the HTTP server.
	HTTPAddr string `json:"httpAddr"`
	// ProviderPollInterval is how often the key store is asked for its
	// current key version.
	ProviderPollInterval Duration `json:"providerPollInterval"`
	// KEK bounds local key-encryption keys.
	KEK KEKConfig `json:"kek"`
	// Log configures logging.
	Log LogConfig `json:"log"`
	// ShutdownTimeout bounds the graceful drain on SIGTERM.
	ShutdownTimeout Duration `json:"shutdownTimeout"`
}

// LocalConfig configures the local provider.
type LocalConfig struct {
	// KeysetPath is the Tink keyset file, created on first start.
	KeysetPath string `json:"keysetPath"`
}

// AzureConfig configures the azurekeyvault provider. Secrets are read from
// files named here, never given inline.
type AzureConfig struct {
	// VaultURL is https://NAME.vault.azure.net, https://NAME.managedhsm.azure.net
	// or a sovereign or custom cloud's equivalent.
	VaultURL string `json:"vaultURL,omitempty"`
	// VaultName builds VaultURL from the cloud's suffix (or VaultSuffix)
	// when VaultURL is empty; ManagedHSM picks the Managed HSM suffix.
	VaultName   string `json:"vaultName,omitempty"`
	ManagedHSM  bool   `json:"managedHSM,omitempty"`
	VaultSuffix string `json:"vaultSuffix,omitempty"`
	// KeyName is the key. Required.
	KeyName string `json:"keyName,omitempty"`
	// KeyVersion pins a version; empty follows the newest enabled version.
	KeyVersion string `json:"keyVersion,omitempty"`
	// Cloud is AzurePublicCloud (default), AzureChinaCloud,
	// AzureUSGovernmentCloud or AzureStackCloud.
	Cloud string `json:"cloud,omitempty"`
	// AuthorityHost overrides the cloud's Entra ID authority host.
	AuthorityHost string `json:"authorityHost,omitempty"`
	// WrapInVault wraps new local KEKs with the vault's wrapkey instead of
	// locally with the RSA public key.
	WrapInVault bool `json:"wrapInVault,omitempty"`
	// DisableChallengeResourceVerification accepts a vault reached under a
	// custom domain.
	DisableChallengeResourceVerification bool `json:"disableChallengeResourceVerification,omitempty"`
	// Timeout bounds each call to the vault, retries included; zero means
	// the provider's default (8s).
	Timeout Duration `json:"timeout,omitzero"`
	// Credential says how to authenticate.
	Credential AzureCredentialConfig `json:"credential"`
}

// AzureCredentialConfig selects the identity the plugin uses with Entra ID.
type AzureCredentialConfig struct {
	// Type is managedIdentity, workloadIdentity, clientSecret,
	// clientCertificate or azureJSON.
	Type string `json:"type"`
	// TenantID and ClientID identify the app registration; for a
	// user-assigned managed identity ClientID is its client ID.
	TenantID string `json:"tenantID,omitempty"`
	ClientID string `json:"clientID,omitempty"`
	// ResourceID selects a user-assigned managed identity by resource ID.
	ResourceID string `json:"resourceID,omitempty"`
	// ClientSecretFile holds the client secret.
	ClientSecretFile string `json:"clientSecretFile,omitempty"`
	// CertificateFile holds a PEM or PKCS#12 certificate with its key;
	// CertificatePasswordFile the PKCS#12 password.
	CertificateFile         string `json:"certificateFile,omitempty"`
	CertificatePasswordFile string `json:"certificatePasswordFile,omitempty"`
	// FederatedTokenFile holds the workload identity token.
	FederatedTokenFile string `json:"federatedTokenFile,omitempty"`
	// AzureJSONFile is the cloud provider's azure.json
	// (default /etc/kubernetes/azure.json).
	AzureJSONFile string `json:"azureJSONFile,omitempty"`
}

// KEKConfig bounds local KEKs.
type KEKConfig struct {
	MaxAge    Duration `json:"maxAge"`
	MaxUses   uint64   `json:"maxUses"`
	CacheSize int      `json:"cacheSize"`
}

// LogConfig configures logging.
type LogConfig struct {
	// Format is "json" (default) or "console".
	Format string `json:"format"`
	// Level is debug, info (default), warn or error.
	Level string `json:"level"`
}

// Duration is a time.Duration written as "60s" or "5m" in YAML.
type Duration struct{ time.Duration }

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"60s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("invalid duration %q", s)
	}
	d.Duration = v
	return nil
}

// Default returns the configuration used with no file and no flags: the
// local provider, with the socket and keyset under the user's state
// directory, so that an unprivileged `kms-plugin serve` just works.
func Default() Config {
	dir := StateDir()
	return Config{
		Endpoint:             "unix://" + filepath.Join(dir, "socket.sock"),
		Provider:             ProviderLocal,
		Local:                LocalConfig{KeysetPath: filepath.Join(dir, "keyset.json")},
		HTTPAddr:             "127.0.0.1:8787",
		ProviderPollInterval: Duration{60 * time.Second},
		KEK:                  KEKConfig{MaxAge: Duration{7 * 24 * time.Hour}, MaxUses: 1 << 20, CacheSize: 10000},
		Log:                  LogConfig{Format: "json", Level: "info"},
		ShutdownTimeout:      Duration{10 * time.Second},
	}
}

// StateDir is the default directory for the socket and keyset:
// $KMS_PLUGIN_STATE_DIR, else $XDG_STATE_HOME/kms-plugin, else
// ~/.local/state/kms-plugin, else a directory under the system temp dir.
func StateDir() string {
	if d := os.Getenv("KMS_PLUGIN_STATE_DIR"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "kms-plugin")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "kms-plugin")
	}
	return filepath.Join(os.TempDir(), "kms-plugin")
}

// Load reads a YAML config file over the defaults. Unknown fields are errors.
func Load(path string) (Config, error) {
	cfg := Default()
	data, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	if err := Parse(data, &cfg); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// Parse decodes YAML data into cfg, keeping the fields data does not set.
func Parse(data []byte, cfg *Config) error {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return fmt.Errorf("parse YAML: %w", err)
	}
	if bytes.Equal(bytes.TrimSpace(js), []byte("null")) {
		return nil // empty file
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	return nil
}

// SocketPath returns the filesystem path of a unix:// endpoint.
func SocketPath(endpoint string) (string, error) {
	path, ok := strings.CutPrefix(endpoint, "unix://")
	if !ok {
		return "", fmt.Errorf("endpoint %q: must start with unix://", endpoint)
	}
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("endpoint %q: socket path must be absolute (unix:///path/to/socket.sock)", endpoint)
	}
	// sun_path is 108 bytes on Linux, including the terminating NUL.
	if len(path) > 107 {
		return "", fmt.Errorf("endpoint %q: socket path is %d bytes, more than the 107 a Unix socket allows", endpoint, len(path))
	}
	return filepath.Clean(path), nil
}

// Validate checks every field and returns one error per bad field, each
// naming the field.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if _, err := SocketPath(c.Endpoint); err != nil {
		bad("endpoint", "%v", err)
	}
	switch c.Provider {
	case ProviderLocal:
		if c.Local.KeysetPath == "" {
			bad("local.keysetPath", "required with provider local")
		} else if !filepath.IsAbs(c.Local.KeysetPath) {
			bad("local.keysetPath", "%q must be an absolute path", c.Local.KeysetPath)
		}
	case ProviderAzureKeyVault:
		c.Azure.validate(bad)
	case "":
		bad("provider", "required (one of: local, azurekeyvault)")
	default:
		bad("provider", "unknown provider %q (one of: local, azurekeyvault)", c.Provider)
	}
	if c.HTTPAddr != "" {
		if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
			bad("httpAddr", "%q is not HOST:PORT", c.HTTPAddr)
		}
	}
	if d := c.ProviderPollInterval.Duration; d < time.Second || d > 24*time.Hour {
		bad("providerPollInterval", "%s is outside 1s..24h", d)
	}
	if d := c.KEK.MaxAge.Duration; d < time.Minute {
		bad("kek.maxAge", "%s is less than 1m", d)
	}
	if c.KEK.MaxUses < 1 || c.KEK.MaxUses > 1<<32 {
		bad("kek.maxUses", "%d is outside 1..4294967296", c.KEK.MaxUses)
	}
	if c.KEK.CacheSize < 1 || c.KEK.CacheSize > 1_000_000 {
		bad("kek.cacheSize", "%d is outside 1..1000000", c.KEK.CacheSize)
	}
	switch c.Log.Format {
	case "json", "console":
	default:
		bad("log.format", "%q must be json or console", c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q must be debug, info, warn or error", c.Log.Level)
	}
	if d := c.ShutdownTimeout.Duration; d <= 0 || d > 10*time.Minute {
		bad("shutdownTimeout", "%s is outside (0, 10m]", d)
	}
	return errors.Join(errs...)
}

var (
	azureKeyNameRE   = regexp.MustCompile(`^[0-9a-zA-Z-]{1,127}$`)
	azureVersionRE   = regexp.MustCompile(`^[0-9a-zA-Z]{1,64}$`)
	azureVaultNameRE = regexp.MustCompile(`^[0-9a-zA-Z-]{3,24}$`)
)

// validate checks the azurekeyvault settings.
func (a AzureConfig) validate(bad func(field, format string, args ...any)) {
	switch {
	case a.VaultURL != "" && a.VaultName != "":
		bad("azure.vaultURL", "set vaultURL or vaultName, not both")
	case a.VaultURL != "":
		if u, err := url.Parse(a.VaultURL); err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") {
			bad("azure.vaultURL", "%q must be https://HOST with no path", a.VaultURL)
		}
	case a.VaultName != "":
		if !azureVaultNameRE.MatchString(a.VaultName) {
			bad("azure.vaultName", "%q must be 3-24 letters, digits and dashes", a.VaultName)
		}
		if strings.EqualFold(a.Cloud, "AzureStackCloud") && a.VaultSuffix == "" {
			bad("azure.vaultSuffix", "required with vaultName on AzureStackCloud (or set vaultURL)")
		}
	default:
		bad("azure.vaultURL", "required with provider azurekeyvault (or vaultName)")
	}
	if !azureKeyNameRE.MatchString(a.KeyName) {
		bad("azure.keyName", "%q must be 1-127 letters, digits and dashes", a.KeyName)
	}
	if a.KeyVersion != "" && !azureVersionRE.MatchString(a.KeyVersion) {
		bad("azure.keyVersion", "%q is not a key version ID", a.KeyVersion)
	}
	switch strings.ToLower(a.Cloud) {
	case "", "azurepubliccloud", "azurechinacloud", "azureusgovernmentcloud", "azurestackcloud":
	default:
		bad("azure.cloud", "unknown cloud %q (AzurePublicCloud, AzureChinaCloud, AzureUSGovernmentCloud or AzureStackCloud)", a.Cloud)
	}
	if a.AuthorityHost != "" {
		if u, err := url.Parse(a.AuthorityHost); err != nil || u.Scheme != "https" || u.Host == "" {
			bad("azure.authorityHost", "%q must be an https:// URL", a.AuthorityHost)
		}
	}
	if d := a.Timeout.Duration; d != 0 && (d < time.Second || d > 5*time.Minute) {
		bad("azure.timeout", "%s is outside 1s..5m", d)
	}
	cr := a.Credential
	file := func(field, path string, required bool) {
		switch {
		case path == "" && required:
			bad("azure.credential."+field, "required with credential type %s", cr.Type)
		case path != "" && !filepath.IsAbs(path):
			bad("azure.credential."+field, "%q must be an absolute path", path)
		}
	}
	need := func(field, v string) {
		if v == "" {
			bad("azure.credential."+field, "required with credential type %s", cr.Type)
		}
	}
	switch cr.Type {
	case "managedIdentity":
		if cr.ClientID != "" && cr.ResourceID != "" {
			bad("azure.credential.resourceID", "set clientID or resourceID, not both")
		}
	case "workloadIdentity":
		file("federatedTokenFile", cr.FederatedTokenFile, false)
	case "clientSecret":
		need("tenantID", cr.TenantID)
		need("clientID", cr.ClientID)
		file("clientSecretFile", cr.ClientSecretFile, true)
	case "clientCertificate":
		need("tenantID", cr.TenantID)
		need("clientID", cr.ClientID)
		file("certificateFile", cr.CertificateFile, true)
		file("certificatePasswordFile", cr.CertificatePasswordFile, false)
	case "azureJSON":
		file("azureJSONFile", cr.AzureJSONFile, false)
	case "":
		bad("azure.credential.type", "required (managedIdentity, workloadIdentity, clientSecret, clientCertificate or azureJSON)")
	default:
		bad("azure.credential.type", "unknown type %q (managedIdentity, workloadIdentity, clientSecret, clientCertificate or azureJSON)", cr.Type)
	}
}
