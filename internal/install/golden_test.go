package install

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// kubeadmVersions lists the kubeadm fixture directories (generate.sh).
func kubeadmVersions(t *testing.T) []string {
	t.Helper()
	dirs, err := filepath.Glob(filepath.Join("testdata", "kubeadm-v*"))
	if err != nil {
		t.Fatal(err)
	}
	if len(dirs) < 3 {
		t.Fatalf("found kubeadm fixtures for %d versions (%v); want at least 3 (run testdata/generate.sh)", len(dirs), dirs)
	}
	return dirs
}

// TestKubeadmGolden installs and uninstalls on kube-apiserver manifests
// written by real kubeadm binaries of several minor versions.
func TestKubeadmGolden(t *testing.T) {
	paths := DefaultPaths()
	for _, dir := range kubeadmVersions(t) {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			original := readFile(t, filepath.Join(dir, "kube-apiserver.yaml"))
			root := kubeadmRoot(t, filepath.Join(dir, "kube-apiserver.yaml"))
			in := newInstaller(t, root, nil)
			install(t, in)

			// The patched manifest is byte for byte what kubeadm itself
			// writes from manifests/kubeadm-clusterconfiguration.yaml.
			got := readFile(t, filepath.Join(root, paths.KubeAPIServer))
			if want := readFile(t, filepath.Join(dir, "kube-apiserver.clusterconfiguration.yaml")); got != want {
				t.Errorf("patched manifest differs from kubeadm's own with the ClusterConfiguration:\n%s", unifiedDiff("kubeadm", "install", []byte(want), []byte(got), 3))
			}
			checkGolden(t, "kms-plugin.yaml", []byte(readFile(t, filepath.Join(root, paths.StaticPod))))
			checkGolden(t, "encryption-config.yaml", []byte(readFile(t, filepath.Join(root, paths.EncryptionConfig))))
			if got, want := readFile(t, filepath.Join(root, paths.PluginConfig)), readFile(t, "../../manifests/config.yaml"); got != want {
				t.Errorf("installed plugin config differs from manifests/config.yaml")
			}
			backup := readFile(t, filepath.Join(root, paths.BackupDir, "20260102T030405Z", paths.KubeAPIServer))
			if backup != original {
				t.Errorf("backup of kube-apiserver.yaml differs from the original")
			}

			// A second run is a no-op.
			before := snapshot(t, root)
			plan, err := newInstaller(t, root, nil).PlanInstall()
			if err != nil {
				t.Fatal(err)
			}
			if !plan.Empty() {
				t.Fatalf("second install plans changes:\n%s", plan.Diff())
			}
			sameTree(t, snapshot(t, root), before)

			// Stage one: identity first, kms kept for reads.
			uninstall(t, in, UninstallOptions{})
			checkGolden(t, "encryption-config.decrypt.yaml", []byte(readFile(t, filepath.Join(root, paths.EncryptionConfig))))
			if got := readFile(t, filepath.Join(root, paths.KubeAPIServer)); got != readFile(t, filepath.Join(dir, "kube-apiserver.clusterconfiguration.yaml")) {
				t.Error("stage one changed kube-apiserver's manifest")
			}
			if plan, err := in.PlanUninstall(t.Context(), UninstallOptions{}); err != nil || !plan.Empty() {
				t.Fatalf("stage one again: plan %v, err %v; want no change", plan, err)
			}

			// Stage two with an etcd that holds nothing encrypted: the node
			// is back to kubeadm's manifest, byte for byte.
			storage := &fakeStorage{objects: map[string]string{"/registry/secrets/default/a": "k8s:enc:aescbc:v1:key1:..."}}
			uninstall(t, in, UninstallOptions{Finalize: true, Storage: storage})
			if len(storage.calls) != 1 || len(storage.calls[0]) != 1 || storage.calls[0][0] != "/registry/secrets/" {
				t.Errorf("etcd scanned %v; want once, /registry/secrets/", storage.calls)
			}
			want := map[string]string{
				"/": "<dir>", "/etc": "<dir>", "/etc/kubernetes": "<dir>",
				"/etc/kubernetes/manifests": "<dir>", "/etc/kubernetes/enc": "<dir>", "/etc/kubernetes/kms-plugin": "<dir>",
				paths.KubeAPIServer: original,
				"/var":              "<dir>", "/var/lib": "<dir>", "/var/lib/kms-plugin": "<dir>",
			}
			sameTree(t, snapshot(t, root), want)
		})
	}
}

// TestKubeadmAlreadyConfigured installs on manifests kubeadm wrote with
// the flags and mounts already in place (from the ClusterConfiguration
// example and from the patches example): kube-apiserver's manifest is left
// alone.
func TestKubeadmAlreadyConfigured(t *testing.T) {
	for _, dir := range kubeadmVersions(t) {
		for _, fixture := range []string{"kube-apiserver.clusterconfiguration.yaml", "kube-apiserver.patches.yaml"} {
			t.Run(filepath.Base(dir)+"/"+fixture, func(t *testing.T) {
				root := kubeadmRoot(t, filepath.Join(dir, fixture))
				plan, err := newInstaller(t, root, nil).PlanInstall()
				if err != nil {
					t.Fatal(err)
				}
				var paths []string
				for _, c := range plan.Changes {
					paths = append(paths, c.Path)
					if c.Path == DefaultPaths().KubeAPIServer {
						t.Errorf("kube-apiserver.yaml would change:\n%s", plan.Diff())
					}
				}
				if len(paths) != 3 {
					t.Errorf("plan changes %v; want the plugin config, static pod and EncryptionConfiguration", paths)
				}
			})
		}
	}
}

// TestKubeadmPatchesMatchInstall checks that kubeadm with the patches
// example mounts and flags what install would add: the same items, only
// elsewhere in their lists.
func TestKubeadmPatchesMatchInstall(t *testing.T) {
	for _, dir := range kubeadmVersions(t) {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			patched, err := parseAPIServer([]byte(readFile(t, filepath.Join(dir, "kube-apiserver.patches.yaml"))))
			if err != nil {
				t.Fatal(err)
			}
			for flag, want := range map[string]string{flagEncryptionConfig: DefaultPaths().EncryptionConfig, flagAutomaticReload: "true"} {
				if got := patched.flagValue(flag); got != want {
					t.Errorf("--%s = %q; want %q", flag, got, want)
				}
			}
			for _, p := range []string{"/etc/kubernetes/enc", "/var/run/kmsplugin"} {
				if !patched.mounted(p) {
					t.Errorf("%s is not mounted", p)
				}
			}
		})
	}
}

// TestDefaultPluginConfigIsTheManifest keeps DefaultPluginConfig equal to
// manifests/config.yaml.
func TestDefaultPluginConfigIsTheManifest(t *testing.T) {
	want, err := os.ReadFile("../../manifests/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(DefaultPluginConfig(), want) {
		t.Fatal("DefaultPluginConfig() differs from manifests/config.yaml; copy it into defaults.go")
	}
}
