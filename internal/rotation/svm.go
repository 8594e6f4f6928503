package rotation

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"go.uber.org/zap"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// svmGroup is the StorageVersionMigration API group.
const svmGroup = "storagemigration.k8s.io"

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

// controllerManagerAlive reports whether kube-controller-manager, which runs
// the storage version migrator, holds a fresh leader Lease, and if not,
// why not. When the Lease cannot be read, it answers true and the start
// timeout decides.
func (r *Runner) controllerManagerAlive(ctx context.Context) (bool, string) {
	l, err := r.cfg.Client.CoordinationV1().Leases("kube-system").Get(ctx, "kube-controller-manager", metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return false, "no kube-controller-manager leader Lease: rewriting with updates rather than a StorageVersionMigration nobody would run"
	}
	if err != nil {
		return true, ""
	}
	exp := expiry(l)
	if ptrString(l.Spec.HolderIdentity) == "" || exp.IsZero() || !r.cfg.Now().Before(exp.Add(time.Minute)) {
		return false, "kube-controller-manager's leader Lease is stale: rewriting with updates rather than a StorageVersionMigration nobody would run"
	}
	return true, ""
}

var nonDNS = regexp.MustCompile(`[^a-z0-9-]+`)

// migrateSVM rewrites resource with a StorageVersionMigration. With
// auto migration, it reports fellBack when no controller picked the
// migration up within SVMStartTimeout (then it deleted it).
func (x *run) migrateSVM(ctx context.Context, res string, gr schema.GroupResource, svmGVR schema.GroupVersionResource, prog *ResourceProgress) (fellBack bool, err error) {
	ri := x.cfg.Dynamic.Resource(svmGVR)
	name := prog.Migration
	if name == "" {
		name = strings.Trim(nonDNS.ReplaceAllString(strings.ToLower("kms-plugin-"+x.rot.ID+"-"+res), "-"), "-")
		if len(name) > 253 {
			name = name[:253]
		}
		prog.Migration = name
	}
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
					prog.Done, prog.Continue = true, ""
					return false, x.save(ctx)
				case typ == "Failed" && status == string(corev1.ConditionTrue):
					prog.Migration = "" // a new one next run
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
				prog.Migration = ""
				return true, nil
			}
		}
		if err := sleep(ctx, x.cfg.PollInterval); err != nil {
			return false, err
		}
	}
}
