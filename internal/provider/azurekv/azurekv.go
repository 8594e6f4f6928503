// Package azurekv is the provider backed by a key in Azure Key Vault or
// Azure Key Vault Managed HSM, through the azkeys and azidentity SDKs.
//
// # Versions and key_ids
//
// The plugin is configured with a key name, not a version: it follows the
// key's newest usable (enabled, not expired, already valid) version by
// itself, so rotating the key in Azure, by hand or by a rotation policy,
// needs no restart and no configuration change. CurrentVersion is one GET of
// the versionless key (the envelope's background loop calls it once per poll
// interval, default 60 s; Status never reaches the vault).
//
// A version string is the full, versioned key ID (the "kid" URL), so that
// Unwrap calls unwrapkey with exactly the version recorded at encryption
// time. When the newest version of the key is not usable (disabled or
// expired: the key went "backwards"), the provider lists the versions, uses
// the newest usable one and reports it as
//
//	<kid of the version used>#after=<ID of the newest version>
//
// so the key_id (derived from the version string) differs from the one the
// same version had before the newer version existed: a key_id is never
// reused for a different state of the key, yet every node that sees the same
// vault computes the same string. A pinned KeyVersion is reported as its
// plain kid. Unwrap calls the vault with the kid; the #after= part only
// changes the key_id. Each version has exactly one accepted spelling (see
// version.go): any other is refused before a call to the vault.
//
// # Revocation
//
// Wrap never uses a version the vault did not report usable within the last
// stateFreshFor (2 s, the time between a poll and the Wrap it triggers):
// otherwise it asks the vault again, falls back to the newest usable version
// like a poll, and returns ErrKeyDisabled when there is none, so no new local
// KEK is wrapped under a version disabled, expired or deleted since the last
// poll. The provider implements provider.VersionChecker: after each poll
// the plugin asks which versions of its cached local KEKs the vault now
// reports disabled, expired, not yet valid or deleted (one listing of the
// versions per key name, none when only the version the poll just checked
// is cached) and drops them.
//
// # Wrapping
//
// RSA keys (RSA, RSA-HSM) use RSA-OAEP-256. By default a new local KEK is
// wrapped locally with the public key of the current version, fetched with
// the GET that discovered that version: this saves one vault call per local
// KEK made right after a poll (at start, after a rotation). A local KEK made
// later (at its age or usage limit) costs one GET first, to check that the
// version is still usable; while the vault cannot answer, none is made and
// the plugin keeps the current one. Unwrap always happens in the vault; the
// private key never leaves it. Set WrapInVault to call wrapkey instead (for
// example when a policy demands that every use of the key be audited in the
// vault's logs).
// Managed HSM oct-HSM keys (AES-256) use AES key wrap (A256KW) in the HSM;
// the key is padded first (ISO/IEC 7816-4: 0x80, then zeros to a multiple
// of 8 bytes, at least 16) because A256KW only takes such lengths.
//
// The wrapped key is one scheme byte followed by what the vault returned:
// 0x01 RSA-OAEP-256, 0x02 A256KW of the padded key. Scheme values are never
// reused.
//
// # Resilience
//
// Every call has a timeout (Timeout overall, TryTimeout per HTTP attempt).
// azcore's retry policy retries 408, 429 and 5xx answers and transport
// errors up to MaxRetries times with exponential backoff, honouring
// Retry-After (an answer asking to wait longer than MaxRetryDelay is not
// retried). A circuit breaker fails calls fast with provider.ErrUnavailable
// after FailureThreshold consecutive unavailable-class failures, for
// OpenDuration; then one probe call is let through. 401 and 403 answers are
// reported as provider.ErrPermissionDenied naming the missing permission,
// and remembered for DeniedBackoff per operation and key version (a 403),
// or for the identity as a whole (a refused token, a 401), so that a
// missing role is not asked about in a hot loop, and a version string
// naming a key the identity may not use does not block the keys it may use.
//
// # Authentication challenge
//
// azkeys elicits a bearer challenge with its first request and, by default,
// requires the challenge's resource to match the vault's domain. That check
// stays on; DisableChallengeResourceVerification exists only for vaults
// reached under a custom domain.
package azurekv

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/to"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Name is the provider name used in metrics, logs and configuration.
const Name = "azurekeyvault"

// Defaults for Config fields left zero.
const (
	DefaultTimeout          = 8 * time.Second
	DefaultTryTimeout       = 4 * time.Second
	DefaultMaxRetries       = 3
	DefaultRetryDelay       = 500 * time.Millisecond
	DefaultMaxRetryDelay    = 10 * time.Second
	DefaultFailureThreshold = 5
	DefaultOpenDuration     = 30 * time.Second
	DefaultDeniedBackoff    = 30 * time.Second
)

// Config configures a Provider. Zero values of the optional fields are safe
// defaults.
type Config struct {
	// VaultURL is the vault's URL: https://NAME.vault.azure.net or
	// https://NAME.managedhsm.azure.net (or a sovereign cloud's suffix).
	// Required.
	VaultURL string
	// KeyName is the key's name. Required.
	KeyName string
	// KeyVersion pins one version. Empty (the default and the
	// recommendation) follows the newest usable version.
	KeyVersion string
	// Credential authenticates to Entra ID; see NewCredential. Required.
	Credential azcore.TokenCredential
	// WrapInVault makes Wrap call the vault's wrapkey for RSA keys instead
	// of wrapping locally with the public key. oct-HSM keys always wrap in
	// the HSM.
	WrapInVault bool
	// DisableChallengeResourceVerification accepts a bearer challenge whose
	// resource is not the vault's domain (vaults behind a custom domain).
	DisableChallengeResourceVerification bool
	// Timeout bounds each provider call, retries included. Default 8 s.
	Timeout time.Duration
	// TryTimeout bounds each HTTP attempt. Default 4 s.
	TryTimeout time.Duration
	// MaxRetries is how often a failed attempt is retried. Default 3;
	// negative means no retries.
	MaxRetries int
	// RetryDelay is the first backoff, doubled at each retry, without a
	// Retry-After. Default 500 ms.
	RetryDelay time.Duration
	// MaxRetryDelay caps the backoff; an answer with a longer Retry-After
	// is not retried. Default 10 s.
	MaxRetryDelay time.Duration
	// FailureThreshold consecutive unavailable-class failures open the
	// circuit breaker. Default 5.
	FailureThreshold int
	// OpenDuration is how long an open breaker fails calls fast. Default
	// 30 s.
	OpenDuration time.Duration
	// DeniedBackoff is how long a 403 answer is remembered per operation
	// and key version, and a refused token or a 401 for every call, before
	// the vault is asked again. Default 30 s.
	DeniedBackoff time.Duration
	// Transport carries every request to the vault; nil uses azcore's
	// default HTTP client (which honours HTTPS_PROXY and NO_PROXY). Tests
	// use it to reach a fake vault.
	Transport policy.Transporter
	// Now returns the current time. Default time.Now.
	Now func() time.Time
	// Rand is the randomness of local RSA-OAEP wraps. Default crypto/rand.
	Rand io.Reader
}

// Provider is the Azure Key Vault / Managed HSM provider. It is safe for
// concurrent use.
type Provider struct {
	cfg       Config
	client    *azkeys.Client
	vaultURL  string
	vaultHost string
	hsm       bool
	breaker   *breaker

	refreshMu sync.Mutex // serializes refreshes
	cur       atomic.Pointer[keyState]

	book     keyBook    // what the vault said about key names and versions
	relistMu sync.Mutex // serializes listings made to admit a version

	listMu   sync.Mutex
	lastList listing // the last complete listing, reused within stateFreshFor

	deniedMu sync.Mutex
	denied   map[string]deniedEntry // by scope: targetScope or identityScope
}

var (
	_ provider.Provider       = (*Provider)(nil)
	_ provider.Rotator        = (*Provider)(nil)
	_ provider.Retirer        = (*Provider)(nil)
	_ provider.HealthChecker  = (*Provider)(nil)
	_ provider.VersionLister  = (*Provider)(nil)
	_ provider.VersionChecker = (*Provider)(nil)
)

var (
	keyNameRE   = regexp.MustCompile(`^[0-9a-zA-Z-]{1,127}$`)
	versionIDRE = regexp.MustCompile(`^[0-9a-zA-Z]{1,64}$`)
)

// New returns a Provider. It makes no network call.
func New(cfg Config) (*Provider, error) {
	u, err := url.Parse(cfg.VaultURL)
	if err != nil || u.Scheme != "https" || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		return nil, fmt.Errorf("azurekv: vault URL %q must be https://HOST with no path", cfg.VaultURL)
	}
	if !keyNameRE.MatchString(cfg.KeyName) {
		return nil, fmt.Errorf("azurekv: key name %q must be 1-127 letters, digits and dashes", cfg.KeyName)
	}
	if cfg.KeyVersion != "" && !versionIDRE.MatchString(cfg.KeyVersion) {
		return nil, fmt.Errorf("azurekv: key version %q must be a version ID (32 hex digits)", cfg.KeyVersion)
	}
	if cfg.Credential == nil {
		return nil, errors.New("azurekv: no credential")
	}
	setDefault(&cfg.Timeout, DefaultTimeout)
	setDefault(&cfg.TryTimeout, DefaultTryTimeout)
	setDefault(&cfg.RetryDelay, DefaultRetryDelay)
	setDefault(&cfg.MaxRetryDelay, DefaultMaxRetryDelay)
	setDefault(&cfg.OpenDuration, DefaultOpenDuration)
	setDefault(&cfg.DeniedBackoff, DefaultDeniedBackoff)
	if cfg.MaxRetries == 0 {
		cfg.MaxRetries = DefaultMaxRetries
	}
	if cfg.FailureThreshold <= 0 {
		cfg.FailureThreshold = DefaultFailureThreshold
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	vaultURL := "https://" + u.Host
	client, err := azkeys.NewClient(vaultURL, cfg.Credential, &azkeys.ClientOptions{
		ClientOptions: azcore.ClientOptions{
			Retry: policy.RetryOptions{
				MaxRetries:    int32(cfg.MaxRetries),
				TryTimeout:    cfg.TryTimeout,
				RetryDelay:    cfg.RetryDelay,
				MaxRetryDelay: cfg.MaxRetryDelay,
			},
			Telemetry: policy.TelemetryOptions{ApplicationID: "kms-plugin"},
			Transport: cfg.Transport,
		},
		DisableChallengeResourceVerification: cfg.DisableChallengeResourceVerification,
	})
	if err != nil {
		return nil, fmt.Errorf("azurekv: %w", err)
	}
	host := strings.ToLower(u.Hostname())
	// The host as key IDs spell it: lower case, without the default port.
	vaultHost := strings.TrimSuffix(strings.ToLower(u.Host), ":443")
	return &Provider{
		cfg:       cfg,
		client:    client,
		vaultURL:  vaultURL,
		vaultHost: vaultHost,
		hsm:       strings.Contains(host, ".managedhsm."),
		breaker:   newBreaker(cfg.FailureThreshold, cfg.OpenDuration),
		book:      keyBook{keep: strings.ToLower(cfg.KeyName)},
		denied:    map[string]deniedEntry{},
	}, nil
}

func setDefault(d *time.Duration, def time.Duration) {
	if *d <= 0 {
		*d = def
	}
}

// Name implements provider.Provider.
func (p *Provider) Name() string { return Name }

// VaultURL returns the vault's URL.
func (p *Provider) VaultURL() string { return p.vaultURL }

// KeyName returns the configured key name.
func (p *Provider) KeyName() string { return p.cfg.KeyName }

// CurrentVersion implements provider.Provider: one GET of the key (plus a
// listing and a GET of the chosen version when the newest version is not
// usable). It returns ErrKeyDisabled when no version is usable,
// ErrKeyNotFound when the key does not exist, ErrPermissionDenied and
// ErrUnavailable as described in the package comment.
func (p *Provider) CurrentVersion(ctx context.Context) (string, error) {
	st, err := p.refresh(ctx)
	if err != nil {
		return "", err
	}
	return st.version, nil
}

// Rotate implements provider.Rotator: it asks the vault to create a new
// version of the key (keys/rotate permission) and makes it current.
func (p *Provider) Rotate(ctx context.Context) (string, error) {
	if p.cfg.KeyVersion != "" {
		return "", fmt.Errorf("azurekv: rotate: key version %s is pinned in the configuration; unpin it to follow new versions", p.cfg.KeyVersion)
	}
	var res azkeys.RotateKeyResponse
	err := p.call(ctx, opRotate, p.cfg.KeyName, "", func(ctx context.Context) error {
		var err error
		res, err = p.client.RotateKey(ctx, p.cfg.KeyName, nil)
		return err
	})
	if err != nil {
		return "", err
	}
	p.refreshMu.Lock()
	defer p.refreshMu.Unlock()
	st, err := p.stateFrom(res.KeyBundle, "")
	if err != nil {
		return "", err
	}
	p.cur.Store(st)
	return st.version, nil
}

// Retire implements provider.Retirer: it disables the version (keys/update
// permission). Key material is never deleted.
func (p *Provider) Retire(ctx context.Context, version string) error {
	ref, err := p.parseVersion(version)
	if err != nil {
		return fmt.Errorf("azurekv: retire: %w", err)
	}
	st := p.cur.Load()
	if st == nil {
		if st, err = p.refresh(ctx); err != nil {
			return err
		}
	}
	if ref.kid == st.kid {
		return fmt.Errorf("azurekv: retire: version %s is the current version; rotate first", ref.kid)
	}
	return p.call(ctx, opUpdate, ref.name, ref.kid, func(ctx context.Context) error {
		_, err := p.client.UpdateKey(ctx, ref.name, ref.id, azkeys.UpdateKeyParameters{
			KeyAttributes: &azkeys.KeyAttributes{Enabled: to.Ptr(false)},
		}, nil)
		return err
	})
}

// Versions implements provider.VersionLister (keys/list permission). When
// no version is usable, every version is listed and none is current.
func (p *Provider) Versions(ctx context.Context) ([]provider.VersionInfo, error) {
	st := p.cur.Load()
	if st == nil {
		var err error
		if st, err = p.refresh(ctx); err != nil && !errors.Is(err, provider.ErrKeyDisabled) {
			return nil, err
		}
	}
	items, err := p.listVersionsOf(ctx, p.cfg.KeyName)
	if err != nil {
		return nil, err
	}
	now := p.cfg.Now()
	out := make([]provider.VersionInfo, 0, len(items))
	for _, it := range items {
		vi := provider.VersionInfo{Version: it.kid, State: provider.VersionDisabled, Created: it.created}
		if usable(it.attrs, now) {
			vi.State = provider.VersionEnabled
		}
		if st != nil && it.kid == st.kid {
			vi.Version, vi.Current = st.version, true
		}
		out = append(out, vi)
	}
	return out, nil
}

// Health implements provider.HealthChecker with the same call as
// CurrentVersion. The plugin's /readyz never calls it: it reports the
// background poll's outcome. kms-plugin doctor does.
func (p *Provider) Health(ctx context.Context) error {
	_, err := p.refresh(ctx)
	return err
}
