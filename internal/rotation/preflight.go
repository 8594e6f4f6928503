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
	found
	// version is the key store's current version.
	version string
	// note describes how the key store is shared between nodes.
	note string
}

// found is what preflight finds for converge to wait for.
type found struct {
	// plugins are every plugin's endpoint, all healthy and on the
	// expected key_id.
	plugins []PluginTarget
	// apiservers are the apiservers the canary is written through, each
	// of which answered.
	apiservers []APIServer
}

// preflight checks that every plugin is healthy, uses the configured key
// store, and is on the same key_id (or, when resuming, on the rotation's
// old or new one). It changes nothing but the rotation's record of the old
// key, and returns the plugins and apiservers it found: converge waits for
// them.
func (x *run) preflight(ctx context.Context) (found, stageResult, error) {
	c, err := x.check(ctx, x.rot)
	if err != nil {
		return found{}, stageResult{}, err
	}
	p, rot, versionNow := x.cfg.Provider, x.rot, c.version
	switch {
	case rot.OldVersion == "":
		rot.OldVersion, rot.OldKeyID = versionNow, envelope.DeriveKeyID(p.Name(), versionNow)
	case rot.NewVersion != "" && versionNow == rot.OldVersion:
		return found{}, stageResult{}, fmt.Errorf("the key store's current version is back at %s, the version this rotation replaced with %s (a restored keyset, or a disabled new version?): fix the key store, or delete the state ConfigMap %s/%s to start over",
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
	return c.found, stageResult{note: c.note}, nil
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
	// The node-local refusal, and the apiservers the canary proves: both
	// from what the cluster says about its control plane, apart from the
	// endpoints this run was given.
	nodeLocal := provider.IsNodeLocal(p)
	countNodes := nodeLocal && !r.cfg.LocalKeysetShared
	discover := r.discoversAPIServers()
	cp := readControlPlane(ctx, r.cfg.Client, countNodes, countNodes || discover)
	note, err := decideSharing(sharingInput{store: p.Name(), nodeLocal: nodeLocal, shared: r.cfg.LocalKeysetShared,
		targets: targets, explicit: len(r.cfg.PluginEndpoints) > 0, cp: cp})
	if err != nil {
		return checked{}, err
	}
	apis, err := r.canaryAPIServers(ctx, cp)
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
	res := checked{found: found{plugins: targets, apiservers: apis}, version: cur, note: note}
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
		return res, nil
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
	return res, nil
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
