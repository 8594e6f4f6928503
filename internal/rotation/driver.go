package rotation

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
)

// run is one process's work on one rotation, under the Lease. It reads the
// Runner's Config (embedded: x.cfg is r.cfg). The driver (run.run and
// runStage) owns the state: st and rot are read and changed on the
// driver's goroutine only, and only the driver saves them. What a stage
// finds for a later stage of the same process is passed as a value
// (converge takes the plugins preflight found); what a later process must
// know is in rot, and so in the state ConfigMap.
type run struct {
	*Runner
	store *stateStore
	st    *State
	rot   *Rotation
	// saved is the part of the state the last save wrote that the
	// metrics show, and live the counters of the resource being
	// re-encrypted: the metrics read both while the driver works.
	saved atomic.Pointer[stateView]
	live  atomic.Pointer[liveProgress]
	// order is the stages of rot in order, for the stage a failed run
	// resumes at; nil: a rotation's. isCurrent tells whether etcd already
	// holds an object as the re-encryption wants it; nil: under the
	// provider's new key_id.
	order     []Stage
	isCurrent func(etcdscan.Encryption) bool
}

// stateView is what the metrics show of the state.
type stateView struct {
	stage    Stage
	status   RunStatus
	progress []ResourceProgress
}

// stageFunc runs one stage.
type stageFunc func(context.Context) (stageResult, error)

// stageResult is what a stage reports on success.
type stageResult struct {
	note    string
	skipped bool
}

// Run runs the rotation that is due, or resumes the one in progress: it
// takes the Lease (or returns a *LeaseHeldError), runs every stage not yet
// completed, and releases the Lease. A failure returns a *StageError; an
// error from a test hook (Config.Hooks) is returned as it is, with the
// Lease left held. Without a failure, the Result says whether a rotation
// completed, was not due, or (DryRun) what would happen.
func (r *Runner) Run(ctx context.Context) (*Result, error) {
	if r.cfg.DryRun {
		return r.dryRun(ctx)
	}
	return r.locked(ctx, (*run).run)
}

// locked takes the Lease (or returns a *LeaseHeldError), runs f on a new
// run while renewing it, and releases it, unless f returned a test hook's
// error (returned as it is) or the Lease was lost.
func (r *Runner) locked(ctx context.Context, f func(*run, context.Context) (*Result, error)) (*Result, error) {
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
	x := &run{Runner: r, store: &stateStore{client: r.cfg.Client, namespace: r.cfg.Namespace, name: r.cfg.Name}}
	r.cur.Store(x)
	res, err := f(x, runCtx)
	stopRenew()
	wg.Wait()
	if he := (*hookError)(nil); errors.As(err, &he) {
		return nil, he.err // leave the Lease as a killed process would
	}
	if !errors.Is(context.Cause(runCtx), ErrLostLease) {
		rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		l.release(rctx)
		rcancel()
	}
	return res, err
}

// run loads the state, resumes the rotation in progress or starts one
// when it is due, runs its stages and records it as completed.
func (x *run) run(ctx context.Context) (*Result, error) {
	st, err := x.store.load(ctx)
	if err != nil {
		return nil, err
	}
	x.st = st
	if st.InProgress() {
		x.rot = st.Rotation
		x.log.Info("resuming rotation", zap.String("id", x.rot.ID), zap.String("stage", string(x.rot.Stage)),
			zap.String("status", string(x.rot.Status)), zap.String("previousHolder", x.rot.Holder))
	} else if from, to, err := x.movedOutside(ctx, st); err != nil {
		return nil, err
	} else if from != "" {
		// The key store made a new version current by itself (Vault's
		// auto_rotate_period, an operator in the vault's console): this
		// run adopts it, converging, re-encrypting, verifying and
		// retiring without creating another version, whatever min-age says.
		x.log.Info("the key store's current version changed outside kms-plugin; adopting it without rotating",
			zap.String("lastRotatedTo", from), zap.String("current", to))
		x.rot = x.newRotation()
		x.rot.OldVersion, x.rot.OldKeyID = from, envelope.DeriveKeyID(x.cfg.Provider.Name(), from)
		st.Rotation = x.rot
	} else {
		due, why, err := x.due(ctx, st)
		if err != nil {
			return nil, err
		}
		if !due {
			x.log.Info(why)
			return &Result{Outcome: OutcomeNotDue, Message: why, State: st}, nil
		}
		x.log.Info("starting a rotation", zap.String("why", why))
		x.rot = x.newRotation()
		st.Rotation = x.rot
	}
	x.rot.Holder = x.cfg.Identity
	x.rot.Runs++
	x.rot.Provider = x.cfg.Provider.Name()
	x.rot.ProviderName = x.cfg.ProviderName
	if err := x.stages(ctx); err != nil {
		return nil, err
	}
	return x.finish(ctx)
}

// stages runs preflight, then every later stage not yet completed.
// Preflight runs in every process: the plugins and apiservers it finds are
// converge's input.
func (x *run) stages(ctx context.Context) error {
	var f found
	preflight := func(ctx context.Context) (res stageResult, err error) {
		f, res, err = x.preflight(ctx)
		return res, err
	}
	if err := x.runStage(ctx, StagePreflight, preflight); err != nil {
		return err
	}
	for _, s := range []struct {
		stage Stage
		f     stageFunc
	}{
		{StageRotate, x.rotate},
		{StageConverge, func(ctx context.Context) (stageResult, error) { return x.converge(ctx, f) }},
		{StageReencrypt, x.reencrypt},
		{StageVerify, x.verify},
		{StageRetire, x.retire},
	} {
		if x.rot.done(s.stage) {
			continue
		}
		if err := x.runStage(ctx, s.stage, s.f); err != nil {
			return err
		}
	}
	return nil
}

// finish records the rotation as completed and says what it did.
func (x *run) finish(ctx context.Context) (*Result, error) {
	now := x.now()
	rot, st := x.rot, x.st
	rot.Stage, rot.Status, rot.FinishedAt, rot.LastError = StageDone, StatusCompleted, &now, ""
	verified := rot.stage(StageVerify).Status == StatusCompleted
	st.LastCompleted = &Completed{
		ID: rot.ID, StartedAt: rot.StartedAt, FinishedAt: now,
		OldKeyID: rot.OldKeyID, NewKeyID: rot.NewKeyID, OldVersion: rot.OldVersion, NewVersion: rot.NewVersion,
		Rewritten: rot.Rewritten(), Retired: rot.Retired, Verified: verified,
	}
	if err := x.save(ctx); err != nil {
		return nil, &StageError{Stage: StageRetire, Resume: StageRetire, Err: err}
	}
	msg := fmt.Sprintf("rotation completed: key_id hash %s -> %s (version %s -> %s); %d objects rewritten",
		envelope.KeyIDHash(rot.OldKeyID), envelope.KeyIDHash(rot.NewKeyID), rot.OldVersion, rot.NewVersion, rot.Rewritten())
	if v := st.LastVerify; verified && v != nil {
		msg += fmt.Sprintf("; verify: %d objects under the new key_id, %d stale, %d unencrypted", v.Current, v.Stale, v.Unencrypted)
	} else {
		msg += "; not verified (no etcd configured), so nothing was retired"
	}
	if verified {
		if len(rot.Retired) > 0 {
			msg += "; retired " + strings.Join(rot.Retired, ", ")
		} else {
			msg += "; nothing to retire"
		}
	}
	x.log.Info(msg)
	return &Result{Outcome: OutcomeCompleted, Message: msg, State: st}, nil
}

// newRotation is a fresh rotation, every stage pending.
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

// runStage runs one stage, persisting its start and its outcome, and
// calls the AfterStage hook once it is persisted as completed. An error
// from a hook stops at once, recording nothing.
func (x *run) runStage(ctx context.Context, s Stage, f stageFunc) error {
	rec := x.rot.stage(s)
	started := x.now()
	rec.Status, rec.StartedAt, rec.FinishedAt, rec.Error = StatusRunning, &started, nil, ""
	x.rot.Stage, x.rot.Status = s, StatusRunning
	if err := x.save(ctx); err != nil {
		return &StageError{Stage: s, Resume: s, Err: err}
	}
	x.log.Info("stage started", zap.String("stage", string(s)))
	res, err := f(ctx)
	if he := (*hookError)(nil); errors.As(err, &he) {
		return err
	}
	finished := x.now()
	rec = x.rot.stage(s)
	rec.FinishedAt = &finished
	if err != nil {
		return x.failed(ctx, s, rec, err)
	}
	rec.Status, rec.Note = StatusCompleted, res.note
	if res.skipped {
		rec.Status = StatusSkipped
	}
	x.rot.LastError = ""
	if err := x.save(ctx); err != nil {
		return &StageError{Stage: s, Resume: s, Err: err}
	}
	fields := []zap.Field{zap.String("stage", string(s)), zap.String("status", string(rec.Status))}
	if res.note != "" {
		fields = append(fields, zap.String("note", res.note))
	}
	x.log.Info("stage finished", fields...)
	if err := x.cfg.Hooks.afterStage(s); err != nil {
		return &hookError{err}
	}
	return nil
}

// failed records that stage s failed with err (unless the Lease is lost:
// then another run may own the state) and returns the *StageError naming
// where the next run resumes.
func (x *run) failed(ctx context.Context, s Stage, rec *StageRecord, err error) error {
	if cause := context.Cause(ctx); cause != nil && !errors.Is(err, cause) {
		err = fmt.Errorf("%w (%v)", err, cause)
	}
	rec.Status, rec.Error = StatusFailed, err.Error()
	x.rot.Status, x.rot.LastError = StatusFailed, err.Error()
	if !errors.Is(context.Cause(ctx), ErrLostLease) {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		if serr := x.save(sctx); serr != nil {
			x.log.Warn("could not record the failure in the state ConfigMap", zap.Error(serr))
		}
		cancel()
	}
	resume := s
	order := x.order
	if order == nil {
		order = stages
	}
	for _, st := range order {
		if !x.rot.done(st) {
			resume = st
			break
		}
	}
	return &StageError{Stage: s, Resume: resume, Err: err}
}

// save persists the state, and shows it to the metrics. Only the driver's
// goroutine calls it.
func (x *run) save(ctx context.Context) error {
	x.saved.Store(&stateView{stage: x.rot.Stage, status: x.rot.Status, progress: append([]ResourceProgress(nil), x.rot.Progress...)})
	return x.store.save(ctx, x.st)
}
