package azurekv

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

// failingTransport fails every request with err.
type failingTransport struct{ err error }

func (f failingTransport) Do(*http.Request) (*http.Response, error) { return nil, f.err }

// tokenError is a credential whose every token request fails with err.
type tokenError struct{ err error }

func (c tokenError) GetToken(context.Context, policy.TokenRequestOptions) (azcore.AccessToken, error) {
	return azcore.AccessToken{}, c.err
}

// TestNetworkRemedyNamesThePort checks that the fix for an unreachable
// vault names the port of the vault URL.
func TestNetworkRemedyNamesThePort(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	for _, tt := range []struct {
		url, want string
	}{
		{"https://v.vault.azure.net", "v.vault.azure.net over HTTPS (port 443)"},
		{"https://v.vault.azure.net:443", "v.vault.azure.net over HTTPS (port 443)"},
		{"https://v.vault.azurestack.example:8443", "v.vault.azurestack.example over HTTPS (port 8443)"},
	} {
		p, err := New(Config{VaultURL: tt.url, KeyName: "k", Credential: &staticCredential{token: "t"}, MaxRetries: -1, Transport: failingTransport{refused}})
		if err != nil {
			t.Fatal(err)
		}
		_, err = p.CurrentVersion(context.Background())
		if !errors.Is(err, provider.ErrUnavailable) {
			t.Fatalf("%s: CurrentVersion = %v; want ErrUnavailable", tt.url, err)
		}
		if r := Remedy(err); !strings.Contains(r, tt.want) {
			t.Fatalf("%s: Remedy = %q; want it to contain %q", tt.url, r, tt.want)
		}
		t.Logf("%v\n\t%s", err, Remedy(err))
	}
}

// TestMissingKeyName checks that a key name the vault does not have is
// reported as a missing key of that vault, not as a missing key version.
func TestMissingKeyName(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	p := newTestProvider(t, srv, "absent", "", nil)
	_, err := p.CurrentVersion(context.Background())
	if !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("CurrentVersion = %v; want ErrKeyNotFound", err)
	}
	if want := "key absent not found in vault " + srv.VaultURL(); !strings.Contains(err.Error(), want) {
		t.Fatalf("error %q does not say %q", err, want)
	}
	if strings.Contains(err.Error(), "key version not found") {
		t.Fatalf("error %q calls a missing key a missing key version", err)
	}
	t.Log(err)
}

// TestClosedConnectionIsAnOutage checks that a connection closed under a
// request, to the vault or to the identity provider, is an unavailable key
// store in words, not the transport's "use of closed network connection".
func TestClosedConnectionIsAnOutage(t *testing.T) {
	closed := &net.OpError{Op: "read", Net: "tcp", Err: net.ErrClosed}
	for _, tt := range []struct {
		name string
		cfg  Config
	}{
		{"vault", Config{Credential: &staticCredential{token: "t"}, Transport: failingTransport{closed}}},
		{"token", Config{Credential: tokenError{errors.New(`ClientSecretCredential: authentication failed: Post "https://login.microsoftonline.com/t/oauth2/v2.0/token": read tcp 10.0.0.4:51234->20.190.0.1:443: use of closed network connection`)},
			Transport: failingTransport{errors.New("unused")}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.cfg
			cfg.VaultURL, cfg.KeyName, cfg.MaxRetries = "https://v.vault.azure.net", "k", -1
			if tt.name == "token" {
				// The token is asked for after the vault's challenge.
				cfg.Transport = challengeTransport{}
			}
			p, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			_, err = p.CurrentVersion(context.Background())
			if !errors.Is(err, provider.ErrUnavailable) {
				t.Fatalf("CurrentVersion = %v; want ErrUnavailable", err)
			}
			if msg := err.Error(); strings.Contains(msg, "use of closed network connection") || !strings.Contains(msg, "key store unavailable: the connection closed before an answer") && !strings.Contains(msg, "key store unavailable: connection closed without an answer") {
				t.Fatalf("error %q; want an unavailable key store in words", msg)
			}
			t.Logf("%v\n\t%s", err, Remedy(err))
		})
	}
}

// challengeTransport answers every request with the vault's bearer
// challenge.
type challengeTransport struct{}

func (challengeTransport) Do(req *http.Request) (*http.Response, error) {
	h := http.Header{}
	h.Set("WWW-Authenticate", `Bearer authorization="https://login.microsoftonline.com/t", resource="https://vault.azure.net"`)
	return &http.Response{StatusCode: http.StatusUnauthorized, Header: h, Body: http.NoBody, Request: req}, nil
}
