package rotation

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// localProviderName is the local keyset provider's Name.
const localProviderName = "local"

// run is one process's work on one rotation.
type run struct {
	r       *Runner
	cfg     Config
	log     *zap.Logger
	store   *stateStore
	st      *State
	rot     *Rotation
	targets []PluginTarget
	// mu guards st and rot while re-encryption workers update counters.
	mu sync.Mutex
	// crashed is set when the crash hook fired and returned.
	crashed bool
}

// stageResult is what a stage reports on success.
type stageResult struct {
	note    string
	skipped bool
}

// Run runs the rotation that is due, or resumes the one in progress: it
// takes the Lease (or returns a *LeaseHeldError), runs every stage not yet
// completed, and releases the Lease. A failure returns a *StageError.
// Without a failure, the Result says whether a rotation completed, was not
// due, or (DryRun) what would happen.
func (r *Runner) Run(ctx context.Context) (*Result, error) {
	if r.cfg.DryRun {
		return r.dryRun(ctx)
	}
	l := &lease{r: r}
	if err := l.acquireWait(ctx); err != nil {
		return nil, err
	}
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	renewCtx, stopRenew := context.WithCancel(runCtx)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		l.renew(renewCtx, func(err error) {
			r.log.Error("stopping: the rotation Lease was lost", zap.Error(err))
			cancel(err)
		})
	}()
	x := &run{r: r, cfg: r.cfg, log: r.log, store: &stateStore{client: r.cfg.Client, namespace: r.cfg.Namespace, name: r.cfg.Name}}
	r.cur.Store(x)
	res, err := x.run(runCtx)
	stopRenew()
	wg.Wait()
	if x.crashed {
		return nil, ErrCrashed // leave the Lease as a killed process would
	}
	if !errors.Is(context.Cause(runCtx), ErrLostLease) {
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		l.release(rctx)
		rcancel()
	}
	return res, err
}

func (x *run) now() time.Time { return x.cfg.Now().UTC() }

func (x *run) run(ctx context.Context) (*Result, error) {
	st, err := x.store.load(ctx)
	if err != nil {
		return nil, err
	}
	x.mu.Lock()
	x.st = st
	x.mu.Unlock()
	if st.InProgress() {
		x.mu.Lock()
		x.rot = st.Rotation
		x.mu.Unlock()
		x.log.Info("resuming rotation", zap.String("id", x.rot.ID), zap.String("stage", string(x.rot.Stage)),
			zap.String("status", string(x.rot.Status)), zap.String("previousHolder", x.rot.Holder))
	} else {
		due, why, err := x.r.due(ctx, st)
		if err != nil {
			return nil, err
		}
		if !due {
			x.log.Info(why)
			return &Result{Outcome: OutcomeNotDue, Message: why, State: st}, nil
		}
		x.log.Info("starting a rotation", zap.String("why", why))
		x.mu.Lock()
		x.rot = x.newRotation()
		st.Rotation = x.rot
		x.mu.Unlock()
	}
	x.mu.Lock()
	x.rot.Holder = x.cfg.Identity
	x.rot.Runs++
	x.rot.Provider = x.cfg.Provider.Name()
	x.rot.ProviderName = x.cfg.ProviderName
	x.mu.Unlock()

	steps := []struct {
		stage Stage
		f     func(context.Context) (stageResult, error)
	}{
		{StagePreflight, x.preflight},
		{StageRotate, x.rotate},
		{StageConverge, x.converge},
		{StageReencrypt, x.reencrypt},
		{StageVerify, x.verify},
		{StageRetire, x.retire},
	}
	for _, s := range steps {
		if s.stage != StagePreflight && x.rot.done(s.stage) {
			continue
		}
		if err := x.runStage(ctx, s.stage, s.f); err != nil {
			return nil, err
		}
	}

	now := x.now()
	x.mu.Lock()
	x.rot.Stage, x.rot.Status, x.rot.FinishedAt, x.rot.LastError = StageDone, StatusCompleted, &now, ""
	verified := x.rot.stage(StageVerify).Status == StatusCompleted
	st.LastCompleted = &Completed{
		ID: x.rot.ID, StartedAt: x.rot.StartedAt, FinishedAt: now,
		OldKeyID: x.rot.OldKeyID, NewKeyID: x.rot.NewKeyID, OldVersion: x.rot.OldVersion, NewVersion: x.rot.NewVersion,
		Rewritten: x.rot.Rewritten(), Retired: x.rot.Retired, Verified: verified,
	}
	x.mu.Unlock()
	if err := x.save(ctx); err != nil {
		return nil, &StageError{Stage: StageRetire, Resume: StageRetire, Err: err}
	}
	msg := fmt.Sprintf("rotation completed: key_id hash %s -> %s (version %s -> %s); %d objects rewritten",
		envelope.KeyIDHash(x.rot.OldKeyID), envelope.KeyIDHash(x.rot.NewKeyID), x.rot.OldVersion, x.rot.NewVersion, x.rot.Rewritten())
	if v := st.LastVerify; verified && v != nil {
		msg += fmt.Sprintf("; verify: %d objects under the new key_id, %d stale, %d unencrypted", v.Current, v.Stale, v.Unencrypted)
	} else {
		msg += "; not verified (no etcd configured), so nothing was retired"
	}
	if verified {
		if len(x.rot.Retired) > 0 {
			msg += "; retired " + strings.Join(x.rot.Retired, ", ")
		} else {
			msg += "; nothing to retire"
		}
	}
	x.log.Info(msg)
	return &Result{Outcome: OutcomeCompleted, Message: msg, State: st}, nil
}

func (x *run) newRotation() *Rotation {
	var b [8]byte
	_, _ = rand.Read(b[:])
	now := x.now()
	rot := &Rotation{ID: now.Format("20060102-150405") + "-" + hex.EncodeToString(b[:3]), Status: StatusRunning, Stage: StagePreflight, StartedAt: now}
	for _, s := range stages {
		rot.stage(s)
	}
	return rot
}

// runStage runs one stage, persisting its start and its outcome, and fires
// the crash hook after a completed stage.
func (x *run) runStage(ctx context.Context, s Stage, f func(context.Context) (stageResult, error)) error {
	x.mu.Lock()
	rec := x.rot.stage(s)
	started := x.now()
	rec.Status, rec.StartedAt, rec.FinishedAt, rec.Error = StatusRunning, &started, nil, ""
	x.rot.Stage, x.rot.Status = s, StatusRunning
	x.mu.Unlock()
	if err := x.save(ctx); err != nil {
		return &StageError{Stage: s, Resume: s, Err: err}
	}
	x.log.Info("stage started", zap.String("stage", string(s)))
	res, err := f(ctx)
	if x.crashed {
		return ErrCrashed
	}
	x.mu.Lock()
	finished := x.now()
	rec = x.rot.stage(s)
	rec.FinishedAt = &finished
	if err != nil {
		if cause := context.Cause(ctx); cause != nil && !errors.Is(err, cause) {
			err = fmt.Errorf("%w (%v)", err, cause)
		}
		rec.Status, rec.Error = StatusFailed, err.Error()
		x.rot.Status, x.rot.LastError = StatusFailed, err.Error()
		x.mu.Unlock()
		if !errors.Is(context.Cause(ctx), ErrLostLease) {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
			if serr := x.save(sctx); serr != nil {
				x.log.Warn("could not record the failure in the state ConfigMap", zap.Error(serr))
			}
			cancel()
		}
		resume := s
		for _, st := range stages {
			if !x.rot.done(st) {
				resume = st
				break
			}
		}
		return &StageError{Stage: s, Resume: resume, Err: err}
	}
	rec.Status, rec.Note = StatusCompleted, res.note
	if res.skipped {
		rec.Status = StatusSkipped
	}
	x.rot.LastError = ""
	x.mu.Unlock()
	if err := x.save(ctx); err != nil {
		return &StageError{Stage: s, Resume: s, Err: err}
	}
	fields := []zap.Field{zap.String("stage", string(s)), zap.String("status", string(rec.Status))}
	if res.note != "" {
		fields = append(fields, zap.String("note", res.note))
	}
	x.log.Info("stage finished", fields...)
	if x.cfg.CrashAfter.Stage == s && x.cfg.CrashAfter.Objects == 0 {
		x.crash()
		return ErrCrashed
	}
	return nil
}

// crash fires the test hook.
func (x *run) crash() {
	x.log.Warn("crash hook: exiting", zap.String("crashAfter", string(x.cfg.CrashAfter.Stage)), zap.Int64("objects", x.cfg.CrashAfter.Objects))
	x.mu.Lock()
	x.crashed = true
	x.mu.Unlock()
	if x.cfg.Crash != nil {
		x.cfg.Crash()
	}
}

func (x *run) save(ctx context.Context) error {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.store.save(ctx, x.st)
}

// due says whether a new rotation should start now, and why.
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

func (r *Runner) pluginSource() PluginSource {
	return PluginSource{Client: r.cfg.Client, Endpoints: r.cfg.PluginEndpoints, Port: r.cfg.PluginPort, HTTP: r.cfg.HTTPClient}
}

// preflight checks that every plugin is healthy, uses the configured key
// store, and is on the same key_id (or, when resuming, on the rotation's
// old or new one). It changes nothing but the rotation's record of the old
// key.
func (x *run) preflight(ctx context.Context) (stageResult, error) {
	targets, versionNow, note, err := x.r.check(ctx, x.rot)
	if err != nil {
		return stageResult{}, err
	}
	x.targets = targets
	p := x.cfg.Provider
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.rot.OldVersion == "" {
		x.rot.OldVersion, x.rot.OldKeyID = versionNow, envelope.DeriveKeyID(p.Name(), versionNow)
	} else if x.rot.NewVersion != "" && versionNow == x.rot.OldVersion {
		return stageResult{}, fmt.Errorf("the key store's current version is back at %s, the version this rotation replaced with %s (a restored keyset, or a disabled new version?): fix the key store, or delete the state ConfigMap %s/%s to start over",
			versionNow, x.rot.NewVersion, x.cfg.Namespace, StateConfigMapName(x.cfg.Name))
	} else if x.rot.NewVersion != "" && versionNow != x.rot.NewVersion {
		// The key moved on after this rotation made its version current
		// (another tool or a rotation policy): go for the newest.
		x.log.Warn("the key store's current version changed since this rotation rotated; adopting it",
			zap.String("rotatedTo", x.rot.NewVersion), zap.String("current", versionNow))
		x.rot.NewVersion, x.rot.NewKeyID = versionNow, envelope.DeriveKeyID(p.Name(), versionNow)
		x.rot.reset(StageConverge, StageReencrypt, StageVerify, StageRetire)
		x.rot.Progress = nil
		x.st.VersionHistory = appendHistory(x.st.VersionHistory, versionNow)
	}
	return stageResult{note: note}, nil
}

// check is preflight's read-only part, shared with the dry run. rot may be
// a fresh rotation (no old version yet). It returns the plugins, the key
// store's current version and a note.
func (r *Runner) check(ctx context.Context, rot *Rotation) ([]PluginTarget, string, string, error) {
	cfg := r.cfg
	p := cfg.Provider
	src := r.pluginSource()
	targets, err := src.Targets(ctx)
	if err != nil {
		return nil, "", "", err
	}
	var note string
	switch p.Name() {
	case localProviderName:
		if len(targets) > 1 && !cfg.LocalKeysetShared {
			return nil, "", "", fmt.Errorf("refusing to rotate the local provider with %d plugins (%s): each node keeps its own keyset file, so a new key made here would exist on this node only, and the other apiservers could not read what it encrypts. "+
				"Use a shared key store (azurekeyvault), or, if every node reads the same keyset file (shared storage), pass --local-keyset-shared", len(targets), targetNames(targets))
		}
		if len(targets) > 1 {
			note = "local provider with a shared keyset file (--local-keyset-shared)"
		}
	case "azurekeyvault":
		note = "azurekeyvault: every node unwraps through the same vault, so each new version is usable on every node as soon as it exists"
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
		return nil, "", "", fmt.Errorf("not every plugin is ready, nothing was changed: %s", strings.Join(bad, "; "))
	}
	cur, err := p.CurrentVersion(ctx)
	if err != nil {
		return nil, "", "", fmt.Errorf("ask the key store for its current version: %w", err)
	}
	want := envelope.DeriveKeyID(p.Name(), cur)
	if rot == nil || rot.OldVersion == "" {
		var keyIDs []string
		for _, s := range statuses {
			if !slices.Contains(keyIDs, s.KeyID()) {
				keyIDs = append(keyIDs, s.KeyID())
			}
		}
		if len(keyIDs) > 1 {
			return nil, "", "", fmt.Errorf("the plugins are not on the same key_id, nothing was changed: %s; wait one provider poll interval for them to agree, or fix the lagging node", describeAll(statuses))
		}
		if keyIDs[0] != want {
			return nil, "", "", fmt.Errorf("the plugins use key_id hash %s, but the key store configured here is at version %s (key_id hash %s), nothing was changed: give rotate the plugins' configuration (--config); if the key was just changed, wait one provider poll interval",
				envelope.KeyIDHash(keyIDs[0]), cur, envelope.KeyIDHash(want))
		}
		return targets, cur, note, nil
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
		return nil, "", "", fmt.Errorf("resuming rotation %s: plugins are on a key_id that is neither the rotation's old one (hash %s) nor the key store's current one (hash %s): %s",
			rot.ID, envelope.KeyIDHash(rot.OldKeyID), envelope.KeyIDHash(want), strings.Join(off, "; "))
	}
	return targets, cur, note, nil
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

// rotate makes a new key version current, or adopts the one an interrupted
// run (or another tool) already made.
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
		note = fmt.Sprintf("adopted version %s, made current after this rotation started (by an interrupted run or another tool); no new version created", cur)
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
	x.mu.Lock()
	x.rot.NewVersion, x.rot.NewKeyID = v, envelope.DeriveKeyID(p.Name(), v)
	x.st.VersionHistory = appendHistory(appendHistory(x.st.VersionHistory, x.rot.OldVersion), v)
	x.mu.Unlock()
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

// converge waits until every plugin reports the new key_id, then until
// every apiserver encrypts with it.
func (x *run) converge(ctx context.Context) (stageResult, error) {
	if len(x.targets) == 0 {
		return stageResult{}, errors.New("no plugin targets (preflight did not run)")
	}
	cctx, cancel := context.WithTimeout(ctx, x.cfg.ConvergeTimeout)
	defer cancel()
	newHash := envelope.KeyIDHash(x.rot.NewKeyID)
	src := x.r.pluginSource()
	lastMsg := ""
	// Ask every plugin to re-read its key store now rather than at its
	// next poll (a minute by default); then nudge only the laggards.
	nudge := x.targets
	for {
		var statuses []PluginStatus
		if len(nudge) > 0 {
			statuses = x.refreshPlugins(cctx, src, nudge)
		}
		statuses = append(statuses, src.Ask(cctx, without(x.targets, nudge))...)
		var lagging []string
		nudge = nil
		for _, s := range statuses {
			if !s.Healthy() || s.KeyID() != x.rot.NewKeyID {
				lagging = append(lagging, s.describe())
				if s.Err == "" {
					nudge = append(nudge, s.PluginTarget)
				}
			}
		}
		if len(lagging) == 0 {
			break
		}
		msg := strings.Join(lagging, "; ")
		if msg != lastMsg {
			x.log.Info("waiting for plugins to report the new key_id", zap.String("want", newHash), zap.Strings("lagging", lagging))
			lastMsg = msg
		}
		if err := sleep(cctx, x.cfg.PollInterval); err != nil {
			if ctx.Err() != nil {
				return stageResult{}, context.Cause(ctx)
			}
			return stageResult{}, fmt.Errorf("not every plugin reports the new key_id (hash %s) after %s: %s", newHash, x.cfg.ConvergeTimeout, msg)
		}
	}
	x.log.Info("every plugin reports the new key_id", zap.String("keyIDHash", newHash), zap.Int("plugins", len(x.targets)))

	canaryRes := x.canaryResource()
	if x.cfg.Etcd == nil || canaryRes == "" {
		why := "no etcd configured"
		if x.cfg.Etcd != nil {
			why = "neither secrets nor configmaps are among the resources, so there is no canary"
		}
		x.log.Info("waiting for the apiservers to pick up the new key_id", zap.String("why", why), zap.Duration("wait", x.cfg.ConvergeWait))
		if err := sleep(ctx, x.cfg.ConvergeWait); err != nil {
			return stageResult{}, err
		}
		return stageResult{note: fmt.Sprintf("%s: waited %s after every plugin reported the new key_id", why, x.cfg.ConvergeWait)}, nil
	}
	apis := x.cfg.APIServers
	if len(apis) == 0 {
		apis = []APIServer{{Name: "default", Client: x.cfg.Client}}
	}
	for _, a := range apis {
		if err := x.waitCanary(cctx, ctx, a, canaryRes); err != nil {
			return stageResult{}, err
		}
	}
	return stageResult{note: fmt.Sprintf("%d plugins and %d apiservers (canary %s read back from etcd) on key_id hash %s", len(x.targets), len(apis), canaryRes, newHash)}, nil
}

// refreshPlugins asks targets to re-read their key store (POST /refresh)
// and, for those that could not (an older plugin, one that refreshed moments
// ago, a key store error), what GET /status says. Refusals are logged, not
// fatal: such a plugin still picks up the new version at its next poll.
func (x *run) refreshPlugins(ctx context.Context, src PluginSource, targets []PluginTarget) []PluginStatus {
	out := src.Refresh(ctx, targets)
	var retry []PluginTarget
	for _, s := range out {
		if s.Err != "" {
			x.log.Info("plugin did not refresh on request; waiting for its own poll", zap.String("node", s.Node), zap.String("reason", s.Err))
			retry = append(retry, s.PluginTarget)
		}
	}
	if len(retry) == 0 {
		return out
	}
	asked := src.Ask(ctx, retry)
	for i, j := 0, 0; i < len(out); i++ {
		if out[i].Err != "" {
			out[i] = asked[j]
			j++
		}
	}
	return out
}

// without returns the targets of all that are not in some.
func without(all, some []PluginTarget) []PluginTarget {
	if len(some) == 0 {
		return all
	}
	out := make([]PluginTarget, 0, len(all))
	for _, t := range all {
		if !slices.Contains(some, t) {
			out = append(out, t)
		}
	}
	return out
}

// nudgeReadyz asks a's /readyz. kube-apiserver asks its KMS plugins for
// their Status (and so learns a new key_id) when a health check runs and
// its cached answer is older than 20 s, else only once a minute; kubelets
// probing /readyz every second keep that at 20 s, and so does this on
// clusters whose probes are slower. The answer does not matter.
func nudgeReadyz(ctx context.Context, a APIServer) {
	rc := a.Client.Discovery().RESTClient()
	if rc == nil {
		return
	}
	_ = rc.Get().AbsPath("/readyz").Do(ctx).Error()
}

// waitCanary writes the canary through a until etcd shows it under the new
// key_id.
func (x *run) waitCanary(cctx, ctx context.Context, a APIServer, resource string) error {
	scanner := etcdscan.New(x.cfg.Etcd, 1)
	key := etcdscan.KeyPrefixes(x.cfg.EtcdPrefix, resource)[0] + x.cfg.Namespace + "/" + CanaryName
	newHash := envelope.KeyIDHash(x.rot.NewKeyID)
	last := ""
	for {
		nudgeReadyz(cctx, a)
		got, err := x.writeCanary(cctx, a, resource, scanner, key)
		var perm *permanentError
		switch {
		case errors.As(err, &perm):
			return err
		case err == nil && got == x.rot.NewKeyID:
			x.log.Info("apiserver encrypts with the new key_id", zap.String("apiserver", a.Name))
			return nil
		case err != nil:
			last = err.Error()
			x.log.Info("canary write failed; retrying", zap.String("apiserver", a.Name), zap.Error(err))
		default:
			last = fmt.Sprintf("it still encrypts with key_id hash %s", envelope.KeyIDHash(got))
			x.log.Info("waiting for the apiserver to pick up the new key_id", zap.String("apiserver", a.Name),
				zap.String("canaryKeyIDHash", envelope.KeyIDHash(got)), zap.String("want", newHash))
		}
		if err := sleep(cctx, x.cfg.PollInterval); err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			return fmt.Errorf("apiserver %s did not pick up the new key_id (hash %s) within %s: %s; kube-apiserver asks the plugin for its Status at most every 20 s (once a minute without /readyz probes), check its logs", a.Name, newHash, x.cfg.ConvergeTimeout, last)
		}
	}
}

// permanentError is an error retrying will not fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }

// canaryResource is secrets or configmaps, whichever the rotation covers.
func (x *run) canaryResource() string {
	for _, r := range []string{"secrets", "configmaps"} {
		if slices.Contains(x.cfg.Resources, r) {
			return r
		}
	}
	return ""
}

// verify counts stored objects per key_id; every object must be under the
// new key_id, or the next run re-encrypts again.
func (x *run) verify(ctx context.Context) (stageResult, error) {
	if x.cfg.Etcd == nil {
		return stageResult{skipped: true, note: "no etcd configured: cannot verify, so nothing will be retired"}, nil
	}
	rep, err := Verify(ctx, VerifyConfig{
		Etcd: x.cfg.Etcd, EtcdPrefix: x.cfg.EtcdPrefix, Resources: x.cfg.Resources,
		ProviderName: x.cfg.ProviderName, ExpectedKeyID: x.rot.NewKeyID, Now: x.cfg.Now,
	})
	if err != nil {
		return stageResult{}, err
	}
	x.mu.Lock()
	x.st.LastVerify = rep
	if rep.Stale > 0 {
		// Go back to re-encryption on the next run.
		x.rot.reset(StageReencrypt)
		for i := range x.rot.Progress {
			x.rot.Progress[i].Done, x.rot.Progress[i].Continue = false, ""
		}
	}
	x.mu.Unlock()
	if rep.Stale > 0 {
		return stageResult{}, fmt.Errorf("%d objects are not under the new key_id (hash %s), such as %s; the next run re-encrypts them and verifies again",
			rep.Stale, envelope.KeyIDHash(rep.ExpectedKeyID), strings.Join(rep.StaleSamples, ", "))
	}
	note := fmt.Sprintf("%d objects, all under key_id hash %s", rep.Current, envelope.KeyIDHash(rep.ExpectedKeyID))
	if rep.Unencrypted > 0 {
		note += fmt.Sprintf("; %d not encrypted at all (such as %s): they do not depend on any key, and the next re-encryption encrypts them", rep.Unencrypted, strings.Join(rep.UnencryptedSamples, ", "))
	}
	return stageResult{note: note}, nil
}

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
	plan, err := x.r.retirePlan(ctx, vl, x.rot.NewVersion, x.st)
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
		x.mu.Lock()
		x.rot.Retired = append(x.rot.Retired, v)
		x.mu.Unlock()
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
