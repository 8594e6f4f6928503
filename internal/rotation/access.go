package rotation

import (
	"strings"
)

// Permission is one kind of API request a run makes, as an RBAC rule
// grants it.
type Permission struct {
	// Group and Resource name the resource; "" is the core group.
	Group, Resource string
	// Namespace holds the objects; "" means every namespace, or a
	// cluster-scoped resource.
	Namespace string
	// Names limits the objects; empty means any (a list or a create
	// cannot be limited by name).
	Names []string
	Verbs []string
	// Why says what the run needs it for.
	Why string
}

// PermissionOptions are the settings that change what a run asks the API
// for (the rest of Config does not).
type PermissionOptions struct {
	// Namespace and Name are Config's (defaults DefaultNamespace and
	// DefaultName).
	Namespace, Name string
	// Resources are Config.Resources (default secrets).
	Resources []string
	// Migration is Config.Migration (default MigrationUpdate).
	Migration Migration
	// Etcd is whether Config.Etcd is set: then converge writes the canary.
	Etcd bool
}

// Permissions lists every kind of request a run (or a dry run) with these
// options makes to the API, besides discovery, which every authenticated
// client may read: what a Role for rotate must grant, and all that it
// needs. Resources named as RESOURCE.GROUP are granted in GROUP.
func Permissions(o PermissionOptions) []Permission {
	if o.Namespace == "" {
		o.Namespace = DefaultNamespace
	}
	if o.Name == "" {
		o.Name = DefaultName
	}
	if len(o.Resources) == 0 {
		o.Resources = []string{"secrets"}
	}
	if o.Migration == "" {
		o.Migration = MigrationUpdate
	}
	ps := []Permission{
		{Group: "coordination.k8s.io", Resource: "leases", Namespace: o.Namespace, Verbs: []string{"create"},
			Why: "the Lease that keeps two runs apart, created by the first run"},
		{Group: "coordination.k8s.io", Resource: "leases", Namespace: o.Namespace, Names: []string{o.Name}, Verbs: []string{"get", "update"},
			Why: "the Lease: take, renew and release it"},
		{Resource: "configmaps", Namespace: o.Namespace, Verbs: []string{"create"},
			Why: "the state ConfigMap, created by the first run"},
		{Resource: "configmaps", Namespace: o.Namespace, Names: []string{StateConfigMapName(o.Name)}, Verbs: []string{"get", "update"},
			Why: "the state ConfigMap: where a rotation stands, so the next run resumes"},
		{Resource: "nodes", Verbs: []string{"list"},
			Why: "preflight: count the control-plane Nodes (a node-local key store on several nodes is refused) and, without --plugin-endpoints, find their plugins"},
		{Group: "discovery.k8s.io", Resource: "endpointslices", Namespace: KubernetesNamespace, Verbs: []string{"list"},
			Why: "preflight: count the apiservers in the kubernetes Service's EndpointSlices and, without --apiserver-endpoints, write the canary through each"},
	}
	if res := canaryResourceOf(o.Resources); res != "" && o.Etcd {
		ps = append(ps,
			Permission{Resource: res, Namespace: o.Namespace, Verbs: []string{"create"},
				Why: "converge: the canary, written through every apiserver and read back from etcd, created by the first run"},
			Permission{Resource: res, Namespace: o.Namespace, Names: []string{CanaryName}, Verbs: []string{"get", "update"},
				Why: "converge: the canary, rewritten through every apiserver until etcd shows it under the new key"})
	}
	if o.Migration == MigrationUpdate || o.Migration == MigrationAuto {
		for _, res := range o.Resources {
			name, group, _ := strings.Cut(res, ".")
			ps = append(ps, Permission{Group: group, Resource: name, Verbs: []string{"list", "get", "update"},
				Why: "reencrypt: list every object and write it back unchanged (re-read after a conflict)"})
		}
	}
	if o.Migration == MigrationSVM || o.Migration == MigrationAuto {
		verbs, why := []string{"create", "get"}, "reencrypt: one StorageVersionMigration per resource, watched until it succeeds"
		if o.Migration == MigrationAuto {
			verbs, why = append(verbs, "delete"), why+"; deleted when no controller starts it and rotate falls back to updates"
		}
		ps = append(ps, Permission{Group: svmGroup, Resource: "storageversionmigrations", Verbs: verbs, Why: why})
	}
	if o.Migration == MigrationAuto {
		ps = append(ps, Permission{Group: "coordination.k8s.io", Resource: "leases", Namespace: "kube-system", Names: []string{"kube-controller-manager"}, Verbs: []string{"get"},
			Why: "reencrypt with --migration auto: is kube-controller-manager, which runs the migrator, alive?"})
	}
	return ps
}
