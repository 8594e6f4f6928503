package manifests_test

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/install"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

// The examples are checked against what `kms-plugin install` writes with
// its defaults. internal/install/testdata/generate.sh also feeds the
// kubeadm examples to real kubeadm binaries, and the install package's
// golden tests compare kubeadm's output with install's patch.

type (
	arg         struct{ Name, Value string }
	extraVolume struct {
		Name      string `json:"name"`
		HostPath  string `json:"hostPath"`
		MountPath string `json:"mountPath"`
		ReadOnly  bool   `json:"readOnly,omitempty"`
		PathType  string `json:"pathType"`
	}
	apiServer struct {
		ExtraArgs    []arg         `json:"extraArgs"`
		ExtraVolumes []extraVolume `json:"extraVolumes"`
	}
	file struct {
		Path        string `json:"path"`
		Owner       string `json:"owner"`
		Permissions string `json:"permissions"`
		Content     string `json:"content,omitempty"`
		Encoding    string `json:"encoding,omitempty"`
		ContentFrom *struct {
			Secret struct{ Name, Key string } `json:"secret"`
		} `json:"contentFrom,omitempty"`
	}
)

func strict(t *testing.T, name string, into any) {
	t.Helper()
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(data, into); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

// wantAPIServer is what install gives kube-apiserver, as kubeadm fields.
func wantAPIServer(t *testing.T) apiServer {
	t.Helper()
	cfg, err := config.Load("config.yaml", registry.Builtin().Default())
	if err != nil {
		t.Fatal(err)
	}
	sock, err := config.SocketPath(cfg.Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	p := install.DefaultPaths()
	return apiServer{
		ExtraArgs: []arg{{"encryption-provider-config", p.EncryptionConfig}, {"encryption-provider-config-automatic-reload", "true"}},
		ExtraVolumes: []extraVolume{
			{Name: install.VolumeEncryptionConfig, HostPath: filepath.Dir(p.EncryptionConfig), MountPath: filepath.Dir(p.EncryptionConfig), ReadOnly: true, PathType: "DirectoryOrCreate"},
			{Name: install.VolumeSocket, HostPath: filepath.Dir(sock), MountPath: filepath.Dir(sock), PathType: "DirectoryOrCreate"},
		},
	}
}

func TestKubeadmClusterConfiguration(t *testing.T) {
	var cc struct {
		APIVersion        string    `json:"apiVersion"`
		Kind              string    `json:"kind"`
		KubernetesVersion string    `json:"kubernetesVersion"`
		APIServer         apiServer `json:"apiServer"`
	}
	strict(t, "kubeadm-clusterconfiguration.yaml", &cc)
	if cc.APIVersion != "kubeadm.k8s.io/v1beta4" || cc.Kind != "ClusterConfiguration" {
		t.Fatalf("header %s %s; want kubeadm.k8s.io/v1beta4 ClusterConfiguration", cc.APIVersion, cc.Kind)
	}
	if want := wantAPIServer(t); !reflect.DeepEqual(cc.APIServer, want) {
		t.Fatalf("apiServer = %+v\nwant %+v", cc.APIServer, want)
	}
}

func TestKubeadmPatches(t *testing.T) {
	var ops []struct {
		Op    string `json:"op"`
		Path  string `json:"path"`
		Value any    `json:"value"`
	}
	strict(t, "kubeadm-patches/kube-apiserver0+json.yaml", &ops)
	want := wantAPIServer(t)
	var flags []string
	mounts := map[string]bool{}
	for _, op := range ops {
		if op.Op != "add" {
			t.Errorf("op %q; want add", op.Op)
		}
		switch op.Path {
		case "/spec/containers/0/command/-":
			flags = append(flags, op.Value.(string))
		case "/spec/containers/0/volumeMounts/-", "/spec/volumes/-":
			m := op.Value.(map[string]any)
			mounts[op.Path+" "+m["name"].(string)] = true
		default:
			t.Errorf("unexpected path %s", op.Path)
		}
	}
	var wantFlags []string
	for _, a := range want.ExtraArgs {
		wantFlags = append(wantFlags, "--"+a.Name+"="+a.Value)
	}
	if !reflect.DeepEqual(flags, wantFlags) {
		t.Errorf("flags %q; want %q", flags, wantFlags)
	}
	for _, v := range want.ExtraVolumes {
		for _, path := range []string{"/spec/containers/0/volumeMounts/-", "/spec/volumes/-"} {
			if !mounts[path+" "+v.Name] {
				t.Errorf("no %s for %s", path, v.Name)
			}
		}
	}
}

// checkPluginFiles checks files written before install: the plugin's
// config where install looks for it, valid, with its keyset path.
func checkPluginFiles(t *testing.T, files []file) {
	t.Helper()
	p := install.DefaultPaths()
	byPath := map[string]file{}
	for _, f := range files {
		byPath[f.Path] = f
	}
	cf, ok := byPath[p.PluginConfig]
	if !ok {
		t.Fatalf("no file at %s", p.PluginConfig)
	}
	cfg := registry.Builtin().Default()
	if err := config.Parse([]byte(cf.Content), &cfg); err != nil {
		t.Fatal(err)
	}
	if err := registry.Builtin().Validate(cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Endpoint != config.ProductionEndpoint || keysetPath(t, cfg) != config.ProductionKeysetPath {
		t.Errorf("plugin config uses %s and %s; want the production paths", cfg.Endpoint, keysetPath(t, cfg))
	}
	if cf.Permissions != "0600" || cf.Owner != "root:root" {
		t.Errorf("plugin config is %s %s; want root:root 0600", cf.Owner, cf.Permissions)
	}
	if ks, ok := byPath[keysetPath(t, cfg)]; ok && (ks.Permissions != "0600" || ks.Owner != "root:root") {
		t.Errorf("keyset is %s %s; want root:root 0600", ks.Owner, ks.Permissions)
	}
}

func TestClusterAPIKubeadmControlPlane(t *testing.T) {
	var kcp struct {
		APIVersion string         `json:"apiVersion"`
		Kind       string         `json:"kind"`
		Metadata   map[string]any `json:"metadata"`
		Spec       struct {
			Replicas          int            `json:"replicas"`
			Version           string         `json:"version"`
			MachineTemplate   map[string]any `json:"machineTemplate"`
			KubeadmConfigSpec struct {
				ClusterConfiguration struct {
					APIServer apiServer `json:"apiServer"`
				} `json:"clusterConfiguration"`
				Files              []file   `json:"files"`
				PreKubeadmCommands []string `json:"preKubeadmCommands"`
			} `json:"kubeadmConfigSpec"`
		} `json:"spec"`
	}
	strict(t, "capi-kubeadmcontrolplane.yaml", &kcp)
	if kcp.APIVersion != "controlplane.cluster.x-k8s.io/v1beta2" || kcp.Kind != "KubeadmControlPlane" {
		t.Fatalf("header %s %s", kcp.APIVersion, kcp.Kind)
	}
	spec := kcp.Spec.KubeadmConfigSpec
	if want := wantAPIServer(t); !reflect.DeepEqual(spec.ClusterConfiguration.APIServer, want) {
		t.Errorf("clusterConfiguration.apiServer = %+v\nwant %+v", spec.ClusterConfiguration.APIServer, want)
	}
	checkPluginFiles(t, spec.Files)
	var ks *file
	for i := range spec.Files {
		if spec.Files[i].Path == config.ProductionKeysetPath {
			ks = &spec.Files[i]
		}
	}
	if ks == nil || ks.ContentFrom == nil || ks.ContentFrom.Secret.Name == "" {
		t.Errorf("the keyset is not a file from a Secret: %+v", ks)
	}
	if len(spec.PreKubeadmCommands) != 1 || !strings.HasPrefix(spec.PreKubeadmCommands[0], "kms-plugin install --skip-kube-apiserver ") {
		t.Errorf("preKubeadmCommands = %q; want kms-plugin install --skip-kube-apiserver", spec.PreKubeadmCommands)
	}
}

func TestCloudInit(t *testing.T) {
	data, err := os.ReadFile("cloud-init.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(data), "#cloud-config\n") {
		t.Fatal("cloud-init.yaml does not start with #cloud-config")
	}
	var ci struct {
		WriteFiles []file     `json:"write_files"`
		RunCmd     [][]string `json:"runcmd"`
	}
	strict(t, "cloud-init.yaml", &ci)
	checkPluginFiles(t, ci.WriteFiles)
	var order []string
	for _, c := range ci.RunCmd {
		order = append(order, strings.Join(c[:2], " "))
	}
	if strings.Join(order, ", ") != "kubeadm init, kms-plugin install" {
		t.Errorf("runcmd runs %q; want kubeadm init, then kms-plugin install", order)
	}
}

// TestStaticPodIsWhatInstallWrites compares the static pod example with
// the one install renders from the default config (image aside), and the
// EncryptionConfiguration example with the one it writes on a fresh node.
func TestStaticPodIsWhatInstallWrites(t *testing.T) {
	root := t.TempDir()
	p := install.DefaultPaths()
	manifest, err := os.ReadFile("../internal/install/testdata/kubeadm-v1.37.2/kube-apiserver.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(root, filepath.Dir(p.KubeAPIServer)), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, p.KubeAPIServer), manifest, 0o600); err != nil {
		t.Fatal(err)
	}
	in, err := install.New(install.Config{FS: install.DirFS(root), Image: "kms-plugin:v0.1.0"})
	if err != nil {
		t.Fatal(err)
	}
	plan, err := in.PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	written := map[string][]byte{}
	for _, c := range plan.Changes {
		written[c.Path] = c.New
	}

	var got, want corev1.Pod
	if err := yaml.UnmarshalStrict(written[p.StaticPod], &got); err != nil {
		t.Fatal(err)
	}
	strict(t, "kms-plugin.static-pod.yaml", &want)
	if !reflect.DeepEqual(got, want) {
		gy, _ := yaml.Marshal(got)
		wy, _ := yaml.Marshal(want)
		t.Errorf("install's static pod differs from kms-plugin.static-pod.yaml:\ninstall:\n%s\nexample:\n%s", gy, wy)
	}

	var gotEC, wantEC any
	if err := yaml.Unmarshal(written[p.EncryptionConfig], &gotEC); err != nil {
		t.Fatal(err)
	}
	strict(t, "encryption-config.yaml", &wantEC)
	if !reflect.DeepEqual(gotEC, wantEC) {
		t.Errorf("install's EncryptionConfiguration differs from encryption-config.yaml:\n%s", written[p.EncryptionConfig])
	}
}

// keysetPath returns the local provider's keyset path that cfg configures.
func keysetPath(t *testing.T, cfg config.Config) string {
	t.Helper()
	_, s, err := registry.Builtin().Settings(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ls, ok := s.(*local.Settings)
	if !ok {
		t.Fatalf("config uses provider %s, not the local one", cfg.Provider)
	}
	return ls.KeysetPath
}
