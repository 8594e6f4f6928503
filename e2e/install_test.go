package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// kubeadmManifest is kube-apiserver's static pod as kubeadm v1.37.2 writes
// it (internal/install/testdata/generate.sh).
const kubeadmManifest = "../internal/install/testdata/kubeadm-v1.37.2/kube-apiserver.yaml"

// Paths install uses by default on a node (under the node root here).
const (
	manifestPath   = "/etc/kubernetes/manifests/kube-apiserver.yaml"
	staticPodPath  = "/etc/kubernetes/manifests/kms-plugin.yaml"
	encConfigPath  = "/etc/kubernetes/enc/encryption-config.yaml"
	installedName  = "kms-plugin" // install's default provider name
	plaintextMagic = "k8s\x00"    // a Secret stored without encryption (protobuf)
)

// replacedFlags are the kubeadm flags the harness replaces or drops: etcd
// (its own, plain HTTP), the address and port (loopback, a free port), and
// certificates and keys kubeadm made under /etc/kubernetes/pki, which do not
// exist here. Every other flag of the manifest is passed as written, host
// paths mapped into the node root.
var replacedFlags = []string{
	"etcd-servers", "etcd-cafile", "etcd-certfile", "etcd-keyfile",
	"advertise-address", "secure-port",
	"client-ca-file", "tls-cert-file", "tls-private-key-file",
	"kubelet-client-certificate", "kubelet-client-key",
	"proxy-client-cert-file", "proxy-client-key-file", "requestheader-client-ca-file",
	"service-account-key-file", "service-account-signing-key-file",
}

// installNode is one control-plane node: a root directory holding what
// kubeadm and `kms-plugin install` write, the plugin started with exactly
// the command of its installed static pod, and kube-apiserver started with
// exactly the flags of its (patched) manifest.
type installNode struct {
	name       string
	root       string // the node's "/"
	state      string // logs and harness certificates, outside the root
	configFile string // the plugin config given to install --config
	plugin     *cluster.Process
	api        *cluster.APIServer
	client     kubernetes.Interface
}

// TestInstallOnKubeadmNodes installs kms-plugin with `kms-plugin install`
// on three node roots holding kube-apiserver's manifest as kubeadm writes
// it, runs the plugins and kube-apiservers exactly as the installed files
// say (against one etcd: a 3-apiserver control plane sharing the keyset as
// documented for the local provider), checks that Secrets are encrypted in
// etcd and readable through every apiserver, then uninstalls in stages with
// data present and finds every Secret readable and stored unencrypted, and
// each manifest back to kubeadm's, byte for byte.
func TestInstallOnKubeadmNodes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	pluginBin, cleanup, err := cluster.PluginBinary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	apiBin, etcdBin := controlPlaneBinaries(t)
	kubeadm, err := os.ReadFile(kubeadmManifest)
	if err != nil {
		t.Fatal(err)
	}
	dir := cluster.TempDir(t, "kmsi-")

	etcd, err := cluster.NewEtcd(etcdBin, dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := etcd.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { etcd.Stop() })
	etcdClient, err := clientv3.New(clientv3.Config{Endpoints: []string{etcd.ClientURL}, DialTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer etcdClient.Close()

	nodes := make([]*installNode, 3)
	for i := range nodes {
		nodes[i] = newInstallNode(t, dir, i, kubeadm)
	}
	t.Cleanup(func() {
		for _, n := range nodes {
			n.stop(t)
			if t.Failed() {
				for _, p := range []*cluster.Process{n.plugin, n.apiProcess()} {
					if p != nil {
						t.Logf("----- %s %s -----\n%s", n.name, p.Name, p.LogTail(40))
					}
				}
			}
		}
	})
	n0 := nodes[0]
	const ns = "install-e2e"
	start := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(start).Seconds(), what) }

	// Before install: node 0's kube-apiserver as kubeadm configured it. A
	// Secret written now is stored in plaintext.
	n0.startAPIServer(ctx, t, apiBin, etcd.ClientURL)
	if _, err := n0.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := map[string]map[string][]byte{}
	putSecret(ctx, t, n0.client, ns, "before-install", want)
	checkStored(ctx, t, etcdClient, ns, want, plaintextMagic)

	phase("plaintext Secret written before install")
	// Install on every node; a second run changes nothing.
	for _, n := range nodes {
		out, err := cluster.RunPlugin(ctx, pluginBin, "install", "--root", n.root, "--config", n.configFile, "--image", "kms-plugin:e2e")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "install: wrote "+manifestPath) {
			t.Fatalf("%s: install output:\n%s", n.name, out)
		}
		out, err = cluster.RunPlugin(ctx, pluginBin, "install", "--root", n.root, "--config", n.configFile, "--image", "kms-plugin:e2e")
		if err != nil || !strings.Contains(out, "no changes") {
			t.Fatalf("%s: second install: %v\n%s", n.name, err, out)
		}
	}

	phase("installed on 3 nodes")
	// The plugins, node 0 first: it creates the keyset, which the others
	// then get a copy of, as documented for the local provider.
	n0.startPlugin(ctx, t, pluginBin)
	keyset, err := os.ReadFile(filepath.Join(n0.root, "etc/kubernetes/kms-plugin/keyset.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes[1:] {
		if err := os.WriteFile(filepath.Join(n.root, "etc/kubernetes/kms-plugin/keyset.json"), keyset, 0o600); err != nil {
			t.Fatal(err)
		}
		n.startPlugin(ctx, t, pluginBin)
	}

	// kubelet restarts kube-apiserver when its manifest changes; the other
	// nodes' start now. Each runs with the patched manifest's flags.
	n0.stopAPIServer(t)
	for _, n := range nodes {
		n.startAPIServer(ctx, t, apiBin, etcd.ClientURL)
	}

	phase("3 plugins and 3 kube-apiservers running from the installed files")
	// A 3-apiserver control plane: what one writes, all read; all encrypt.
	for _, n := range nodes {
		putSecret(ctx, t, n.client, ns, "via-"+n.name, want)
	}
	readEverywhere(ctx, t, nodes, ns, want)
	encrypted := map[string]map[string][]byte{}
	for name, d := range want {
		if name != "before-install" {
			encrypted[name] = d
		}
	}
	checkStored(ctx, t, etcdClient, ns, encrypted, cluster.StoredPrefix(installedName))
	// Written before install, still plaintext, still readable (identity last),
	// until rewritten.
	checkStored(ctx, t, etcdClient, ns, map[string]map[string][]byte{"before-install": want["before-install"]}, plaintextMagic)
	rewriteSecrets(ctx, t, nodes[1].client)
	checkStored(ctx, t, etcdClient, ns, want, cluster.StoredPrefix(installedName))

	phase("Secrets encrypted, readable through every kube-apiserver")
	// Uninstall, stage one, on every node: writes go back to identity, the
	// plugin still reads. Finalizing now is refused: etcd holds encrypted
	// Secrets (checked by the real etcd scan).
	for _, n := range nodes {
		if out, err := cluster.RunPlugin(ctx, pluginBin, "uninstall", "--root", n.root); err != nil || !strings.Contains(out, "uninstall: wrote "+encConfigPath) {
			t.Fatalf("%s: uninstall: %v\n%s", n.name, err, out)
		}
	}
	_, err = cluster.RunPlugin(ctx, pluginBin, "uninstall", "--finalize", "--root", n0.root, "--etcd-endpoints", etcd.ClientURL)
	if err == nil || !strings.Contains(err.Error(), "objects are still encrypted by the kms provider") {
		t.Fatalf("finalize with encrypted data: %v; want a refusal", err)
	}
	// kube-apiserver reloads the EncryptionConfiguration by itself (it polls
	// the file every minute): wait until each one writes plaintext.
	for _, n := range nodes {
		n.waitForPlaintextWrites(ctx, t, etcdClient, ns, want)
	}
	phase("every kube-apiserver reloaded its EncryptionConfiguration")
	rewriteSecrets(ctx, t, nodes[2].client)
	readEverywhere(ctx, t, nodes, ns, want)
	checkAllPlaintext(ctx, t, etcdClient)

	phase("every Secret rewritten in plaintext")
	// Stage two, with the real etcd check: the provider, the flags, the
	// mounts and the plugin go; kube-apiserver's manifest is kubeadm's again.
	for _, n := range nodes {
		out, err := cluster.RunPlugin(ctx, pluginBin, "uninstall", "--finalize", "--root", n.root, "--etcd-endpoints", etcd.ClientURL)
		if err != nil {
			t.Fatalf("%s: finalize: %v", n.name, err)
		}
		for _, p := range []string{staticPodPath, encConfigPath} {
			if !strings.Contains(out, "uninstall: removed "+p) {
				t.Errorf("%s: finalize did not remove %s:\n%s", n.name, p, out)
			}
		}
		if got, err := os.ReadFile(filepath.Join(n.root, manifestPath)); err != nil || !bytes.Equal(got, kubeadm) {
			t.Errorf("%s: kube-apiserver's manifest is not kubeadm's again (%v)", n.name, err)
		}
	}

	phase("finalized on 3 nodes")
	// kubelet restarts kube-apiserver from the restored manifest and stops
	// the plugin: every Secret reads back without any plugin.
	for _, n := range nodes {
		n.stop(t)
	}
	n0.startAPIServer(ctx, t, apiBin, etcd.ClientURL)
	if slices.Contains(n0.api.Process().Args, "--encryption-provider-config-automatic-reload=true") {
		t.Error("the restored kube-apiserver still gets the encryption flags")
	}
	readEverywhere(ctx, t, nodes[:1], ns, want)
	checkAllPlaintext(ctx, t, etcdClient)
	phase("every Secret read back without the plugin")
}

// newInstallNode makes node i's root with kubeadm's manifest, and the
// plugin config for install: the production layout, except that the
// socket and keyset are real paths under the node root (the plugin runs as
// a plain process here, without the container's mount namespace).
func newInstallNode(t *testing.T, dir string, i int, kubeadm []byte) *installNode {
	t.Helper()
	n := &installNode{name: fmt.Sprintf("node%d", i), root: filepath.Join(dir, fmt.Sprintf("n%d", i))}
	n.state = n.root + "-state"
	n.configFile = n.root + "-config.yaml"
	for _, d := range []string{filepath.Join(n.root, filepath.Dir(manifestPath)), n.state} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(n.root, manifestPath), kubeadm, 0o600); err != nil {
		t.Fatal(err)
	}
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	config := fmt.Sprintf(`endpoint: unix://%[1]s/var/run/kmsplugin/socket.sock
provider: local
local:
  keysetPath: %[1]s/etc/kubernetes/kms-plugin/keyset.json
httpAddr: 127.0.0.1:%[2]d
providerPollInterval: 5s
log:
  format: console
`, n.root, port)
	if err := os.WriteFile(n.configFile, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	return n
}

// readPod reads a static pod manifest from the node root.
func (n *installNode) readPod(t *testing.T, path string) *corev1.Pod {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(n.root, path))
	if err != nil {
		t.Fatal(err)
	}
	var pod corev1.Pod
	if err := yaml.UnmarshalStrict(data, &pod); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return &pod
}

// hostPath maps path p as container c of pod sees it to the real file:
// through the pod's hostPath volumes to the node's host path, then into the
// node root (host paths the test already placed under the root are real).
// A path no volume mounts fails the test: the container could not see it.
func (n *installNode) hostPath(t *testing.T, pod *corev1.Pod, c *corev1.Container, p string) string {
	t.Helper()
	var best *corev1.VolumeMount
	for i, m := range c.VolumeMounts {
		if (p == m.MountPath || strings.HasPrefix(p, m.MountPath+"/")) && (best == nil || len(m.MountPath) > len(best.MountPath)) {
			best = &c.VolumeMounts[i]
		}
	}
	if best == nil {
		t.Fatalf("%s: %s is not mounted into container %s", n.name, p, c.Name)
	}
	for _, v := range pod.Spec.Volumes {
		if v.Name != best.Name || v.HostPath == nil {
			continue
		}
		host := v.HostPath.Path + strings.TrimPrefix(p, best.MountPath)
		if strings.HasPrefix(host, n.root+"/") {
			return host
		}
		return filepath.Join(n.root, host)
	}
	t.Fatalf("%s: mount %s of %s is not a hostPath volume", n.name, best.Name, p)
	return ""
}

// mapArgs maps every --flag=/absolute/path argument through hostPath.
func (n *installNode) mapArgs(t *testing.T, pod *corev1.Pod, c *corev1.Container, args []string) []string {
	t.Helper()
	out := make([]string, 0, len(args))
	for _, a := range args {
		if name, v, ok := strings.Cut(a, "="); ok && strings.HasPrefix(name, "--") && strings.HasPrefix(v, "/") {
			a = name + "=" + n.hostPath(t, pod, c, v)
		}
		out = append(out, a)
	}
	return out
}

// startPlugin runs the plugin with exactly the arguments of the installed
// static pod (its image's entrypoint is the binary), and waits until the
// liveness probe kubelet would run answers 200.
func (n *installNode) startPlugin(ctx context.Context, t *testing.T, binary string) {
	t.Helper()
	pod := n.readPod(t, staticPodPath)
	if !pod.Spec.HostNetwork || pod.Spec.PriorityClassName != "system-node-critical" || len(pod.Spec.Containers) != 1 {
		t.Fatalf("%s: static pod spec %+v", n.name, pod.Spec)
	}
	c := &pod.Spec.Containers[0]
	if len(c.Command) != 0 {
		t.Fatalf("%s: static pod overrides the image's entrypoint: %q", n.name, c.Command)
	}
	// The socket and keyset the config names must be visible in the pod.
	for _, p := range []string{n.root + "/var/run/kmsplugin/socket.sock", n.root + "/etc/kubernetes/kms-plugin/keyset.json"} {
		n.hostPath(t, pod, c, p)
	}
	n.plugin = &cluster.Process{
		Name:    "kms-plugin",
		Path:    binary,
		Args:    n.mapArgs(t, pod, c, c.Args),
		LogPath: filepath.Join(n.state, "kms-plugin.log"),
	}
	if err := n.plugin.Start(); err != nil {
		t.Fatal(err)
	}
	probe := c.LivenessProbe.HTTPGet
	url := fmt.Sprintf("http://%s:%d%s", probe.Host, probe.Port.IntValue(), probe.Path)
	cluster.WaitFor(ctx, t, 30*time.Second, time.Second, n.name+" plugin liveness "+url, func() error {
		resp, err := http.Get(url)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("%s: %s", url, resp.Status)
		}
		return nil
	})
}

// startAPIServer runs kube-apiserver with the flags of the node's current
// manifest (see replacedFlags) and waits until it is ready.
func (n *installNode) startAPIServer(ctx context.Context, t *testing.T, binary, etcdURL string) {
	t.Helper()
	pod := n.readPod(t, manifestPath)
	var c *corev1.Container
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == "kube-apiserver" {
			c = &pod.Spec.Containers[i]
		}
	}
	if c == nil || len(c.Command) < 2 || c.Command[0] != "kube-apiserver" {
		t.Fatalf("%s: no kube-apiserver command in the manifest", n.name)
	}
	var args []string
	for _, a := range n.mapArgs(t, pod, c, c.Command[1:]) {
		name, _, _ := strings.Cut(strings.TrimPrefix(a, "--"), "=")
		if !slices.Contains(replacedFlags, name) {
			args = append(args, a)
		}
	}
	// The EncryptionConfiguration's socket must be visible in the container.
	if cfg := flagValue(args, "encryption-provider-config"); cfg != "" {
		data, err := os.ReadFile(cfg)
		if err != nil {
			t.Fatal(err)
		}
		n.hostPath(t, pod, c, n.root+"/var/run/kmsplugin/socket.sock")
		if !bytes.Contains(data, []byte("endpoint: unix://"+n.root+"/var/run/kmsplugin/socket.sock")) {
			t.Fatalf("%s: EncryptionConfiguration does not name the plugin's socket:\n%s", n.name, data)
		}
	}
	stateDir := filepath.Join(n.state, fmt.Sprintf("apiserver-%d", time.Now().UnixNano()))
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	api, err := cluster.NewAPIServerWithArgs(binary, stateDir, etcdURL, args)
	if err != nil {
		t.Fatal(err)
	}
	n.api = api
	if err := api.Start(ctx); err != nil {
		t.Fatalf("%s: %v", n.name, err)
	}
	if n.client, err = kubernetes.NewForConfig(api.RestConfig()); err != nil {
		t.Fatal(err)
	}
}

func (n *installNode) apiProcess() *cluster.Process {
	if n.api == nil {
		return nil
	}
	return n.api.Process()
}

func (n *installNode) stopAPIServer(t *testing.T) {
	t.Helper()
	if n.api != nil {
		if err := n.api.Stop(); err != nil {
			t.Errorf("%s: stop kube-apiserver: %v", n.name, err)
		}
	}
}

func (n *installNode) stop(t *testing.T) {
	t.Helper()
	n.stopAPIServer(t)
	if n.plugin != nil {
		if err := n.plugin.Stop(); err != nil {
			t.Errorf("%s: stop kms-plugin: %v", n.name, err)
		}
	}
}

// waitForPlaintextWrites updates a probe Secret through the node's
// kube-apiserver until it is stored in plaintext: the apiserver has
// reloaded an EncryptionConfiguration with identity first.
func (n *installNode) waitForPlaintextWrites(ctx context.Context, t *testing.T, etcdClient *clientv3.Client, ns string, want map[string]map[string][]byte) {
	t.Helper()
	name := "probe-" + n.name
	cluster.WaitFor(ctx, t, 150*time.Second, time.Second, n.name+" writing plaintext after reloading its EncryptionConfiguration", func() error {
		putSecret(ctx, t, n.client, ns, name, want)
		raw, err := etcdClient.Get(ctx, cluster.SecretKey(ns, name))
		if err != nil {
			return err
		}
		if len(raw.Kvs) != 1 || !bytes.HasPrefix(raw.Kvs[0].Value, []byte(plaintextMagic)) {
			return fmt.Errorf("%s still stored encrypted", name)
		}
		return nil
	})
}

func flagValue(args []string, name string) string {
	for _, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
	}
	return ""
}

// putSecret creates or updates Secret ns/name with fresh random data and
// records it in want.
func putSecret(ctx context.Context, t *testing.T, client kubernetes.Interface, ns, name string, want map[string]map[string][]byte) {
	t.Helper()
	data := map[string][]byte{"password": []byte("install-e2e-" + cluster.RandomHex(12))}
	s, err := client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
	if err == nil {
		s.Data = data
		_, err = client.CoreV1().Secrets(ns).Update(ctx, s, metav1.UpdateOptions{})
	} else {
		_, err = client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Data: data}, metav1.CreateOptions{})
	}
	if err != nil {
		t.Fatalf("put secret %s/%s: %v", ns, name, err)
	}
	want[name] = data
}

// readEverywhere reads every Secret in want through every node.
func readEverywhere(ctx context.Context, t *testing.T, nodes []*installNode, ns string, want map[string]map[string][]byte) {
	t.Helper()
	for _, n := range nodes {
		for name, data := range want {
			s, err := n.client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				t.Errorf("%s: get %s/%s: %v", n.name, ns, name, err)
				continue
			}
			if !equalData(s.Data, data) {
				t.Errorf("%s: %s/%s differs from what was written", n.name, ns, name)
			}
		}
	}
}

// checkStored checks that each Secret's etcd value starts with prefix.
func checkStored(ctx context.Context, t *testing.T, etcdClient *clientv3.Client, ns string, secrets map[string]map[string][]byte, prefix string) {
	t.Helper()
	for name := range secrets {
		resp, err := etcdClient.Get(ctx, cluster.SecretKey(ns, name))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) != 1 {
			t.Errorf("%s/%s: %d values in etcd", ns, name, len(resp.Kvs))
			continue
		}
		if v := resp.Kvs[0].Value; !bytes.HasPrefix(v, []byte(prefix)) {
			t.Errorf("%s/%s is stored as %q...; want prefix %q", ns, name, v[:min(len(v), 30)], prefix)
		}
	}
}

// checkAllPlaintext checks every Secret in etcd is stored unencrypted.
func checkAllPlaintext(ctx context.Context, t *testing.T, etcdClient *clientv3.Client) {
	t.Helper()
	resp, err := etcdClient.Get(ctx, "/registry/secrets/", clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		t.Fatal("no Secret in etcd")
	}
	for _, kv := range resp.Kvs {
		if !bytes.HasPrefix(kv.Value, []byte(plaintextMagic)) {
			t.Errorf("%s is stored as %q...; want plaintext", kv.Key, kv.Value[:min(len(kv.Value), 30)])
		}
	}
}

// rewriteSecrets rewrites every Secret through client, as
// `kubectl get secrets -A -o json | kubectl replace -f -` does: a no-op
// update stores each under the first provider of the EncryptionConfiguration.
func rewriteSecrets(ctx context.Context, t *testing.T, client kubernetes.Interface) {
	t.Helper()
	list, err := client.CoreV1().Secrets("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range list.Items {
		s := &list.Items[i]
		if _, err := client.CoreV1().Secrets(s.Namespace).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("rewrite %s/%s: %v", s.Namespace, s.Name, err)
		}
	}
}
