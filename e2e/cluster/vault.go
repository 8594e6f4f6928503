package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// VaultState is the state file kvtestd writes (kvtest.State).
type VaultState struct {
	VaultURL      string `json:"vaultURL"`
	AuthorityHost string `json:"authorityHost"`
	TenantID      string `json:"tenantID"`
	ProxyURL      string `json:"proxyURL"`
	AdminURL      string `json:"adminURL"`
	CAFile        string `json:"caFile"`
}

// Vault is a kvtestd process: the in-repo Key Vault protocol server with
// its Entra ID token endpoint and HTTPS proxy, driven over its admin API,
// with one key and one application (client secret) registered.
type Vault struct {
	VaultState
	KeyName, ClientID string
	SecretFile        string // the application's client secret, in a file

	proc   *Process
	admin  *http.Client
	secret string
}

// VaultKeyVersion is one version of the vault key as the Key Vault REST
// API lists it.
type VaultKeyVersion struct {
	KID     string
	Enabled bool
}

// StartVault builds kvtestd from the enclosing repository into dir, starts
// it, and creates an RSA key keyName and an application with a client
// secret. Stop it with Stop.
func StartVault(ctx context.Context, dir, keyName string) (*Vault, error) {
	root, err := RepoRoot()
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(dir, "kvtestd")
	bctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(bctx, "go", "build", "-o", bin, "./internal/provider/azurekv/kvtest/kvtestd")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build kvtestd: %w\n%s", err, out)
	}
	statePath := filepath.Join(dir, "kvtest-state.json")
	v := &Vault{
		KeyName:  keyName,
		ClientID: "0b5bdb30-f5b6-4bb3-9c67-54f3c7cdb0e1",
		proc:     &Process{Name: "kvtestd", Path: bin, Args: []string{"-state", statePath}, LogPath: filepath.Join(dir, "kvtestd.log")},
		admin:    &http.Client{Timeout: 10 * time.Second},
	}
	if err := v.proc.Start(); err != nil {
		return nil, err
	}
	err = waitUntil(ctx, v.proc, 30*time.Second, 50*time.Millisecond, "kvtestd state file", func(context.Context) (bool, error) {
		data, err := os.ReadFile(statePath)
		if err != nil {
			return false, err
		}
		return true, json.Unmarshal(data, &v.VaultState)
	})
	if err != nil {
		_ = v.proc.Stop()
		return nil, err
	}
	v.secret = RandomHex(16)
	v.SecretFile = filepath.Join(dir, "client-secret")
	if err := os.WriteFile(v.SecretFile, []byte(v.secret+"\n"), 0o600); err != nil {
		return nil, err
	}
	for _, path := range []string{
		"/keys?name=" + keyName + "&kty=RSA&bits=3072",
		"/secret?clientID=" + v.ClientID + "&secret=" + v.secret,
	} {
		if _, err := v.Admin(ctx, http.MethodPost, path); err != nil {
			_ = v.proc.Stop()
			return nil, err
		}
	}
	return v, nil
}

// Process is the kvtestd process.
func (v *Vault) Process() *Process { return v.proc }

// Stop stops kvtestd.
func (v *Vault) Stop() error { return v.proc.Stop() }

// ProviderArgs are the kms-plugin flags (serve and rotate) that select the
// azurekeyvault provider on this vault's key with the client secret.
func (v *Vault) ProviderArgs() []string {
	return []string{
		"--provider", "azurekeyvault",
		"--azure-vault-url", v.VaultURL,
		"--azure-key-name", v.KeyName,
		"--azure-credential", "clientSecret",
		"--azure-tenant-id", v.TenantID,
		"--azure-client-id", v.ClientID,
		"--azure-client-secret-file", v.SecretFile,
		"--azure-authority-host", v.AuthorityHost,
	}
}

// Env is the environment a kms-plugin process needs to reach the vault and
// Entra ID under their real-looking host names: the proxy and the CA.
func (v *Vault) Env() []string {
	return []string{"HTTPS_PROXY=" + v.ProxyURL, "HTTP_PROXY=" + v.ProxyURL, "NO_PROXY=", "no_proxy=", "SSL_CERT_FILE=" + v.CAFile}
}

// Admin calls kvtestd's admin API and returns its JSON answer.
func (v *Vault) Admin(ctx context.Context, method, path string) (map[string]any, error) {
	req, err := http.NewRequestWithContext(ctx, method, v.AdminURL+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := v.admin.Do(req)
	if err != nil {
		return nil, fmt.Errorf("kvtestd %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("kvtestd %s %s: %d %s", method, path, resp.StatusCode, body)
	}
	out := map[string]any{}
	if err := json.Unmarshal(body, &out); err != nil {
		return nil, fmt.Errorf("kvtestd %s %s: %w in %s", method, path, err, body)
	}
	return out, nil
}

// Calls returns kvtestd's per-operation request counters ("wrapkey",
// "unwrapkey", "get", "list", "update", "rotate", "token", ... and "vault",
// every vault request).
func (v *Vault) Calls(ctx context.Context) (map[string]int64, error) {
	raw, err := v.Admin(ctx, http.MethodGet, "/calls")
	if err != nil {
		return nil, err
	}
	out := map[string]int64{}
	for k, x := range raw {
		f, ok := x.(float64)
		if !ok {
			return nil, fmt.Errorf("kvtestd /calls: %s = %v", k, x)
		}
		out[k] = int64(f)
	}
	return out, nil
}

// ResetCalls sets kvtestd's counters to zero.
func (v *Vault) ResetCalls(ctx context.Context) error {
	_, err := v.Admin(ctx, http.MethodPost, "/calls/reset")
	return err
}

// NewKeyVersion creates a new version of the key by the admin API (as an
// operator rotating in the portal would) and returns its kid.
func (v *Vault) NewKeyVersion(ctx context.Context) (string, error) {
	out, err := v.Admin(ctx, http.MethodPost, "/rotate?name="+v.KeyName)
	if err != nil {
		return "", err
	}
	kid, _ := out["kid"].(string)
	if kid == "" {
		return "", fmt.Errorf("kvtestd /rotate: no kid in %v", out)
	}
	return kid, nil
}

// KeyVersions lists the key's versions and whether each is enabled,
// through the Key Vault REST API itself (GET /keys/NAME/versions with a
// token of the registered application), as `az keyvault key list-versions`
// would. These requests count in Calls ("token", "list").
func (v *Vault) KeyVersions(ctx context.Context) ([]VaultKeyVersion, error) {
	client, err := v.restClient()
	if err != nil {
		return nil, err
	}
	token, err := v.token(ctx, client)
	if err != nil {
		return nil, err
	}
	var out []VaultKeyVersion
	next := v.VaultURL + "/keys/" + url.PathEscape(v.KeyName) + "/versions?api-version=7.5"
	for next != "" {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, next, nil)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err != nil {
			return nil, fmt.Errorf("list key versions: %w", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("list key versions: %d %s", resp.StatusCode, body)
		}
		var page struct {
			Value []struct {
				KID        string `json:"kid"`
				Attributes struct {
					Enabled bool `json:"enabled"`
				} `json:"attributes"`
			} `json:"value"`
			NextLink *string `json:"nextLink"`
		}
		if err := json.Unmarshal(body, &page); err != nil {
			return nil, fmt.Errorf("list key versions: %w in %s", err, body)
		}
		for _, item := range page.Value {
			out = append(out, VaultKeyVersion{KID: item.KID, Enabled: item.Attributes.Enabled})
		}
		next = ""
		if page.NextLink != nil {
			next = *page.NextLink
		}
	}
	return out, nil
}

// restClient reaches the vault and Entra ID through kvtestd's proxy,
// trusting its CA.
func (v *Vault) restClient() (*http.Client, error) {
	caPEM, err := os.ReadFile(v.CAFile)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("%s: no certificate", v.CAFile)
	}
	proxy, err := url.Parse(v.ProxyURL)
	if err != nil {
		return nil, err
	}
	return &http.Client{Timeout: 15 * time.Second, Transport: &http.Transport{
		Proxy:           http.ProxyURL(proxy),
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
	}}, nil
}

// token gets an access token for the vault with the client-credentials
// grant.
func (v *Vault) token(ctx context.Context, client *http.Client) (string, error) {
	form := url.Values{
		"grant_type":    {"client_credentials"},
		"client_id":     {v.ClientID},
		"client_secret": {v.secret},
		"scope":         {"https://vault.azure.net/.default"},
	}
	endpoint := strings.TrimSuffix(v.AuthorityHost, "/") + "/" + v.TenantID + "/oauth2/v2.0/token"
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return "", err
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp, err := client.Do(req)
	if err != nil {
		return "", fmt.Errorf("token: %w", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var tok struct {
		AccessToken string `json:"access_token"`
	}
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &tok) != nil || tok.AccessToken == "" {
		return "", fmt.Errorf("token: %d %s", resp.StatusCode, body)
	}
	return tok.AccessToken, nil
}
