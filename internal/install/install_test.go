package install

import (
	"net"
	"strings"
	"testing"
)

const fixture = "testdata/kubeadm-v1.37.2/kube-apiserver.yaml"

// TestInstallRejectsBadInput checks that install fails with a clear
// message, before writing anything, on input it cannot handle safely.
func TestInstallRejectsBadInput(t *testing.T) {
	paths := DefaultPaths()
	apiserver := readFile(t, fixture)
	withFlag := strings.Replace(apiserver, "    - --etcd-cafile", "    - --encryption-provider-config=/etc/kubernetes/other/enc.yaml\n    - --etcd-cafile", 1)
	for _, tt := range []struct {
		name  string
		files map[string]string
		edit  func(*Config)
		want  string
	}{
		{
			name: "missing kube-apiserver manifest",
			want: "kube-apiserver manifest /etc/kubernetes/manifests/kube-apiserver.yaml does not exist",
		},
		{
			name:  "manifest is not YAML",
			files: map[string]string{paths.KubeAPIServer: "apiVersion: v1\nkind: Pod\nspec: [unclosed\n"},
			want:  "parse YAML",
		},
		{
			name:  "manifest is not a pod",
			files: map[string]string{paths.KubeAPIServer: "apiVersion: apps/v1\nkind: Deployment\n"},
			want:  "not a v1 Pod manifest",
		},
		{
			name:  "two documents",
			files: map[string]string{paths.KubeAPIServer: apiserver + "---\n" + apiserver},
			want:  "more than one YAML document",
		},
		{
			name:  "no kube-apiserver container",
			files: map[string]string{paths.KubeAPIServer: strings.Replace(apiserver, "    name: kube-apiserver\n", "    name: etcd\n", 1)},
			want:  "no container named kube-apiserver",
		},
		{
			name:  "another EncryptionConfiguration",
			files: map[string]string{paths.KubeAPIServer: withFlag},
			want:  "already uses --encryption-provider-config=/etc/kubernetes/other/enc.yaml; rerun with --encryption-config=/etc/kubernetes/other/enc.yaml",
		},
		{
			name: "our provider name at another endpoint",
			files: map[string]string{paths.KubeAPIServer: apiserver, paths.EncryptionConfig: `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources: [secrets]
  providers:
  - kms: {apiVersion: v2, name: kms-plugin, endpoint: unix:///run/other.sock}
`},
			want: `kms provider "kms-plugin" uses endpoint unix:///run/other.sock, not unix:///var/run/kmsplugin/socket.sock`,
		},
		{
			name: "another provider on our socket",
			files: map[string]string{paths.KubeAPIServer: apiserver, paths.EncryptionConfig: `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources: [secrets]
  providers:
  - kms: {apiVersion: v2, name: vault, endpoint: unix:///var/run/kmsplugin/socket.sock}
`},
			want: `kms provider "vault" already uses endpoint unix:///var/run/kmsplugin/socket.sock`,
		},
		{
			name: "unknown provider",
			files: map[string]string{paths.KubeAPIServer: apiserver, paths.EncryptionConfig: `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources: [secrets]
  providers:
  - rot13: {}
`},
			want: "not a valid EncryptionConfiguration",
		},
		{
			name: "unknown field",
			files: map[string]string{paths.KubeAPIServer: apiserver, paths.EncryptionConfig: `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources: [secrets]
  providers:
  - identity: {}
  provider: []
`},
			want: "field provider not found",
		},
		{
			name: "two providers in one item",
			files: map[string]string{paths.KubeAPIServer: apiserver, paths.EncryptionConfig: `apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
- resources: [secrets]
  providers:
  - identity: {}
    aescbc: {keys: []}
`},
			want: "unknown provider (want one of aescbc, aesgcm, secretbox, kms, identity)",
		},
		{
			name:  "wrong kind",
			files: map[string]string{paths.KubeAPIServer: apiserver, paths.EncryptionConfig: "apiVersion: v1\nkind: ConfigMap\n"},
			want:  "apiVersion/kind is v1/ConfigMap",
		},
		{
			name:  "unknown key store",
			files: map[string]string{paths.KubeAPIServer: apiserver},
			edit: func(c *Config) {
				c.PluginConfig = []byte("endpoint: unix:///var/run/kmsplugin/socket.sock\nprovider: rot13\n")
			},
			want: `provider: unknown provider "rot13"`,
		},
		{
			name:  "plugin config without endpoint",
			files: map[string]string{paths.KubeAPIServer: apiserver},
			edit: func(c *Config) {
				c.PluginConfig = []byte("provider: local\nlocal:\n  keysetPath: /etc/kubernetes/kms-plugin/keyset.json\n")
			},
			want: "endpoint must be set",
		},
		{
			name:  "plugin config without keyset path",
			files: map[string]string{paths.KubeAPIServer: apiserver},
			edit: func(c *Config) {
				c.PluginConfig = []byte("endpoint: unix:///var/run/kmsplugin/socket.sock\nprovider: local\n")
			},
			want: "local.keysetPath must be set (the default depends on the environment of `kms-plugin serve`)",
		},
		{
			name:  "plugin config with unknown field in a section",
			files: map[string]string{paths.KubeAPIServer: apiserver},
			edit: func(c *Config) {
				c.PluginConfig = []byte("endpoint: unix:///var/run/kmsplugin/socket.sock\nlocal:\n  keysetPath: /etc/kubernetes/kms-plugin/keyset.json\n  keyset: /x\n")
			},
			want: `local: json: unknown field "keyset"`,
		},
		{
			name:  "plugin config with unknown field",
			files: map[string]string{paths.KubeAPIServer: apiserver},
			edit: func(c *Config) {
				c.PluginConfig = []byte("endpoint: unix:///var/run/kmsplugin/socket.sock\nkeyset: /x\n")
			},
			want: `unknown field "keyset"`,
		},
		{
			name:  "installed plugin config is broken",
			files: map[string]string{paths.KubeAPIServer: apiserver, paths.PluginConfig: "endpoint: [\n"},
			want:  "/etc/kubernetes/kms-plugin/config.yaml: parse YAML",
		},
		{
			name:  "static pod without HTTP server",
			files: map[string]string{paths.KubeAPIServer: apiserver},
			edit: func(c *Config) {
				c.PluginConfig = []byte("endpoint: unix:///var/run/kmsplugin/socket.sock\nlocal:\n  keysetPath: /etc/kubernetes/kms-plugin/keyset.json\nhttpAddr: \"\"\n")
			},
			want: "httpAddr must be set",
		},
		{
			name:  "systemd socket outside /run",
			files: map[string]string{paths.KubeAPIServer: apiserver},
			edit: func(c *Config) {
				c.Mode = ModeSystemd
				c.PluginConfig = []byte("endpoint: unix:///srv/kms/socket.sock\nlocal:\n  keysetPath: /etc/kubernetes/kms-plugin/keyset.json\n")
			},
			want: "needs the socket directory directly under /run or /var/run",
		},
		{
			name:  "volume name taken",
			files: map[string]string{paths.KubeAPIServer: strings.Replace(apiserver, "name: k8s-certs\n", "name: kms-plugin-socket\n", -1)},
			want:  "a volume named kms-plugin-socket already exists",
		},
		{
			name: "mount point taken",
			files: map[string]string{paths.KubeAPIServer: strings.Replace(strings.Replace(apiserver,
				"    - mountPath: /etc/kubernetes/pki\n", "    - mountPath: /var/run/kmsplugin\n", 1),
				"      path: /etc/kubernetes/pki\n", "      path: /somewhere/else\n", 1)},
			want: "/var/run/kmsplugin is already a mount point of kube-apiserver (volume k8s-certs)",
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root := newRoot(t, tt.files)
			before := snapshot(t, root)
			_, err := newInstaller(t, root, tt.edit).PlanInstall()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("PlanInstall() error = %v; want it to contain %q", err, tt.want)
			}
			if !strings.HasPrefix(err.Error(), "install: ") {
				t.Errorf("error %q does not say where it comes from", err)
			}
			sameTree(t, snapshot(t, root), before)
		})
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, tt := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no image", Config{}, "image: required with mode static-pod"},
		{"unknown mode", Config{Mode: "daemonset"}, `unknown mode "daemonset"`},
		{"relative path", Config{Image: "x", Paths: Paths{EncryptionConfig: "enc.yaml"}}, `encryption config path: "enc.yaml" must be a clean absolute path`},
		{"path with spaces", Config{Image: "x", Paths: Paths{PluginConfig: "/etc/kms plugin/config.yaml"}}, "without spaces"},
		{"bad provider name", Config{Image: "x", ProviderName: "KMS:1"}, `provider name: "KMS:1"`},
		{"wildcard resource", Config{Image: "x", Resources: []string{"*.*"}}, "wildcards are not supported"},
		{"bad timeout", Config{Image: "x", Timeout: -1}, "timeout: -1ns is outside"},
		{"relative mount", Config{Image: "x", ExtraMounts: []string{"azure.json"}}, "extra mount"},
		{"unspecified admin IP", Config{Image: "x", AdminIPs: []net.IP{net.IPv4zero}}, "admin IP: 0.0.0.0 is not an address of this node"},
		{"relative CA path", Config{Image: "x", Paths: Paths{ClusterCAKey: "pki/ca.key"}}, `cluster CA key: "pki/ca.key" must be a clean absolute path`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New() error = %v; want it to contain %q", err, tt.want)
			}
		})
	}
}

// TestDryRunWritesNothing checks that planning never writes, and that the
// diff shows every change.
func TestDryRunWritesNothing(t *testing.T) {
	root := kubeadmRoot(t, fixture)
	before := snapshot(t, root)
	plan, err := newInstaller(t, root, nil).PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	sameTree(t, snapshot(t, root), before)
	diff := string(plan.Diff())
	for _, want := range []string{
		"--- /dev/null\n+++ /etc/kubernetes/kms-plugin/config.yaml\n",
		"--- /dev/null\n+++ /etc/kubernetes/manifests/kms-plugin.yaml\n",
		"--- /dev/null\n+++ /etc/kubernetes/enc/encryption-config.yaml\n",
		"--- /etc/kubernetes/manifests/kube-apiserver.yaml\n+++ /etc/kubernetes/manifests/kube-apiserver.yaml\n",
		"+    - --encryption-provider-config=/etc/kubernetes/enc/encryption-config.yaml\n+    - --encryption-provider-config-automatic-reload=true\n",
	} {
		if !strings.Contains(diff, want) {
			t.Errorf("diff lacks %q:\n%s", want, diff)
		}
	}
	// kube-apiserver's manifest is written last: kubelet restarts it at once.
	if last := plan.Changes[len(plan.Changes)-1].Path; last != DefaultPaths().KubeAPIServer {
		t.Errorf("last change is %s; want kube-apiserver's manifest", last)
	}
}

// TestInstallModes covers systemd mode, switching modes, extra mounts,
// a keyset outside the config directory and a given plugin config.
func TestInstallModes(t *testing.T) {
	paths := DefaultPaths()
	root := kubeadmRoot(t, fixture)
	install(t, newInstaller(t, root, nil))

	// Switch to systemd: the unit replaces the static pod.
	in := newInstaller(t, root, func(c *Config) { c.Mode = ModeSystemd })
	plan := install(t, in)
	tree := snapshot(t, root)
	if _, ok := tree[paths.StaticPod]; ok {
		t.Error("the static pod is still there after switching to systemd")
	}
	if got, want := tree[paths.SystemdUnit], readFile(t, "../../manifests/kms-plugin.service"); got != want {
		t.Errorf("unit differs from manifests/kms-plugin.service:\n%s", unifiedDiff("manifest", "installed", []byte(want), []byte(got), 3))
	}
	if !strings.Contains(strings.Join(plan.Notes, "\n"), "systemctl daemon-reload && systemctl enable --now kms-plugin.service") {
		t.Errorf("notes %q do not say how to start the unit", plan.Notes)
	}

	// A custom config on a fresh node: keyset elsewhere, credentials
	// mounted, two resources.
	root = kubeadmRoot(t, fixture)
	// httpAddr off loopback with the config's own admin credentials
	// (install keeps them; TestAdminCredentials covers issuing them).
	custom := "endpoint: unix:///run/kms/kms.sock\nprovider: local\nlocal:\n  keysetPath: /var/lib/kms/keyset.json\nhttpAddr: 0.0.0.0:9000\n" +
		"httpTLS:\n  certFile: /etc/kms/tls.crt\n  keyFile: /etc/kms/tls.key\nhttpAuth:\n  tokenFile: /etc/kms/token\n"
	in = newInstaller(t, root, func(c *Config) {
		c.PluginConfig = []byte(custom)
		c.ExtraMounts = []string{"/etc/kubernetes/azure.json"}
		c.Resources = []string{"secrets", "configmaps"}
	})
	install(t, in)
	tree = snapshot(t, root)
	if tree[paths.PluginConfig] != custom {
		t.Errorf("plugin config = %q; want the given one", tree[paths.PluginConfig])
	}
	pod := tree[paths.StaticPod]
	for _, want := range []string{"path: /run/kms\n", "path: /var/lib/kms\n", "name: keyset-dir\n", "path: /etc/kubernetes/azure.json\n", "readOnly: true\n", "host: 127.0.0.1\n", "port: 9000\n"} {
		if !strings.Contains(pod, want) {
			t.Errorf("static pod lacks %q:\n%s", want, pod)
		}
	}
	api := tree[paths.KubeAPIServer]
	if !strings.Contains(api, "path: /run/kms\n") {
		t.Errorf("kube-apiserver does not mount the new socket directory:\n%s", api)
	}
	enc := tree[paths.EncryptionConfig]
	if !strings.Contains(enc, "endpoint: unix:///run/kms/kms.sock") || !strings.Contains(enc, "- configmaps") {
		t.Errorf("EncryptionConfiguration does not follow the new config:\n%s", enc)
	}

	// Moving the socket of an installed provider is a conflict: kube-apiserver
	// would lose the plugin that reads what is stored.
	in = newInstaller(t, root, func(c *Config) { c.PluginConfig = DefaultPluginConfig() })
	if _, err := in.PlanInstall(); err == nil || !strings.Contains(err.Error(), "uses endpoint unix:///run/kms/kms.sock") {
		t.Errorf("reinstall with another endpoint: error %v; want a conflict", err)
	}
}

func TestFileSets(t *testing.T) {
	const doc = "endpoint: unix:///x.sock\nsocketGroup: \"\"\nlog: null\nLocal:\n  keysetPath: /k\nazure:\n  credential: {type: azureJSON}\n"
	for _, tt := range []struct {
		path string
		want bool
	}{
		{"endpoint", true},
		{"socketGroup", false},
		{"log", false},
		{"httpAddr", false},
		{"local.keysetPath", true},
		{"local.keysetpath", true},
		{"azure.credential.type", true},
		{"azure.credential.azureJSONFile", false},
		{"endpoint.x", false},
	} {
		if got := fileSets([]byte(doc), tt.path); got != tt.want {
			t.Errorf("fileSets(%q) = %v; want %v", tt.path, got, tt.want)
		}
	}
}
