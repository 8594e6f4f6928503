package azurekv

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Remedy returns a concrete fix, in one or two sentences, for an error
// returned by this package, or "" when it has none. kms-plugin doctor prints
// it under each failed check.
func Remedy(err error) string {
	switch {
	case err == nil:
		return ""
	case errors.Is(err, errCircuitOpen):
		return "the vault failed several calls in a row, so calls are paused for a while; fix the cause shown in the earlier errors (network path, vault outage, throttling)"
	case strings.Contains(err.Error(), "doesn't match the requested domain"):
		return "the vault's authentication challenge names another domain than vaultURL: use the vault's own URL (https://NAME.vault.azure.net), or set azure.disableChallengeResourceVerification for a custom domain you trust"
	case strings.Contains(err.Error(), "AdditionallyAllowedTenants"):
		return "the vault belongs to another tenant than the credential: set azure.credential.tenantID to the vault's tenant (kms-plugin doctor prints it), or use a vault of the credential's tenant"
	}
	var e *Error
	if !errors.As(err, &e) {
		return ""
	}
	vault := e.Vault
	name, _, _ := strings.Cut(vault, ".")
	switch {
	case e.Op == opToken.name:
		return tokenRemedy(e)
	case e.Status == http.StatusUnauthorized:
		return "the vault rejected the access token: the credential's tenant is probably not the vault's tenant (the vault names its tenant in its challenge); set azure.credential.tenantID to the vault's tenant, or use an identity of that tenant"
	case e.InnerCode == "ForbiddenByFirewall" || e.InnerCode == "ForbiddenByConnection":
		return "the vault's firewall refuses this node's address: add the node's subnet or public IP to the vault's network rules, or reach it through a private endpoint"
	case errors.Is(e.Kind, provider.ErrPermissionDenied) && e.Permission != "":
		if e.HSM {
			return fmt.Sprintf("grant the identity the Managed HSM local role \"Managed HSM Crypto Service Encryption User\" (or \"Managed HSM Crypto User\") on the key: az keyvault role assignment create --hsm-name %s --role \"Managed HSM Crypto User\" --assignee OBJECT_ID --scope /keys/KEY (missing: %s)", name, e.RBACAction)
		}
		return fmt.Sprintf("grant the identity %s: with Azure RBAC, the role \"Key Vault Crypto Service Encryption User\" (read, wrap, unwrap) or \"Key Vault Crypto User\" on the key or vault (az role assignment create --role \"Key Vault Crypto Service Encryption User\" --assignee OBJECT_ID --scope VAULT_RESOURCE_ID/keys/KEY); with access policies, key permissions get, wrapKey, unwrapKey (az keyvault set-policy --name %s --object-id OBJECT_ID --key-permissions get wrapKey unwrapKey)",
			e.Permission, name)
	case errors.Is(e.Kind, provider.ErrKeyDisabled):
		return fmt.Sprintf("the key version is disabled or expired: enable it (az keyvault key set-attributes --vault-name %s --name KEY --version VERSION --enabled true) or create a new version (az keyvault key rotate --vault-name %s --name KEY); versions that still wrap stored data must stay enabled", name, name)
	case errors.Is(e.Kind, provider.ErrKeyNotFound) && e.Op != opUnwrap.name:
		return fmt.Sprintf("no such key in %s: check azure.keyName and azure.vaultURL (az keyvault key list --vault-name %s); a Managed HSM URL is https://NAME.managedhsm.azure.net", vault, name)
	case errors.Is(e.Kind, provider.ErrKeyNotFound):
		return "the key version that wrapped this data no longer exists (or belongs to another vault): recover the deleted key (az keyvault key recover) or point the plugin at the vault that holds it"
	case errors.Is(e.Kind, provider.ErrUnavailable):
		return networkRemedy(e)
	}
	return ""
}

func networkRemedy(e *Error) string {
	m := e.Message
	switch {
	case strings.HasPrefix(m, "cannot resolve"):
		return fmt.Sprintf("DNS cannot resolve %s: check the spelling of azure.vaultURL; with a private endpoint, the privatelink.vaultcore.azure.net (or privatelink.managedhsm.azure.net) zone must be linked to the node's network", e.Vault)
	case strings.HasPrefix(m, "TLS certificate"):
		return "the vault's TLS certificate is not trusted: a TLS-inspecting proxy needs its CA in the node's trust store (or SSL_CERT_FILE); for Azure Stack Hub add the stamp's root CA"
	case e.Status == http.StatusTooManyRequests:
		return "the vault is throttling this identity: the plugin needs about one call a minute per node, so look for other clients of the same vault, or raise the poll interval"
	case e.Status >= 500:
		return "the vault answered with a server error: check Azure Service Health for Key Vault in the vault's region; the plugin keeps serving from its cached keys meanwhile"
	}
	host, port := e.Vault, "443"
	if h, p, err := net.SplitHostPort(e.Vault); err == nil {
		host, port = h, p
	}
	return fmt.Sprintf("cannot reach %s over HTTPS (port %s): check the network path (NSG, firewall, route), and HTTPS_PROXY / NO_PROXY if a proxy is required", host, port)
}

func tokenRemedy(e *Error) string {
	code, _ := strconv.Atoi(strings.TrimPrefix(e.InnerCode, "AADSTS"))
	var fe *fileError
	switch {
	case errors.As(e.Err, &fe):
		return fe.fix
	case code == 7000215:
		return "the client secret is wrong or expired: create a new secret for the app registration and write its value (not its ID) to the secret file"
	case code == 700016:
		return "the client ID is not an application of this tenant: check azure.credential.clientID and tenantID (and the cloud)"
	case code == 90002:
		return "the tenant does not exist in this cloud: check azure.credential.tenantID and azure.cloud / authorityHost"
	case code == 700024:
		return "Entra ID judged the client assertion's time range invalid: this node's clock is off; synchronize it (chronyc tracking, timedatectl)"
	case code == 70021:
		return "no federated identity credential matches the token: add one to the app or managed identity with the token's issuer and subject (system:serviceaccount:NAMESPACE:NAME) and audience api://AzureADTokenExchange"
	case code == 700027:
		return "the certificate is not registered on the app registration, or the key does not match it: upload the certificate's public part to the app registration"
	case strings.Contains(e.Message, "Identity not found"):
		return "the managed identity is not assigned to this VM, or its client/resource ID is wrong: assign it (az vm identity assign --identities RESOURCE_ID) and check azure.credential.clientID / resourceID"
	case errors.Is(e.Kind, provider.ErrUnavailable):
		return "the identity endpoint did not answer: for managed identity, IMDS (169.254.169.254) must be reachable and bypass any proxy (NO_PROXY=169.254.169.254); otherwise check the path to the authority host"
	}
	return "the identity provider refused the credential: check the credential settings shown above"
}
