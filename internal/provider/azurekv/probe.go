package azurekv

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// ProbeResult is what the vault says to an unauthenticated request.
type ProbeResult struct {
	// Authority is the authorization URL of the challenge, with the
	// vault's tenant: https://login.microsoftonline.com/TENANT.
	Authority string
	// TenantID is the tenant named in the challenge.
	TenantID string
	// Resource is the challenge's resource (token audience).
	Resource string
	// ServerTime is the vault's Date header; zero when absent.
	ServerTime time.Time
	// Skew is ServerTime minus the local time.
	Skew time.Duration
}

// Probe sends one unauthenticated request to the vault, as azkeys does
// before its first authorized one, and reports the challenge: DNS, TLS and
// the network path work, which tenant the vault belongs to, and how far the
// local clock is from the vault's. kms-plugin doctor uses it.
func (p *Provider) Probe(ctx context.Context) (ProbeResult, error) {
	var res ProbeResult
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.vaultURL+"/keys/"+url.PathEscape(p.cfg.KeyName)+"/?api-version=2025-07-01", nil)
	if err != nil {
		return res, err
	}
	var transport policy.Transporter = http.DefaultClient
	if p.cfg.Transport != nil {
		transport = p.cfg.Transport
	}
	resp, err := transport.Do(req)
	if err != nil {
		return res, p.classify(context.Background(), opProbe, p.cfg.KeyName, "", err)
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if t, err := http.ParseTime(resp.Header.Get("Date")); err == nil {
		res.ServerTime = t
		res.Skew = t.Sub(p.cfg.Now())
	}
	if resp.StatusCode != http.StatusUnauthorized {
		return res, &Error{Op: opProbe.name, Vault: p.vaultHost, HSM: p.hsm, Status: resp.StatusCode,
			Message: "expected a 401 bearer challenge; is this a Key Vault or Managed HSM URL?"}
	}
	for _, part := range strings.Fields(strings.TrimPrefix(resp.Header.Get("WWW-Authenticate"), "Bearer ")) {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			continue
		}
		v = strings.TrimSuffix(strings.Trim(strings.TrimSuffix(v, ","), `"`), ",")
		switch k {
		case "authorization", "authorization_uri":
			res.Authority = v
			if u, err := url.Parse(v); err == nil {
				res.TenantID = strings.Trim(u.Path, "/")
			}
		case "resource":
			if res.Resource == "" {
				res.Resource = v
			}
		case "scope":
			res.Resource = strings.TrimSuffix(v, "/.default")
		}
	}
	if res.Resource == "" {
		return res, &Error{Op: opProbe.name, Vault: p.vaultHost, HSM: p.hsm, Status: resp.StatusCode,
			Message: "the 401 answer has no bearer challenge; is this a Key Vault or Managed HSM URL?"}
	}
	return res, nil
}

// CheckCredential gets an access token for the vault's resource and tenant
// from the configured credential, without calling the vault. The token is
// discarded.
func (p *Provider) CheckCredential(ctx context.Context, probe ProbeResult) error {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	_, err := p.cfg.Credential.GetToken(ctx, policy.TokenRequestOptions{
		Scopes:   []string{strings.TrimSuffix(probe.Resource, "/") + "/.default"},
		TenantID: probe.TenantID,
	})
	if err == nil {
		return nil
	}
	e := p.classify(context.Background(), opToken, p.cfg.KeyName, "", err)
	var ke *Error
	if errors.As(e, &ke) && ke.Op != opToken.name {
		ke.Op = opToken.name
		if ke.Kind == nil {
			ke.Kind = provider.ErrPermissionDenied
		}
	}
	return e
}
