package kvtest

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/cloud"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestKeyWrapRFC3394 checks WrapKey and UnwrapKey against the test vectors
// of RFC 3394 section 4.
func TestKeyWrapRFC3394(t *testing.T) {
	for _, tt := range []struct{ name, kek, data, wrapped string }{
		{"4.1 128-bit data, 128-bit KEK", "000102030405060708090A0B0C0D0E0F", "00112233445566778899AABBCCDDEEFF", "1FA68B0A8112B447 AEF34BD8FB5A7B82 9D3E862371D2CFE5"},
		{"4.3 128-bit data, 256-bit KEK", "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F", "00112233445566778899AABBCCDDEEFF", "64E8C3F9CE0F5BA2 63E9777905818A2A 93C8191E7D6E8AE7"},
		{"4.6 256-bit data, 256-bit KEK", "000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F", "00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F", "28C9F404C4B810F4 CBCCB35CFB87F826 3F5786E2D80ED326 CBC7F0E71A99F43B FB988B9B7A02DD21"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			kek, data, want := unhex(t, tt.kek), unhex(t, tt.data), unhex(t, tt.wrapped)
			got, err := WrapKey(kek, data)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("WrapKey = %X, %v; want %X", got, err, want)
			}
			back, err := UnwrapKey(kek, want)
			if err != nil || !bytes.Equal(back, data) {
				t.Fatalf("UnwrapKey = %X, %v; want %X", back, err, data)
			}
			bad := bytes.Clone(want)
			bad[len(bad)-1] ^= 1
			if _, err := UnwrapKey(kek, bad); err == nil {
				t.Fatal("UnwrapKey accepted a tampered ciphertext")
			}
		})
	}
	if _, err := WrapKey(make([]byte, 32), make([]byte, 12)); err == nil {
		t.Fatal("WrapKey accepted 12 bytes")
	}
}

// rawClient talks to the vault with plain HTTP, to check the wire format.
type rawClient struct {
	t     *testing.T
	srv   *Server
	token string
}

func newRawClient(t *testing.T, srv *Server) *rawClient {
	t.Helper()
	srv.AddClientSecret("raw-client", "raw-secret")
	form := url.Values{"grant_type": {"client_credentials"}, "client_id": {"raw-client"}, "client_secret": {"raw-secret"},
		"scope": {srv.Resource() + "/.default openid offline_access profile"}}
	resp, err := srv.HTTPClient().PostForm(srv.AuthorityHost()+srv.TenantID()+"/oauth2/v2.0/token", form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var tok struct {
		AccessToken string `json:"access_token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&tok); err != nil || tok.AccessToken == "" {
		t.Fatalf("token: %d %v", resp.StatusCode, err)
	}
	return &rawClient{t: t, srv: srv, token: tok.AccessToken}
}

func (c *rawClient) do(method, path, body string, auth bool) (*http.Response, string) {
	c.t.Helper()
	req, err := http.NewRequest(method, c.srv.VaultURL()+path, strings.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if auth {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.srv.HTTPClient().Do(req)
	if err != nil {
		c.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

func TestWireProtocol(t *testing.T) {
	srv, err := Start(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	kid, err := srv.CreateKey("wire", KeyTypeRSA, 2048)
	if err != nil {
		t.Fatal(err)
	}
	version := kid[strings.LastIndex(kid, "/")+1:]
	c := newRawClient(t, srv)
	q := "?api-version=" + APIVersion

	resp, body := c.do("GET", "/keys/wire/"+q, "", false)
	wantChallenge := `Bearer authorization="https://login.kvtest.example/` + DefaultTenantID + `", resource="https://vault.azure.net"`
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") != wantChallenge || !strings.Contains(body, `"code":"Unauthorized"`) {
		t.Fatalf("unauthenticated GET = %d %q %s; want 401 with challenge %q", resp.StatusCode, resp.Header.Get("WWW-Authenticate"), body, wantChallenge)
	}

	for _, tt := range []struct {
		name, method, path, body string
		status                   int
		want                     string
	}{
		{"latest with trailing slash", "GET", "/keys/wire/" + q, "", 200, `"kid":"` + kid + `"`},
		{"latest without", "GET", "/keys/wire" + q, "", 200, `"kty":"RSA"`},
		{"versioned", "GET", "/keys/wire/" + version + q, "", 200, `"enabled":true`},
		{"names are case-insensitive", "GET", "/keys/WIRE/" + version + q, "", 200, `"kid":"` + kid + `"`},
		{"no api-version", "GET", "/keys/wire/", "", 400, "api-version"},
		{"unknown key", "GET", "/keys/absent/" + q, "", 404, `"code":"KeyNotFound"`},
		{"unknown version", "GET", "/keys/wire/00000000000000000000000000000000" + q, "", 404, `"code":"KeyNotFound"`},
		{"unversioned wrap", "POST", "/keys/wire/wrapkey" + q, `{"alg":"RSA-OAEP-256","value":"AAECAwQFBgcICQoLDA0ODw"}`, 200, `"kid":"` + kid + `"`},
		{"padded base64 is refused", "POST", "/keys/wire/" + version + "/wrapkey" + q, `{"alg":"RSA-OAEP-256","value":"AAECAwQFBgcICQoLDA0ODw=="}`, 400, "without padding"},
		{"unknown algorithm", "POST", "/keys/wire/" + version + "/wrapkey" + q, `{"alg":"A256KW","value":"AAECAwQFBgcICQoLDA0ODw"}`, 400, "BadParameter"},
		{"garbage unwrap", "POST", "/keys/wire/" + version + "/unwrapkey" + q, `{"alg":"RSA-OAEP-256","value":"AAECAwQFBgcICQoLDA0ODw"}`, 400, "BadParameter"},
		{"unsupported path", "DELETE", "/keys/wire" + q, "", 404, "unsupported request"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			resp, body := c.do(tt.method, tt.path, tt.body, true)
			if resp.StatusCode != tt.status || !strings.Contains(body, tt.want) {
				t.Fatalf("%s %s = %d %s; want %d containing %q", tt.method, tt.path, resp.StatusCode, body, tt.status, tt.want)
			}
			if strings.Contains(body, `=",`) || strings.Contains(body, `="}`) {
				t.Fatalf("body has padded base64: %s", body)
			}
		})
	}

	// Disabled: GET still answers (enabled false), operations are refused.
	if err := srv.SetEnabled("wire", version, false); err != nil {
		t.Fatal(err)
	}
	if resp, body := c.do("GET", "/keys/wire/"+version+q, "", true); resp.StatusCode != 200 || !strings.Contains(body, `"enabled":false`) {
		t.Fatalf("GET of a disabled version = %d %s", resp.StatusCode, body)
	}
	resp, body = c.do("POST", "/keys/wire/"+version+"/wrapkey"+q, `{"alg":"RSA-OAEP-256","value":"AAECAwQFBgcICQoLDA0ODw"}`, true)
	if resp.StatusCode != 403 || !strings.Contains(body, `"innererror":{"code":"KeyDisabled"}`) {
		t.Fatalf("wrapkey with a disabled version = %d %s; want 403 KeyDisabled", resp.StatusCode, body)
	}

	// Denied: access-policy message naming the permission.
	srv.SetPermissions(App("raw-client"), PermGet)
	resp, body = c.do("POST", "/keys/wire/unwrapkey"+q, `{"alg":"RSA-OAEP-256","value":"AA"}`, true)
	if resp.StatusCode != 403 || !strings.Contains(body, "does not have keys unwrapKey permission") || !strings.Contains(body, `"code":"AccessDenied"`) {
		t.Fatalf("denied unwrapkey = %d %s", resp.StatusCode, body)
	}
}

func TestFaultsAndCounters(t *testing.T) {
	srv, err := Start(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if _, err := srv.CreateKey("k", KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	c := newRawClient(t, srv)
	q := "?api-version=" + APIVersion

	srv.Throttle(1, 1500*time.Millisecond)
	resp, _ := c.do("GET", "/keys/k/"+q, "", true)
	if resp.StatusCode != 429 || resp.Header.Get("Retry-After") != "2" || resp.Header.Get("retry-after-ms") != "1500" {
		t.Fatalf("throttled = %d, Retry-After %q, retry-after-ms %q", resp.StatusCode, resp.Header.Get("Retry-After"), resp.Header.Get("retry-after-ms"))
	}
	srv.Fail(1, 503)
	if resp, _ := c.do("GET", "/keys/k/"+q, "", true); resp.StatusCode != 503 {
		t.Fatalf("failing = %d; want 503", resp.StatusCode)
	}
	srv.SetLatency(100 * time.Millisecond)
	start := time.Now()
	if resp, _ := c.do("GET", "/keys/k/"+q, "", true); resp.StatusCode != 200 || time.Since(start) < 100*time.Millisecond {
		t.Fatalf("with latency: %d after %s", resp.StatusCode, time.Since(start))
	}
	srv.SetLatency(0)
	srv.SetClockSkew(time.Hour)
	resp, _ = c.do("GET", "/keys/k/"+q, "", true)
	if d, err := http.ParseTime(resp.Header.Get("Date")); err != nil || time.Until(d) < 59*time.Minute {
		t.Fatalf("skewed Date = %q", resp.Header.Get("Date"))
	}
	if got := srv.Calls("get"); got != 4 {
		t.Fatalf("Calls(get) = %d; want 4", got)
	}
	srv.SetOutage(true)
	req, _ := http.NewRequest("GET", srv.VaultURL()+"/keys/k/"+q, nil)
	if resp, err := srv.HTTPClient().Do(req); err == nil {
		resp.Body.Close()
		t.Fatalf("request during an outage answered %d", resp.StatusCode)
	}
	// net/http retries an idempotent request once on a dropped reused
	// connection: 5 or 6.
	if got := srv.VaultCalls(); got < 5 || got > 6 {
		t.Fatalf("VaultCalls = %d; want 5 or 6", got)
	}
}

// TestSDKOperations drives the server with the real azkeys client:
// encrypt/decrypt, create, rotate, update and paged listing, on a Managed
// HSM with oct-HSM keys.
func TestSDKOperations(t *testing.T) {
	srv, err := Start(Options{ManagedHSM: true, PageSize: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	srv.AddClientSecret("sdk", "sdk-secret")
	opts := azcore.ClientOptions{Transport: srv.HTTPClient(), Cloud: cloud.Configuration{ActiveDirectoryAuthorityHost: srv.AuthorityHost()}}
	cred, err := azidentity.NewClientSecretCredential(srv.TenantID(), "sdk", "sdk-secret", &azidentity.ClientSecretCredentialOptions{ClientOptions: opts, DisableInstanceDiscovery: true})
	if err != nil {
		t.Fatal(err)
	}
	client, err := azkeys.NewClient(srv.VaultURL(), cred, &azkeys.ClientOptions{ClientOptions: azcore.ClientOptions{Transport: srv.HTTPClient()}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	created, err := client.CreateKey(ctx, "aes", azkeys.CreateKeyParameters{Kty: to.Ptr(azkeys.KeyTypeOctHSM), KeySize: to.Ptr(int32(256))}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if *created.Key.Kty != azkeys.KeyTypeOctHSM || len(created.Key.K) != 0 {
		t.Fatalf("created %+v; want an oct-HSM key without material", created.Key)
	}
	enc, err := client.Encrypt(ctx, "aes", "", azkeys.KeyOperationParameters{Algorithm: to.Ptr(azkeys.EncryptionAlgorithmA256GCM), Value: []byte("hello"), AdditionalAuthenticatedData: []byte("aad")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	dec, err := client.Decrypt(ctx, "aes", created.Key.KID.Version(), azkeys.KeyOperationParameters{
		Algorithm: to.Ptr(azkeys.EncryptionAlgorithmA256GCM), Value: enc.Result, IV: enc.IV, AuthenticationTag: enc.AuthenticationTag, AdditionalAuthenticatedData: []byte("aad"),
	}, nil)
	if err != nil || string(dec.Result) != "hello" {
		t.Fatalf("Decrypt = %q, %v", dec.Result, err)
	}
	for range 4 {
		if _, err := client.RotateKey(ctx, "aes", nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := client.UpdateKey(ctx, "aes", created.Key.KID.Version(), azkeys.UpdateKeyParameters{KeyAttributes: &azkeys.KeyAttributes{Enabled: to.Ptr(false)}}, nil); err != nil {
		t.Fatal(err)
	}
	pager := client.NewListKeyPropertiesVersionsPager("aes", nil)
	var n, disabled, pages int
	for pager.More() {
		page, err := pager.NextPage(ctx)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		for _, kp := range page.Value {
			n++
			if !*kp.Attributes.Enabled {
				disabled++
			}
		}
	}
	if n != 5 || disabled != 1 || pages != 3 {
		t.Fatalf("listed %d versions (%d disabled) in %d pages; want 5 (1) in 3", n, disabled, pages)
	}
	if srv.Calls("token") != 1 {
		t.Fatalf("token requests = %d; want 1 (cached)", srv.Calls("token"))
	}
}

func TestManagedIdentityEndpoint(t *testing.T) {
	srv, err := Start(Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	srv.AddManagedIdentity("mi-client", "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/mi")
	get := func(query string, metadata bool) (int, string) {
		req, _ := http.NewRequest("GET", "http://"+IMDSHost+"/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net&"+query, nil)
		if metadata {
			req.Header.Set("Metadata", "true")
		}
		resp, err := srv.HTTPClient().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, tt := range []struct {
		name, query string
		metadata    bool
		status      int
		want        string
	}{
		{"system", "", true, 200, `"token_type":"Bearer"`},
		{"client ID", "client_id=mi-client", true, 200, `"client_id":"mi-client"`},
		{"resource ID", "mi_res_id=" + url.QueryEscape("/subscriptions/s/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/mi"), true, 200, `"client_id":"mi-client"`},
		{"unknown identity", "client_id=other", true, 400, "Identity not found"},
		{"no Metadata header", "", false, 400, "metadata header"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if status, body := get(tt.query, tt.metadata); status != tt.status || !strings.Contains(body, tt.want) {
				t.Fatalf("IMDS %s = %d %s; want %d with %q", tt.query, status, body, tt.status, tt.want)
			}
		})
	}
	srv.SetSystemIdentity(false)
	if status, _ := get("", true); status != 400 {
		t.Fatalf("system identity removed: IMDS = %d; want 400", status)
	}
}
