package rotation

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"
	"golang.org/x/time/rate"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
)

// FieldManager names the rotation's no-op updates.
const FieldManager = "kms-plugin-rotate"

// reencrypt rewrites every object of every resource that is not yet under
// the new key_id.
func (x *run) reencrypt(ctx context.Context) (stageResult, error) {
	method, svmGVR, err := x.migration(ctx)
	if err != nil {
		return stageResult{}, err
	}
	limiter := rate.NewLimiter(rate.Limit(x.cfg.QPS), x.cfg.Burst)
	// rewritten counts the objects this stage rewrote in this process,
	// for Hooks.AfterRewrites.
	var rewritten atomic.Int64
	// Create every progress record first: the pointers taken below must
	// not move.
	for _, res := range x.cfg.Resources {
		x.rot.progress(res)
	}
	for _, res := range x.cfg.Resources {
		prog := x.rot.progress(res)
		if prog.Done {
			continue
		}
		served, err := x.resolve(ctx, res)
		if err != nil {
			return stageResult{}, err
		}
		if x.rot.Migration == string(MigrationSVM) {
			fellBack, err := x.migrateSVM(ctx, res, served.gvr.GroupResource(), svmGVR, prog)
			if err != nil {
				return stageResult{}, err
			}
			if !fellBack {
				continue
			}
			x.rot.Migration = string(MigrationUpdate)
		}
		if err := x.rewriteResource(ctx, res, served, prog, limiter, &rewritten); err != nil {
			return stageResult{}, err
		}
	}
	var parts []string
	var failed int64
	for _, p := range x.rot.Progress {
		failed += p.Failed
		parts = append(parts, fmt.Sprintf("%s: %d listed, %d rewritten, %d already current, %d deleted meanwhile, %d conflicts retried, %d failed",
			p.Resource, p.Listed, p.Rewritten, p.SkippedCurrent, p.SkippedDeleted, p.ConflictsRetried, p.Failed))
	}
	if failed > 0 {
		for i := range x.rot.Progress {
			x.rot.Progress[i].Done, x.rot.Progress[i].Continue = false, ""
		}
		return stageResult{}, fmt.Errorf("%d objects could not be rewritten (%s); the next run tries again", failed, strings.Join(parts, "; "))
	}
	return stageResult{note: fmt.Sprintf("via %s: %s", method, strings.Join(parts, "; "))}, nil
}

// pipeline is the re-encryption of one resource: a lister that runs one
// page ahead, so the workers never wait for a LIST; Workers that rewrite
// the listed objects; and the coordinator (rewriteResource, on the
// driver's goroutine) that records each page once its every object was
// handled. The lister and the workers count into live, and change nothing
// else that the driver owns.
type pipeline struct {
	x        *run
	res      string
	store    objectStore
	newKeyID string
	// isCurrent tells whether an object stored so is done; nil: under
	// newKeyID of the provider.
	isCurrent func(etcdscan.Encryption) bool
	limiter   *rate.Limiter
	live      *liveProgress
	// rewritten is the stage's count, for Hooks.AfterRewrites.
	rewritten *atomic.Int64
	// stop stops the workers and the lister; a hook's error is its cause.
	stop context.CancelCauseFunc
}

// rewriteResource pages through resource and rewrites the objects that are
// not under the new key_id. The saved list position only ever moves past
// a page whose every object was handled.
func (x *run) rewriteResource(ctx context.Context, res string, served servedResource, prog *ResourceProgress, limiter *rate.Limiter, rewritten *atomic.Int64) error {
	cont := prog.Continue
	wctx, stop := context.WithCancelCause(ctx)
	defer stop(nil)
	p := &pipeline{x: x, res: res, store: x.objectStore(served), newKeyID: x.rot.NewKeyID, isCurrent: x.isCurrent, limiter: limiter,
		live: newLiveProgress(*prog), rewritten: rewritten, stop: stop}
	log := x.log.With(zap.String("resource", res))
	log.Info("re-encrypting", zap.String("gvr", served.gvr.String()), zap.String("wire", p.store.wire()),
		zap.Bool("resuming", cont != ""), zap.Bool("etcdSkip", x.cfg.Etcd != nil))
	x.live.Store(p.live)
	defer x.live.Store(nil)
	rep := x.newReporter(res, p.live)
	defer rep.stop()

	lctx, stopListing := context.WithCancel(wctx)
	defer stopListing()
	pages := make(chan *pageWork, 1)
	work := make(chan pageItem, x.cfg.Workers)
	listErr := make(chan error, 1)
	go func() {
		defer close(work)
		defer close(pages)
		listErr <- p.list(lctx, cont, pages, work)
	}()
	var wg sync.WaitGroup
	for range x.cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.work(wctx, work)
		}()
	}
	// Whatever happens, the state gets every count of this process.
	defer func() {
		wg.Wait()
		p.live.fold(prog)
	}()

	var stopErr error
	for pw := range pages {
		<-pw.done
		if stopErr != nil {
			continue // drain: the lister stops at its next send
		}
		switch {
		case context.Cause(wctx) != nil:
			stopErr = context.Cause(wctx) // ctx's cause, or a hook's
		case pw.skipped.Load():
			stopErr = errors.New("re-encryption stopped before a page was done")
		}
		if stopErr != nil {
			stopListing()
			continue
		}
		p.live.fold(prog)
		prog.Continue = pw.cont
		if pw.cont == "" {
			prog.Done = true
		}
		if err := x.save(ctx); err != nil {
			stopErr = err
			stopListing()
		}
	}
	if stopErr != nil {
		return stopErr
	}
	if err := <-listErr; err != nil {
		return err
	}
	s := p.live.snapshot()
	log.Info("resource re-encrypted", zap.Int64("listed", s.Listed), zap.Int64("rewritten", s.Rewritten),
		zap.Int64("alreadyCurrent", s.SkippedCurrent), zap.Int64("deletedMeanwhile", s.SkippedDeleted),
		zap.Int64("conflictsRetried", s.ConflictsRetried), zap.Int64("failed", s.Failed))
	return nil
}

// pageWork tracks the objects of one listed page still being rewritten.
type pageWork struct {
	cont    string // the list position after this page
	pending atomic.Int64
	skipped atomic.Bool // an object was left alone (stopping)
	done    chan struct{}
}

func newPageWork(cont string, n int) *pageWork {
	p := &pageWork{cont: cont, done: make(chan struct{})}
	p.pending.Store(int64(n))
	if n == 0 {
		close(p.done)
	}
	return p
}

// finish marks one object of the page handled.
func (p *pageWork) finish() {
	if p.pending.Add(-1) == 0 {
		close(p.done)
	}
}

// pageItem is one object to rewrite and the page it came from.
type pageItem struct {
	obj  *storedObject
	page *pageWork
}

// list lists the resource from cont page by page until the end, sending
// each page (in order) to pages and then its objects that are not yet
// under the new key_id to work.
func (p *pipeline) list(ctx context.Context, cont string, pages chan<- *pageWork, work chan<- pageItem) error {
	for {
		var page objectPage
		err := retry(ctx, func() error {
			var err error
			page, err = p.store.list(ctx, p.x.cfg.PageSize, cont)
			return err
		})
		if cont != "" && (apierrors.IsResourceExpired(err) || apierrors.IsGone(err) || apierrors.IsBadRequest(err)) {
			p.x.log.Info("the saved list position expired; listing again from the start (objects already rewritten are skipped)", zap.String("resource", p.res))
			cont = ""
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil // stopping: the caller knows why
			}
			return fmt.Errorf("list %s: %w", p.res, err)
		}
		current := p.current(ctx, page.items)
		listed := p.live.listed.Add(int64(len(page.items)))
		if page.remaining != nil {
			p.live.estimate.Store(p.live.base.Listed + listed + *page.remaining)
		}
		todo := make([]*storedObject, 0, len(page.items))
		for i, o := range page.items {
			if current[i] {
				p.live.current.Add(1)
				continue
			}
			todo = append(todo, o)
		}
		pw := newPageWork(page.cont, len(todo))
		select {
		case pages <- pw:
		case <-ctx.Done():
			return nil
		}
		for i, o := range todo {
			select {
			case work <- pageItem{obj: o, page: pw}:
			case <-ctx.Done():
				// Account for the objects never handed out.
				for range todo[i:] {
					pw.skipped.Store(true)
					pw.finish()
				}
				return nil
			}
		}
		if page.cont == "" {
			return nil
		}
		cont = page.cont
	}
}

// work rewrites the objects handed to it until work closes; once ctx ends
// it leaves the rest alone, marking their pages as not done. It calls the
// AfterRewrites hook after each object rewritten, and stops the pipeline
// when the hook says so.
func (p *pipeline) work(ctx context.Context, work <-chan pageItem) {
	for it := range work {
		o := outcomeStopped
		if ctx.Err() == nil {
			o = p.rewriteOne(ctx, it.obj)
		}
		switch o {
		case outcomeStopped:
			it.page.skipped.Store(true)
		case outcomeRewritten:
			if err := p.x.cfg.Hooks.afterRewrites(p.rewritten.Add(1)); err != nil {
				p.stop(&hookError{err})
			}
		}
		it.page.finish()
	}
}
