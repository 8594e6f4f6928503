package rotation

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// checked is what check found.
type checked struct {
	// plugins are every plugin's endpoint, all healthy and on the
	// expected key_id.
	plugins []PluginTarget
	// version is the key store's current version.
	version string
	// note describes how the key store is shared between nodes.
	note string
}

// preflight checks that every plugin is healthy, uses the configured key
// store, and is on the same key_id (or, when resuming, on the rotation's
// old or new one). It changes nothing but the rotation's record of the old
// key, and returns the plugins it found: converge waits for them.
func (x *run) preflight(ctx context.Context) ([]PluginTarget, stageResult, error) {
	c, err := x.check(ctx, x.rot)
	if err != nil {
		return nil, stageResult{}, err
	}
	p, rot, versionNow := x.cfg.Provider, x.rot, c.version
	switch {
	case rot.OldVersion == "":
		rot.OldVersion, rot.OldKeyID = versionNow, envelope.DeriveKeyID(p.Name(), versionNow)
	case rot.NewVersion != "" && versionNow == rot.OldVersion:
		return nil, stageResult{}, fmt.Errorf("the key store's current version is back at %s, the version this rotation replaced with %s (a restored keyset, or a disabled new version?): fix the key store, or delete the state ConfigMap %s/%s to start over",
			versionNow, rot.NewVersion, x.cfg.Namespace, StateConfigMapName(x.cfg.Name))
	case rot.NewVersion != "" && versionNow != rot.NewVersion:
		// The key moved on after this rotation made its version current
		// (another tool or a rotation policy): go for the newest.
		x.log.Warn("the key store's current version changed since this rotation rotated; adopting it",
			zap.String("rotatedTo", rot.NewVersion), zap.String("current", versionNow))
		rot.NewVersion, rot.NewKeyID = versionNow, envelope.DeriveKeyID(p.Name(), versionNow)
		rot.reset(StageConverge, StageReencrypt, StageVerify, StageRetire)
		rot.Progress = nil
		x.st.VersionHistory = appendHistory(x.st.VersionHistory, versionNow)
	}
	return c.plugins, stageResult{note: c.note}, nil
}

// check is preflight's read-only part, shared with the dry run. rot may be
// a fresh rotation (no old version yet), or nil.
func (r *Runner) check(ctx context.Context, rot *Rotation) (checked, error) {
	p := r.cfg.Provider
	src := r.pluginSource()
	targets, err := src.Targets(ctx)
	if err != nil {
		return checked{}, err
	}
	note, err := r.sharing(targets)
	if err != nil {
		return checked{}, err
	}
	statuses := src.Ask(ctx, targets)
	var bad []string
	for _, s := range statuses {
		switch {
		case !s.Healthy():
			bad = append(bad, s.describe())
		case s.Status.Provider != p.Name():
			bad = append(bad, fmt.Sprintf("%s (%s) uses provider %s, but rotate is configured with provider %s", s.Node, s.URL, s.Status.Provider, p.Name()))
		}
	}
	if len(bad) > 0 {
		return checked{}, fmt.Errorf("not every plugin is ready, nothing was changed: %s", strings.Join(bad, "; "))
	}
	cur, err := p.CurrentVersion(ctx)
	if err != nil {
		return checked{}, fmt.Errorf("ask the key store for its current version: %w", err)
	}
	want := envelope.DeriveKeyID(p.Name(), cur)
	found := checked{plugins: targets, version: cur, note: note}
	if rot == nil || rot.OldVersion == "" {
		var keyIDs []string
		for _, s := range statuses {
			if !slices.Contains(keyIDs, s.KeyID()) {
				keyIDs = append(keyIDs, s.KeyID())
			}
		}
		if len(keyIDs) > 1 {
			return checked{}, fmt.Errorf("the plugins are not on the same key_id, nothing was changed: %s; wait one provider poll interval for them to agree, or fix the lagging node", describeAll(statuses))
		}
		if keyIDs[0] != want {
			return checked{}, fmt.Errorf("the plugins use key_id hash %s, but the key store configured here is at version %s (key_id hash %s), nothing was changed: give rotate the plugins' configuration (--config); if the key was just changed, wait one provider poll interval",
				envelope.KeyIDHash(keyIDs[0]), cur, envelope.KeyIDHash(want))
		}
		return found, nil
	}
	allowed := []string{rot.OldKeyID, want}
	if rot.NewKeyID != "" {
		allowed = append(allowed, rot.NewKeyID)
	}
	var off []string
	for _, s := range statuses {
		if !slices.Contains(allowed, s.KeyID()) {
			off = append(off, s.describe())
		}
	}
	if len(off) > 0 {
		return checked{}, fmt.Errorf("resuming rotation %s: plugins are on a key_id that is neither the rotation's old one (hash %s) nor the key store's current one (hash %s): %s",
			rot.ID, envelope.KeyIDHash(rot.OldKeyID), envelope.KeyIDHash(want), strings.Join(off, "; "))
	}
	return found, nil
}

// sharing refuses a store whose key material is local to each node
// (provider.NodeLocal) when there are several plugins, unless
// LocalKeysetShared says they share it, and returns a note on how the
// plugins share the key.
func (r *Runner) sharing(targets []PluginTarget) (string, error) {
	p := r.cfg.Provider
	if !provider.IsNodeLocal(p) {
		return fmt.Sprintf("%s: every node unwraps through the same key store, so each new version is usable on every node as soon as it exists", p.Name()), nil
	}
	switch {
	case len(targets) > 1 && !r.cfg.LocalKeysetShared:
		return "", fmt.Errorf("refusing to rotate the %s provider with %d plugins (%s): each node keeps its own keyset file, so a new key made here would exist on this node only, and the other apiservers could not read what it encrypts. "+
			"Use a shared key store (azurekeyvault), or, if every node reads the same keyset file (shared storage), pass --local-keyset-shared", p.Name(), len(targets), targetNames(targets))
	case len(targets) > 1:
		return fmt.Sprintf("%s provider with a shared keyset file (--local-keyset-shared)", p.Name()), nil
	}
	return "", nil
}

func targetNames(ts []PluginTarget) string {
	var names []string
	for _, t := range ts {
		names = append(names, t.Node)
	}
	return strings.Join(names, ", ")
}

func describeAll(ss []PluginStatus) string {
	var out []string
	for _, s := range ss {
		out = append(out, s.describe())
	}
	return strings.Join(out, "; ")
}
