package azurekv

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/url"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Section is the config file's key of the azurekeyvault settings.
const Section = "azure"

// Registration describes the azurekeyvault provider to the provider
// registry.
func Registration() provider.Registration {
	return provider.Registration{
		Name:        Name,
		Section:     Section,
		Summary:     "a key in Azure Key Vault or Managed HSM",
		NewSettings: func() provider.Settings { return &Settings{} },
		Flags:       flags,
	}
}

// Settings are the azure section of the config file. Secrets are read from
// files named here, never given inline. The zero value is the defaults.
type Settings struct {
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
	Timeout config.Duration `json:"timeout,omitzero"`
	// Credential says how to authenticate.
	Credential CredentialSettings `json:"credential"`
}

// CredentialSettings select the identity the plugin uses with Entra ID.
type CredentialSettings struct {
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
	// (default DefaultAzureJSONPath).
	AzureJSONFile string `json:"azureJSONFile,omitempty"`
}

var (
	_ provider.Settings   = (*Settings)(nil)
	_ provider.Describer  = (*Settings)(nil)
	_ provider.Doctor     = (*Settings)(nil)
	_ provider.HostPather = (*Settings)(nil)
)

// flags registers the --azure-* flags. Secrets are only ever named by
// file.
func flags(fs *flag.FlagSet) func(provider.Settings) {
	s := map[string]*string{}
	str := func(name, usage string) { s[name] = fs.String(name, "", usage) }
	str("azure-vault-url", "azurekeyvault: vault URL, https://NAME.vault.azure.net or https://NAME.managedhsm.azure.net")
	str("azure-vault-name", "azurekeyvault: vault name, with the cloud's suffix (instead of --azure-vault-url)")
	str("azure-key-name", "azurekeyvault: key name")
	str("azure-key-version", "azurekeyvault: pin a key version (default: follow the newest enabled version)")
	str("azure-cloud", "azurekeyvault: AzurePublicCloud, AzureChinaCloud, AzureUSGovernmentCloud or AzureStackCloud")
	str("azure-authority-host", "azurekeyvault: Entra ID authority host for custom clouds")
	str("azure-credential", "azurekeyvault: managedIdentity, workloadIdentity, clientSecret, clientCertificate or azureJSON")
	str("azure-tenant-id", "azurekeyvault: Entra tenant ID")
	str("azure-client-id", "azurekeyvault: app client ID, or a user-assigned managed identity's client ID")
	str("azure-identity-resource-id", "azurekeyvault: user-assigned managed identity resource ID")
	str("azure-client-secret-file", "azurekeyvault: file holding the client secret")
	str("azure-client-certificate-file", "azurekeyvault: PEM or PFX file with the client certificate and key")
	str("azure-client-certificate-password-file", "azurekeyvault: file holding the PFX password")
	str("azure-federated-token-file", "azurekeyvault: workload identity token file")
	str("azure-json", "azurekeyvault: cloud provider azure.json file (default "+DefaultAzureJSONPath+")")
	wrapInVault := fs.Bool("azure-wrap-in-vault", false, "azurekeyvault: wrap new local KEKs in the vault instead of locally with the RSA public key")

	return func(settings provider.Settings) {
		a := settings.(*Settings)
		c := &a.Credential
		fields := map[string]*string{
			"azure-vault-url": &a.VaultURL, "azure-vault-name": &a.VaultName, "azure-key-name": &a.KeyName,
			"azure-key-version": &a.KeyVersion, "azure-cloud": &a.Cloud, "azure-authority-host": &a.AuthorityHost,
			"azure-credential": &c.Type, "azure-tenant-id": &c.TenantID, "azure-client-id": &c.ClientID,
			"azure-identity-resource-id": &c.ResourceID, "azure-client-secret-file": &c.ClientSecretFile,
			"azure-client-certificate-file": &c.CertificateFile, "azure-client-certificate-password-file": &c.CertificatePasswordFile,
			"azure-federated-token-file": &c.FederatedTokenFile, "azure-json": &c.AzureJSONFile,
		}
		fs.Visit(func(f *flag.Flag) {
			if dst, ok := fields[f.Name]; ok {
				*dst = *s[f.Name]
			}
			if f.Name == "azure-wrap-in-vault" {
				a.WrapInVault = *wrapInVault
			}
		})
	}
}

// vaultNameRE is a vault's name; keyNameRE and versionIDRE (in azurekv.go)
// check the key's.
var vaultNameRE = regexp.MustCompile(`^[0-9a-zA-Z-]{3,24}$`)

// Validate implements provider.Settings.
func (a *Settings) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", Section, field, fmt.Sprintf(format, args...)))
	}
	switch {
	case a.VaultURL != "" && a.VaultName != "":
		bad("vaultURL", "set vaultURL or vaultName, not both")
	case a.VaultURL != "":
		if u, err := url.Parse(a.VaultURL); err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") {
			bad("vaultURL", "%q must be https://HOST with no path", a.VaultURL)
		}
	case a.VaultName != "":
		if !vaultNameRE.MatchString(a.VaultName) {
			bad("vaultName", "%q must be 3-24 letters, digits and dashes", a.VaultName)
		}
		if strings.EqualFold(a.Cloud, CloudStack) && a.VaultSuffix == "" {
			bad("vaultSuffix", "required with vaultName on AzureStackCloud (or set vaultURL)")
		}
	default:
		bad("vaultURL", "required with provider %s (or vaultName)", Name)
	}
	if !keyNameRE.MatchString(a.KeyName) {
		bad("keyName", "%q must be 1-127 letters, digits and dashes", a.KeyName)
	}
	if a.KeyVersion != "" && !versionIDRE.MatchString(a.KeyVersion) {
		bad("keyVersion", "%q is not a key version ID", a.KeyVersion)
	}
	switch strings.ToLower(a.Cloud) {
	case "", "azurepubliccloud", "azurechinacloud", "azureusgovernmentcloud", "azurestackcloud":
	default:
		bad("cloud", "unknown cloud %q (AzurePublicCloud, AzureChinaCloud, AzureUSGovernmentCloud or AzureStackCloud)", a.Cloud)
	}
	if a.AuthorityHost != "" {
		if u, err := url.Parse(a.AuthorityHost); err != nil || u.Scheme != "https" || u.Host == "" {
			bad("authorityHost", "%q must be an https:// URL", a.AuthorityHost)
		}
	}
	if d := a.Timeout.Duration; d != 0 && (d < time.Second || d > 5*time.Minute) {
		bad("timeout", "%s is outside 1s..5m", d)
	}
	cr := a.Credential
	file := func(field, path string, required bool) {
		switch {
		case path == "" && required:
			bad("credential."+field, "required with credential type %s", cr.Type)
		case path != "" && !filepath.IsAbs(path):
			bad("credential."+field, "%q must be an absolute path", path)
		}
	}
	need := func(field, v string) {
		if v == "" {
			bad("credential."+field, "required with credential type %s", cr.Type)
		}
	}
	switch cr.Type {
	case CredentialManagedIdentity:
		if cr.ClientID != "" && cr.ResourceID != "" {
			bad("credential.resourceID", "set clientID or resourceID, not both")
		}
	case CredentialWorkloadIdentity:
		file("federatedTokenFile", cr.FederatedTokenFile, false)
	case CredentialClientSecret:
		need("tenantID", cr.TenantID)
		need("clientID", cr.ClientID)
		file("clientSecretFile", cr.ClientSecretFile, true)
	case CredentialClientCertificate:
		need("tenantID", cr.TenantID)
		need("clientID", cr.ClientID)
		file("certificateFile", cr.CertificateFile, true)
		file("certificatePasswordFile", cr.CertificatePasswordFile, false)
	case CredentialAzureJSON:
		file("azureJSONFile", cr.AzureJSONFile, false)
	case "":
		bad("credential.type", "required (managedIdentity, workloadIdentity, clientSecret, clientCertificate or azureJSON)")
	default:
		bad("credential.type", "unknown type %q (managedIdentity, workloadIdentity, clientSecret, clientCertificate or azureJSON)", cr.Type)
	}
	return errors.Join(errs...)
}

// vaultURL returns the configured vault URL, building it from the vault
// name and the cloud's suffix when needed.
func (a *Settings) vaultURL() (string, error) {
	if a.VaultURL != "" {
		return a.VaultURL, nil
	}
	suffix := a.VaultSuffix
	if suffix == "" {
		var err error
		if suffix, err = VaultSuffix(a.Cloud, a.ManagedHSM); err != nil {
			return "", err
		}
	}
	return "https://" + a.VaultName + "." + strings.TrimPrefix(suffix, "."), nil
}

// Open implements provider.Settings. It makes no network call; o.Create
// does not apply (the key must exist in the vault).
func (a *Settings) Open(_ context.Context, o provider.OpenOptions) (provider.Provider, error) {
	p, _, err := a.open(o)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// open builds the provider and returns it with a description of its
// credential.
func (a *Settings) open(o provider.OpenOptions) (*Provider, string, error) {
	vaultURL, err := a.vaultURL()
	if err != nil {
		return nil, "", err
	}
	var transport policy.Transporter
	if o.Transport != nil {
		transport = o.Transport
	}
	cred, desc, err := NewCredential(CredentialConfig{
		Kind:                    a.Credential.Type,
		TenantID:                a.Credential.TenantID,
		ClientID:                a.Credential.ClientID,
		ResourceID:              a.Credential.ResourceID,
		ClientSecretFile:        a.Credential.ClientSecretFile,
		CertificateFile:         a.Credential.CertificateFile,
		CertificatePasswordFile: a.Credential.CertificatePasswordFile,
		FederatedTokenFile:      a.Credential.FederatedTokenFile,
		AzureJSONFile:           a.Credential.AzureJSONFile,
		Cloud:                   a.Cloud,
		AuthorityHost:           a.AuthorityHost,
		Transport:               transport,
	})
	if err != nil {
		return nil, "", err
	}
	p, err := New(Config{
		VaultURL:                             vaultURL,
		KeyName:                              a.KeyName,
		KeyVersion:                           a.KeyVersion,
		Credential:                           cred,
		WrapInVault:                          a.WrapInVault,
		DisableChallengeResourceVerification: a.DisableChallengeResourceVerification,
		Timeout:                              a.Timeout.Duration,
		Transport:                            transport,
	})
	if err != nil {
		return nil, "", err
	}
	return p, desc, nil
}

// Describe implements provider.Describer: the vault and the key.
func (a *Settings) Describe() string {
	u, err := a.vaultURL()
	if err != nil {
		u = "(" + err.Error() + ")"
	}
	s := fmt.Sprintf("vault %s, key %s", u, a.KeyName)
	if a.KeyVersion != "" {
		s += " (pinned version " + a.KeyVersion + ")"
	}
	return s
}

// HostPaths implements provider.HostPather: the credential files, read
// only, including the default azure.json of the azureJSON credential.
func (a *Settings) HostPaths() provider.HostPaths {
	cred := a.Credential
	var files []string
	for _, f := range []string{cred.ClientSecretFile, cred.CertificateFile, cred.CertificatePasswordFile, cred.FederatedTokenFile, cred.AzureJSONFile} {
		if f != "" {
			files = append(files, f)
		}
	}
	if cred.Type == CredentialAzureJSON && cred.AzureJSONFile == "" {
		files = append(files, DefaultAzureJSONPath)
	}
	var hp provider.HostPaths
	for n, f := range files {
		hp.Read = append(hp.Read, provider.HostPath{Name: "credential-" + strconv.Itoa(n), Path: f})
	}
	return hp
}
