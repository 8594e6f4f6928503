//go:build !serveonly

package main

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/adminauth/adminauthtest"
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
	if !strings.Contains(errOut, "kms-plugin reencrypt --resources secrets") {
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
		{"negative --keep-backups", []string{"install", "--keep-backups", "-1"}, "--keep-backups: -1 is negative (0 keeps every backup)"},
		{"bad --admin-ip", []string{"install", "--admin-ip", "node-1"}, `--admin-ip: "node-1" is not an IP address`},
		{"root not a directory", []string{"install", "--root", "/dev/null"}, "--root /dev/null is not a directory"},
		{"uninstall root not a directory", []string{"uninstall", "--root", "/nonexistent"}, "--root /nonexistent is not a directory"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root := nodeRoot(t, "", nil)
			_, errOut, err := runCmd(t, append([]string{tt.args[0], "--root", root}, tt.args[1:]...)...)
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

// TestInstallCommandAdminCredentials installs a plugin whose admin port
// listens on the node's address, on a kubeadm node with its cluster CA (an
// RSA key in PKCS#1, as kubeadm writes it): --dry-run shows the
// certificates and no key, the real run issues them for the node's
// addresses and rotate's client, a second run changes nothing, and
// without the CA key install refuses in one line.
func TestInstallCommandAdminCredentials(t *testing.T) {
	ca := adminauthtest.NewCA(t, "kubernetes", adminauthtest.RSAPKCS1)
	pki := map[string]string{"/etc/kubernetes/pki/ca.crt": string(ca.CertPEM), "/etc/kubernetes/pki/ca.key": string(ca.KeyPEM)}
	cfgFile := filepath.Join(t.TempDir(), "config.yaml")
	config := "endpoint: unix:///var/run/kmsplugin/socket.sock\nprovider: local\nlocal:\n  keysetPath: /etc/kubernetes/kms-plugin/keyset.json\nhttpAddr: 10.0.0.5:8787\n"
	if err := os.WriteFile(cfgFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	root := nodeRoot(t, "kube-apiserver.yaml", pki)
	args := []string{"install", "--root", root, "--config", cfgFile, "--image", "x", "--admin-ip", "192.0.2.7", "--admin-hostname", "CP-1"}

	out, errOut, err := runCmd(t, append(args, "--dry-run")...)
	if err != nil {
		t.Fatal(err, errOut)
	}
	for _, want := range []string{
		"+++ /etc/kubernetes/kms-plugin/admin/tls.crt\n", "+-----BEGIN CERTIFICATE-----\n",
		"# /etc/kubernetes/kms-plugin/admin/tls.key: key material, not shown\n",
		"# /etc/kubernetes/kms-plugin/admin/client.key: key material, not shown\n",
		"+  clientCAFile: /etc/kubernetes/pki/ca.crt\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("dry-run output lacks %q", want)
		}
	}
	if strings.Contains(out+errOut, "PRIVATE KEY") {
		t.Error("dry-run output shows a private key")
	}
	if _, err := os.Stat(filepath.Join(root, "/etc/kubernetes/kms-plugin")); !os.IsNotExist(err) {
		t.Fatal("dry-run wrote the plugin's files")
	}

	out, _, err = runCmd(t, args...)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "install: wrote /etc/kubernetes/kms-plugin/admin/client.key") ||
		!strings.Contains(out, "--plugin-ca-file=/etc/kubernetes/pki/ca.crt --plugin-cert-file=/etc/kubernetes/kms-plugin/admin/client.crt --plugin-key-file=/etc/kubernetes/kms-plugin/admin/client.key") {
		t.Errorf("output does not tell about the client certificate:\n%s", out)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	for _, tt := range []struct {
		file  string
		usage x509.ExtKeyUsage
		names []string
	}{
		{"tls.crt", x509.ExtKeyUsageServerAuth, []string{"cp-1", "10.0.0.5", "192.0.2.7", "127.0.0.1"}},
		{"client.crt", x509.ExtKeyUsageClientAuth, nil},
	} {
		block, _ := pem.Decode([]byte(readNode(t, root, "/etc/kubernetes/kms-plugin/admin/"+tt.file)))
		if block == nil {
			t.Fatalf("%s holds no PEM", tt.file)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{tt.usage}}); err != nil {
			t.Errorf("%s: %v", tt.file, err)
		}
		var names []string
		names = append(names, c.DNSNames...)
		for _, ip := range c.IPAddresses {
			names = append(names, ip.String())
		}
		if !slices.Equal(names, tt.names) {
			t.Errorf("%s names %v; want %v", tt.file, names, tt.names)
		}
		if tt.usage == x509.ExtKeyUsageClientAuth && c.Subject.CommonName != adminauth.DefaultClientName {
			t.Errorf("%s: CommonName %q", tt.file, c.Subject.CommonName)
		}
	}
	for _, f := range []string{"tls.crt", "tls.key", "client.crt", "client.key"} {
		if info, err := os.Stat(filepath.Join(root, "/etc/kubernetes/kms-plugin/admin", f)); err != nil || info.Mode().Perm() != 0o600 {
			t.Errorf("%s: %v, %v; want mode 0600", f, info, err)
		}
	}
	if out, _, err = runCmd(t, args...); err != nil || !strings.Contains(out, "no changes") {
		t.Fatalf("second install: %v, %q; want no changes", err, out)
	}

	// An external CA: only its certificate is on the node.
	bare := nodeRoot(t, "kube-apiserver.yaml", map[string]string{"/etc/kubernetes/pki/ca.crt": string(ca.CertPEM)})
	_, _, err = runCmd(t, append(slices.Clone(args), "--root", bare)...)
	if err == nil || strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "/etc/kubernetes/pki/ca.key does not exist (external CA?)") {
		t.Fatalf("install without the CA key: %v; want a one-line refusal", err)
	}
	// --admin-ca-key names another key, under --root.
	_, _, err = runCmd(t, append(slices.Clone(args), "--root", bare, "--admin-ca-key", "/srv/ca.key")...)
	if err == nil || !strings.Contains(err.Error(), "/srv/ca.key does not exist") {
		t.Fatalf("--admin-ca-key: %v", err)
	}
	if _, err := os.Stat(filepath.Join(bare, "/etc/kubernetes/kms-plugin")); !os.IsNotExist(err) {
		t.Error("the refused install wrote the plugin's files")
	}
}

// TestInstallCommandKeepBackups changes the node again and again with
// --keep-backups 2: two backups remain; --keep-backups 0 keeps them all.
func TestInstallCommandKeepBackups(t *testing.T) {
	root := nodeRoot(t, "kube-apiserver.yaml", nil)
	backups := filepath.Join(root, "/var/lib/kms-plugin/backup")
	count := func() int {
		entries, err := os.ReadDir(backups)
		if err != nil {
			t.Fatal(err)
		}
		return len(entries)
	}
	timeouts := []string{"4s", "5s"} // each run changes the EncryptionConfiguration
	for n := range 4 {
		out, _, err := runCmd(t, "install", "--root", root, "--image", "x", "--keep-backups", "2", "--kms-timeout", timeouts[n%2])
		if err != nil {
			t.Fatal(err)
		}
		if n >= 2 && !strings.Contains(out, "install: removed 1 older backups (--keep-backups)") {
			t.Errorf("run %d output lacks the pruning:\n%s", n, out)
		}
	}
	if got := count(); got != 2 {
		t.Errorf("%d backups after --keep-backups 2; want 2", got)
	}
	for n := range 2 {
		if _, _, err := runCmd(t, "install", "--root", root, "--image", "x", "--keep-backups", "0", "--kms-timeout", timeouts[n%2]); err != nil {
			t.Fatal(err)
		}
	}
	if got := count(); got != 4 {
		t.Errorf("%d backups after --keep-backups 0; want 4", got)
	}
	info, err := os.Stat(backups)
	if err != nil || info.Mode().Perm() != 0o700 {
		t.Errorf("backup directory: %v, %v; want mode 0700", info, err)
	}
}
