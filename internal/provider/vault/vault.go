// Package vault is the provider backed by a key of a HashiCorp Vault (or
// OpenBao: same API) transit secrets engine, through the official client
// github.com/hashicorp/vault/api.
//
// # Versions
//
// A version is the transit key_version, spelled in canonical decimal ("3").
// The current version is the key's latest_version (which Vault keeps at or
// above min_encryption_version). Wrap always pins key_version, so the
// version it reports is the one Vault used, and binds it with
// associated_data: a ciphertext presented under another version does not
// authenticate. A version below min_decryption_version is disabled: Unwrap
// returns provider.ErrKeyDisabled (gRPC FailedPrecondition through the
// plugin). A key whose auto_rotate_period rotates it inside Vault is
// followed by itself: CurrentVersion is one read of the key, made once per
// poll.
//
// # Rotate and retire
//
// Rotate calls transit/keys/NAME/rotate. Retire(v) raises
// min_decryption_version to v+1 (and min_encryption_version with it when
// it is set lower, as Vault requires): transit disables versions by
// threshold, so every version up to v stops decrypting. The plugin's
// rotation reaches it only from its retire stage, after verify showed that
// nothing stored depends on those versions, and only for versions beyond
// its keep count, which are the oldest: never while data still uses them.
// Vault keeps the key material: lowering min_decryption_version again
// undoes a retire, until someone trims the key.
//
// # Tokens
//
// Tokens live in memory only. A session logs in (token file, AppRole,
// TLS certificate or JWT), renews the token with the client's
// LifetimeWatcher, and logs in again when renewal fails, when the token
// nears its maximum TTL, or when Vault refuses it. While renewal and the
// login after it fail, CurrentVersion fails too (so /readyz reports it)
// and ReportState exports the token's expiry, long before it expires.
//
// # Resilience
//
// Every call has a timeout. The Vault client retries a failed request once
// (MaxRetries 1: a connection reset or a leader election costs one retry,
// not a failed Decrypt), and the provider does the rest: after three
// consecutive unavailable-class failures (5xx, sealed, standby, network)
// calls fail fast for a backoff doubling from 1 s to 8 s, one probe at a
// time, so an outage costs Vault about one request per backoff whatever the
// load, and the plugin's poll returns within the backoff of Vault's return.
package vault

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Name is the provider name used in metrics, logs and configuration.
const Name = "vault"

// Defaults for Config fields left zero.
const (
	DefaultMount            = "transit"
	DefaultTimeout          = 10 * time.Second
	DefaultFailureThreshold = 3
	DefaultMinBackoff       = time.Second
	DefaultMaxBackoff       = 8 * time.Second
)

// stateFreshFor is how long a read of the key is trusted by Wrap (the time
// between a poll and the Wrap it triggers) and by Unwrap's local checks of
// a version beyond the latest one.
const stateFreshFor = 2 * time.Second

// schemeAEAD is the first byte of every wrapped key: the raw transit
// ciphertext (nonce, ciphertext, tag) of an AEAD key, with the version in
// WrappedKey.Version and bound as associated data. Values are never
// reused.
const schemeAEAD = 0x01

// Config configures a Provider.
type Config struct {
	// Client is the Vault client with the address, TLS and namespace set.
	// Required. The provider sets its token.
	Client *api.Client
	// Mount is the transit mount path. Default "transit".
	Mount string
	// KeyName is the transit key's name. Required.
	KeyName string
	// Auth logs in. Required.
	Auth Method
	// Timeout bounds each call to Vault, the client's retry included.
	// Default 10 s.
	Timeout time.Duration
	// FailureThreshold, MinBackoff and MaxBackoff shape the backoff while
	// Vault is unavailable. Defaults 3, 1 s and 8 s.
	FailureThreshold       int
	MinBackoff, MaxBackoff time.Duration
	// Now returns the current time. Default time.Now.
	Now func() time.Time
}

// Provider is the Vault transit provider. It is safe for concurrent use.
type Provider struct {
	cfg     Config
	client  *api.Client
	session *session
	breaker *breaker
	keyPath string // MOUNT/keys/NAME

	readMu sync.Mutex // serializes reads of the key
	state  atomic.Pointer[keyState]

	calls atomic.Uint64 // requests sent to Vault (data calls; logins and renewals aside)

	deniedMu  sync.Mutex
	denied    map[string]deniedEntry // by operation: a 403 of the policy, remembered
	deniedGen atomic.Uint64          // the login generation the denials are of
}

// deniedFor is how long a 403 of the token's policy (not of the token
// itself) is remembered per operation, so that a removed policy is not
// asked about at the rate of Decrypt calls.
const deniedFor = 5 * time.Second

type deniedEntry struct {
	until time.Time
	err   error
}

var (
	_ provider.Provider         = (*Provider)(nil)
	_ provider.Rotator          = (*Provider)(nil)
	_ provider.Retirer          = (*Provider)(nil)
	_ provider.HealthChecker    = (*Provider)(nil)
	_ provider.VersionLister    = (*Provider)(nil)
	_ provider.VersionChecker   = (*Provider)(nil)
	_ provider.VersionValidator = (*Provider)(nil)
	_ provider.StateReporter    = (*Provider)(nil)
)

var (
	keyNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)
	mountRE   = regexp.MustCompile(`^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$`)
	versionRE = regexp.MustCompile(`^[1-9][0-9]{0,9}$`)
)

// New returns a Provider. It makes no network call: the first call logs
// in.
func New(cfg Config) (*Provider, error) {
	if cfg.Client == nil {
		return nil, errors.New("vault: no client")
	}
	if cfg.Auth == nil {
		return nil, errors.New("vault: no auth method")
	}
	if cfg.Mount == "" {
		cfg.Mount = DefaultMount
	}
	cfg.Mount = strings.Trim(cfg.Mount, "/")
	if !mountRE.MatchString(cfg.Mount) {
		return nil, fmt.Errorf("vault: transit mount %q must be a path such as transit or kms/transit", cfg.Mount)
	}
	if !keyNameRE.MatchString(cfg.KeyName) {
		return nil, fmt.Errorf("vault: key name %q must be 1-128 letters, digits, '.', '_' and '-'", cfg.KeyName)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.FailureThreshold <= 0 {
		cfg.FailureThreshold = DefaultFailureThreshold
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = DefaultMinBackoff
	}
	if cfg.MaxBackoff < cfg.MinBackoff {
		cfg.MaxBackoff = max(DefaultMaxBackoff, cfg.MinBackoff)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Provider{
		cfg:     cfg,
		client:  cfg.Client,
		session: newSession(cfg.Client, cfg.Auth, cfg.Now),
		breaker: newBreaker(cfg.FailureThreshold, cfg.MinBackoff, cfg.MaxBackoff),
		keyPath: cfg.Mount + "/keys/" + cfg.KeyName,
	}, nil
}

// Name implements provider.Provider.
func (p *Provider) Name() string { return Name }

// KeyPath returns MOUNT/keys/NAME.
func (p *Provider) KeyPath() string { return p.keyPath }

// Address returns Vault's address.
func (p *Provider) Address() string { return p.client.Address() }

// Close stops the token's renewal.
func (p *Provider) Close() error {
	p.session.close()
	return nil
}

// Token describes the token in use (no secret).
func (p *Provider) Token() TokenInfo { return p.session.info() }

// Calls returns how many requests the provider sent to Vault for key
// operations (reads, encrypts, decrypts, rotations, config), logins and
// renewals aside.
func (p *Provider) Calls() uint64 { return p.calls.Load() }

// CurrentVersion implements provider.Provider: one read of the key. It
// also fails while the token's renewal and the login after it fail, so
// that /readyz says so before the token expires.
func (p *Provider) CurrentVersion(ctx context.Context) (string, error) {
	st, err := p.readKey(ctx)
	if err != nil {
		return "", err
	}
	if err := p.session.problem(); err != nil {
		// Vault answers: try to replace the token now (once per poll,
		// within the login backoff), so that a fixed credential file
		// counts at the next poll.
		if lerr := p.session.refused(ctx, p.session.generation()); lerr == nil && p.session.problem() == nil {
			return st.current(), nil
		}
		return "", &Error{Op: opRenew, Kind: provider.ErrUnavailable, Err: err, Message: err.Error()}
	}
	return st.current(), nil
}

// Wrap implements provider.Provider: transit encrypt with the current
// version pinned and bound as associated data.
func (p *Provider) Wrap(ctx context.Context, key []byte) (provider.WrappedKey, error) {
	st, err := p.freshState(ctx)
	if err != nil {
		return provider.WrappedKey{}, err
	}
	v := st.current()
	body := map[string]any{
		"plaintext":       base64.StdEncoding.EncodeToString(key),
		"key_version":     st.latest,
		"associated_data": aad(v),
	}
	if st.derived {
		body["context"] = keyContext
	}
	path := p.cfg.Mount + "/encrypt/" + p.cfg.KeyName
	s, err := p.call(ctx, opEncrypt, path, v, http.MethodPut, body)
	if errors.Is(err, provider.ErrPermissionDenied) {
		// Encrypting with a key that does not exist asks for the create
		// capability, which the plugin's policy does not grant: a 403 may
		// be a deleted key.
		if _, rerr := p.readKey(ctx); errors.Is(rerr, provider.ErrKeyNotFound) {
			return provider.WrappedKey{}, rerr
		}
	}
	if err != nil {
		return provider.WrappedKey{}, err
	}
	ct, _ := s.Data["ciphertext"].(string)
	prefix := "vault:v" + v + ":"
	if !strings.HasPrefix(ct, prefix) {
		return provider.WrappedKey{}, &Error{Op: opEncrypt, Path: path, Version: v, Kind: provider.ErrUnavailable,
			Message: fmt.Sprintf("Vault answered a ciphertext not of version %s", v)}
	}
	raw, err := base64.StdEncoding.DecodeString(ct[len(prefix):])
	if err != nil || len(raw) == 0 {
		return provider.WrappedKey{}, &Error{Op: opEncrypt, Path: path, Version: v, Kind: provider.ErrUnavailable, Message: "Vault answered a ciphertext that is not base64"}
	}
	return provider.WrappedKey{Version: v, Ciphertext: append([]byte{schemeAEAD}, raw...)}, nil
}

// minWrapped is the shortest wrapped key: the scheme byte, a 12-byte nonce
// and a 16-byte tag.
const minWrapped = 1 + 12 + 16

// Unwrap implements provider.Provider: transit decrypt of exactly
// w.Version. A malformed version or wrapped key, a version beyond the
// key's latest one or below its min_decryption_version is refused without
// a decrypt call.
func (p *Provider) Unwrap(ctx context.Context, w provider.WrappedKey) ([]byte, error) {
	n, err := parseVersion(w.Version)
	if err != nil {
		return nil, fmt.Errorf("vault: unwrap: %w", err)
	}
	if len(w.Ciphertext) < minWrapped || w.Ciphertext[0] != schemeAEAD {
		return nil, fmt.Errorf("vault: unwrap with key version %s: %w: not a wrapped key of this provider", w.Version, provider.ErrInvalidCiphertext)
	}
	st := p.state.Load()
	if st == nil || (n > st.latest && p.cfg.Now().Sub(st.read) > stateFreshFor) {
		if st, err = p.readKey(ctx); err != nil {
			return nil, err
		}
	}
	switch {
	case n > st.latest:
		return nil, fmt.Errorf("vault: unwrap: key version %s: %w: %s's latest version is %d", w.Version, provider.ErrKeyNotFound, p.keyPath, st.latest)
	case n < st.minDecryption:
		return nil, fmt.Errorf("vault: unwrap: key version %s: %w: below min_decryption_version %d of %s", w.Version, provider.ErrKeyDisabled, st.minDecryption, p.keyPath)
	}
	body := map[string]any{
		"ciphertext":      "vault:v" + w.Version + ":" + base64.StdEncoding.EncodeToString(w.Ciphertext[1:]),
		"associated_data": aad(w.Version),
	}
	if st.derived {
		body["context"] = keyContext
	}
	s, err := p.call(ctx, opDecrypt, p.cfg.Mount+"/decrypt/"+p.cfg.KeyName, w.Version, http.MethodPut, body)
	if err != nil {
		return nil, err
	}
	pt, _ := s.Data["plaintext"].(string)
	key, err := base64.StdEncoding.DecodeString(pt)
	if err != nil || len(key) == 0 {
		return nil, &Error{Op: opDecrypt, Version: w.Version, Kind: provider.ErrInvalidCiphertext, Message: "Vault answered no plaintext"}
	}
	return key, nil
}

// Rotate implements provider.Rotator: transit rotate (update on
// MOUNT/keys/NAME/rotate), then a read of the key.
func (p *Provider) Rotate(ctx context.Context) (string, error) {
	before := p.state.Load()
	if _, err := p.call(ctx, opRotate, p.keyPath+"/rotate", "", http.MethodPut, map[string]any{}); err != nil {
		return "", err
	}
	st, err := p.readKey(ctx)
	if err != nil {
		return "", err
	}
	if before != nil && st.latest <= before.latest {
		return "", fmt.Errorf("vault: rotate: %s still has latest version %d", p.keyPath, st.latest)
	}
	return st.current(), nil
}

// Retire implements provider.Retirer: it raises min_decryption_version
// above version (see the package comment). Retiring a version that is
// already below min_decryption_version succeeds without a change.
func (p *Provider) Retire(ctx context.Context, version string) error {
	n, err := parseVersion(version)
	if err != nil {
		return fmt.Errorf("vault: retire: %w", err)
	}
	st, err := p.readKey(ctx)
	if err != nil {
		return err
	}
	switch {
	case n > st.latest:
		return fmt.Errorf("vault: retire: key version %s: %w", version, provider.ErrKeyNotFound)
	case n == st.latest:
		return fmt.Errorf("vault: retire: key version %s is the current version of %s; rotate first", version, p.keyPath)
	case n < st.minDecryption:
		return nil
	}
	body := map[string]any{"min_decryption_version": n + 1}
	if st.minEncryption > 0 && st.minEncryption < n+1 {
		body["min_encryption_version"] = n + 1
	}
	if _, err := p.call(ctx, opConfig, p.keyPath+"/config", version, http.MethodPut, body); err != nil {
		return err
	}
	_, err = p.readKey(ctx)
	return err
}

// Versions implements provider.VersionLister from one read of the key:
// versions below min_decryption_version are disabled, the latest is
// current.
func (p *Provider) Versions(ctx context.Context) ([]provider.VersionInfo, error) {
	st, err := p.readKey(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]provider.VersionInfo, 0, st.latest)
	for v := st.minAvailable; v <= st.latest; v++ {
		vi := provider.VersionInfo{Version: strconv.Itoa(v), State: provider.VersionEnabled, Current: v == st.latest, Created: st.created[v]}
		if v < st.minDecryption {
			vi.State = provider.VersionDisabled
		}
		out = append(out, vi)
	}
	return out, nil
}

// RevokedVersions implements provider.VersionChecker from the read of the
// key CurrentVersion made in the same poll (or a new one): versions below
// min_decryption_version, beyond the latest version (the key was deleted
// and made again), or of a deleted key.
func (p *Provider) RevokedVersions(ctx context.Context, versions []string) ([]string, error) {
	st := p.state.Load()
	if st == nil || p.cfg.Now().Sub(st.read) > stateFreshFor {
		var err error
		st, err = p.readKey(ctx)
		if errors.Is(err, provider.ErrKeyNotFound) {
			var out []string
			for _, v := range versions {
				if _, perr := parseVersion(v); perr == nil {
					out = append(out, v)
				}
			}
			return out, nil
		}
		if err != nil {
			return nil, err
		}
	}
	var out []string
	for _, v := range versions {
		n, err := parseVersion(v)
		if err != nil {
			continue
		}
		if n < st.minDecryption || n > st.latest {
			out = append(out, v)
		}
	}
	return out, nil
}

// Health implements provider.HealthChecker: a read of the key and the
// token's state.
func (p *Provider) Health(ctx context.Context) error {
	_, err := p.CurrentVersion(ctx)
	return err
}

// ValidVersion implements provider.VersionValidator: canonical decimal,
// 1 to 2147483647, no sign, no leading zero.
func (p *Provider) ValidVersion(version string) error {
	_, err := parseVersion(version)
	return err
}

func parseVersion(v string) (int, error) {
	if !versionRE.MatchString(v) {
		return 0, fmt.Errorf("%w: %q is not a transit key version (a decimal number without leading zeros)", provider.ErrKeyNotFound, oneLine(v, 40))
	}
	n, err := strconv.ParseInt(v, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%w: transit key version %s is out of range", provider.ErrKeyNotFound, v)
	}
	return int(n), nil
}

// aad is the associated data bound to a wrapped key: the version, so that
// a ciphertext does not authenticate under any other version.
func aad(version string) string {
	return base64.StdEncoding.EncodeToString([]byte("kms-plugin/vault/v1 key_version=" + version))
}

// keyContext is the context sent for a derived key: fixed, so one derived
// key serves every local KEK.
var keyContext = base64.StdEncoding.EncodeToString([]byte("kms-plugin"))

// ReportState implements provider.StateReporter: the backoff's state and
// the token's expiry, renewal failures and trouble, without a call.
func (p *Provider) ReportState() provider.StoreState {
	ti := p.session.info()
	expiry := 0.0
	if !ti.Expiry.IsZero() {
		expiry = float64(ti.Expiry.UnixNano()) / 1e9
	}
	trouble := 0.0
	if ti.Trouble != nil {
		trouble = 1
	}
	return provider.StoreState{
		Breaker: p.breaker.report(p.cfg.Now()),
		Gauges: []provider.Gauge{
			{Name: "vault_token_expiry_timestamp_seconds", Help: "When the Vault token in use expires (Unix time); 0 when it never expires or there is none yet.", Value: expiry},
			{Name: "vault_token_renewal_failing", Help: "1 while the Vault token's renewal and the login after it fail, long before the token expires; else 0.", Value: trouble},
			{Name: "vault_token_renewal_failures", Help: "Vault token renewals that failed since start (each followed by a login).", Value: float64(ti.RenewFailures)},
			{Name: "vault_logins", Help: "Logins to Vault since start.", Value: float64(ti.Logins)},
		},
	}
}

// call sends one request for a key operation: with a token, under the
// timeout and the backoff, classifying its error. A refused token leads to
// one login and one retry.
func (p *Provider) call(ctx context.Context, op, path, version, method string, body map[string]any) (*api.Secret, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("vault: %s: %w", op, err)
	}
	if gen := p.session.generation(); gen != p.deniedGen.Load() {
		// A new token may have another policy: forget the denials.
		p.deniedGen.Store(gen)
		p.deniedMu.Lock()
		clear(p.denied)
		p.deniedMu.Unlock()
	}
	if err := p.deniedErr(op); err != nil {
		return nil, err
	}
	for attempt := 0; ; attempt++ {
		probe, err := p.breaker.allow(p.cfg.Now())
		if err != nil {
			return nil, err
		}
		if err := p.session.ensure(ctx); err != nil {
			p.breaker.done(p.cfg.Now(), probe, false, errors.Is(err, provider.ErrUnavailable), err)
			return nil, err
		}
		gen := p.session.generation()
		cctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
		p.calls.Add(1)
		s, err := p.send(cctx, method, path, body)
		cancel()
		err = classify(ctx, op, path, version, err)
		var e *Error
		isE := errors.As(err, &e)
		unavailable := errors.Is(err, provider.ErrUnavailable) && ctx.Err() == nil
		answered := err == nil || (isE && e.Status != 0 && !unavailable)
		p.breaker.done(p.cfg.Now(), probe, answered, unavailable, err)
		if unavailable && isE {
			e.retryAfter = p.breaker.retryIn(p.cfg.Now())
		}
		if err == nil && s == nil && method == http.MethodGet {
			return nil, &Error{Op: op, Path: path, Version: version, Status: http.StatusNotFound, Kind: provider.ErrKeyNotFound, Message: "no such key"}
		}
		if answered {
			p.session.retryNow()
		}
		if isE && errors.Is(err, provider.ErrPermissionDenied) {
			if attempt == 0 && p.tokenRefused(ctx, e) {
				if lerr := p.session.refused(ctx, gen); lerr != nil {
					return nil, fmt.Errorf("%w (and the login after it: %v)", err, lerr)
				}
				continue
			}
			p.rememberDenied(op, err)
		}
		if err != nil {
			return nil, err
		}
		if s == nil {
			s = &api.Secret{}
		}
		return s, nil
	}
}

func (p *Provider) deniedErr(op string) error {
	p.deniedMu.Lock()
	defer p.deniedMu.Unlock()
	d, ok := p.denied[op]
	if !ok {
		return nil
	}
	now := p.cfg.Now()
	if !now.Before(d.until) {
		delete(p.denied, op)
		return nil
	}
	return fmt.Errorf("%w (remembered; Vault is asked again in %s)", d.err, d.until.Sub(now).Round(100*time.Millisecond))
}

func (p *Provider) rememberDenied(op string, err error) {
	p.deniedMu.Lock()
	defer p.deniedMu.Unlock()
	if p.denied == nil {
		p.denied = map[string]deniedEntry{}
	}
	p.denied[op] = deniedEntry{until: p.cfg.Now().Add(deniedFor), err: err}
}

// tokenRefused reports whether a 403 was Vault refusing the token itself
// (revoked, expired) rather than its policy refusing the path: from the
// message when Vault says so, else from a lookup-self.
func (p *Provider) tokenRefused(ctx context.Context, e *Error) bool {
	if e.invalidToken {
		return true
	}
	cctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	_, err := p.client.Auth().Token().LookupSelfWithContext(cctx)
	var re *api.ResponseError
	return errors.As(err, &re) && re.StatusCode == http.StatusForbidden
}

func (p *Provider) send(ctx context.Context, method, path string, body map[string]any) (*api.Secret, error) {
	switch method {
	case http.MethodGet:
		return p.client.Logical().ReadWithContext(ctx, path)
	default:
		return p.client.Logical().WriteWithContext(ctx, path, body)
	}
}

// keyState is what one read of the key said.
type keyState struct {
	read                                    time.Time
	typ                                     string
	latest, minDecryption, minEncryption    int
	minAvailable                            int
	derived, convergent, supportsEncryption bool
	autoRotate                              time.Duration
	created                                 map[int]time.Time
}

func (st *keyState) current() string { return strconv.Itoa(st.latest) }

// authenticatedTypes are the transit key types Wrap accepts: AEADs that
// bind associated data.
var authenticatedTypes = map[string]bool{"aes256-gcm96": true, "aes128-gcm96": true, "chacha20-poly1305": true}

// freshState returns the key's state as read within stateFreshFor, reading
// it again when older.
func (p *Provider) freshState(ctx context.Context) (*keyState, error) {
	if st := p.state.Load(); st != nil && p.cfg.Now().Sub(st.read) <= stateFreshFor {
		return st, nil
	}
	return p.readKey(ctx)
}

// readKey reads MOUNT/keys/NAME (read capability) and checks that the key
// can serve: an authenticated encryption type, not convergent.
func (p *Provider) readKey(ctx context.Context) (*keyState, error) {
	p.readMu.Lock()
	defer p.readMu.Unlock()
	s, err := p.call(ctx, opRead, p.keyPath, "", http.MethodGet, nil)
	if err != nil {
		return nil, err
	}
	st, err := parseKey(s.Data, p.cfg.Now())
	if err != nil {
		return nil, fmt.Errorf("vault: read key %s: %w", p.keyPath, err)
	}
	if !authenticatedTypes[st.typ] {
		return nil, fmt.Errorf("vault: key %s has type %s: the plugin needs an authenticated encryption type (aes256-gcm96, aes128-gcm96 or chacha20-poly1305)", p.keyPath, st.typ)
	}
	if st.convergent {
		return nil, fmt.Errorf("vault: key %s uses convergent encryption: create a key without convergent_encryption for the plugin", p.keyPath)
	}
	if old := p.state.Load(); old != nil {
		// Vault lists creation times only from min_decryption_version on;
		// keep the ones seen before.
		for v, t := range old.created {
			if _, ok := st.created[v]; !ok && v <= st.latest {
				st.created[v] = t
			}
		}
	}
	p.state.Store(st)
	return st, nil
}

func parseKey(d map[string]any, now time.Time) (*keyState, error) {
	st := &keyState{read: now, created: map[int]time.Time{}}
	st.typ, _ = d["type"].(string)
	latest, ok := jsonInt(d["latest_version"])
	if !ok || latest < 1 {
		return nil, errors.New("the answer has no latest_version")
	}
	st.latest = int(latest)
	if v, ok := jsonInt(d["min_decryption_version"]); ok {
		st.minDecryption = int(v)
	}
	if v, ok := jsonInt(d["min_encryption_version"]); ok {
		st.minEncryption = int(v)
	}
	if v, ok := jsonInt(d["min_available_version"]); ok {
		st.minAvailable = int(v)
	}
	st.minDecryption = max(st.minDecryption, 1)
	st.minAvailable = max(st.minAvailable, 1)
	if v, ok := jsonInt(d["auto_rotate_period"]); ok {
		st.autoRotate = time.Duration(v) * time.Second
	}
	st.derived, _ = d["derived"].(bool)
	st.convergent, _ = d["convergent_encryption"].(bool)
	st.supportsEncryption, _ = d["supports_encryption"].(bool)
	if keys, ok := d["keys"].(map[string]any); ok {
		for k, v := range keys {
			n, err := strconv.Atoi(k)
			if err != nil {
				continue
			}
			if t, ok := jsonInt(v); ok && t > 0 {
				st.created[n] = time.Unix(t, 0)
			}
		}
	}
	return st, nil
}
