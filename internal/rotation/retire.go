package rotation

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// retire disables the versions beyond the keep count, once verify showed
// nothing depends on them.
func (x *run) retire(ctx context.Context) (stageResult, error) {
	if x.rot.stage(StageVerify).Status != StatusCompleted {
		return stageResult{skipped: true, note: "not verified: nothing retired"}, nil
	}
	p := x.cfg.Provider
	vl, ok1 := p.(provider.VersionLister)
	rt, ok2 := p.(provider.Retirer)
	if !ok1 || !ok2 {
		return stageResult{skipped: true, note: fmt.Sprintf("provider %s cannot list or retire versions: nothing retired", p.Name())}, nil
	}
	plan, err := x.retirePlan(ctx, vl, x.rot.NewVersion, x.st)
	if err != nil {
		return stageResult{}, err
	}
	for _, v := range plan {
		if slices.Contains(x.rot.Retired, v) {
			continue
		}
		if err := rt.Retire(ctx, v); err != nil {
			return stageResult{}, fmt.Errorf("retire version %s: %w", v, err)
		}
		x.log.Info("retired key version", zap.String("version", v))
		x.rot.Retired = append(x.rot.Retired, v)
		if err := x.save(ctx); err != nil {
			return stageResult{}, err
		}
	}
	if len(plan) == 0 {
		return stageResult{note: fmt.Sprintf("nothing to retire: no enabled version beyond the %d kept", x.cfg.Keep)}, nil
	}
	return stageResult{note: fmt.Sprintf("disabled %s (keep %d)", strings.Join(x.rot.Retired, ", "), x.cfg.Keep)}, nil
}

// retirePlan lists the enabled versions beyond the keep count, never the
// current version nor newVersion. Versions are ordered by creation time
// where the store records it, else by the state's history; versions seen
// in neither count as the oldest.
func (r *Runner) retirePlan(ctx context.Context, vl provider.VersionLister, newVersion string, st *State) ([]string, error) {
	vs, err := vl.Versions(ctx)
	if err != nil {
		return nil, fmt.Errorf("list key versions: %w", err)
	}
	return planRetire(vs, newVersion, st.VersionHistory, r.cfg.Keep), nil
}

// planRetire is retirePlan's decision, shared with the dry run.
func planRetire(vs []provider.VersionInfo, newVersion string, history []string, keep int) []string {
	base := func(v string) string { b, _, _ := strings.Cut(v, "#"); return b }
	var cands []provider.VersionInfo
	for _, v := range vs {
		if v.Current || v.State != provider.VersionEnabled || base(v.Version) == base(newVersion) {
			continue
		}
		cands = append(cands, v)
	}
	rank := func(v provider.VersionInfo) int {
		for i := len(history) - 1; i >= 0; i-- {
			if base(history[i]) == base(v.Version) {
				return i
			}
		}
		return -1
	}
	slices.SortStableFunc(cands, func(a, b provider.VersionInfo) int {
		if !a.Created.IsZero() && !b.Created.IsZero() && !a.Created.Equal(b.Created) {
			return b.Created.Compare(a.Created) // newest first
		}
		return rank(b) - rank(a)
	})
	if len(cands) <= keep {
		return nil
	}
	var out []string
	for _, v := range cands[keep:] {
		out = append(out, v.Version)
	}
	return out
}
