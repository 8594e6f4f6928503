package local

import (
	"context"
	"fmt"

	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
)

// RevokedVersions implements provider.VersionChecker: of versions, those
// the keyset (re-read when the file changed) holds disabled or no longer
// holds at all. A version that is not a canonical local version is not
// judged. It makes no remote call, so a plugin checks its cached local
// KEKs against `kms-plugin keyset retire` at every poll.
func (p *Provider) RevokedVersions(ctx context.Context, versions []string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	st, err := p.reload(false)
	if err != nil {
		return nil, fmt.Errorf("local: check versions: %w", err)
	}
	var out []string
	for _, v := range versions {
		id, err := parseVersion(v)
		if err != nil {
			continue
		}
		if status, ok := st.keys[id]; !ok || status != tinkpb.KeyStatusType_ENABLED {
			out = append(out, v)
		}
	}
	return out, nil
}

// ValidVersion implements provider.VersionValidator: a local version is a
// key ID in decimal, spelled exactly as this provider writes it.
func (p *Provider) ValidVersion(version string) error {
	if _, err := parseVersion(version); err != nil {
		return fmt.Errorf("local: %w", err)
	}
	return nil
}
