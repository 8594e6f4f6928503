package install

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// TestFinalizeRefuses checks the guards of uninstall's last stage.
func TestFinalizeRefuses(t *testing.T) {
	encrypted := map[string]string{
		"/registry/secrets/default/a":     "k8s:enc:kms:v2:kms-plugin:\x0a\x01...",
		"/registry/secrets/kube-system/b": "k8s:enc:kms:v2:kms-plugin:\x0a\x01...",
		"/registry/secrets/default/c":     "k8s\x00\x0a\x0c\x0a\x02v1...",  // plaintext protobuf
		"/registry/configmaps/default/d":  "k8s:enc:kms:v2:kms-plugin:...", // not a resource of ours
	}
	for _, tt := range []struct {
		name    string
		stage1  bool
		opts    UninstallOptions
		wantErr error
		want    string
	}{
		{"stage one not run", false, UninstallOptions{Finalize: true, Storage: &fakeStorage{}}, ErrNotDecrypted, "run `kms-plugin uninstall` first"},
		{"objects still encrypted", true, UninstallOptions{Finalize: true, Storage: &fakeStorage{objects: encrypted}}, ErrStillEncrypted, "2 objects in etcd, such as /registry/secrets/"},
		{"etcd unreachable", true, UninstallOptions{Finalize: true, Storage: &fakeStorage{err: errors.New("connection refused")}}, nil, "check etcd: connection refused"},
		{"no etcd check", true, UninstallOptions{Finalize: true}, nil, "use --force to skip the check"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root := kubeadmRoot(t, fixture)
			in := newInstaller(t, root, nil)
			install(t, in)
			if tt.stage1 {
				uninstall(t, in, UninstallOptions{})
			}
			before := snapshot(t, root)
			_, err := in.PlanUninstall(t.Context(), tt.opts)
			if err == nil || !strings.Contains(err.Error(), tt.want) || (tt.wantErr != nil && !errors.Is(err, tt.wantErr)) {
				t.Fatalf("PlanUninstall error = %v; want %v containing %q", err, tt.wantErr, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "uninstall: ") {
				t.Errorf("error %q does not say where it comes from", err)
			}
			sameTree(t, snapshot(t, root), before)
		})
	}
}

// TestFinalizeForce removes everything without any check.
func TestFinalizeForce(t *testing.T) {
	root := kubeadmRoot(t, fixture)
	in := newInstaller(t, root, nil)
	install(t, in)
	plan := uninstall(t, in, UninstallOptions{Finalize: true, Force: true})
	if len(plan.Changes) != 4 {
		t.Errorf("forced finalize changed %d files; want 4", len(plan.Changes))
	}
	if got := readFile(t, filepath.Join(root, DefaultPaths().KubeAPIServer)); got != readFile(t, fixture) {
		t.Error("kube-apiserver's manifest is not back to kubeadm's")
	}
	if !strings.Contains(strings.Join(plan.Notes, "\n"), "the keyset stays") {
		t.Errorf("notes %q do not mention the keyset", plan.Notes)
	}
}

// TestUninstallKeepsOtherProviders: on a node that had aescbc before, the
// last stage keeps the file, the flag and its mount, and drops only the
// plugin's socket mount and files.
func TestUninstallKeepsOtherProviders(t *testing.T) {
	paths := DefaultPaths()
	aescbc := ecHeader + `resources:
  - resources:
      - secrets
    providers:
      - aescbc:
          keys:
            - name: key1
              secret: MTIzNDU2Nzg5MDEyMzQ1Ng==
      - identity: {}
`
	root := newRoot(t, map[string]string{paths.KubeAPIServer: readFile(t, fixture), paths.EncryptionConfig: aescbc})
	in := newInstaller(t, root, nil)
	install(t, in)
	uninstall(t, in, UninstallOptions{})
	storage := &fakeStorage{objects: map[string]string{"/registry/secrets/a/b": "k8s:enc:aescbc:v1:key1:..."}}
	uninstall(t, in, UninstallOptions{Finalize: true, Storage: storage})

	tree := snapshot(t, root)
	if tree[paths.EncryptionConfig] != aescbc {
		t.Errorf("EncryptionConfiguration is not as before install:\n%s", tree[paths.EncryptionConfig])
	}
	api := tree[paths.KubeAPIServer]
	for _, want := range []string{"--encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml", "name: kms-plugin-encryption-config"} {
		if !strings.Contains(api, want) {
			t.Errorf("kube-apiserver lost %q", want)
		}
	}
	if strings.Contains(api, "kms-plugin-socket") {
		t.Error("kube-apiserver still mounts the plugin's socket")
	}
	for _, p := range []string{paths.StaticPod, paths.PluginConfig} {
		if _, ok := tree[p]; ok {
			t.Errorf("%s is still there", p)
		}
	}
}

// TestUninstallNothingInstalled: both stages are no-ops on a node without
// the plugin.
func TestUninstallNothingInstalled(t *testing.T) {
	root := kubeadmRoot(t, fixture)
	in := newInstaller(t, root, nil)
	for _, opts := range []UninstallOptions{{}, {Finalize: true, Storage: &fakeStorage{}}} {
		plan, err := in.PlanUninstall(t.Context(), opts)
		if err != nil {
			t.Fatal(err)
		}
		if !plan.Empty() {
			t.Errorf("uninstall %+v on a bare node plans:\n%s", opts, plan.Diff())
		}
	}
}
