package rotation

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
)

// ReencryptTarget says how a re-encryption (Reencrypter) leaves every
// object stored.
type ReencryptTarget string

// Targets.
const (
	// TargetKMS: every object stored by the kms v2 provider
	// Config.ProviderName under one key_id (ReencryptOptions.KeyID, else
	// the plugins'). An object stored by any other provider (aescbc,
	// aesgcm, secretbox, kms v1, another kms v2 name), under another
	// key_id, or unencrypted is not done. After the EncryptionConfiguration
	// put the kms provider first, such as when migrating from aescbc.
	TargetKMS ReencryptTarget = "kms"
	// TargetOffKMS: no object stored by the kms v2 provider
	// Config.ProviderName, under any key_id; whatever else stores it
	// (aescbc, identity, ...) is done. After uninstall's first stage moved
	// the kms provider out of first place.
	TargetOffKMS ReencryptTarget = "off-kms"
)

// reencryptStages are a re-encryption's stages, in order.
var reencryptStages = []Stage{StageReencrypt, StageVerify}

// ReencryptOptions choose what a Reencrypter rewrites toward.
type ReencryptOptions struct {
	// Target is TargetKMS (the default) or TargetOffKMS.
	Target ReencryptTarget
	// KeyID is the key_id TargetKMS rewrites toward. Empty: the one every
	// plugin reports (Config.PluginEndpoints, else the control-plane
	// Nodes' plugins), which must all be ready and agree.
	KeyID string
}

// Reencrypter runs the re-encrypt and verify stages of a rotation on their
// own (`kms-plugin reencrypt`), without touching any key: it rewrites every
// object of Config.Resources that etcd does not already hold as the target
// wants, then proves from etcd that none is left otherwise. It takes the
// rotation's Lease (Config.Namespace and Name), so a rotation and a
// re-encryption never run at once, keeps its progress in the rotation's
// state ConfigMap (State.Reencryption), so a run that stops resumes where
// it stopped, and is paced by Config.Workers, QPS and Burst. Of the
// Config, it reads what the re-encrypt and verify stages read; Provider,
// APIServers, MinAge, the converge settings, Keep and LocalKeysetShared do
// not apply.
type Reencrypter struct {
	r    *Runner
	opts ReencryptOptions
}

// NewReencrypter checks cfg and opts and returns a Reencrypter.
func NewReencrypter(cfg Config, opts ReencryptOptions) (*Reencrypter, error) {
	switch opts.Target {
	case "":
		opts.Target = TargetKMS
	case TargetKMS, TargetOffKMS:
	default:
		return nil, fmt.Errorf("rotation: re-encryption target %q: want %s or %s", opts.Target, TargetKMS, TargetOffKMS)
	}
	if opts.Target == TargetOffKMS && opts.KeyID != "" {
		return nil, fmt.Errorf("rotation: a key_id applies to target %s only", TargetKMS)
	}
	r, err := newRunner(cfg)
	if err != nil {
		return nil, err
	}
	return &Reencrypter{r: r, opts: opts}, nil
}

// RegisterMetrics registers the same metrics as Runner.RegisterMetrics:
// the stage (reencrypt, verify) and the object counts per resource.
func (re *Reencrypter) RegisterMetrics(reg prometheus.Registerer) error {
	return re.r.RegisterMetrics(reg)
}

// Run re-encrypts, or resumes the re-encryption in progress when it has
// the same target, provider name, key_id and resources (else it starts
// over): it takes the Lease (or returns a *LeaseHeldError; Config.Wait
// waits), runs the stages not yet completed and releases the Lease. A
// failure returns a *StageError (Op "re-encryption"); the next run resumes
// at its Resume stage. An error from a test hook (Config.Hooks) is
// returned as it is, with the Lease left held. With Config.DryRun it only
// says what a run would do.
func (re *Reencrypter) Run(ctx context.Context) (*Result, error) {
	var (
		res *Result
		err error
	)
	if re.r.cfg.DryRun {
		res, err = re.dryRun(ctx)
	} else {
		res, err = re.r.locked(ctx, re.run)
	}
	if se := (*StageError)(nil); errors.As(err, &se) {
		se.Op = "re-encryption"
	}
	return res, err
}

// targetKeyID is the key_id TargetKMS rewrites toward, and where it came
// from; "" for TargetOffKMS.
func (re *Reencrypter) targetKeyID(ctx context.Context) (string, string, error) {
	if re.opts.Target != TargetKMS {
		return "", "", nil
	}
	if re.opts.KeyID != "" {
		return re.opts.KeyID, "key_id given", nil
	}
	src := re.r.pluginSource()
	targets, err := src.Targets(ctx)
	if err != nil {
		return "", "", fmt.Errorf("find the plugins, to ask for the key_id (or name it with --expect-key-id): %w", err)
	}
	statuses := src.Ask(ctx, targets)
	var bad, keyIDs []string
	for _, s := range statuses {
		if !s.Healthy() {
			bad = append(bad, s.describe())
		} else if !slices.Contains(keyIDs, s.KeyID()) {
			keyIDs = append(keyIDs, s.KeyID())
		}
	}
	switch {
	case len(bad) > 0:
		return "", "", fmt.Errorf("not every plugin is ready, nothing was changed: %s", strings.Join(bad, "; "))
	case len(keyIDs) != 1:
		return "", "", fmt.Errorf("the plugins are not on the same key_id, nothing was changed: %s; wait one provider poll interval, or finish the rotation in progress (kms-plugin rotate)", describeAll(statuses))
	}
	return keyIDs[0], fmt.Sprintf("the key_id of %d ready plugin(s): %s", len(targets), targetNames(targets)), nil
}

// describe says what the target is, for messages.
func (re *Reencrypter) describe(keyID string) string {
	if re.opts.Target == TargetOffKMS {
		return fmt.Sprintf("no object stored by kms provider %s", re.r.cfg.ProviderName)
	}
	return fmt.Sprintf("every object under kms provider %s, key_id hash %s", re.r.cfg.ProviderName, envelope.KeyIDHash(keyID))
}

// isCurrent tells whether an object stored as e is done.
func (re *Reencrypter) isCurrent(keyID string) func(etcdscan.Encryption) bool {
	name := re.r.cfg.ProviderName
	if re.opts.Target == TargetOffKMS {
		return func(e etcdscan.Encryption) bool { return e.Kind != etcdscan.KindKMSv2 || e.Provider != name }
	}
	return func(e etcdscan.Encryption) bool {
		return e.Kind == etcdscan.KindKMSv2 && e.Provider == name && e.KeyID == keyID
	}
}

// mismatch says why rec, a re-encryption in progress, cannot be resumed
// toward keyID with this configuration, or "".
func (re *Reencrypter) mismatch(rec *Rotation, keyID string) string {
	cfg := &re.r.cfg
	switch {
	case rec.Target != re.opts.Target:
		return fmt.Sprintf("its target was %q, this run's is %q", rec.Target, re.opts.Target)
	case rec.ProviderName != cfg.ProviderName:
		return fmt.Sprintf("it was for kms provider %q, this run is for %q", rec.ProviderName, cfg.ProviderName)
	case rec.NewKeyID != keyID:
		return fmt.Sprintf("it rewrote toward key_id hash %s, this run toward %s", envelope.KeyIDHash(rec.NewKeyID), envelope.KeyIDHash(keyID))
	}
	for _, p := range rec.Progress {
		if !slices.Contains(cfg.Resources, p.Resource) {
			return fmt.Sprintf("it re-encrypted %s, which this run does not", p.Resource)
		}
	}
	return ""
}

// resumable returns the re-encryption in progress in st that this run
// resumes, or nil, and why not.
func (re *Reencrypter) resumable(st *State, keyID string) (*Rotation, string) {
	rec := st.Reencryption
	if rec == nil || rec.Status == StatusCompleted {
		return nil, ""
	}
	if why := re.mismatch(rec, keyID); why != "" {
		return nil, why
	}
	return rec, ""
}

// run is the re-encryption under the Lease.
func (re *Reencrypter) run(x *run, ctx context.Context) (*Result, error) {
	st, err := x.store.load(ctx)
	if err != nil {
		return nil, err
	}
	x.st = st
	keyID, from, err := re.targetKeyID(ctx)
	if err != nil {
		return nil, &StageError{Stage: StageReencrypt, Resume: StageReencrypt, Err: err}
	}
	if st.InProgress() {
		x.log.Warn("a rotation is in progress; this re-encryption does not finish it (kms-plugin rotate resumes it)",
			zap.String("id", st.Rotation.ID), zap.String("stage", string(st.Rotation.Stage)))
	}
	rec, why := re.resumable(st, keyID)
	switch {
	case rec != nil:
		x.log.Info("resuming re-encryption", zap.String("id", rec.ID), zap.String("stage", string(rec.Stage)),
			zap.String("status", string(rec.Status)), zap.String("previousHolder", rec.Holder))
	default:
		if why != "" {
			x.log.Warn("starting the re-encryption over", zap.String("id", st.Reencryption.ID), zap.String("why", why))
		}
		rec = re.newRecord(keyID)
		st.Reencryption = rec
		x.log.Info("starting a re-encryption", zap.String("target", re.describe(keyID)), zap.String("from", from),
			zap.Strings("resources", x.cfg.Resources))
	}
	x.rot, x.order, x.isCurrent = rec, reencryptStages, re.isCurrent(keyID)
	rec.Holder = x.cfg.Identity
	rec.Runs++
	for _, s := range []struct {
		stage Stage
		f     stageFunc
	}{
		{StageReencrypt, x.reencrypt},
		{StageVerify, func(ctx context.Context) (stageResult, error) { return re.verify(ctx, x) }},
	} {
		if rec.done(s.stage) {
			continue
		}
		if err := x.runStage(ctx, s.stage, s.f); err != nil {
			return nil, err
		}
	}
	return re.finish(ctx, x)
}

// newRecord is a fresh re-encryption toward keyID, every stage pending.
func (re *Reencrypter) newRecord(keyID string) *Rotation {
	var b [3]byte
	_, _ = rand.Read(b[:])
	now := re.r.now()
	rec := &Rotation{ID: now.Format("20060102-150405") + "-" + hex.EncodeToString(b[:]), Status: StatusRunning, Stage: StageReencrypt,
		StartedAt: now, Target: re.opts.Target, ProviderName: re.r.cfg.ProviderName, NewKeyID: keyID}
	for _, s := range reencryptStages {
		rec.stage(s)
	}
	return rec
}

// verify is the re-encryption's verify stage: every object must be as the
// target wants, or the next run re-encrypts again.
func (re *Reencrypter) verify(ctx context.Context, x *run) (stageResult, error) {
	if x.cfg.Etcd == nil {
		return stageResult{skipped: true, note: "no etcd configured: cannot verify"}, nil
	}
	off := re.opts.Target == TargetOffKMS
	rep, err := Verify(ctx, VerifyConfig{
		Etcd: x.cfg.Etcd, EtcdPrefix: x.cfg.EtcdPrefix, Resources: x.cfg.Resources,
		ProviderName: x.cfg.ProviderName, ExpectedKeyID: x.rot.NewKeyID, Off: off, Now: x.cfg.Now,
	})
	if err != nil {
		return stageResult{}, err
	}
	x.st.LastReencryptVerify = rep
	bad, samples := rep.Stale, rep.StaleSamples
	if !off {
		bad += rep.Unencrypted
		samples = append(samples, rep.UnencryptedSamples...)
	}
	if bad > 0 {
		// Back to re-encryption on the next run, from the start.
		x.rot.reset(StageReencrypt)
		for i := range x.rot.Progress {
			x.rot.Progress[i].Done, x.rot.Progress[i].Continue = false, ""
		}
		if off {
			return stageResult{}, fmt.Errorf("%d objects are still stored by kms provider %s, such as %s: is it out of first place in every kube-apiserver's EncryptionConfiguration (kms-plugin uninstall on every control-plane node), and reloaded? The next run re-encrypts them and verifies again",
				bad, x.cfg.ProviderName, strings.Join(samples, ", "))
		}
		return stageResult{}, fmt.Errorf("%d objects are not under kms provider %s at key_id hash %s (%d under another provider or key_id, %d unencrypted), such as %s: is the kms provider first in every kube-apiserver's EncryptionConfiguration, and reloaded? The next run re-encrypts them and verifies again",
			bad, x.cfg.ProviderName, envelope.KeyIDHash(x.rot.NewKeyID), rep.Stale, rep.Unencrypted, strings.Join(samples, ", "))
	}
	if off {
		return stageResult{note: fmt.Sprintf("%d objects, none stored by kms provider %s (%d unencrypted)", rep.Total, x.cfg.ProviderName, rep.Unencrypted)}, nil
	}
	return stageResult{note: fmt.Sprintf("%d objects, all under key_id hash %s", rep.Current, envelope.KeyIDHash(rep.ExpectedKeyID))}, nil
}

// finish records the re-encryption as completed and says what it did.
func (re *Reencrypter) finish(ctx context.Context, x *run) (*Result, error) {
	now := x.now()
	rec := x.rot
	rec.Stage, rec.Status, rec.FinishedAt, rec.LastError = StageDone, StatusCompleted, &now, ""
	if err := x.save(ctx); err != nil {
		return nil, &StageError{Stage: StageVerify, Resume: StageVerify, Err: err}
	}
	msg := fmt.Sprintf("re-encryption completed (%s): %d objects rewritten", re.describe(rec.NewKeyID), rec.Rewritten())
	if v := x.st.LastReencryptVerify; rec.stage(StageVerify).Status == StatusCompleted && v != nil {
		msg += fmt.Sprintf("; verify: %d objects, %d stale, %d unencrypted", v.Total, v.Stale, v.Unencrypted)
	} else {
		msg += "; not verified (no etcd configured)"
	}
	x.log.Info(msg)
	return &Result{Outcome: OutcomeCompleted, Message: msg, State: x.st}, nil
}

// dryRun says what Run would do. It reads the state, the plugins and etcd,
// and writes nothing: no Lease, no state.
func (re *Reencrypter) dryRun(ctx context.Context) (*Result, error) {
	r := re.r
	cfg := &r.cfg
	st, err := LoadState(ctx, cfg.Client, cfg.Namespace, cfg.Name)
	if err != nil {
		return nil, err
	}
	keyID, from, err := re.targetKeyID(ctx)
	if err != nil {
		return nil, &StageError{Stage: StageReencrypt, Resume: StageReencrypt, Err: err}
	}
	var plan []string
	rec, why := re.resumable(st, keyID)
	switch {
	case rec != nil:
		plan = append(plan, fmt.Sprintf("would resume re-encryption %s at stage %s (%s)", rec.ID, rec.Stage, rec.Status))
	case why != "":
		plan = append(plan, fmt.Sprintf("would start re-encryption over (the one in progress, %s: %s)", st.Reencryption.ID, why))
	default:
		plan = append(plan, "would start a re-encryption")
	}
	if held, err := ReadLease(ctx, cfg.Client, cfg.Namespace, cfg.Name); err == nil && held.Holder != "" {
		plan = append(plan, fmt.Sprintf("note: the Lease is held by %s now; a real run would wait or exit with code 2", held.Holder))
	}
	line := "target: " + re.describe(keyID)
	if from != "" {
		line += " (" + from + ")"
	}
	plan = append(plan, line)
	var chosen Migration
	if rec != nil {
		chosen = Migration(rec.Migration)
	}
	method, _, _, err := r.migrationFor(ctx, chosen)
	if err != nil {
		return nil, &StageError{Stage: StageReencrypt, Resume: StageReencrypt, Err: err}
	}
	if cfg.Etcd == nil {
		plan = append(plan, fmt.Sprintf("reencrypt: would rewrite (%s) every object of %s", method, strings.Join(cfg.Resources, ", ")),
			"verify: no etcd configured: would skip verify")
		return &Result{Outcome: OutcomeDryRun, Message: "dry run: nothing was changed", Plan: plan, State: st}, nil
	}
	off := re.opts.Target == TargetOffKMS
	rep, err := Verify(ctx, VerifyConfig{Etcd: cfg.Etcd, EtcdPrefix: cfg.EtcdPrefix, Resources: cfg.Resources,
		ProviderName: cfg.ProviderName, ExpectedKeyID: keyID, Off: off, Now: cfg.Now})
	if err != nil {
		return nil, err
	}
	var parts []string
	for _, rr := range rep.Resources {
		todo := rr.Stale
		if !off {
			todo += rr.Unencrypted
		}
		parts = append(parts, fmt.Sprintf("%s: %d of %d objects", rr.Resource, todo, rr.Total))
	}
	plan = append(plan, fmt.Sprintf("reencrypt: would rewrite (%s, %d workers, %.0f QPS) %s", method, cfg.Workers, cfg.QPS, strings.Join(parts, "; ")),
		"verify: would check in etcd that "+re.describe(keyID)+" is left otherwise")
	return &Result{Outcome: OutcomeDryRun, Message: "dry run: nothing was changed", Plan: plan, State: st}, nil
}

// ReencryptPermissions lists every kind of request a re-encryption with
// these options makes to the API, besides discovery: what a Role for
// `kms-plugin reencrypt` must grant. It is Permissions without the
// canary and the kubernetes EndpointSlices, and without Nodes unless
// nodes is set (TargetKMS with neither a key_id nor plugin endpoints:
// the plugins are found on the control-plane Nodes). o.Etcd is ignored.
func ReencryptPermissions(o PermissionOptions, nodes bool) []Permission {
	o.Etcd = false // no canary
	var out []Permission
	for _, p := range Permissions(o) {
		switch p.Resource {
		case "endpointslices":
			continue
		case "nodes":
			if !nodes {
				continue
			}
			p.Why = "find the plugins on the control-plane Nodes, to ask for their key_id (without --plugin-endpoints or --expect-key-id)"
		}
		out = append(out, p)
	}
	return out
}
