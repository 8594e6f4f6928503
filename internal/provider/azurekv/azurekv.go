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
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"regexp"
	"slices"
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

// Wrapped key schemes: the first byte of every wrapped key.
const (
	schemeRSAOAEP256 = 0x01
	schemeA256KW     = 0x02
)

// afterMarker separates a version's kid from the newest version's ID when
// the key went backwards.
const afterMarker = "#after="

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

// keyState is the version Wrap uses now.
type keyState struct {
	version string // what CurrentVersion and Wrap report
	kid     string // versioned key ID
	name    string
	id      string // version ID
	kty     azkeys.KeyType
	pub     *rsa.PublicKey // RSA keys only
	ops     []string
	checked time.Time // when the vault last reported the version usable
}

// stateFreshFor is how long a version the vault reported usable counts as
// usable without asking again: long enough for the Wrap that follows a
// poll, short enough that a version disabled since is never used to wrap.
const stateFreshFor = 2 * time.Second

type deniedEntry struct {
	until time.Time
	err   error
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

// Wrap implements provider.Provider. RSA keys wrap locally with the cached
// public key unless WrapInVault is set; oct-HSM keys wrap in the HSM. It
// uses only a version the vault reported usable within stateFreshFor, asking
// again otherwise (see the package comment): it returns ErrKeyDisabled when
// no version is usable, ErrKeyNotFound when the key is gone, and
// ErrUnavailable or ErrPermissionDenied when the vault cannot tell.
func (p *Provider) Wrap(ctx context.Context, key []byte) (provider.WrappedKey, error) {
	if err := ctx.Err(); err != nil {
		return provider.WrappedKey{}, err
	}
	st := p.cur.Load()
	if st == nil || p.cfg.Now().Sub(st.checked) >= stateFreshFor {
		var err error
		if st, err = p.refresh(ctx); err != nil {
			return provider.WrappedKey{}, err
		}
	}
	w, err := p.wrapWith(ctx, st, key)
	if errors.Is(err, provider.ErrKeyDisabled) {
		// The vault refused the version: disabled since it was checked.
		// Use what is usable now, once.
		next, rerr := p.refresh(ctx)
		if rerr != nil {
			return provider.WrappedKey{}, rerr
		}
		if next.kid != st.kid {
			return p.wrapWith(ctx, next, key)
		}
	}
	return w, err
}

// wrapWith wraps key with the version of st.
func (p *Provider) wrapWith(ctx context.Context, st *keyState, key []byte) (provider.WrappedKey, error) {
	switch {
	case isRSA(st.kty) && !p.cfg.WrapInVault:
		ct, err := rsa.EncryptOAEP(sha256.New(), p.cfg.Rand, st.pub, key, nil)
		if err != nil {
			return provider.WrappedKey{}, fmt.Errorf("azurekv: wrap locally with version %s: %w", st.kid, err)
		}
		return provider.WrappedKey{Version: st.version, Ciphertext: append([]byte{schemeRSAOAEP256}, ct...)}, nil
	case isRSA(st.kty):
		ct, err := p.vaultWrap(ctx, st, azkeys.EncryptionAlgorithmRSAOAEP256, key)
		if err != nil {
			return provider.WrappedKey{}, err
		}
		return provider.WrappedKey{Version: st.version, Ciphertext: append([]byte{schemeRSAOAEP256}, ct...)}, nil
	default:
		ct, err := p.vaultWrap(ctx, st, azkeys.EncryptionAlgorithmA256KW, pad(key))
		if err != nil {
			return provider.WrappedKey{}, err
		}
		return provider.WrappedKey{Version: st.version, Ciphertext: append([]byte{schemeA256KW}, ct...)}, nil
	}
}

func (p *Provider) vaultWrap(ctx context.Context, st *keyState, alg azkeys.EncryptionAlgorithm, value []byte) ([]byte, error) {
	var res azkeys.WrapKeyResponse
	err := p.call(ctx, opWrap, st.name, st.kid, func(ctx context.Context) error {
		var err error
		res, err = p.client.WrapKey(ctx, st.name, st.id, azkeys.KeyOperationParameters{Algorithm: &alg, Value: value}, nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	if res.KID == nil || !strings.EqualFold(string(*res.KID), st.kid) || len(res.Result) == 0 {
		return nil, fmt.Errorf("azurekv: wrapKey with version %s: the vault answered for another key version", st.kid)
	}
	return res.Result, nil
}

// Unwrap implements provider.Provider: one unwrapkey call with exactly the
// version in w.Version, which may name any key of the configured vault (so
// that data survives a change of key name). It returns ErrKeyNotFound for a
// version that is not a key ID of this vault in its one accepted spelling
// (refused before any call; see version.go) or that the vault does not
// know, ErrKeyDisabled for a disabled version, ErrInvalidCiphertext when the
// vault cannot unwrap the ciphertext, and ErrPermissionDenied or
// ErrUnavailable.
func (p *Provider) Unwrap(ctx context.Context, w provider.WrappedKey) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ref, err := p.parseVersion(w.Version)
	if err != nil {
		return nil, fmt.Errorf("azurekv: unwrap: %w", err)
	}
	if len(w.Ciphertext) < 2 {
		return nil, fmt.Errorf("azurekv: unwrapKey with version %s: wrapped key is empty: %w", ref.kid, provider.ErrInvalidCiphertext)
	}
	var alg azkeys.EncryptionAlgorithm
	switch w.Ciphertext[0] {
	case schemeRSAOAEP256:
		alg = azkeys.EncryptionAlgorithmRSAOAEP256
	case schemeA256KW:
		alg = azkeys.EncryptionAlgorithmA256KW
	default:
		return nil, fmt.Errorf("azurekv: unwrapKey with version %s: unknown wrap scheme %#x: %w", ref.kid, w.Ciphertext[0], provider.ErrInvalidCiphertext)
	}
	if err := p.admit(ctx, ref); err != nil {
		return nil, fmt.Errorf("azurekv: unwrap: %w", err)
	}
	var res azkeys.UnwrapKeyResponse
	err = p.call(ctx, opUnwrap, ref.name, ref.kid, func(ctx context.Context) error {
		var err error
		res, err = p.client.UnwrapKey(ctx, ref.name, ref.id, azkeys.KeyOperationParameters{Algorithm: &alg, Value: w.Ciphertext[1:]}, nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	if res.KID != nil {
		// The vault names the version it used in its own spelling: learn
		// it, and refuse any other spelling, so that one version has one
		// key_id.
		name, id, ok := p.splitKID(string(*res.KID))
		if !ok || name != ref.name || id != ref.id {
			clear(res.Result)
			if ok {
				p.book.saw(name, id)
			}
			return nil, fmt.Errorf("azurekv: unwrapKey with version %s: the vault answered for %s; only the vault's spelling of a version is accepted: %w", ref.kid, *res.KID, provider.ErrKeyNotFound)
		}
		p.book.saw(name, id)
	}
	if w.Ciphertext[0] == schemeA256KW {
		key, err := unpad(res.Result)
		if err != nil {
			return nil, fmt.Errorf("azurekv: unwrapKey with version %s: %w: %w", ref.kid, err, provider.ErrInvalidCiphertext)
		}
		return key, nil
	}
	return res.Result, nil
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

// refresh reads the key's current version from the vault and caches it.
// When the vault says no version may wrap (disabled, expired, the key
// gone), it forgets the cached version, so that Wrap cannot use it.
func (p *Provider) refresh(ctx context.Context) (*keyState, error) {
	p.refreshMu.Lock()
	defer p.refreshMu.Unlock()
	st, err := p.refreshLocked(ctx)
	if errors.Is(err, provider.ErrKeyDisabled) || errors.Is(err, provider.ErrKeyNotFound) {
		p.cur.Store(nil)
	}
	return st, err
}

func (p *Provider) refreshLocked(ctx context.Context) (*keyState, error) {
	var b azkeys.KeyBundle
	version := ""
	if p.cfg.KeyVersion != "" {
		version = p.kidOf(p.cfg.KeyName, p.cfg.KeyVersion)
	}
	err := p.call(ctx, opGet, p.cfg.KeyName, version, func(ctx context.Context) error {
		res, err := p.client.GetKey(ctx, p.cfg.KeyName, p.cfg.KeyVersion, nil)
		b = res.KeyBundle
		return err
	})
	now := p.cfg.Now()
	switch {
	case err == nil && usable(b.Attributes, now):
		st, err := p.stateFrom(b, "")
		if err != nil {
			return nil, err
		}
		p.cur.Store(st)
		return st, nil
	case err == nil && p.cfg.KeyVersion != "":
		return nil, fmt.Errorf("azurekv: pinned version %s of key %s is disabled, expired or not yet valid: %w", p.cfg.KeyVersion, p.cfg.KeyName, provider.ErrKeyDisabled)
	case err != nil && (p.cfg.KeyVersion != "" || !errors.Is(err, provider.ErrKeyDisabled)):
		return nil, err
	}
	// The newest version is not usable: fall back to the newest usable one.
	newest := ""
	if err == nil && b.Key != nil && b.Key.KID != nil {
		newest = strings.ToLower(b.Key.KID.Version())
	}
	return p.fallback(ctx, newest, now)
}

// fallback makes the newest usable version current when the newest version
// is not usable, and marks its version string with the newest version's ID.
func (p *Provider) fallback(ctx context.Context, newest string, now time.Time) (*keyState, error) {
	items, err := p.listVersionsOf(ctx, p.cfg.KeyName)
	if err != nil {
		return nil, err
	}
	var best, latest *versionItem
	for i := range items {
		it := &items[i]
		if latest == nil || later(it, latest) {
			latest = it
		}
		if usable(it.attrs, now) && (best == nil || later(it, best)) {
			best = it
		}
	}
	if newest == "" && latest != nil {
		newest = latest.id
	}
	if best == nil {
		return nil, &Error{Op: opGet.name, Vault: p.vaultHost, HSM: p.hsm, Kind: provider.ErrKeyDisabled,
			Message: fmt.Sprintf("no version of key %s is enabled and valid (newest: %s)", p.cfg.KeyName, newest)}
	}
	suffix := afterMarker + newest
	if cur := p.cur.Load(); cur != nil && cur.kid == best.kid {
		st := *cur
		st.version, st.checked = cur.kid+suffix, now
		p.cur.Store(&st)
		return &st, nil
	}
	var b azkeys.KeyBundle
	err = p.call(ctx, opGet, best.name, best.kid, func(ctx context.Context) error {
		res, err := p.client.GetKey(ctx, best.name, best.id, nil)
		b = res.KeyBundle
		return err
	})
	if err != nil {
		return nil, err
	}
	st, err := p.stateFrom(b, suffix)
	if err != nil {
		return nil, err
	}
	p.cur.Store(st)
	return st, nil
}

// listing is a complete listing of one key's versions.
type listing struct {
	name  string // case-folded key name
	at    time.Time
	items []versionItem
}

// recentListing returns the versions of key name if they were listed
// within stateFreshFor, so that a poll that fell back to an older version
// and then checks its cached versions lists once.
func (p *Provider) recentListing(name string) ([]versionItem, bool) {
	p.listMu.Lock()
	defer p.listMu.Unlock()
	l := p.lastList
	if l.name != strings.ToLower(name) || l.at.IsZero() || p.cfg.Now().Sub(l.at) >= stateFreshFor {
		return nil, false
	}
	return l.items, true
}

// versionItem is one entry of a version listing.
type versionItem struct {
	kid, name, id string // kid in its canonical spelling
	created       time.Time
	attrs         *azkeys.KeyAttributes
}

// later orders versions by creation time, then by ID, so that every node
// picks the same one.
func later(a, b *versionItem) bool {
	if !a.created.Equal(b.created) {
		return a.created.After(b.created)
	}
	return strings.ToLower(a.id) > strings.ToLower(b.id)
}

// listVersionsOf lists the versions of key name (keys/list permission) and
// records them in the provider's key book.
func (p *Provider) listVersionsOf(ctx context.Context, name string) ([]versionItem, error) {
	var out []versionItem
	err := p.call(ctx, opList, name, "", func(ctx context.Context) error {
		out = out[:0]
		pager := p.client.NewListKeyPropertiesVersionsPager(name, nil)
		for pager.More() {
			page, err := pager.NextPage(ctx)
			if err != nil {
				return err
			}
			for _, kp := range page.Value {
				if kp == nil || kp.KID == nil {
					continue
				}
				kname, id, ok := p.splitKID(string(*kp.KID))
				if !ok || !strings.EqualFold(kname, name) {
					continue
				}
				it := versionItem{kid: p.kidOf(kname, id), name: kname, id: id, attrs: kp.Attributes}
				if kp.Attributes != nil && kp.Attributes.Created != nil {
					it.created = *kp.Attributes.Created
				}
				out = append(out, it)
			}
		}
		return nil
	})
	now := p.cfg.Now()
	switch {
	case err == nil:
		spelled := ""
		ids := make([]string, 0, len(out))
		for _, it := range out {
			spelled = it.name
			ids = append(ids, it.id)
		}
		p.book.listed(name, spelled, ids, false, now)
		p.listMu.Lock()
		p.lastList = listing{name: strings.ToLower(name), at: now, items: slices.Clone(out)}
		p.listMu.Unlock()
	case errors.Is(err, provider.ErrKeyNotFound):
		p.book.listed(name, "", nil, true, now)
	}
	return out, err
}

// usable reports whether a version may wrap now: enabled, already valid and
// not expired.
func usable(a *azkeys.KeyAttributes, now time.Time) bool {
	if a == nil || a.Enabled == nil || !*a.Enabled {
		return false
	}
	if a.NotBefore != nil && now.Before(*a.NotBefore) {
		return false
	}
	return a.Expires == nil || now.Before(*a.Expires)
}

func isRSA(kty azkeys.KeyType) bool {
	return kty == azkeys.KeyTypeRSA || kty == azkeys.KeyTypeRSAHSM
}

// stateFrom checks a key bundle and makes it a keyState whose version
// string ends with suffix.
func (p *Provider) stateFrom(b azkeys.KeyBundle, suffix string) (*keyState, error) {
	if b.Key == nil || b.Key.KID == nil || b.Key.Kty == nil {
		return nil, fmt.Errorf("azurekv: key %s: the vault's answer has no key", p.cfg.KeyName)
	}
	name, id, ok := p.splitKID(string(*b.Key.KID))
	if !ok {
		return nil, fmt.Errorf("azurekv: key %s: the vault returned key ID %q, not a versioned key ID of %s", p.cfg.KeyName, *b.Key.KID, p.vaultHost)
	}
	kid := p.kidOf(name, id)
	st := &keyState{version: kid + suffix, kid: kid, name: name, id: id, kty: *b.Key.Kty, checked: p.cfg.Now()}
	for _, op := range b.Key.KeyOps {
		if op != nil {
			st.ops = append(st.ops, string(*op))
		}
	}
	need := []string{string(azkeys.KeyOperationUnwrapKey)}
	switch {
	case isRSA(st.kty):
		if len(b.Key.N) == 0 || len(b.Key.E) == 0 || len(b.Key.E) > 4 {
			return nil, fmt.Errorf("azurekv: key %s: RSA public key missing or malformed", kid)
		}
		st.pub = &rsa.PublicKey{N: new(big.Int).SetBytes(b.Key.N), E: int(new(big.Int).SetBytes(b.Key.E).Int64())}
		if st.pub.N.BitLen() < 2048 {
			return nil, fmt.Errorf("azurekv: key %s: RSA key of %d bits; use 2048 bits or more", kid, st.pub.N.BitLen())
		}
		if p.cfg.WrapInVault {
			need = append(need, string(azkeys.KeyOperationWrapKey))
		}
	case st.kty == azkeys.KeyTypeOctHSM || st.kty == azkeys.KeyTypeOct:
		need = append(need, string(azkeys.KeyOperationWrapKey))
	default:
		return nil, fmt.Errorf("azurekv: key %s has type %s; use an RSA, RSA-HSM or oct-HSM key", kid, st.kty)
	}
	for _, op := range need {
		if len(st.ops) > 0 && !slices.ContainsFunc(st.ops, func(o string) bool { return strings.EqualFold(o, op) }) {
			return nil, fmt.Errorf("azurekv: key %s does not permit the %s operation (its key_ops are %v); allow it with az keyvault key set-attributes --ops", kid, op, st.ops)
		}
	}
	p.book.saw(name, id)
	return st, nil
}

// call runs one vault operation on key name (and version, a canonical key
// ID, or "" for an operation on the key) under the per-call timeout, the
// remembered permission denials and the circuit breaker, and classifies
// its error.
func (p *Provider) call(ctx context.Context, op operation, name, version string, f func(context.Context) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("azurekv: %s: %w", op.name, err)
	}
	target := targetScope(op, name, version)
	if err := p.deniedErr(target); err != nil {
		return err
	}
	probe, err := p.breaker.allow(p.cfg.Now())
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	err = f(cctx)
	cancel()
	err = p.classify(ctx, op, name, version, err)
	o := neutral
	switch {
	case err == nil:
		o = success
	case ctx.Err() != nil:
		// The caller gave up: that says nothing about the vault.
	case errors.Is(err, provider.ErrUnavailable):
		o = failure
	default:
		// The vault answered (403, 404, 400...): it is reachable.
		var e *Error
		if errors.As(err, &e) && e.Status != 0 && e.Op != opToken.name {
			o = success
		}
	}
	p.breaker.done(p.cfg.Now(), probe, o, err)
	var e *Error
	if o == failure && errors.As(err, &e) {
		// The failure that opens the breaker says when it lets a probe
		// through, as the breaker's own errors do.
		e.retryAfter = p.breaker.retryIn(p.cfg.Now())
	}
	if errors.Is(err, provider.ErrPermissionDenied) {
		p.rememberDenied(deniedScope(target, err), err)
	}
	return err
}

// identityScope is where a denial of the identity as a whole is
// remembered: a refused token, a 401, the vault's firewall.
const identityScope = "identity"

// maxDenied bounds the denials remembered: version strings come from
// etcd, so their number is not the plugin's to choose.
const maxDenied = 1024

// targetScope is where a 403 of op on one key version (or on the key) is
// remembered, so that a version string naming a key the identity may not
// use blocks nothing else.
func targetScope(op operation, name, version string) string {
	if version != "" {
		return op.name + " " + strings.ToLower(version)
	}
	return op.name + " key " + strings.ToLower(name)
}

// deniedScope is where err, a denial of a call on target, is remembered.
func deniedScope(target string, err error) string {
	var e *Error
	if errors.As(err, &e) && (e.Op == opToken.name || e.Status == http.StatusUnauthorized ||
		e.InnerCode == "ForbiddenByFirewall" || e.InnerCode == "ForbiddenByConnection") {
		return identityScope
	}
	return target
}

// deniedErr returns the remembered denial that applies to a call on
// target, if any.
func (p *Provider) deniedErr(target string) error {
	p.deniedMu.Lock()
	defer p.deniedMu.Unlock()
	now := p.cfg.Now()
	for _, scope := range []string{identityScope, target} {
		d, ok := p.denied[scope]
		if !ok {
			continue
		}
		if !now.Before(d.until) {
			delete(p.denied, scope)
			continue
		}
		return fmt.Errorf("%w (remembered; the vault is asked again in %s)", d.err, d.until.Sub(now).Round(time.Second))
	}
	return nil
}

func (p *Provider) rememberDenied(scope string, err error) {
	p.deniedMu.Lock()
	defer p.deniedMu.Unlock()
	now := p.cfg.Now()
	if len(p.denied) >= maxDenied {
		for k, d := range p.denied {
			if !now.Before(d.until) {
				delete(p.denied, k)
			}
		}
		for k := range p.denied {
			if len(p.denied) < maxDenied {
				break
			}
			if k != identityScope {
				delete(p.denied, k)
			}
		}
	}
	p.denied[scope] = deniedEntry{until: now.Add(p.cfg.DeniedBackoff), err: err}
}

// pad pads a key for AES key wrap: 0x80, then zeros up to a multiple of 8
// bytes, at least 16 (ISO/IEC 7816-4).
func pad(key []byte) []byte {
	n := max(16, (len(key)+1+7)/8*8)
	out := make([]byte, n)
	copy(out, key)
	out[len(key)] = 0x80
	return out
}

func unpad(b []byte) ([]byte, error) {
	i := len(b) - 1
	for i >= 0 && b[i] == 0 {
		i--
	}
	if i < 0 || b[i] != 0x80 || len(b) < 16 || len(b)%8 != 0 {
		return nil, errors.New("bad key padding")
	}
	return b[:i], nil
}

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
