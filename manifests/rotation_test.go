package manifests

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/internal/install"
	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

// docs splits a multi-document YAML file into generic objects.
func docs(t *testing.T, name string) []map[string]any {
	t.Helper()
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, d := range strings.Split(string(data), "\n---\n") {
		var m map[string]any
		if err := yaml.Unmarshal([]byte(d), &m); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if m != nil {
			out = append(out, m)
		}
	}
	return out
}

func get(m any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			mm, _ := m.(map[string]any)
			m = mm[k]
		case int:
			s, _ := m.([]any)
			if k >= len(s) {
				return nil
			}
			m = s[k]
		}
	}
	return m
}

// rotationCronJobs are the CronJob manifests of `kms-plugin rotate`: the
// full rotation, and the one without etcd or Secret rights.
var rotationCronJobs = []string{"rotation-cronjob.yaml", "rotation-cronjob-svm.yaml"}

// grant is one verb on one object ("" for any), namespace "" cluster-wide.
type grant struct{ group, resource, namespace, name, verb string }

func (g grant) String() string {
	name, ns := g.name, g.namespace
	if name == "" {
		name = "*"
	}
	if ns == "" {
		ns = "(cluster)"
	}
	return fmt.Sprintf("%s %s.%s %s/%s", g.verb, g.resource, g.group, ns, name)
}

// strs converts a YAML list of strings.
func strs(t *testing.T, v any) []string {
	t.Helper()
	if v == nil {
		return nil
	}
	l, ok := v.([]any)
	if !ok {
		t.Fatalf("%v is not a list", v)
	}
	var out []string
	for _, x := range l {
		out = append(out, x.(string))
	}
	return out
}

// rbacGrants expands the rules of every (Cluster)Role bound to the
// rotation's ServiceAccount into single grants; it fails t on a Role that
// nothing binds, a binding of another subject, or a wildcard.
func rbacGrants(t *testing.T, objs []map[string]any) []grant {
	t.Helper()
	bound := map[string]bool{} // KIND/NAMESPACE/NAME of bound roles
	for _, o := range objs {
		kind := o["kind"].(string)
		if kind != "RoleBinding" && kind != "ClusterRoleBinding" {
			continue
		}
		subj := get(o, "subjects", 0)
		if n := len(get(o, "subjects").([]any)); n != 1 || get(subj, "kind") != "ServiceAccount" || get(subj, "name") != "kms-plugin-rotation" || get(subj, "namespace") != rotation.DefaultNamespace {
			t.Errorf("%s %v binds %v; want the kms-plugin-rotation ServiceAccount only", kind, get(o, "metadata", "name"), get(o, "subjects"))
		}
		ns, _ := get(o, "metadata", "namespace").(string)
		if get(o, "roleRef", "kind") == "ClusterRole" {
			ns = ""
		}
		bound[fmt.Sprintf("%v/%s/%v", get(o, "roleRef", "kind"), ns, get(o, "roleRef", "name"))] = true
	}
	var out []grant
	for _, o := range objs {
		kind := o["kind"].(string)
		if kind != "Role" && kind != "ClusterRole" {
			continue
		}
		ns, _ := get(o, "metadata", "namespace").(string)
		if !bound[fmt.Sprintf("%s/%s/%v", kind, ns, get(o, "metadata", "name"))] {
			t.Errorf("%s %s/%v is bound to nothing", kind, ns, get(o, "metadata", "name"))
		}
		for _, r := range get(o, "rules").([]any) {
			names := strs(t, get(r, "resourceNames"))
			if len(names) == 0 {
				names = []string{""}
			}
			for _, g := range strs(t, get(r, "apiGroups")) {
				for _, res := range strs(t, get(r, "resources")) {
					for _, v := range strs(t, get(r, "verbs")) {
						for _, n := range names {
							if strings.Contains(g+res+v+n, "*") {
								t.Errorf("%s %s: wildcard in %v", kind, ns, r)
							}
							out = append(out, grant{g, res, ns, n, v})
						}
					}
				}
			}
		}
	}
	return out
}

// codeGrants expands rotation.Permissions into single grants.
func codeGrants(ps []rotation.Permission) map[grant]string {
	out := map[grant]string{}
	for _, p := range ps {
		names := p.Names
		if len(names) == 0 {
			names = []string{""}
		}
		for _, n := range names {
			for _, v := range p.Verbs {
				out[grant{p.Group, p.Resource, p.Namespace, n, v}] = p.Why
			}
		}
	}
	return out
}

// flagValues returns the values of each --NAME=VALUE argument.
func flagValues(args []string) map[string]string {
	out := map[string]string{}
	for _, a := range args {
		if k, v, ok := strings.Cut(strings.TrimPrefix(a, "--"), "="); ok && strings.HasPrefix(a, "--") {
			out[k] = v
		}
	}
	return out
}

func TestRotationCronJob(t *testing.T) {
	for _, file := range rotationCronJobs {
		t.Run(file, func(t *testing.T) { checkRotationCronJob(t, file) })
	}
}

func checkRotationCronJob(t *testing.T, file string) {
	objs := docs(t, file)
	kinds := map[string]int{}
	var cj map[string]any
	for _, o := range objs {
		kind := o["kind"].(string)
		kinds[kind]++
		if kind == "CronJob" {
			cj = o
		}
		ns := get(o, "metadata", "namespace")
		switch {
		case kind == "Role" || kind == "RoleBinding":
			if ns != rotation.DefaultNamespace && ns != rotation.KubernetesNamespace {
				t.Errorf("%s in namespace %v; want %s or %s", kind, ns, rotation.DefaultNamespace, rotation.KubernetesNamespace)
			}
		case ns != nil && ns != rotation.DefaultNamespace:
			t.Errorf("%s in namespace %v; want %s", kind, ns, rotation.DefaultNamespace)
		}
	}
	for _, k := range []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "CronJob"} {
		if kinds[k] == 0 {
			t.Fatalf("no %s", k)
		}
	}
	if get(cj, "spec", "concurrencyPolicy") != "Forbid" || get(cj, "spec", "startingDeadlineSeconds") == nil {
		t.Errorf("CronJob spec: concurrencyPolicy %v, startingDeadlineSeconds %v", get(cj, "spec", "concurrencyPolicy"), get(cj, "spec", "startingDeadlineSeconds"))
	}
	pod := get(cj, "spec", "jobTemplate", "spec", "template", "spec")
	if _, ok := get(pod, "nodeSelector").(map[string]any)[rotation.ControlPlaneLabel]; !ok {
		t.Errorf("pod does not select control-plane nodes")
	}
	if get(pod, "tolerations", 0, "key") != rotation.ControlPlaneLabel || get(pod, "serviceAccountName") != "kms-plugin-rotation" {
		t.Errorf("pod tolerations %v, service account %v", get(pod, "tolerations"), get(pod, "serviceAccountName"))
	}
	c := get(pod, "containers", 0)
	args := strs(t, get(c, "args"))
	if args[0] != "rotate" {
		t.Fatalf("args %q", args)
	}
	flags := flagValues(args[1:])

	// Mounts: every path a flag names is mounted (etcd's read-only), and
	// every mount is a path a flag names.
	mounts := map[string]bool{}
	for _, m := range get(c, "volumeMounts").([]any) {
		ro, _ := get(m, "readOnly").(bool)
		mounts[get(m, "mountPath").(string)] = ro
	}
	used := map[string]bool{}
	for flag, val := range flags {
		if !strings.HasPrefix(val, "/") {
			continue
		}
		ro, mounted := false, false
		for p, r := range mounts {
			if val == p || strings.HasPrefix(val, p+"/") {
				ro, mounted, used[p] = r, true, true
			}
		}
		if !mounted {
			t.Errorf("--%s=%s is not mounted", flag, val)
		}
		if strings.HasPrefix(flag, "etcd-") && !ro {
			t.Errorf("%s is mounted writable; want read-only", val)
		}
	}
	for p := range mounts {
		if !used[p] {
			t.Errorf("%s is mounted, but no flag uses it", p)
		}
	}

	// RBAC: exactly what the code needs for these flags. Resources come
	// from the node's EncryptionConfiguration, as the shipped one has them.
	resources := strings.Split(flags["resources"], ",")
	if flags["resources"] == "" {
		data, err := os.ReadFile("encryption-config.yaml")
		if err != nil {
			t.Fatal(err)
		}
		if resources, err = install.EncryptedResources(data, flags["provider-name"]); err != nil {
			t.Fatal(err)
		}
	}
	opts := rotation.PermissionOptions{
		Resources: resources,
		Migration: rotation.Migration(flags["migration"]),
		Etcd:      flags["etcd-endpoints"] != "",
	}
	need := codeGrants(rotation.Permissions(opts))
	granted := rbacGrants(t, objs)
	for _, g := range granted {
		if _, ok := need[g]; !ok {
			t.Errorf("RBAC grants %s, which rotate does not need with these flags (%+v)", g, opts)
		}
	}
	for g, why := range need {
		if !slices.Contains(granted, g) {
			t.Errorf("rotate needs %s (%s), which no RBAC rule grants", g, why)
		}
	}

	// The Role covers the rotation's own objects by name.
	var names []string
	for _, g := range granted {
		if g.name != "" {
			names = append(names, g.name)
		}
	}
	want := []string{rotation.DefaultName, rotation.StateConfigMapName(rotation.DefaultName)}
	if opts.Etcd {
		want = append(want, rotation.CanaryName)
	}
	for _, w := range want {
		if !slices.Contains(names, w) {
			t.Errorf("the Role does not name %s", w)
		}
	}
}

// TestRotationCronJobWithoutEtcd pins what the StorageVersionMigration
// variant is for: no etcd flag or mount, no right on any Secret, the
// migration by the cluster's migrator.
func TestRotationCronJobWithoutEtcd(t *testing.T) {
	objs := docs(t, "rotation-cronjob-svm.yaml")
	for _, g := range rbacGrants(t, objs) {
		if g.resource == "secrets" {
			t.Errorf("grants %s; want no right on Secrets", g)
		}
	}
	data, err := os.ReadFile("rotation-cronjob-svm.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var cj map[string]any
	for _, o := range objs {
		if o["kind"] == "CronJob" {
			cj = o
		}
	}
	c := get(cj, "spec", "jobTemplate", "spec", "template", "spec", "containers", 0)
	flags := flagValues(strs(t, get(c, "args")))
	if flags["migration"] != string(rotation.MigrationSVM) {
		t.Errorf("--migration=%q; want %s", flags["migration"], rotation.MigrationSVM)
	}
	for f := range flags {
		if strings.HasPrefix(f, "etcd-") {
			t.Errorf("--%s: want no etcd flag", f)
		}
	}
	for _, m := range get(c, "volumeMounts").([]any) {
		if p := get(m, "mountPath").(string); strings.Contains(p, "etcd") || strings.Contains(p, "pki") {
			t.Errorf("mounts %s; want no etcd key", p)
		}
	}
	// It says how to verify and retire instead.
	for _, want := range []string{"kms-plugin verify --fail-on-stale", "keyset", "retire"} {
		if !strings.Contains(string(data), want) {
			t.Errorf("the manifest's comments do not say %q", want)
		}
	}
}

func TestRotationSystemdUnits(t *testing.T) {
	svc, err := os.ReadFile("kms-plugin-rotate.service")
	if err != nil {
		t.Fatal(err)
	}
	timer, err := os.ReadFile("kms-plugin-rotate.timer")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=oneshot", "ExecStart=/usr/local/bin/kms-plugin rotate", "--min-age=720h", "SuccessExitStatus=2"} {
		if !strings.Contains(string(svc), want) {
			t.Errorf("service lacks %q", want)
		}
	}
	for _, want := range []string{"OnCalendar=", "Persistent=true", "Unit=kms-plugin-rotate.service", "WantedBy=timers.target"} {
		if !strings.Contains(string(timer), want) {
			t.Errorf("timer lacks %q", want)
		}
	}
}
