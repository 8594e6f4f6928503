package rotation

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/time/rate"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
)

// FieldManager names the rotation's no-op updates.
const FieldManager = "kms-plugin-rotate"

// svmGroup is the StorageVersionMigration API group.
const svmGroup = "storagemigration.k8s.io"

// maxAttempts bounds the tries of one object's update.
const maxAttempts = 6

// reencrypt rewrites every object of every resource that is not yet under
// the new key_id.
func (x *run) reencrypt(ctx context.Context) (stageResult, error) {
	method, svmGVR, err := x.migrationMethod(ctx)
	if err != nil {
		return stageResult{}, err
	}
	limiter := rate.NewLimiter(rate.Limit(x.cfg.QPS), x.cfg.Burst)
	var rewritten atomic.Int64
	// Create every progress record first: the pointers taken below must
	// not move.
	x.mu.Lock()
	for _, res := range x.cfg.Resources {
		x.rot.progress(res)
	}
	x.mu.Unlock()
	for _, res := range x.cfg.Resources {
		x.mu.Lock()
		prog := x.rot.progress(res)
		done := prog.Done
		x.mu.Unlock()
		if done {
			continue
		}
		served, err := x.r.resolve(ctx, res)
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
			x.mu.Lock()
			x.rot.Migration = string(MigrationUpdate)
			x.mu.Unlock()
		}
		if err := x.rewriteResource(ctx, res, served, prog, limiter, &rewritten); err != nil {
			return stageResult{}, err
		}
	}
	x.mu.Lock()
	defer x.mu.Unlock()
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

// migrationMethod fixes, once per rotation, how objects are rewritten.
func (x *run) migrationMethod(ctx context.Context) (string, schema.GroupVersionResource, error) {
	svmGVR, served, err := x.r.svmServed(ctx)
	if err != nil {
		return "", svmGVR, err
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.rot.Migration == "" {
		switch {
		case x.cfg.Migration == MigrationSVM && !served:
			return "", svmGVR, fmt.Errorf("--migration storageversionmigration: the cluster does not serve %s; use --migration update", svmGroup)
		case x.cfg.Migration == MigrationSVM || (x.cfg.Migration == MigrationAuto && served && x.r.controllerManagerAlive(ctx)):
			x.rot.Migration = string(MigrationSVM)
		default:
			x.rot.Migration = string(MigrationUpdate)
		}
	}
	if x.rot.Migration == string(MigrationSVM) && !served {
		x.rot.Migration = string(MigrationUpdate)
	}
	return x.rot.Migration, svmGVR, nil
}

// controllerManagerAlive reports whether kube-controller-manager, which runs
// the storage version migrator, holds a fresh leader Lease. When the Lease
// cannot be read, it answers true and the start timeout decides.
func (r *Runner) controllerManagerAlive(ctx context.Context) bool {
	l, err := r.cfg.Client.CoordinationV1().Leases("kube-system").Get(ctx, "kube-controller-manager", metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		r.log.Info("no kube-controller-manager leader Lease: rewriting with updates rather than a StorageVersionMigration nobody would run")
		return false
	}
	if err != nil {
		return true
	}
	exp := expiry(l)
	alive := ptrString(l.Spec.HolderIdentity) != "" && !exp.IsZero() && r.cfg.Now().Before(exp.Add(time.Minute))
	if !alive {
		r.log.Info("kube-controller-manager's leader Lease is stale: rewriting with updates rather than a StorageVersionMigration nobody would run")
	}
	return alive
}

// svmServed finds the StorageVersionMigration resource the cluster serves.
func (r *Runner) svmServed(ctx context.Context) (schema.GroupVersionResource, bool, error) {
	for _, v := range []string{"v1", "v1beta1"} {
		gv := svmGroup + "/" + v
		list, err := r.cfg.Client.Discovery().ServerResourcesForGroupVersion(gv)
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return schema.GroupVersionResource{}, false, fmt.Errorf("discover %s: %w", gv, err)
		}
		for _, res := range list.APIResources {
			if res.Name == "storageversionmigrations" {
				return schema.GroupVersionResource{Group: svmGroup, Version: v, Resource: res.Name}, true, nil
			}
		}
	}
	return schema.GroupVersionResource{}, false, nil
}

// servedResource is a resource as the cluster serves it.
type servedResource struct {
	gvr        schema.GroupVersionResource
	kind       string
	namespaced bool
}

// resolve finds the served version of resource ("secrets",
// "deployments.apps").
func (r *Runner) resolve(ctx context.Context, resource string) (servedResource, error) {
	name, group, _ := strings.Cut(resource, ".")
	disc := r.cfg.Client.Discovery()
	gv := "v1"
	if group != "" {
		groups, err := disc.ServerGroups()
		if err != nil {
			return servedResource{}, fmt.Errorf("discover API groups: %w", err)
		}
		gv = ""
		for _, g := range groups.Groups {
			if g.Name == group {
				gv = g.PreferredVersion.GroupVersion
			}
		}
		if gv == "" {
			return servedResource{}, fmt.Errorf("resource %s: the cluster serves no API group %s", resource, group)
		}
	}
	list, err := disc.ServerResourcesForGroupVersion(gv)
	if err != nil {
		return servedResource{}, fmt.Errorf("resource %s: discover %s: %w", resource, gv, err)
	}
	for _, res := range list.APIResources {
		if res.Name == name {
			if !slices.Contains(res.Verbs, "update") || !slices.Contains(res.Verbs, "list") {
				return servedResource{}, fmt.Errorf("resource %s cannot be listed and updated", resource)
			}
			parsed, err := schema.ParseGroupVersion(gv)
			if err != nil {
				return servedResource{}, err
			}
			return servedResource{gvr: parsed.WithResource(name), kind: res.Kind, namespaced: res.Namespaced}, nil
		}
	}
	return servedResource{}, fmt.Errorf("resource %s: %s serves no resource %s", resource, gv, name)
}

// rewriteResource pages through resource and rewrites the objects that are
// not under the new key_id. Listing runs one page ahead of the workers, so
// they never wait for a LIST; the saved list position only ever moves past
// a page whose every object was handled.
func (x *run) rewriteResource(ctx context.Context, res string, served servedResource, prog *ResourceProgress, limiter *rate.Limiter, rewritten *atomic.Int64) error {
	store := x.objectStore(served)
	x.mu.Lock()
	cont := prog.Continue
	x.mu.Unlock()
	log := x.log.With(zap.String("resource", res))
	log.Info("re-encrypting", zap.String("gvr", served.gvr.String()), zap.String("wire", store.wire()),
		zap.Bool("resuming", cont != ""), zap.Bool("etcdSkip", x.cfg.Etcd != nil))
	rep := x.newReporter(res, prog)
	defer rep.stop()

	lctx, stopListing := context.WithCancel(ctx)
	defer stopListing()
	pages := make(chan *pageWork, 1)
	work := make(chan pageItem, x.cfg.Workers)
	listErr := make(chan error, 1)
	go func() {
		defer close(work)
		defer close(pages)
		listErr <- x.listPages(lctx, res, store, cont, prog, pages, work)
	}()
	var wg sync.WaitGroup
	for range x.cfg.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for it := range work {
				if ctx.Err() != nil || x.isCrashed() {
					it.page.skipped.Store(true)
				} else {
					x.rewriteOne(ctx, store, it.obj, prog, limiter, rewritten)
				}
				it.page.finish()
			}
		}()
	}
	defer wg.Wait()

	var stopErr error
	for p := range pages {
		<-p.done
		if stopErr != nil {
			continue // drain: the lister stops at its next send
		}
		switch {
		case x.isCrashed():
			stopErr = ErrCrashed
		case ctx.Err() != nil:
			stopErr = context.Cause(ctx)
		case p.skipped.Load():
			stopErr = errors.New("re-encryption stopped before a page was done")
		}
		if stopErr != nil {
			stopListing()
			continue
		}
		x.mu.Lock()
		prog.Continue = p.cont
		if p.cont == "" {
			prog.Done = true
		}
		x.mu.Unlock()
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
	x.mu.Lock()
	p := *prog
	x.mu.Unlock()
	log.Info("resource re-encrypted", zap.Int64("listed", p.Listed), zap.Int64("rewritten", p.Rewritten),
		zap.Int64("alreadyCurrent", p.SkippedCurrent), zap.Int64("deletedMeanwhile", p.SkippedDeleted),
		zap.Int64("conflictsRetried", p.ConflictsRetried), zap.Int64("failed", p.Failed))
	return nil
}

// objectStore picks how objects of served are read and written: raw JSON
// through Config.REST, else the dynamic client.
func (x *run) objectStore(served servedResource) objectStore {
	if x.cfg.REST != nil && served.kind != "" {
		return newRawStore(x.cfg.REST, served.gvr, served.kind, served.namespaced)
	}
	return dynamicStore{ri: x.cfg.Dynamic.Resource(served.gvr)}
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

// listPages lists resource from cont page by page until the end, sending
// each page (in order) to pages and then its objects that are not yet
// under the new key_id to work.
func (x *run) listPages(ctx context.Context, res string, store objectStore, cont string, prog *ResourceProgress, pages chan<- *pageWork, work chan<- pageItem) error {
	for {
		var page objectPage
		err := retry(ctx, func() error {
			var err error
			page, err = store.list(ctx, x.cfg.PageSize, cont)
			return err
		})
		if cont != "" && (apierrors.IsResourceExpired(err) || apierrors.IsGone(err) || apierrors.IsBadRequest(err)) {
			x.log.Info("the saved list position expired; listing again from the start (objects already rewritten are skipped)", zap.String("resource", res))
			cont = ""
			continue
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil // stopping: the caller knows why
			}
			return fmt.Errorf("list %s: %w", res, err)
		}
		current := x.currentObjects(ctx, res, page.items)
		x.mu.Lock()
		prog.Listed += int64(len(page.items))
		if page.remaining != nil {
			prog.Estimate = prog.Listed + *page.remaining
		}
		x.mu.Unlock()
		todo := make([]*storedObject, 0, len(page.items))
		for i, o := range page.items {
			if current[i] {
				x.count(func() { prog.SkippedCurrent++ })
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

// count applies f to the progress under the lock.
func (x *run) count(f func()) {
	x.mu.Lock()
	f()
	x.mu.Unlock()
}

func (x *run) isCrashed() bool {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.crashed
}

// rewriteOne does the no-op update of one object: with the object as
// listed, then, after a conflict, as read again.
func (x *run) rewriteOne(ctx context.Context, store objectStore, obj *storedObject, prog *ResourceProgress, limiter *rate.Limiter, rewritten *atomic.Int64) {
	cur := obj
	var lastErr error
	for attempt := 1; ; attempt++ {
		if err := limiter.Wait(ctx); err != nil {
			return
		}
		err := store.update(ctx, cur)
		switch {
		case err == nil:
			x.count(func() { prog.Rewritten++ })
			if n := rewritten.Add(1); x.cfg.CrashAfter.Stage == StageReencrypt && x.cfg.CrashAfter.Objects > 0 && n == x.cfg.CrashAfter.Objects {
				x.crash()
			}
			return
		case apierrors.IsNotFound(err):
			x.count(func() { prog.SkippedDeleted++ })
			return
		case apierrors.IsConflict(err) && attempt < maxAttempts:
			x.count(func() { prog.ConflictsRetried++ })
			fresh, gerr := store.get(ctx, obj)
			switch {
			case apierrors.IsNotFound(gerr):
				x.count(func() { prog.SkippedDeleted++ })
				return
			case gerr != nil:
				lastErr = gerr
				cur = obj
				if sleep(ctx, backoff(attempt)) != nil {
					return
				}
			default:
				cur = fresh
			}
			continue
		case transient(err) && attempt < maxAttempts:
			lastErr = err
			if sleep(ctx, backoff(attempt)) != nil {
				return
			}
			continue
		default:
			if ctx.Err() != nil {
				return
			}
			if lastErr != nil && apierrors.IsConflict(err) {
				err = fmt.Errorf("%w (after %v)", err, lastErr)
			}
			x.count(func() { prog.Failed++ })
			x.log.Warn("could not rewrite an object", zap.String("resource", prog.Resource), zap.String("namespace", obj.namespace), zap.String("name", obj.name), zap.Error(err))
			return
		}
	}
}

// transient reports whether err may go away by itself.
func transient(err error) bool {
	return apierrors.IsTooManyRequests(err) || apierrors.IsServerTimeout(err) || apierrors.IsTimeout(err) ||
		apierrors.IsInternalError(err) || apierrors.IsServiceUnavailable(err) || apierrors.IsUnexpectedServerError(err) ||
		errors.Is(err, context.DeadlineExceeded) || isConnectionError(err)
}

func isConnectionError(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	return strings.Contains(s, "connection refused") || strings.Contains(s, "connection reset") || strings.Contains(s, "EOF") || strings.Contains(s, "http2: ")
}

func backoff(attempt int) time.Duration {
	return min(time.Duration(1<<min(attempt, 6))*100*time.Millisecond, 5*time.Second)
}

// retry runs f until it succeeds, fails for good, or maxAttempts pass.
func retry(ctx context.Context, f func() error) error {
	for attempt := 1; ; attempt++ {
		err := f()
		if err == nil || !transient(err) || attempt >= maxAttempts {
			return err
		}
		if serr := sleep(ctx, backoff(attempt)); serr != nil {
			return err
		}
	}
}

// currentObjects tells, per listed object, whether etcd already holds it
// under the new key_id. Without etcd, or when etcd cannot say, nothing is
// current and every object is rewritten.
func (x *run) currentObjects(ctx context.Context, res string, items []*storedObject) []bool {
	out := make([]bool, len(items))
	if x.cfg.Etcd == nil || len(items) == 0 {
		return out
	}
	sc := etcdscan.New(x.cfg.Etcd, 100)
	for _, prefix := range etcdscan.KeyPrefixes(x.cfg.EtcdPrefix, res) {
		idx := make(map[string]int, len(items))
		lo, hi := "", ""
		for i, o := range items {
			k := prefix + o.path()
			idx[k] = i
			if lo == "" || k < lo {
				lo = k
			}
			if k > hi {
				hi = k
			}
		}
		found := 0
		_, err := sc.ScanRange(ctx, lo, hi+"\x00", 0, func(kv etcdscan.KeyValue) error {
			i, ok := idx[string(kv.Key)]
			if !ok {
				return nil
			}
			found++
			e, err := etcdscan.Classify(kv.Value)
			out[i] = err == nil && e.Kind == etcdscan.KindKMSv2 && e.Provider == x.cfg.ProviderName && e.KeyID == x.rot.NewKeyID
			return nil
		})
		if err != nil {
			x.log.Warn("could not read etcd to skip objects already under the new key_id; rewriting this page", zap.String("resource", res), zap.Error(err))
			return make([]bool, len(items))
		}
		if found > 0 {
			break
		}
	}
	return out
}

var nonDNS = regexp.MustCompile(`[^a-z0-9-]+`)

// migrateSVM rewrites resource with a StorageVersionMigration. With
// auto migration, it reports fellBack when no controller picked the
// migration up within SVMStartTimeout (then it deleted it).
func (x *run) migrateSVM(ctx context.Context, res string, gr schema.GroupResource, svmGVR schema.GroupVersionResource, prog *ResourceProgress) (fellBack bool, err error) {
	ri := x.cfg.Dynamic.Resource(svmGVR)
	x.mu.Lock()
	name := prog.Migration
	if name == "" {
		name = strings.Trim(nonDNS.ReplaceAllString(strings.ToLower("kms-plugin-"+x.rot.ID+"-"+res), "-"), "-")
		if len(name) > 253 {
			name = name[:253]
		}
		prog.Migration = name
	}
	x.mu.Unlock()
	obj := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": svmGVR.GroupVersion().String(),
		"kind":       "StorageVersionMigration",
		"metadata": map[string]any{"name": name, "labels": map[string]any{
			"app.kubernetes.io/name": "kms-plugin", "app.kubernetes.io/component": "rotation"}},
		"spec": map[string]any{"resource": map[string]any{"group": gr.Group, "resource": gr.Resource}},
	}}
	if _, err := ri.Create(ctx, obj, metav1.CreateOptions{FieldManager: FieldManager}); err != nil && !apierrors.IsAlreadyExists(err) {
		return false, fmt.Errorf("create StorageVersionMigration %s for %s: %w", name, res, err)
	}
	if err := x.save(ctx); err != nil {
		return false, err
	}
	x.log.Info("waiting for the StorageVersionMigration", zap.String("resource", res), zap.String("migration", name))
	start := time.Now()
	for {
		cur, err := ri.Get(ctx, name, metav1.GetOptions{})
		if err != nil && !transient(err) {
			return false, fmt.Errorf("read StorageVersionMigration %s: %w", name, err)
		}
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(cur.Object, "status", "conditions")
			seen := false
			for _, c := range conds {
				m, _ := c.(map[string]any)
				typ, _ := m["type"].(string)
				status, _ := m["status"].(string)
				msg, _ := m["message"].(string)
				seen = true
				switch {
				case typ == "Succeeded" && status == string(corev1.ConditionTrue):
					x.count(func() { prog.Done, prog.Continue = true, "" })
					return false, x.save(ctx)
				case typ == "Failed" && status == string(corev1.ConditionTrue):
					x.count(func() { prog.Migration = "" }) // a new one next run
					return false, fmt.Errorf("StorageVersionMigration %s for %s failed: %s", name, res, msg)
				}
			}
			if !seen && time.Since(start) > x.cfg.SVMStartTimeout {
				msg := fmt.Sprintf("no controller picked up StorageVersionMigration %s within %s (is kube-controller-manager's storage version migrator enabled?)", name, x.cfg.SVMStartTimeout)
				if x.cfg.Migration != MigrationAuto {
					return false, errors.New(msg + "; use --migration update")
				}
				x.log.Warn(msg + "; falling back to updates")
				_ = ri.Delete(ctx, name, metav1.DeleteOptions{})
				x.count(func() { prog.Migration = "" })
				return true, nil
			}
		}
		if err := sleep(ctx, x.cfg.PollInterval); err != nil {
			return false, err
		}
	}
}

// writeCanary writes the canary through a, then reads its key_id from etcd.
func (x *run) writeCanary(ctx context.Context, a APIServer, resource string, sc *etcdscan.Scanner, key string) (string, error) {
	data := map[string]string{"apiserver": a.Name, "written": x.now().Format(time.RFC3339Nano), "rotation": x.rot.ID}
	meta := metav1.ObjectMeta{Name: CanaryName, Namespace: x.cfg.Namespace,
		Labels: map[string]string{"app.kubernetes.io/name": "kms-plugin", "app.kubernetes.io/component": "rotation-canary"}}
	var err error
	switch resource {
	case "secrets":
		secrets := a.Client.CoreV1().Secrets(x.cfg.Namespace)
		var s *corev1.Secret
		s, err = secrets.Get(ctx, CanaryName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, err = secrets.Create(ctx, &corev1.Secret{ObjectMeta: meta, StringData: data}, metav1.CreateOptions{FieldManager: FieldManager})
		case err == nil:
			s.StringData = data
			_, err = secrets.Update(ctx, s, metav1.UpdateOptions{FieldManager: FieldManager})
		}
	default:
		cms := a.Client.CoreV1().ConfigMaps(x.cfg.Namespace)
		var c *corev1.ConfigMap
		c, err = cms.Get(ctx, CanaryName, metav1.GetOptions{})
		switch {
		case apierrors.IsNotFound(err):
			_, err = cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: meta, Data: data}, metav1.CreateOptions{FieldManager: FieldManager})
		case err == nil:
			c.Data = data
			_, err = cms.Update(ctx, c, metav1.UpdateOptions{FieldManager: FieldManager})
		}
	}
	if err != nil {
		return "", fmt.Errorf("write canary %s %s/%s through %s: %w", resource, x.cfg.Namespace, CanaryName, a.Name, err)
	}
	raw, ok, err := sc.Get(ctx, key)
	if err != nil {
		return "", err
	}
	if !ok {
		return "", &permanentError{fmt.Errorf("the canary written through %s is not in etcd at %s: check --etcd-prefix and --etcd-endpoints", a.Name, key)}
	}
	e, err := etcdscan.Classify(raw)
	if err != nil {
		return "", &permanentError{fmt.Errorf("canary at %s: %w", key, err)}
	}
	if e.Kind != etcdscan.KindKMSv2 || e.Provider != x.cfg.ProviderName {
		how := "in clear"
		if e.Encrypted() {
			how = fmt.Sprintf("by %s provider %q", e.Kind, e.Provider)
		}
		return "", &permanentError{fmt.Errorf("the canary written through %s is stored %s, not by kms provider %q: check --provider-name, and that the EncryptionConfiguration encrypts %s with it first", a.Name, how, x.cfg.ProviderName, resource)}
	}
	return e.KeyID, nil
}
