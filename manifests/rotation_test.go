package manifests

import (
	"os"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

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

func TestRotationCronJob(t *testing.T) {
	objs := docs(t, "rotation-cronjob.yaml")
	byKind := map[string]map[string]any{}
	for _, o := range objs {
		byKind[o["kind"].(string)] = o
		if ns := get(o, "metadata", "namespace"); ns != nil && ns != rotation.DefaultNamespace {
			t.Errorf("%s in namespace %v; want %s", o["kind"], ns, rotation.DefaultNamespace)
		}
	}
	for _, k := range []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "CronJob"} {
		if byKind[k] == nil {
			t.Fatalf("no %s", k)
		}
	}
	cj := byKind["CronJob"]
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
	var args []string
	for _, a := range get(c, "args").([]any) {
		args = append(args, a.(string))
	}
	if args[0] != "rotate" {
		t.Fatalf("args %q", args)
	}
	mounts := map[string]bool{}
	for _, m := range get(c, "volumeMounts").([]any) {
		ro, _ := get(m, "readOnly").(bool)
		mounts[get(m, "mountPath").(string)] = ro
	}
	for _, a := range args {
		flag, val, _ := strings.Cut(a, "=")
		if !strings.HasPrefix(val, "/") {
			continue
		}
		ro, mounted := false, false
		for p, r := range mounts {
			if val == p || strings.HasPrefix(val, p+"/") {
				ro, mounted = r, true
			}
		}
		if !mounted {
			t.Errorf("%s=%s is not mounted", flag, val)
		}
		if strings.HasPrefix(flag, "--etcd-") && !ro {
			t.Errorf("%s is mounted writable; want read-only", val)
		}
	}

	// RBAC: the Role covers the rotation's own objects by name.
	var names []string
	for _, r := range get(byKind["Role"], "rules").([]any) {
		rn, _ := get(r, "resourceNames").([]any)
		for _, n := range rn {
			names = append(names, n.(string))
		}
	}
	for _, want := range []string{rotation.DefaultName, rotation.StateConfigMapName(rotation.DefaultName), rotation.CanaryName} {
		if !slices.Contains(names, want) {
			t.Errorf("Role does not name %s", want)
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
