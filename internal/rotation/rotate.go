package rotation

import (
	"context"
	"fmt"
	"slices"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// rotate makes a new key version current, or adopts the one an interrupted
// run (or another tool) already made, and records it as the rotation's new
// version.
func (x *run) rotate(ctx context.Context) (stageResult, error) {
	p := x.cfg.Provider
	cur, err := p.CurrentVersion(ctx)
	if err != nil {
		return stageResult{}, fmt.Errorf("ask the key store for its current version: %w", err)
	}
	var (
		v    string
		note string
	)
	if cur != x.rot.OldVersion {
		v = cur
		note = fmt.Sprintf("adopted version %s, made current without this rotation (by an interrupted run, another tool or the key store's own rotation policy); no new version created", cur)
		x.log.Info("adopting the key store's current version", zap.String("version", cur))
	} else {
		rt, ok := p.(provider.Rotator)
		if !ok {
			return stageResult{}, fmt.Errorf("provider %s cannot create key versions: rotate the key in the key store, then run again to re-encrypt and verify", p.Name())
		}
		if v, err = rt.Rotate(ctx); err != nil {
			return stageResult{}, fmt.Errorf("rotate the key: %w", err)
		}
		note = fmt.Sprintf("created version %s", v)
		x.log.Info("rotated the key", zap.String("version", v), zap.String("keyIDHash", envelope.KeyIDHash(envelope.DeriveKeyID(p.Name(), v))))
	}
	x.rot.NewVersion, x.rot.NewKeyID = v, envelope.DeriveKeyID(p.Name(), v)
	x.st.VersionHistory = appendHistory(appendHistory(x.st.VersionHistory, x.rot.OldVersion), v)
	return stageResult{note: note}, nil
}

// appendHistory appends v unless it is already last, keeping 64 entries.
func appendHistory(h []string, v string) []string {
	if v == "" || (len(h) > 0 && h[len(h)-1] == v) {
		return h
	}
	h = append(slices.DeleteFunc(h, func(s string) bool { return s == v }), v)
	if len(h) > 64 {
		h = h[len(h)-64:]
	}
	return h
}
