package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv"
)

const kubeadmFixture = "../../internal/install/testdata/kubeadm-v1.37.2/"

// nodeRoot returns a temporary node root holding kube-apiserver's manifest
// as kubeadm writes it (fixture "" for none), plus files.
func nodeRoot(t *testing.T, fixture string, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	if fixture != "" {
		data, err := os.ReadFile(kubeadmFixture + fixture)
		if err != nil {
			t.Fatal(err)
		}
		files = mergeFiles(files, map[string]string{"/etc/kubernetes/manifests/kube-apiserver.yaml": string(data)})
	}
	for p, content := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func mergeFiles(a, b map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range a {
		out[k] = v
	}
	for k, v := range b {
		out[k] = v
	}
	return out
}

func readNode(t *testing.T, root, p string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(root, p))
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

func TestInstallCommand(t *testing.T) {
	root := nodeRoot(t, "kube-apiserver.yaml", nil)

	// --dry-run prints the diff and writes nothing.
	out, errOut, err := runCmd(t, "install", "--root", root, "--dry-run", "--image", "example/kms-plugin:v1")
	if err != nil {
		t.Fatal(err, errOut)
	}
	for _, want := range []string{"+++ /etc/kubernetes/manifests/kms-plugin.yaml", "+    image: example/kms-plugin:v1", "+    - --encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml"} {
		if !strings.Contains(out, want) {
			t.Errorf("dry-run output lacks %q", want)
		}
	}
	if !strings.Contains(errOut, "kubectl get secrets -A -o json | kubectl replace -f -") {
		t.Errorf("dry-run notes lack the rewrite command: %q", errOut)
	}
	if _, err := os.Stat(filepath.Join(root, "/etc/kubernetes/manifests/kms-plugin.yaml")); !os.IsNotExist(err) {
		t.Fatal("dry-run wrote the static pod")
	}

	// The real run, then a second one that changes nothing.
	out, _, err = runCmd(t, "install", "--root", root, "--image", "example/kms-plugin:v1", "--resources", "secrets,configmaps")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"install: wrote /etc/kubernetes/manifests/kube-apiserver.yaml", "install: previous files backed up in /var/lib/kms-plugin/backup/"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if enc := readNode(t, root, "/etc/kubernetes/enc/encryption-config.yaml"); !strings.Contains(enc, "- configmaps") {
		t.Errorf("--resources ignored:\n%s", enc)
	}
	out, _, err = runCmd(t, "install", "--root", root, "--image", "example/kms-plugin:v1", "--resources", "secrets,configmaps")
	if err != nil || !strings.Contains(out, "no changes") {
		t.Fatalf("second install: %v, %q; want no changes", err, out)
	}

	// Uninstall, both stages (forced: no etcd here).
	out, _, err = runCmd(t, "uninstall", "--root", root)
	if err != nil || !strings.Contains(out, "uninstall: wrote /etc/kubernetes/enc/encryption-config.yaml") {
		t.Fatalf("uninstall: %v, %q", err, out)
	}
	_, _, err = runCmd(t, "uninstall", "--root", root, "--finalize", "--etcd-endpoints", "http://127.0.0.1:1", "--etcd-timeout", "200ms")
	if err == nil || !strings.Contains(err.Error(), "check etcd") {
		t.Fatalf("finalize without etcd: %v; want the etcd check to fail", err)
	}
	_, _, err = runCmd(t, "uninstall", "--root", root, "--finalize")
	if err == nil || !strings.Contains(err.Error(), "etcd CA") {
		t.Fatalf("finalize without etcd certificates: %v; want the CA named", err)
	}
	out, _, err = runCmd(t, "uninstall", "--root", root, "--finalize", "--force")
	if err != nil || !strings.Contains(out, "uninstall: removed /etc/kubernetes/manifests/kms-plugin.yaml") {
		t.Fatalf("forced finalize: %v, %q", err, out)
	}
	want, _ := os.ReadFile(kubeadmFixture + "kube-apiserver.yaml")
	if got := readNode(t, root, "/etc/kubernetes/manifests/kube-apiserver.yaml"); got != string(want) {
		t.Error("kube-apiserver's manifest is not back to kubeadm's")
	}
}

func TestInstallCommandErrors(t *testing.T) {
	for _, tt := range []struct {
		name string
		args []string
		want string
	}{
		{"missing manifest", []string{"install", "--image", "x"}, "kube-apiserver manifest /etc/kubernetes/manifests/kube-apiserver.yaml does not exist"},
		{"bad mode", []string{"install", "--mode", "daemonset"}, `unknown mode "daemonset"`},
		{"missing config", []string{"install", "--config", "/nonexistent/config.yaml"}, "no such file"},
		{"stray argument", []string{"install", "now"}, "unexpected arguments"},
		{"uninstall without kube-apiserver", []string{"uninstall"}, "does not exist"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root := nodeRoot(t, "", nil)
			_, errOut, err := runCmd(t, append(tt.args, "--root", root)...)
			if err == nil {
				t.Fatal("no error")
			}
			if all := errOut + err.Error(); !strings.Contains(all, tt.want) {
				t.Fatalf("output %q; want it to contain %q", all, tt.want)
			}
		})
	}
}

// exampleCommand returns the arguments of the `kms-plugin install` command
// in a shell-style line.
func exampleCommand(t *testing.T, line string) []string {
	t.Helper()
	f := strings.Fields(line)
	if len(f) < 2 || f[0] != "kms-plugin" || f[1] != "install" {
		t.Fatalf("%q is not a kms-plugin install command", line)
	}
	return f[1:]
}

// TestClusterAPIExample runs the KubeadmControlPlane example on a node
// root: its files, its preKubeadmCommands, then kubeadm (the manifest
// kubeadm writes from the same ClusterConfiguration, generated by the real
// kubeadm) and install again, which must find nothing to change.
func TestClusterAPIExample(t *testing.T) {
	var kcp struct {
		Spec struct {
			KubeadmConfigSpec struct {
				Files []struct {
					Path    string `json:"path"`
					Content string `json:"content"`
				} `json:"files"`
				PreKubeadmCommands []string `json:"preKubeadmCommands"`
			} `json:"kubeadmConfigSpec"`
		} `json:"spec"`
	}
	data, err := os.ReadFile("../../manifests/capi-kubeadmcontrolplane.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &kcp); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	for _, f := range kcp.Spec.KubeadmConfigSpec.Files {
		if f.Content != "" {
			files[f.Path] = f.Content
		}
	}
	root := nodeRoot(t, "", files)
	for _, line := range kcp.Spec.KubeadmConfigSpec.PreKubeadmCommands {
		if _, errOut, err := runCmd(t, append(exampleCommand(t, line), "--root", root)...); err != nil {
			t.Fatalf("%s: %v\n%s", line, err, errOut)
		}
	}
	for _, p := range []string{"/etc/kubernetes/manifests/kms-plugin.yaml", "/etc/kubernetes/enc/encryption-config.yaml"} {
		if _, err := os.Stat(filepath.Join(root, p)); err != nil {
			t.Errorf("preKubeadmCommands did not write %s", p)
		}
	}
	if got := readNode(t, root, "/etc/kubernetes/kms-plugin/config.yaml"); got != files["/etc/kubernetes/kms-plugin/config.yaml"] {
		t.Error("install replaced the config the files entry wrote")
	}

	// kubeadm init writes kube-apiserver's manifest with the
	// ClusterConfiguration's extraArgs and extraVolumes.
	manifest, err := os.ReadFile(kubeadmFixture + "kube-apiserver.clusterconfiguration.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "/etc/kubernetes/manifests/kube-apiserver.yaml"), manifest, 0o600); err != nil {
		t.Fatal(err)
	}
	out, _, err := runCmd(t, "install", "--root", root, "--image", "registry.example.com/kms-plugin:v0.1.0")
	if err != nil || !strings.Contains(out, "no changes") {
		t.Fatalf("install after kubeadm: %v, %q; want no changes", err, out)
	}
}

// TestCloudInitExample runs the cloud-init example's install command on a
// node where kubeadm init has written kube-apiserver's manifest.
func TestCloudInitExample(t *testing.T) {
	var ci struct {
		WriteFiles []struct {
			Path    string `json:"path"`
			Content string `json:"content"`
		} `json:"write_files"`
		RunCmd [][]string `json:"runcmd"`
	}
	data, err := os.ReadFile("../../manifests/cloud-init.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(data, &ci); err != nil {
		t.Fatal(err)
	}
	files := map[string]string{}
	for _, f := range ci.WriteFiles {
		files[f.Path] = f.Content
	}
	root := nodeRoot(t, "kube-apiserver.yaml", files)
	var ran bool
	for _, cmd := range ci.RunCmd {
		if cmd[0] != "kms-plugin" {
			continue
		}
		if _, errOut, err := runCmd(t, append(cmd[1:], "--root", root)...); err != nil {
			t.Fatalf("%q: %v\n%s", cmd, err, errOut)
		}
		ran = true
	}
	if !ran {
		t.Fatal("runcmd has no kms-plugin command")
	}
	want, err := os.ReadFile(kubeadmFixture + "kube-apiserver.clusterconfiguration.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if got := readNode(t, root, "/etc/kubernetes/manifests/kube-apiserver.yaml"); got != string(want) {
		t.Error("kube-apiserver's manifest differs from kubeadm's own with the ClusterConfiguration")
	}
}

// TestInstallMountsAzureCredentials checks that the static pod mounts the
// credential files of the azurekeyvault provider, including its default
// azure.json.
func TestInstallMountsAzureCredentials(t *testing.T) {
	for _, tt := range []struct {
		name, credential, want string
	}{
		{"azure.json default", "type: azureJSON", azurekv.DefaultAzureJSONPath},
		{"client secret", "type: clientSecret\n    tenantID: 72f988bf-86f1-41af-91ab-2d7cd011db47\n    clientID: 04b07795-8ddb-461a-bbee-02f9e1bf7b46\n    clientSecretFile: /etc/kubernetes/kms-plugin/azure-secret", "/etc/kubernetes/kms-plugin/azure-secret"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			config := "endpoint: unix:///var/run/kmsplugin/socket.sock\nprovider: azurekeyvault\nhttpAddr: 127.0.0.1:8787\nazure:\n  vaultURL: https://contoso-kms.vault.azure.net\n  keyName: kms-kek\n  credential:\n    " + tt.credential + "\n"
			cfgFile := filepath.Join(t.TempDir(), "config.yaml")
			if err := os.WriteFile(cfgFile, []byte(config), 0o600); err != nil {
				t.Fatal(err)
			}
			root := nodeRoot(t, "kube-apiserver.yaml", nil)
			if _, errOut, err := runCmd(t, "install", "--root", root, "--config", cfgFile, "--image", "x"); err != nil {
				t.Fatal(err, errOut)
			}
			pod := readNode(t, root, "/etc/kubernetes/manifests/kms-plugin.yaml")
			if !strings.Contains(pod, "    - mountPath: "+tt.want+"\n      name: credential-0\n      readOnly: true\n") ||
				!strings.Contains(pod, "      path: "+tt.want+"\n      type: File\n    name: credential-0\n") {
				t.Fatalf("static pod does not mount %s read-only:\n%s", tt.want, pod)
			}
		})
	}
}
