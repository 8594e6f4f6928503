package rotation

import (
	"context"
	"fmt"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// due says whether a new rotation should start now, and why: MinAge after
// the last completed rotation, or, with none recorded, after the creation
// of the key store's current version.
func (r *Runner) due(ctx context.Context, st *State) (bool, string, error) {
	if r.cfg.MinAge == 0 {
		return true, "min-age is 0: every run rotates", nil
	}
	var (
		last time.Time
		what string
	)
	if st.LastCompleted != nil {
		last, what = st.LastCompleted.FinishedAt, "last rotation"
	} else if vl, ok := r.cfg.Provider.(provider.VersionLister); ok {
		vs, err := vl.Versions(ctx)
		if err != nil {
			return false, "", fmt.Errorf("list key versions for the minimum age: %w", err)
		}
		for _, v := range vs {
			if v.Current && !v.Created.IsZero() {
				last, what = v.Created, "current key version created"
			}
		}
	}
	if last.IsZero() {
		return true, "no rotation recorded and the key store does not date its current version", nil
	}
	age := r.cfg.Now().Sub(last)
	if age < r.cfg.MinAge {
		return false, fmt.Sprintf("not due: %s %s ago, min-age %s", what, HumanDuration(age), HumanDuration(r.cfg.MinAge)), nil
	}
	return true, fmt.Sprintf("due: %s %s ago, min-age %s", what, HumanDuration(age), HumanDuration(r.cfg.MinAge)), nil
}

// movedOutside reports the version the last rotation made current (from)
// and the key store's current version (to) when they differ: the store
// rotated by itself since, and the data under from still needs
// re-encrypting. It returns "" for from when nothing was recorded yet or
// the store is where the last rotation left it.
func (r *Runner) movedOutside(ctx context.Context, st *State) (from, to string, err error) {
	switch {
	case st.LastCompleted != nil && st.LastCompleted.NewVersion != "":
		from = st.LastCompleted.NewVersion
	case len(st.VersionHistory) > 0:
		from = st.VersionHistory[len(st.VersionHistory)-1]
	default:
		return "", "", nil
	}
	to, err = r.cfg.Provider.CurrentVersion(ctx)
	if err != nil {
		return "", "", fmt.Errorf("ask the key store for its current version: %w", err)
	}
	if to == from {
		return "", to, nil
	}
	return from, to, nil
}
