package azurekv

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// RevokedVersions implements provider.VersionChecker: of versions, those
// the vault reports disabled, expired, not yet valid or deleted (the key
// gone, or the version not in its listing). A version that is not a key ID
// of this vault in its canonical spelling is not judged.
//
// It makes one listing of the versions per key name the versions use (the
// list permission; none for the configured key when the poll just listed
// it), and no call at all for the version the last poll reported usable
// within stateFreshFor, which is all a plugin holds at steady state. Where listing is refused it GETs each version instead. It
// returns ErrUnavailable or ErrPermissionDenied when the vault cannot
// tell; the caller then keeps what it has.
func (p *Provider) RevokedVersions(ctx context.Context, versions []string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("azurekv: check versions: %w", err)
	}
	now := p.cfg.Now()
	cur := p.cur.Load()
	byKey := map[string][]versionRef{} // by case-folded key name
	var order []string
	for _, v := range versions {
		ref, err := p.parseVersion(v)
		if err != nil {
			continue
		}
		if cur != nil && ref.kid == cur.kid && now.Sub(cur.checked) < stateFreshFor {
			continue // the poll just found it usable
		}
		k := strings.ToLower(ref.name)
		if _, ok := byKey[k]; !ok {
			order = append(order, k)
		}
		byKey[k] = append(byKey[k], ref)
	}
	var revoked []string
	for _, k := range order {
		refs := byKey[k]
		out, err := p.revokedOf(ctx, refs)
		if err != nil {
			return nil, err
		}
		revoked = append(revoked, out...)
	}
	return revoked, nil
}

// revokedOf judges versions of one key with one listing of its versions
// (the poll's own, when it just listed them to fall back).
func (p *Provider) revokedOf(ctx context.Context, refs []versionRef) ([]string, error) {
	items, ok := p.recentListing(refs[0].name)
	var err error
	if !ok {
		items, err = p.listVersionsOf(ctx, refs[0].name)
	}
	now := p.cfg.Now()
	var out []string
	switch {
	case err == nil:
		for _, ref := range refs {
			i := slices.IndexFunc(items, func(it versionItem) bool { return it.kid == ref.kid })
			if i < 0 || !usable(items[i].attrs, now) {
				out = append(out, ref.String())
			}
		}
		return out, nil
	case errors.Is(err, provider.ErrKeyNotFound):
		for _, ref := range refs {
			out = append(out, ref.String())
		}
		return out, nil
	case !errors.Is(err, provider.ErrPermissionDenied):
		return nil, err
	}
	// Listing refused (an access policy without list): GET each version.
	verdict := map[string]bool{} // kid -> revoked
	for _, ref := range refs {
		gone, ok := verdict[ref.kid]
		if !ok {
			var b azkeys.KeyBundle
			err := p.call(ctx, opGet, ref.name, ref.kid, func(ctx context.Context) error {
				res, err := p.client.GetKey(ctx, ref.name, ref.id, nil)
				b = res.KeyBundle
				return err
			})
			switch {
			case err == nil:
				gone = !usable(b.Attributes, now)
			case errors.Is(err, provider.ErrKeyDisabled), errors.Is(err, provider.ErrKeyNotFound):
				gone = true
			default:
				return nil, err
			}
			verdict[ref.kid] = gone
		}
		if gone {
			out = append(out, ref.String())
		}
	}
	return out, nil
}

// ValidVersion implements provider.VersionValidator: a version is valid
// when it is spelled exactly as this provider writes key IDs of its vault
// (parseVersion), so the plugin refuses a forged spelling before it takes a
// place in the unwrap limits. It makes no call; the vault's own spelling of
// the key name is still checked on Unwrap.
func (p *Provider) ValidVersion(version string) error {
	if _, err := p.parseVersion(version); err != nil {
		return fmt.Errorf("azurekv: %w", err)
	}
	return nil
}
