package rotation

import (
	"context"
	"fmt"
	"strings"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// dryRun reports what Run would do. It reads the state, the plugins, the
// key store and etcd, and writes nothing: no Lease, no state, no key.
func (r *Runner) dryRun(ctx context.Context) (*Result, error) {
	cfg := &r.cfg
	st, err := LoadState(ctx, cfg.Client, cfg.Namespace, cfg.Name)
	if err != nil {
		return nil, err
	}
	var (
		plan []string
		rot  *Rotation
	)
	if st.InProgress() {
		rot = st.Rotation
		plan = append(plan, fmt.Sprintf("would resume rotation %s at stage %s (%s)", rot.ID, rot.Stage, rot.Status))
	} else if from, to, err := r.movedOutside(ctx, st); err != nil {
		return nil, err
	} else if from != "" {
		rot = &Rotation{OldVersion: from, OldKeyID: envelope.DeriveKeyID(cfg.Provider.Name(), from)}
		plan = append(plan, fmt.Sprintf("the key store moved from version %s (the last rotation's) to %s by itself: would adopt it without creating a version", from, to))
	} else {
		due, why, err := r.due(ctx, st)
		if err != nil {
			return nil, err
		}
		if !due {
			return &Result{Outcome: OutcomeNotDue, Message: why, State: st}, nil
		}
		plan = append(plan, "a rotation is due ("+why+")")
	}
	if held, err := ReadLease(ctx, cfg.Client, cfg.Namespace, cfg.Name); err == nil && held.Holder != "" {
		plan = append(plan, fmt.Sprintf("note: the Lease is held by %s now; a real run would wait or exit with code 2", held.Holder))
	}
	c, err := r.check(ctx, rot)
	if err != nil {
		return nil, &StageError{Stage: StagePreflight, Resume: StagePreflight, Err: err}
	}
	p, cur := cfg.Provider, c.version
	curKeyID := envelope.DeriveKeyID(p.Name(), cur)
	line := fmt.Sprintf("preflight: %d plugins ready (%s), key store %s at version %s (key_id hash %s)", len(c.plugins), targetNames(c.plugins), p.Name(), cur, envelope.KeyIDHash(curKeyID))
	if c.note != "" {
		line += "; " + c.note
	}
	plan = append(plan, line)

	newKeyID := ""
	switch {
	case rot != nil && rot.done(StageRotate):
		newKeyID = rot.NewKeyID
		plan = append(plan, fmt.Sprintf("rotate: done already, version %s (key_id hash %s)", rot.NewVersion, envelope.KeyIDHash(rot.NewKeyID)))
	case rot != nil && cur != rot.OldVersion:
		newKeyID = curKeyID
		plan = append(plan, fmt.Sprintf("rotate: would adopt version %s, already current", cur))
	default:
		if _, ok := p.(provider.Rotator); !ok {
			return nil, &StageError{Stage: StageRotate, Resume: StagePreflight, Err: fmt.Errorf("provider %s cannot create key versions", p.Name())}
		}
		plan = append(plan, fmt.Sprintf("rotate: would create a new version of the %s key and make it current", p.Name()))
	}
	var apis []string
	for _, a := range c.apiservers {
		apis = append(apis, a.Name)
	}
	how := fmt.Sprintf("write the canary through %d apiserver(s) (%s) and read it back from etcd", len(apis), strings.Join(apis, ", "))
	if !r.writesCanary() {
		how = fmt.Sprintf("wait %s (no etcd configured, or no canary resource)", cfg.ConvergeWait)
	}
	plan = append(plan, fmt.Sprintf("converge: would wait up to %s for every plugin to report the new key_id, then %s", cfg.ConvergeTimeout, how))

	var chosen Migration
	if rot != nil {
		chosen = Migration(rot.Migration)
	}
	method, _, _, err := r.migrationFor(ctx, chosen)
	if err != nil {
		return nil, &StageError{Stage: StageReencrypt, Resume: StagePreflight, Err: err}
	}
	if cfg.Etcd != nil {
		rep, err := Verify(ctx, VerifyConfig{Etcd: cfg.Etcd, EtcdPrefix: cfg.EtcdPrefix, Resources: cfg.Resources, ProviderName: cfg.ProviderName, ExpectedKeyID: newKeyID, Now: cfg.Now})
		if err != nil {
			return nil, err
		}
		var parts []string
		for _, rr := range rep.Resources {
			todo := rr.Total
			if newKeyID != "" {
				todo = rr.Stale + rr.Unencrypted
			}
			parts = append(parts, fmt.Sprintf("%s: %d of %d objects", rr.Resource, todo, rr.Total))
		}
		plan = append(plan, fmt.Sprintf("reencrypt: would rewrite (%s, %d workers, %.0f QPS) %s", method, cfg.Workers, cfg.QPS, strings.Join(parts, "; ")))
		plan = append(plan, "verify: would count every object per key_id in etcd; retire only if none is left under an old key_id")
	} else {
		plan = append(plan, fmt.Sprintf("reencrypt: would rewrite (%s) every object of %s", method, strings.Join(cfg.Resources, ", ")))
		plan = append(plan, "verify: no etcd configured: would skip verify, and so retire nothing")
	}
	if vl, ok := p.(provider.VersionLister); ok && cfg.Etcd != nil {
		vs, err := vl.Versions(ctx)
		if err != nil {
			return nil, fmt.Errorf("list key versions: %w", err)
		}
		history := st.VersionHistory
		newVersion := "(new)"
		if rot != nil && rot.NewVersion != "" {
			newVersion = rot.NewVersion
		} else {
			// After the rotation, today's current version is the newest old one.
			for i := range vs {
				vs[i].Current = false
			}
			history = appendHistory(append([]string(nil), history...), cur)
		}
		if retire := planRetire(vs, newVersion, history, cfg.Keep); len(retire) > 0 {
			plan = append(plan, fmt.Sprintf("retire: would disable %s (keep %d)", strings.Join(retire, ", "), cfg.Keep))
		} else {
			plan = append(plan, fmt.Sprintf("retire: nothing beyond the %d version(s) kept", cfg.Keep))
		}
	}
	return &Result{Outcome: OutcomeDryRun, Message: "dry run: nothing was changed", Plan: plan, State: st}, nil
}
