package azurekv

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
)

// Credential kinds.
const (
	// CredentialManagedIdentity is the VM's managed identity from IMDS:
	// system-assigned, or user-assigned by ClientID or ResourceID.
	CredentialManagedIdentity = "managedIdentity"
	// CredentialWorkloadIdentity exchanges a federated (service account)
	// token read from FederatedTokenFile for an app's access token.
	CredentialWorkloadIdentity = "workloadIdentity"
	// CredentialClientSecret is an app registration's secret, read from
	// ClientSecretFile.
	CredentialClientSecret = "clientSecret"
	// CredentialClientCertificate is an app registration's certificate and
	// private key, in a PEM or PKCS#12 (PFX) file.
	CredentialClientCertificate = "clientCertificate"
	// CredentialAzureJSON reads the Azure cloud provider's azure.json, as
	// written on kubeadm and Cluster API Azure nodes.
	CredentialAzureJSON = "azureJSON"
)

// DefaultAzureJSONPath is where kubeadm and Cluster API Azure nodes keep the
// cloud provider configuration.
const DefaultAzureJSONPath = "/etc/kubernetes/azure.json"

// Cloud names, as in azure.json's "cloud" field.
const (
	CloudPublic       = "AzurePublicCloud"
	CloudChina        = "AzureChinaCloud"
	CloudUSGovernment = "AzureUSGovernmentCloud"
	// CloudStack reads the authority from the file named by
	// AZURE_ENVIRONMENT_FILEPATH, as the cloud provider does.
	CloudStack = "AzureStackCloud"
)

// cloudInfo is what this package needs to know about a cloud.
type cloudInfo struct {
	authority   string
	vaultSuffix string
	hsmSuffix   string
}

var knownClouds = map[string]cloudInfo{
	"azurepubliccloud":       {cloud.AzurePublic.ActiveDirectoryAuthorityHost, "vault.azure.net", "managedhsm.azure.net"},
	"azurechinacloud":        {cloud.AzureChina.ActiveDirectoryAuthorityHost, "vault.azure.cn", "managedhsm.azure.cn"},
	"azureusgovernmentcloud": {cloud.AzureGovernment.ActiveDirectoryAuthorityHost, "vault.usgovcloudapi.net", "managedhsm.usgovcloudapi.net"},
}

// VaultSuffix returns the DNS suffix of vaults (or, with hsm, of Managed
// HSMs) in the named cloud: "vault.azure.net" for AzurePublicCloud (and "").
func VaultSuffix(cloudName string, hsm bool) (string, error) {
	if cloudName == "" {
		cloudName = CloudPublic
	}
	c, ok := knownClouds[strings.ToLower(cloudName)]
	if !ok {
		return "", fmt.Errorf("azurekv: unknown cloud %q (one of %s, %s, %s; for other clouds set the vault URL)", cloudName, CloudPublic, CloudChina, CloudUSGovernment)
	}
	if hsm {
		return c.hsmSuffix, nil
	}
	return c.vaultSuffix, nil
}

// CredentialConfig says how to authenticate to Entra ID. Secrets are read
// from files, never given inline. Every file holding a secret (the client
// secret, the certificate and its password, the federated token, an
// azure.json holding a secret) must be readable by its owner only (mode
// 0600 or 0400) and owned by the plugin's user or root. The client secret
// and certificate files are read again at the first token request after
// they change, so rotating them needs no restart.
type CredentialConfig struct {
	// Kind is one of the Credential* constants. Required.
	Kind string
	// TenantID is the Entra tenant (directory) ID. Workload identity
	// defaults to $AZURE_TENANT_ID; secret and certificate need it.
	TenantID string
	// ClientID is the application (client) ID, or for managed identity the
	// client ID of a user-assigned identity. Workload identity defaults to
	// $AZURE_CLIENT_ID.
	ClientID string
	// ResourceID selects a user-assigned managed identity by its ARM
	// resource ID instead of ClientID.
	ResourceID string
	// ClientSecretFile holds the client secret.
	ClientSecretFile string
	// CertificateFile holds the certificate and its private key, PEM or
	// PKCS#12; CertificatePasswordFile the PKCS#12 password, if any.
	CertificateFile         string
	CertificatePasswordFile string
	// FederatedTokenFile holds the federated token. Default
	// $AZURE_FEDERATED_TOKEN_FILE.
	FederatedTokenFile string
	// AzureJSONFile is the cloud provider file. Default
	// DefaultAzureJSONPath.
	AzureJSONFile string
	// Cloud is AzurePublicCloud (default), AzureChinaCloud or
	// AzureUSGovernmentCloud; it picks the authority host.
	Cloud string
	// AuthorityHost overrides the cloud's Entra authority host, for custom
	// clouds (https://login.example/ or an ADFS host).
	AuthorityHost string
	// Transport carries every request; nil uses azcore's default HTTP
	// client (which honours HTTPS_PROXY, HTTP_PROXY and NO_PROXY).
	Transport policy.Transporter
	// Retry configures retries of token requests; zero values are azcore's
	// defaults. The provider's Timeout bounds every call anyway.
	Retry policy.RetryOptions
	// LookupEnv reads the environment. Default os.LookupEnv.
	LookupEnv func(string) (string, bool)
}

// NewCredential builds the credential cfg describes. It makes no network
// call. The returned description names the identity for logs and kms-plugin
// doctor; it holds no secret.
func NewCredential(cfg CredentialConfig) (azcore.TokenCredential, string, error) {
	if cfg.LookupEnv == nil {
		cfg.LookupEnv = os.LookupEnv
	}
	if cfg.Kind == CredentialManagedIdentity {
		// IMDS needs no authority host.
		return managedIdentity(azcore.ClientOptions{Transport: cfg.Transport, Retry: cfg.Retry}, cfg.ClientID, cfg.ResourceID)
	}
	authority, custom, err := resolveAuthority(cfg.AuthorityHost, cfg.Cloud, "", cfg.LookupEnv)
	if err != nil {
		return nil, "", err
	}
	opts := azcore.ClientOptions{Transport: cfg.Transport, Retry: cfg.Retry}
	if authority != "" {
		opts.Cloud = cloud.Configuration{ActiveDirectoryAuthorityHost: authority}
	}
	switch cfg.Kind {
	case CredentialWorkloadIdentity:
		return workloadIdentity(opts, custom, cfg.TenantID, cfg.ClientID, cfg.FederatedTokenFile, cfg.LookupEnv)
	case CredentialClientSecret:
		if cfg.ClientSecretFile == "" {
			return nil, "", errors.New("azurekv: client secret credential needs a secret file")
		}
		files := []credentialFile{{cfg.ClientSecretFile, "client secret"}}
		return newReloadingCredential(files, func(c [][]byte) (azcore.TokenCredential, string, error) {
			secret, err := secretText(cfg.ClientSecretFile, "client secret", c[0])
			if err != nil {
				return nil, "", err
			}
			return clientSecret(opts, custom, cfg.TenantID, cfg.ClientID, secret)
		})
	case CredentialClientCertificate:
		if cfg.CertificateFile == "" {
			return nil, "", errors.New("azurekv: client certificate credential needs a certificate file")
		}
		files := []credentialFile{{cfg.CertificateFile, "client certificate"}}
		if cfg.CertificatePasswordFile != "" {
			files = append(files, credentialFile{cfg.CertificatePasswordFile, "certificate password"})
		}
		return newReloadingCredential(files, func(c [][]byte) (azcore.TokenCredential, string, error) {
			var password string
			if len(c) > 1 {
				var err error
				if password, err = secretText(cfg.CertificatePasswordFile, "certificate password", c[1]); err != nil {
					return nil, "", err
				}
			}
			return clientCertificate(opts, custom, cfg.TenantID, cfg.ClientID, cfg.CertificateFile, c[0], password)
		})
	case CredentialAzureJSON:
		return fromAzureJSON(cfg)
	case "":
		return nil, "", fmt.Errorf("azurekv: no credential kind (one of %s)", strings.Join(CredentialKinds(), ", "))
	default:
		return nil, "", fmt.Errorf("azurekv: unknown credential kind %q (one of %s)", cfg.Kind, strings.Join(CredentialKinds(), ", "))
	}
}

// CredentialKinds lists the valid CredentialConfig.Kind values.
func CredentialKinds() []string {
	return []string{CredentialManagedIdentity, CredentialWorkloadIdentity, CredentialClientSecret, CredentialClientCertificate, CredentialAzureJSON}
}

// resolveAuthority picks the authority host: explicit host, else the named
// cloud, else fallbackCloud (from azure.json), else "" (azidentity then uses
// $AZURE_AUTHORITY_HOST or the public cloud). custom reports a host outside
// the known clouds, where Entra instance discovery must be skipped.
func resolveAuthority(host, cloudName, fallbackCloud string, env func(string) (string, bool)) (string, bool, error) {
	if host == "" {
		name := cloudName
		if name == "" {
			name = fallbackCloud
		}
		switch {
		case strings.EqualFold(name, CloudStack):
			var err error
			if host, err = stackAuthority(env); err != nil {
				return "", false, err
			}
		case name != "":
			c, ok := knownClouds[strings.ToLower(name)]
			if !ok {
				return "", false, fmt.Errorf("azurekv: unknown cloud %q (one of %s, %s, %s, %s; or set the authority host)", name, CloudPublic, CloudChina, CloudUSGovernment, CloudStack)
			}
			return c.authority, false, nil
		}
	}
	if host == "" {
		return "", false, nil
	}
	u, err := url.Parse(host)
	if err != nil || u.Scheme != "https" || u.Host == "" {
		return "", false, fmt.Errorf("azurekv: authority host %q must be an https:// URL", host)
	}
	if !strings.HasSuffix(host, "/") {
		host += "/"
	}
	for _, c := range knownClouds {
		if strings.EqualFold(c.authority, host) {
			return host, false, nil
		}
	}
	return host, true, nil
}

// stackAuthority reads the authority host of an Azure Stack Hub cloud from
// the environment file the cloud provider uses.
func stackAuthority(env func(string) (string, bool)) (string, error) {
	path, ok := env("AZURE_ENVIRONMENT_FILEPATH")
	if !ok || path == "" {
		return "", errors.New("azurekv: cloud AzureStackCloud needs AZURE_ENVIRONMENT_FILEPATH (or set the authority host)")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("azurekv: read Azure Stack environment: %w", err)
	}
	var v struct {
		ActiveDirectoryEndpoint string `json:"activeDirectoryEndpoint"`
	}
	if err := json.Unmarshal(data, &v); err != nil || v.ActiveDirectoryEndpoint == "" {
		return "", fmt.Errorf("azurekv: Azure Stack environment %s has no activeDirectoryEndpoint", path)
	}
	return v.ActiveDirectoryEndpoint, nil
}

func managedIdentity(opts azcore.ClientOptions, clientID, resourceID string) (azcore.TokenCredential, string, error) {
	o := &azidentity.ManagedIdentityCredentialOptions{ClientOptions: opts}
	desc := "managed identity (system-assigned)"
	switch {
	case clientID != "" && resourceID != "":
		return nil, "", errors.New("azurekv: managed identity: set client ID or resource ID, not both")
	case clientID != "":
		o.ID = azidentity.ClientID(clientID)
		desc = "managed identity (user-assigned, client ID " + clientID + ")"
	case resourceID != "":
		o.ID = azidentity.ResourceID(resourceID)
		desc = "managed identity (user-assigned, resource ID " + resourceID + ")"
	}
	c, err := azidentity.NewManagedIdentityCredential(o)
	if err != nil {
		return nil, "", fmt.Errorf("azurekv: managed identity: %w", err)
	}
	return c, desc, nil
}

func workloadIdentity(opts azcore.ClientOptions, custom bool, tenantID, clientID, tokenFile string, env func(string) (string, bool)) (azcore.TokenCredential, string, error) {
	if tenantID == "" {
		tenantID, _ = env("AZURE_TENANT_ID")
	}
	if clientID == "" {
		clientID, _ = env("AZURE_CLIENT_ID")
	}
	if tokenFile == "" {
		tokenFile, _ = env("AZURE_FEDERATED_TOKEN_FILE")
	}
	if tenantID == "" || clientID == "" || tokenFile == "" {
		return nil, "", errors.New("azurekv: workload identity needs a tenant ID, a client ID and a federated token file (or AZURE_TENANT_ID, AZURE_CLIENT_ID, AZURE_FEDERATED_TOKEN_FILE)")
	}
	// azidentity reads the token file at each token request; check it once
	// here, where a mistake is easy to report.
	if err := checkCredentialFile(tokenFile, "federated token"); err != nil {
		return nil, "", err
	}
	c, err := azidentity.NewWorkloadIdentityCredential(&azidentity.WorkloadIdentityCredentialOptions{
		ClientOptions: opts, TenantID: tenantID, ClientID: clientID, TokenFilePath: tokenFile,
		DisableInstanceDiscovery: custom,
	})
	if err != nil {
		return nil, "", fmt.Errorf("azurekv: workload identity: %w", err)
	}
	return c, fmt.Sprintf("workload identity (tenant %s, client ID %s, token file %s)", tenantID, clientID, tokenFile), nil
}

func clientSecret(opts azcore.ClientOptions, custom bool, tenantID, clientID, secret string) (azcore.TokenCredential, string, error) {
	if tenantID == "" || clientID == "" {
		return nil, "", errors.New("azurekv: client secret credential needs a tenant ID and a client ID")
	}
	c, err := azidentity.NewClientSecretCredential(tenantID, clientID, secret, &azidentity.ClientSecretCredentialOptions{
		ClientOptions: opts, DisableInstanceDiscovery: custom || strings.EqualFold(tenantID, "adfs"),
	})
	if err != nil {
		return nil, "", fmt.Errorf("azurekv: client secret credential: %w", err)
	}
	return c, fmt.Sprintf("client secret (tenant %s, client ID %s)", tenantID, clientID), nil
}

// clientCertificate builds a certificate credential from data, the content
// of file.
func clientCertificate(opts azcore.ClientOptions, custom bool, tenantID, clientID, file string, data []byte, password string) (azcore.TokenCredential, string, error) {
	if tenantID == "" || clientID == "" {
		return nil, "", errors.New("azurekv: client certificate credential needs a tenant ID and a client ID")
	}
	certs, key, err := azidentity.ParseCertificates(data, []byte(password))
	if err != nil {
		// The parser's message never includes the password.
		return nil, "", fmt.Errorf("azurekv: client certificate %s: %w", file, err)
	}
	c, err := azidentity.NewClientCertificateCredential(tenantID, clientID, certs, key, &azidentity.ClientCertificateCredentialOptions{
		ClientOptions: opts, DisableInstanceDiscovery: custom || strings.EqualFold(tenantID, "adfs"),
	})
	if err != nil {
		return nil, "", fmt.Errorf("azurekv: client certificate credential: %w", err)
	}
	return c, fmt.Sprintf("client certificate (tenant %s, client ID %s, subject %q)", tenantID, clientID, certs[0].Subject.CommonName), nil
}

// azureJSON holds the fields of the cloud provider's azure.json that select
// a credential.
type azureJSON struct {
	Cloud                                 string `json:"cloud"`
	TenantID                              string `json:"tenantId"`
	IdentitySystem                        string `json:"identitySystem"`
	AADClientID                           string `json:"aadClientId"`
	AADClientSecret                       string `json:"aadClientSecret"`
	AADClientCertPath                     string `json:"aadClientCertPath"`
	AADClientCertPassword                 string `json:"aadClientCertPassword"`
	UseManagedIdentityExtension           bool   `json:"useManagedIdentityExtension"`
	UserAssignedIdentityID                string `json:"userAssignedIdentityID"`
	UseFederatedWorkloadIdentityExtension bool   `json:"useFederatedWorkloadIdentityExtension"`
	UseWorkloadIdentityExtension          bool   `json:"useWorkloadIdentityExtension"`
	AADFederatedTokenFile                 string `json:"aadFederatedTokenFile"`
}

// fromAzureJSON builds the credential the Azure cloud provider would use
// from the same file, with the same precedence: AZURE_TENANT_ID,
// AZURE_CLIENT_ID and AZURE_FEDERATED_TOKEN_FILE override the file (the last
// turns workload identity on); then workload identity, managed identity,
// client secret, client certificate (PKCS#12 with password).
func fromAzureJSON(cfg CredentialConfig) (azcore.TokenCredential, string, error) {
	path := cfg.AzureJSONFile
	if path == "" {
		path = DefaultAzureJSONPath
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, "", fmt.Errorf("azurekv: read cloud provider config: %w", err)
	}
	fi, err := f.Stat()
	var data []byte
	if err == nil {
		data, err = io.ReadAll(io.LimitReader(f, maxCredentialFileSize))
	}
	f.Close()
	if err != nil {
		return nil, "", fmt.Errorf("azurekv: read cloud provider config: %w", err)
	}
	var aj azureJSON
	if err := json.Unmarshal(data, &aj); err != nil {
		// json's message quotes no field values.
		return nil, "", fmt.Errorf("azurekv: parse %s: %w", path, err)
	}
	if aj.AADClientSecret != "" || aj.AADClientCertPassword != "" {
		// The file holds a secret: it must be as private as a secret file.
		if err := checkSecretFile(path, "cloud provider config", fi); err != nil {
			return nil, "", fileErrorText(err)
		}
	}
	if v, ok := cfg.LookupEnv("AZURE_TENANT_ID"); ok && v != "" {
		aj.TenantID = v
	}
	if v, ok := cfg.LookupEnv("AZURE_CLIENT_ID"); ok && v != "" {
		aj.AADClientID = v
	}
	if v, ok := cfg.LookupEnv("AZURE_FEDERATED_TOKEN_FILE"); ok && v != "" {
		aj.AADFederatedTokenFile = v
		aj.UseFederatedWorkloadIdentityExtension = true
	}
	tenant := aj.TenantID
	if strings.EqualFold(aj.IdentitySystem, "adfs") {
		tenant = "adfs"
	}
	authority, custom, err := resolveAuthority(cfg.AuthorityHost, cfg.Cloud, aj.Cloud, cfg.LookupEnv)
	if err != nil {
		return nil, "", err
	}
	opts := azcore.ClientOptions{Transport: cfg.Transport, Retry: cfg.Retry}
	if authority != "" {
		opts.Cloud = cloud.Configuration{ActiveDirectoryAuthorityHost: authority}
	}
	var (
		cred azcore.TokenCredential
		desc string
	)
	switch {
	case aj.UseFederatedWorkloadIdentityExtension || aj.UseWorkloadIdentityExtension:
		cred, desc, err = workloadIdentity(opts, custom, tenant, aj.AADClientID, aj.AADFederatedTokenFile, func(string) (string, bool) { return "", false })
	case aj.UseManagedIdentityExtension:
		id := aj.UserAssignedIdentityID
		if strings.Contains(strings.ToLower(id), "/subscriptions/") {
			cred, desc, err = managedIdentity(opts, "", id)
		} else {
			cred, desc, err = managedIdentity(opts, id, "")
		}
	case aj.AADClientSecret != "":
		cred, desc, err = clientSecret(opts, custom, tenant, aj.AADClientID, aj.AADClientSecret)
	case aj.AADClientCertPath != "" && aj.AADClientCertPassword != "":
		files := []credentialFile{{aj.AADClientCertPath, "client certificate"}}
		cred, desc, err = newReloadingCredential(files, func(c [][]byte) (azcore.TokenCredential, string, error) {
			return clientCertificate(opts, custom, tenant, aj.AADClientID, aj.AADClientCertPath, c[0], aj.AADClientCertPassword)
		})
	default:
		return nil, "", fmt.Errorf("azurekv: %s sets no credential (useManagedIdentityExtension, aadClientSecret, aadClientCertPath with aadClientCertPassword, or useFederatedWorkloadIdentityExtension)", path)
	}
	if err != nil {
		return nil, "", err
	}
	return cred, desc + " from " + path, nil
}
