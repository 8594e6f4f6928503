package azurekv

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Version strings travel in clear next to every wrapped local KEK, so
// whoever can write etcd or reach the plugin's socket can send any string.
// Key Vault answers for many spellings of one key version (the host and the
// key name in any case, a port, a trailing slash, a query, percent escapes,
// anything after '#'), and to the plugin every distinct string is a distinct
// key_id and cache entry: one genuine wrapped KEK replayed under N spellings
// would cost N unwraps and N cache entries. So a version string has exactly
// one accepted spelling, the one the provider writes:
//
//	https://HOST/keys/NAME/ID[#after=ID]
//
// HOST is the configured vault's host in lower case (":443" dropped), each
// ID is 32 lower-case hex digits, and NAME is spelled as the vault
// spells it once the vault has named the key (in a key ID it returned); the
// ID after "#after=" must be a version of that key the vault listed.
// parseVersion checks the syntax and admit what the vault said; both refuse
// with ErrKeyNotFound before any call for the version itself.

// canonicalIDRE is a version ID as Key Vault and Managed HSM write it: 32
// lower-case hex digits.
var canonicalIDRE = regexp.MustCompile(`^[0-9a-f]{32}$`)

// versionRef is a parsed version string.
type versionRef struct {
	kid   string // https://HOST/keys/NAME/ID
	name  string // the key name as spelled in the string
	id    string // the version ID
	after string // the ID after "#after=", or ""
}

// String returns the version string ref was parsed from.
func (r versionRef) String() string {
	if r.after == "" {
		return r.kid
	}
	return r.kid + afterMarker + r.after
}

// kidPrefix is what every canonical key ID of the vault starts with.
func (p *Provider) kidPrefix() string { return "https://" + p.vaultHost + "/keys/" }

// kidOf returns the canonical key ID of version id of key name.
func (p *Provider) kidOf(name, id string) string {
	return p.kidPrefix() + name + "/" + strings.ToLower(id)
}

// parseVersion parses a version string in its one canonical spelling
// (see above), without any network call.
func (p *Provider) parseVersion(v string) (versionRef, error) {
	rest, ok := strings.CutPrefix(v, p.kidPrefix())
	if !ok {
		return versionRef{}, p.foreignVersion(v)
	}
	kidPart, frag, hasFrag := strings.Cut(rest, "#")
	name, id, ok := strings.Cut(kidPart, "/")
	if !ok || !keyNameRE.MatchString(name) || !canonicalIDRE.MatchString(id) {
		return versionRef{}, fmt.Errorf("version %q is not a versioned key ID of %s in the form https://%s/keys/NAME/VERSION: %w", v, p.vaultHost, p.vaultHost, provider.ErrKeyNotFound)
	}
	ref := versionRef{kid: p.kidPrefix() + kidPart, name: name, id: id}
	if hasFrag {
		after, ok := strings.CutPrefix(frag, afterMarker[1:])
		if !ok || !canonicalIDRE.MatchString(after) {
			return versionRef{}, fmt.Errorf("version %q: only %sVERSION may follow the key ID: %w", v, afterMarker, provider.ErrKeyNotFound)
		}
		ref.after = after
	}
	return ref, nil
}

// foreignVersion explains why v, which does not start with the vault's
// key ID prefix, is refused.
func (p *Provider) foreignVersion(v string) error {
	u, err := url.Parse(strings.TrimSpace(v))
	switch {
	case err != nil || u.Host == "" || !strings.HasPrefix(u.Path, "/keys/"):
		return fmt.Errorf("version %q is not a Key Vault key ID: %w", v, provider.ErrKeyNotFound)
	case !strings.EqualFold(u.Hostname(), strings.Split(p.vaultHost, ":")[0]):
		return fmt.Errorf("version %s belongs to vault %s, not to the configured %s: %w", v, u.Host, p.vaultHost, provider.ErrKeyNotFound)
	}
	return fmt.Errorf("version %q is not spelled as this plugin writes key IDs of %s (https://%s/keys/NAME/VERSION): %w", v, p.vaultHost, p.vaultHost, provider.ErrKeyNotFound)
}

// splitKID splits a key ID the vault returned, leniently:
// https://HOST/keys/NAME/ID, HOST and ID in any case. A key ID it refuses
// is never written into a version string (it could not be read back).
func (p *Provider) splitKID(kid string) (name, id string, ok bool) {
	u, err := url.Parse(kid)
	if err != nil || u.Scheme != "https" || !strings.EqualFold(u.Host, p.vaultHost) && !strings.EqualFold(u.Host, p.vaultHost+":443") {
		return "", "", false
	}
	seg := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	if len(seg) != 3 || seg[0] != "keys" || !keyNameRE.MatchString(seg[1]) || !canonicalIDRE.MatchString(strings.ToLower(seg[2])) {
		return "", "", false
	}
	return seg[1], strings.ToLower(seg[2]), true
}

// Bounds of what the provider remembers about keys.
const (
	// relistInterval is how long a listing of a key's versions counts as
	// complete: a version string naming an unknown #after= version is
	// refused without asking the vault again within it.
	relistInterval = 10 * time.Second
	maxBookKeys    = 256
	maxBookIDs     = 4096
)

// keyBook remembers what the vault said about keys, by case-folded name:
// how it spells the name, which version IDs it named, and when it last
// listed them. It only ever learns from the vault's answers, never from a
// version string, so a forged string cannot teach it anything.
type keyBook struct {
	keep string // the configured key's case-folded name, never forgotten

	mu   sync.Mutex
	keys map[string]*keyFacts
}

type keyFacts struct {
	name   string // the vault's spelling
	ids    map[string]bool
	listed time.Time // last complete listing; zero if never
	absent bool      // that listing found no such key
}

// keyView is what the book knows about one key and one of its versions.
type keyView struct {
	name   string
	listed time.Time
	absent bool
	hasID  bool
}

// lookup returns what the book knows about key name and its version id.
func (b *keyBook) lookup(name, id string) (keyView, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	f, ok := b.keys[strings.ToLower(name)]
	if !ok {
		return keyView{}, false
	}
	return keyView{name: f.name, listed: f.listed, absent: f.absent, hasID: id != "" && f.ids[strings.ToLower(id)]}, true
}

// entry returns the facts of name, making room for them. b.mu is held.
func (b *keyBook) entry(name string) *keyFacts {
	k := strings.ToLower(name)
	if f, ok := b.keys[k]; ok {
		return f
	}
	if b.keys == nil {
		b.keys = map[string]*keyFacts{}
	}
	if len(b.keys) >= maxBookKeys {
		for other := range b.keys { // forget one; the vault is asked again
			if other != b.keep {
				delete(b.keys, other)
				break
			}
		}
	}
	f := &keyFacts{ids: map[string]bool{}}
	b.keys[k] = f
	return f
}

// saw records that the vault named version id of key name (spelled so).
func (b *keyBook) saw(name, id string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	f := b.entry(name)
	f.name, f.absent = name, false
	if len(f.ids) < maxBookIDs {
		f.ids[strings.ToLower(id)] = true
	}
}

// listed records a complete listing of key name: its spelling and IDs, or
// that it does not exist (absent).
func (b *keyBook) listed(name, spelled string, ids []string, absent bool, now time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	f := b.entry(name)
	f.listed, f.absent = now, absent
	f.ids = map[string]bool{}
	if absent {
		return
	}
	if spelled != "" {
		f.name = spelled
	}
	for _, id := range ids {
		if len(f.ids) < maxBookIDs {
			f.ids[strings.ToLower(id)] = true
		}
	}
}

// admit checks ref against what the vault said about its key, listing the
// key's versions (at most once per relistInterval) only to learn an
// unknown #after= version. It returns an ErrKeyNotFound error for a
// spelling or version the vault contradicts; nil when the vault should
// judge.
func (p *Provider) admit(ctx context.Context, ref versionRef) error {
	for listedNow := false; ; listedNow = true {
		f, known := p.book.lookup(ref.name, ref.after)
		now := p.cfg.Now()
		fresh := known && !f.listed.IsZero() && now.Sub(f.listed) < relistInterval
		switch {
		case known && f.name != "" && f.name != ref.name:
			return fmt.Errorf("version %s: the vault spells this key %q, and only that spelling is accepted: %w", ref, f.name, provider.ErrKeyNotFound)
		case known && f.absent && fresh:
			return fmt.Errorf("version %s: vault https://%s has no key %s: %w", ref, p.vaultHost, ref.name, provider.ErrKeyNotFound)
		case ref.after == "" || known && f.hasID:
			return nil
		case fresh || listedNow:
			return fmt.Errorf("version %s: key %s has no version %s for %s to name: %w", ref, ref.name, ref.after, afterMarker, provider.ErrKeyNotFound)
		}
		if err := p.relist(ctx, ref.name); err != nil {
			if errors.Is(err, provider.ErrPermissionDenied) {
				return nil // cannot list: let the vault judge the unwrap
			}
			return err
		}
	}
}

// relist lists the versions of key name unless another caller just did.
func (p *Provider) relist(ctx context.Context, name string) error {
	p.relistMu.Lock()
	defer p.relistMu.Unlock()
	if f, ok := p.book.lookup(name, ""); ok && !f.listed.IsZero() && p.cfg.Now().Sub(f.listed) < relistInterval {
		return nil
	}
	_, err := p.listVersionsOf(ctx, name)
	if errors.Is(err, provider.ErrKeyNotFound) {
		return nil // recorded as absent
	}
	return err
}
