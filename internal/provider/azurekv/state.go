package azurekv

import (
	"context"
	"crypto/rsa"
	"errors"
	"fmt"
	"math/big"
	"slices"
	"strings"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// afterMarker separates a version's kid from the newest version's ID when
// the key went backwards.
const afterMarker = "#after="

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
