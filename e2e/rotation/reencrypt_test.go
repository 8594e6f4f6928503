package rotation

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// reencryptRBAC is what `kms-plugin reencrypt` needs, and all it gets here:
// list/get/update on the resources it rewrites, and in kube-system the
// rotation's Lease and state ConfigMap by name (plus create, which cannot
// be limited by name). No Nodes (the plugin is named), no EndpointSlices
// and no canary, unlike rotate (rotation.ReencryptPermissions).
const reencryptRBAC = `apiVersion: v1
kind: ServiceAccount
metadata: {name: kms-plugin-reencrypt, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: kms-plugin-reencrypt}
rules:
  - apiGroups: [""]
    resources: [secrets, configmaps]
    verbs: [list, get, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: kms-plugin-reencrypt}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: kms-plugin-reencrypt}
subjects: [{kind: ServiceAccount, name: kms-plugin-reencrypt, namespace: kube-system}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: kms-plugin-reencrypt, namespace: kube-system}
rules:
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    verbs: [create]
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    resourceNames: [kms-plugin-rotation]
    verbs: [get, update]
  - apiGroups: [""]
    resources: [configmaps]
    verbs: [create]
  - apiGroups: [""]
    resources: [configmaps]
    resourceNames: [kms-plugin-rotation-state]
    verbs: [get, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: kms-plugin-reencrypt, namespace: kube-system}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: kms-plugin-reencrypt}
subjects: [{kind: ServiceAccount, name: kms-plugin-reencrypt, namespace: kube-system}]
`

// TestReencryptAESCBCToKMSAndUninstall starts a control plane whose
// Secrets and ConfigMaps are encrypted with aescbc, then:
//   - `kms-plugin install` (on a node root, kube-apiserver's manifest left
//     alone) puts the plugin's kms provider first, aescbc kept for reads,
//     and kube-apiserver is restarted on it;
//   - `kms-plugin reencrypt`, killed by its crash hook part way and run
//     again (it resumes), under a service account with only the RBAC
//     above, leaves no aescbc value in etcd (raw scan): every object is
//     under the plugin's key_id, and reads back;
//   - uninstall as the README documents: `kms-plugin uninstall` (its
//     finalize is refused while the kms provider stores objects), restart,
//     `kms-plugin reencrypt --target off-kms`, `kms-plugin uninstall
//     --finalize` (it checks etcd itself), restart without the plugin:
//     every object reads back, none is stored by the kms provider.
func TestReencryptAESCBCToKMSAndUninstall(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	start := time.Now()
	phase := func(what string) { t.Logf("%6.1fs %s", time.Since(start).Seconds(), what) }
	dir := cluster.TempDir(t, "kmsa-")
	root := filepath.Join(dir, "root")
	encPath := filepath.Join(root, "etc/kubernetes/enc/encryption-config.yaml")
	for _, d := range []string{filepath.Dir(encPath), filepath.Join(root, "var/run/kmsplugin"), filepath.Join(dir, "api")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	resources := []string{"secrets", "configmaps"}
	if err := cluster.WriteAESCBCEncryptionConfig(encPath, "key1", resources); err != nil {
		t.Fatal(err)
	}

	etcd, err := cluster.NewEtcd(bins.etcd, dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := etcd.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = etcd.Stop() })
	etcdClient, err := clientv3.New(clientv3.Config{Endpoints: []string{etcd.ClientURL}, DialTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer etcdClient.Close()
	api, err := cluster.NewAPIServer(cluster.APIServerConfig{Binary: bins.apiserver, Dir: filepath.Join(dir, "api"), EtcdURL: etcd.ClientURL, EncryptionProviderFile: encPath})
	if err != nil {
		t.Fatal(err)
	}
	if err := api.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var plugin *cluster.Process
	t.Cleanup(func() {
		_ = api.Stop()
		if plugin != nil {
			_ = plugin.Stop()
		}
		if t.Failed() {
			t.Logf("----- kube-apiserver -----\n%s", api.Process().LogTail(30))
			if plugin != nil {
				t.Logf("----- kms-plugin -----\n%s", plugin.LogTail(30))
			}
		}
	})
	client, err := kubernetes.NewForConfig(api.RestConfig())
	if err != nil {
		t.Fatal(err)
	}
	want := aesPopulate(ctx, t, client, []string{"aes-a", "aes-b"}, 60, 30)
	kinds := scanKinds(ctx, t, etcdClient, resources)
	if n := len(kinds[cluster.StoredKind([]byte(cluster.AESCBCPrefix("key1")+"x"))]); n < 180 {
		t.Fatalf("before install: %d objects under aescbc, want at least 180: %v", n, cluster.KindCounts(kinds))
	}
	phase(fmt.Sprintf("180 objects written under aescbc: %v", cluster.KindCounts(kinds)))

	// Install on the node root; kube-apiserver's manifest is left alone
	// (the harness runs it), its EncryptionConfiguration is install's.
	port, err := cluster.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	pluginURL := fmt.Sprintf("http://127.0.0.1:%d", port)
	configFile := filepath.Join(dir, "plugin-config.yaml")
	if err := os.WriteFile(configFile, fmt.Appendf(nil, `endpoint: unix://%[1]s/var/run/kmsplugin/socket.sock
provider: local
local:
  keysetPath: %[1]s/etc/kubernetes/kms-plugin/keyset.json
httpAddr: 127.0.0.1:%[2]d
providerPollInterval: 5s
log:
  format: console
`, root, port), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := cluster.RunPlugin(ctx, bins.plugin, "install", "--root", root, "--config", configFile, "--skip-kube-apiserver",
		"--resources", "secrets,configmaps", "--image", "kms-plugin:e2e")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "kms-plugin reencrypt --resources secrets,configmaps") {
		t.Errorf("install's notes do not name kms-plugin reencrypt:\n%s", out)
	}
	enc, err := os.ReadFile(encPath)
	if err != nil {
		t.Fatal(err)
	}
	if k, a := strings.Index(string(enc), "kms:"), strings.Index(string(enc), "aescbc:"); k < 0 || a < k {
		t.Fatalf("install's EncryptionConfiguration does not put kms before aescbc:\n%s", enc)
	}
	plugin = &cluster.Process{Name: "kms-plugin", Path: bins.plugin, LogPath: filepath.Join(dir, "kms-plugin.log"),
		Args: []string{"serve", "--config", filepath.Join(root, "etc/kubernetes/kms-plugin/config.yaml")}}
	if err := plugin.Start(); err != nil {
		t.Fatal(err)
	}
	cluster.WaitFor(ctx, t, 30*time.Second, 200*time.Millisecond, "plugin /readyz", func() error {
		resp, err := http.Get(pluginURL + "/readyz")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/readyz: %s", resp.Status)
		}
		return nil
	})
	if err := api.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	keyID := pluginKeyID(ctx, t, pluginURL)
	kmsKind := cluster.StoredKind([]byte(cluster.StoredPrefix(installedName) + "x"))
	for k, v := range aesPopulate(ctx, t, client, []string{"kms-c"}, 5, 5) {
		want[k] = v
	}
	kinds = scanKinds(ctx, t, etcdClient, resources)
	if len(kinds[kmsKind]) < 10 || len(kinds["aescbc:key1"]) < 180 {
		t.Fatalf("after install: %v; want the new objects under kms, the old still under aescbc", cluster.KindCounts(kinds))
	}
	phase(fmt.Sprintf("installed, kube-apiserver restarted with kms first: %v", cluster.KindCounts(kinds)))

	// reencrypt under its own service account, with only its RBAC.
	if err := cluster.ApplyRBAC(ctx, client, []byte(reencryptRBAC)); err != nil {
		t.Fatal(err)
	}
	saKubeconfig := filepath.Join(dir, "reencrypt.kubeconfig")
	if err := cluster.WriteServiceAccountKubeconfig(ctx, client, api, "kube-system", "kms-plugin-reencrypt", saKubeconfig); err != nil {
		t.Fatal(err)
	}
	log := filepath.Join(dir, "reencrypt.log")
	reencrypt := func(env []string, args ...string) cluster.CommandResult {
		t.Helper()
		args = append([]string{"reencrypt", "--kubeconfig", saKubeconfig, "--etcd-endpoints", etcd.ClientURL,
			"--log-format", "console", "--progress", "log", "--qps", "400"}, args...)
		res, err := cluster.Command{Binary: bins.plugin, Args: args, Env: env, Timeout: 2 * time.Minute, LogPath: log}.Run(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	// Killed after 40 rewrites, as a crash would: exit 137, Lease held.
	res := reencrypt([]string{"KMS_PLUGIN_ROTATE_CRASH_AFTER=reencrypt:40"}, "--resources", "secrets,configmaps", "--plugin-endpoints", pluginURL,
		"--workers", "4", "--page-size", "50")
	if res.ExitCode != 137 {
		t.Fatalf("reencrypt with the crash hook: %s", res)
	}
	if st := reencryptState(ctx, t, client); st.Status != "running" || st.Runs != 1 {
		t.Fatalf("after the crash: state.reencryption %+v", st)
	}
	mid := cluster.KindCounts(scanKinds(ctx, t, etcdClient, resources))
	if n := mid["aescbc:key1"]; n == 0 || n > len(kinds["aescbc:key1"])-40 {
		t.Fatalf("after 40 rewrites: %v; want at least 40 fewer under aescbc than the %d before, and some left", mid, len(kinds["aescbc:key1"]))
	}
	// The next run (same host, the dead run's Lease taken over at once)
	// resumes and finishes.
	res = reencrypt(nil, "--resources", "secrets,configmaps", "--plugin-endpoints", pluginURL)
	if res.ExitCode != 0 || !strings.Contains(string(res.Stdout), "re-encryption completed (every object under kms provider kms-plugin") ||
		!strings.Contains(string(res.Stdout), "0 stale, 0 unencrypted") {
		t.Fatalf("reencrypt: %s\nstdout: %s", res, res.Stdout)
	}
	st := reencryptState(ctx, t, client)
	if st.Status != "completed" || st.Runs != 2 {
		t.Fatalf("state.reencryption %+v; want completed by the second run", st)
	}
	kinds = scanKinds(ctx, t, etcdClient, resources)
	if len(kinds) != 1 || len(kinds[kmsKind]) < 190 {
		t.Fatalf("after reencrypt etcd holds %v; want every object under kms", cluster.KindCounts(kinds))
	}
	checkKeyIDs(ctx, t, etcdClient, resources, keyID)
	aesCheckRead(ctx, t, client, want)
	phase(fmt.Sprintf("reencrypt (crashed after 40, resumed in %v): %v, every object reads back; %s", res.Duration.Round(time.Millisecond), cluster.KindCounts(kinds), lastLine(string(res.Stdout))))

	// Uninstall, stage 1: aescbc first again. Finalize is refused.
	out, err = cluster.RunPlugin(ctx, bins.plugin, "uninstall", "--root", root, "--skip-kube-apiserver")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "kms-plugin reencrypt --target off-kms --resources secrets,configmaps") {
		t.Errorf("uninstall's notes do not name kms-plugin reencrypt --target off-kms:\n%s", out)
	}
	_, err = cluster.RunPlugin(ctx, bins.plugin, "uninstall", "--finalize", "--root", root, "--skip-kube-apiserver", "--etcd-endpoints", etcd.ClientURL)
	if err == nil || !strings.Contains(err.Error(), "objects are still encrypted by the kms provider") || !strings.Contains(err.Error(), "kms-plugin reencrypt --target off-kms") {
		t.Fatalf("finalize with objects under kms: %v; want a refusal naming kms-plugin reencrypt", err)
	}
	if err := api.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	res = reencrypt(nil, "--target", "off-kms", "--encryption-config", encPath)
	if res.ExitCode != 0 || !strings.Contains(string(res.Stdout), "re-encryption completed (no object stored by kms provider kms-plugin)") {
		t.Fatalf("reencrypt --target off-kms: %s\nstdout: %s", res, res.Stdout)
	}
	kinds = scanKinds(ctx, t, etcdClient, resources)
	if len(kinds[kmsKind]) != 0 || len(kinds["aescbc:key1"]) < 190 {
		t.Fatalf("after reencrypt --target off-kms etcd holds %v; want every object under aescbc", cluster.KindCounts(kinds))
	}
	phase(fmt.Sprintf("uninstall stage 1, restart, reencrypt --target off-kms (%v): %v", res.Duration.Round(time.Millisecond), cluster.KindCounts(kinds)))

	out, err = cluster.RunPlugin(ctx, bins.plugin, "uninstall", "--finalize", "--root", root, "--skip-kube-apiserver", "--etcd-endpoints", etcd.ClientURL)
	if err != nil {
		t.Fatal(err)
	}
	if enc, err := os.ReadFile(encPath); err != nil || strings.Contains(string(enc), "kms") || !strings.Contains(string(enc), "aescbc") {
		t.Fatalf("after finalize (%v) the EncryptionConfiguration is:\n%s\nfinalize said:\n%s", err, enc, out)
	}
	if err := plugin.Stop(); err != nil {
		t.Fatal(err)
	}
	plugin = nil
	if err := api.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	aesCheckRead(ctx, t, client, want)
	kinds = scanKinds(ctx, t, etcdClient, resources)
	if len(kinds[kmsKind]) != 0 {
		t.Fatalf("after finalize etcd holds %v", cluster.KindCounts(kinds))
	}
	phase(fmt.Sprintf("finalized; kube-apiserver without the plugin reads every object: %v", cluster.KindCounts(kinds)))
}

// aesPopulate creates the namespaces and, in each, nSecrets Secrets and
// nConfigMaps ConfigMaps holding random values, and returns the values.
func aesPopulate(ctx context.Context, t *testing.T, client kubernetes.Interface, namespaces []string, nSecrets, nConfigMaps int) map[objKey]string {
	t.Helper()
	var keys []objKey
	for _, ns := range namespaces {
		if _, err := client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		for i := range nSecrets {
			keys = append(keys, objKey{"secrets", ns, fmt.Sprintf("secret-%03d", i)})
		}
		for i := range nConfigMaps {
			keys = append(keys, objKey{"configmaps", ns, fmt.Sprintf("config-%03d", i)})
		}
	}
	values := make([]string, len(keys))
	if err := cluster.Parallel(len(keys), 8, func(i int) error {
		k, v := keys[i], "v-"+cluster.RandomHex(12)
		meta := metav1.ObjectMeta{Name: k.name, Namespace: k.namespace}
		var err error
		if k.resource == "secrets" {
			_, err = client.CoreV1().Secrets(k.namespace).Create(ctx, &corev1.Secret{ObjectMeta: meta, Data: map[string][]byte{"value": []byte(v)}}, metav1.CreateOptions{})
		} else {
			_, err = client.CoreV1().ConfigMaps(k.namespace).Create(ctx, &corev1.ConfigMap{ObjectMeta: meta, Data: map[string]string{"value": v}}, metav1.CreateOptions{})
		}
		values[i] = v
		return err
	}); err != nil {
		t.Fatal(err)
	}
	out := make(map[objKey]string, len(keys))
	for i, k := range keys {
		out[k] = values[i]
	}
	return out
}

// aesCheckRead reads every object of want through client.
func aesCheckRead(ctx context.Context, t *testing.T, client kubernetes.Interface, want map[objKey]string) {
	t.Helper()
	bad := 0
	for k, v := range want {
		var got string
		if k.resource == "secrets" {
			s, err := client.CoreV1().Secrets(k.namespace).Get(ctx, k.name, metav1.GetOptions{})
			if err != nil {
				t.Errorf("read %s: %v", k, err)
				bad++
				continue
			}
			got = string(s.Data["value"])
		} else {
			c, err := client.CoreV1().ConfigMaps(k.namespace).Get(ctx, k.name, metav1.GetOptions{})
			if err != nil {
				t.Errorf("read %s: %v", k, err)
				bad++
				continue
			}
			got = c.Data["value"]
		}
		if got != v {
			t.Errorf("%s holds %q, want %q", k, got, v)
			bad++
		}
		if bad > 5 {
			t.Fatal("giving up")
		}
	}
}

func scanKinds(ctx context.Context, t *testing.T, cli *clientv3.Client, resources []string) map[string][]string {
	t.Helper()
	kinds, err := cluster.ScanKinds(ctx, cli, resources...)
	if err != nil {
		t.Fatal(err)
	}
	return kinds
}

// checkKeyIDs decodes every stored value as a KMS v2 EncryptedObject (with
// kube-apiserver's own validation) and checks its key_id.
func checkKeyIDs(ctx context.Context, t *testing.T, cli *clientv3.Client, resources []string, keyID string) {
	t.Helper()
	for _, res := range resources {
		objs, err := cluster.ScanStored(ctx, cli, res, installedName)
		if err != nil {
			t.Fatal(err)
		}
		for _, o := range objs {
			if !o.Encrypted || o.KeyID != keyID {
				t.Errorf("%s: encrypted %v, key_id %q (%v); want %q", o.Key, o.Encrypted, o.KeyID, o.Err, keyID)
			}
		}
	}
}

// installedName is the kms provider name install writes by default.
const installedName = "kms-plugin"

// pluginKeyID is the key_id the plugin at url reports.
func pluginKeyID(ctx context.Context, t *testing.T, url string) string {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url+"/status", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st struct {
		KeyID string `json:"keyID"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil || st.KeyID == "" {
		t.Fatalf("plugin /status: %v, key_id %q", err, st.KeyID)
	}
	return st.KeyID
}

// reencryptRecord is the part of the state's "reencryption" the test reads.
type reencryptRecord struct {
	ID     string `json:"id"`
	Status string `json:"status"`
	Runs   int    `json:"runs"`
	Target string `json:"target"`
}

// reencryptState reads state.json's reencryption from the state ConfigMap.
func reencryptState(ctx context.Context, t *testing.T, client kubernetes.Interface) reencryptRecord {
	t.Helper()
	cm, err := client.CoreV1().ConfigMaps("kube-system").Get(ctx, "kms-plugin-rotation-state", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Reencryption *reencryptRecord `json:"reencryption"`
	}
	if err := json.Unmarshal([]byte(cm.Data["state.json"]), &doc); err != nil || doc.Reencryption == nil {
		t.Fatalf("state.json: %v: %s", err, cm.Data["state.json"])
	}
	return *doc.Reencryption
}
