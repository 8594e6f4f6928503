package azurekv

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

// startServer starts a fake vault for one test.
func startServer(t *testing.T, opts kvtest.Options) *kvtest.Server {
	t.Helper()
	srv, err := kvtest.Start(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	return srv
}

// randomID returns a fresh GUID-like ID, so that identities never collide
// across tests (MSAL caches managed identity tokens per process).
func randomID(t *testing.T) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// writeFile writes a file readable by its owner only and returns its path.
func writeFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// secretCredential registers a new app with a secret on srv and returns a
// real azidentity client secret credential for it.
func secretCredential(t *testing.T, srv *kvtest.Server) (azcore.TokenCredential, string) {
	t.Helper()
	clientID, secret := randomID(t), "s3cret-"+randomID(t)
	srv.AddClientSecret(clientID, secret)
	cred, _, err := NewCredential(CredentialConfig{
		Kind: CredentialClientSecret, TenantID: srv.TenantID(), ClientID: clientID,
		ClientSecretFile: writeFile(t, "secret", []byte(secret+"\n")),
		AuthorityHost:    srv.AuthorityHost(), Transport: srv.HTTPClient(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return cred, clientID
}

// testConfig is a Config for srv with fast retries.
func testConfig(srv *kvtest.Server, cred azcore.TokenCredential, keyName string) Config {
	return Config{
		VaultURL: srv.VaultURL(), KeyName: keyName, Credential: cred, Transport: srv.HTTPClient(),
		Timeout: 10 * time.Second, TryTimeout: 5 * time.Second, RetryDelay: 10 * time.Millisecond, MaxRetryDelay: 3 * time.Second,
	}
}

// newTestProvider creates key keyName (RSA unless kty says otherwise) on
// srv and a provider for it with a client secret credential.
func newTestProvider(t *testing.T, srv *kvtest.Server, keyName, kty string, edit func(*Config)) *Provider {
	t.Helper()
	if kty != "" {
		if _, err := srv.CreateKey(keyName, kty, 0); err != nil {
			t.Fatal(err)
		}
	}
	cred, _ := secretCredential(t, srv)
	cfg := testConfig(srv, cred, keyName)
	if edit != nil {
		edit(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// staticCredential returns a fixed token, for tests of what the vault does
// with bad tokens.
type staticCredential struct {
	token string
	calls atomic.Int64
}

func (c *staticCredential) GetToken(context.Context, policy.TokenRequestOptions) (azcore.AccessToken, error) {
	c.calls.Add(1)
	return azcore.AccessToken{Token: c.token, ExpiresOn: time.Now().Add(time.Hour)}, nil
}

// updateExpires sets a version's expiry through the REST API.
func updateExpires(t time.Time) azkeys.UpdateKeyParameters {
	return azkeys.UpdateKeyParameters{KeyAttributes: &azkeys.KeyAttributes{Expires: &t}}
}
