package main

import (
	"flag"
	"fmt"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv"
)

// azureFlags registers the azurekeyvault flags on fs and returns a function
// that applies the ones set to a Config. Secrets are only ever named by
// file.
func azureFlags(fs *flag.FlagSet) func(*config.Config) {
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
	str("azure-json", "azurekeyvault: cloud provider azure.json file (default "+azurekv.DefaultAzureJSONPath+")")
	wrapInVault := fs.Bool("azure-wrap-in-vault", false, "azurekeyvault: wrap new local KEKs in the vault instead of locally with the RSA public key")

	return func(cfg *config.Config) {
		a, c := &cfg.Azure, &cfg.Azure.Credential
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

// azureVaultURL returns the configured vault URL, building it from the vault
// name and the cloud's suffix when needed.
func azureVaultURL(a config.AzureConfig) (string, error) {
	if a.VaultURL != "" {
		return a.VaultURL, nil
	}
	suffix := a.VaultSuffix
	if suffix == "" {
		var err error
		if suffix, err = azurekv.VaultSuffix(a.Cloud, a.ManagedHSM); err != nil {
			return "", err
		}
	}
	return "https://" + a.VaultName + "." + strings.TrimPrefix(suffix, "."), nil
}

// newAzureProvider builds the azurekeyvault provider and returns it with a
// description of its credential. transport is nil except in tests.
func newAzureProvider(a config.AzureConfig, transport policy.Transporter) (*azurekv.Provider, string, error) {
	vaultURL, err := azureVaultURL(a)
	if err != nil {
		return nil, "", err
	}
	cred, desc, err := azurekv.NewCredential(azurekv.CredentialConfig{
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
	p, err := azurekv.New(azurekv.Config{
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

// describeAzure is a one-line summary of the azurekeyvault settings.
func describeAzure(a config.AzureConfig) string {
	u, err := azureVaultURL(a)
	if err != nil {
		u = "(" + err.Error() + ")"
	}
	s := fmt.Sprintf("vault %s, key %s", u, a.KeyName)
	if a.KeyVersion != "" {
		s += " (pinned version " + a.KeyVersion + ")"
	}
	return s
}
