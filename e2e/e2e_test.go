// Package e2e runs kms-plugin under a real kube-apiserver and etcd (see
// package cluster) and checks, through the Kubernetes API and the raw etcd
// values, that Secrets are encrypted at rest and survive restarts, plugin
// outages and key rotation. All tests share one cluster; each works in its
// own namespace and leaves the cluster ready.
package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// kmsCheck is the readyz check kube-apiserver registers for its KMS v2
// providers when no KMS v1 provider is configured.
const kmsCheck = "kms-providers"

// c is the shared cluster, started by TestMain.
var c *cluster.Cluster

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx := context.Background()
	fail := func(format string, args ...any) int {
		fmt.Fprintf(os.Stderr, "e2e: "+format+"\n", args...)
		return 1
	}
	pluginBin, cleanup, err := cluster.ServePluginBinary(ctx)
	if err != nil {
		return fail("kms-plugin binary: %v", err)
	}
	defer cleanup()
	kubeAPIServerBin, err := cluster.KubeAPIServerBinary()
	if err != nil {
		return fail("kube-apiserver binary: %v", err)
	}
	etcdBin, err := cluster.EtcdBinary()
	if err != nil {
		return fail("etcd binary: %v", err)
	}
	dir, err := os.MkdirTemp("", "kms-e2e-")
	if err != nil {
		return fail("%v", err)
	}

	start := time.Now()
	c, err = cluster.Start(ctx, cluster.Config{
		PluginBinary:        pluginBin,
		KubeAPIServerBinary: kubeAPIServerBin,
		EtcdBinary:          etcdBin,
		Dir:                 dir,
	})
	if err != nil {
		return fail("start cluster (state kept in %s): %v", dir, err)
	}
	fmt.Fprintf(os.Stderr, "e2e: etcd, kms-plugin and kube-apiserver ready in %v\n", time.Since(start).Round(time.Millisecond))

	code := m.Run()
	if err := c.Close(); err != nil {
		fmt.Fprintf(os.Stderr, "e2e: stop cluster: %v\n", err)
		code = 1
	}
	if code == 0 {
		os.RemoveAll(dir)
	} else {
		fmt.Fprintf(os.Stderr, "e2e: kept logs and state in %s\n", dir)
	}
	return code
}

// TestReadyzCheckName checks that kube-apiserver runs the KMS health check
// under the name the other tests watch.
func TestReadyzCheckName(t *testing.T) {
	setup(t)
	names, err := c.APIServer.ReadyzChecks(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(names, kmsCheck) {
		t.Fatalf("/readyz?verbose lists %q, want it to include %q", names, kmsCheck)
	}
	if code, body := apiGet(t, "/readyz/"+kmsCheck); code != http.StatusOK {
		t.Fatalf("/readyz/%s = %d %q, want 200", kmsCheck, code, body)
	}
}

// TestSecretsEncryptedAtRest creates Secrets through the API and checks
// that etcd holds them only as KMS v2 EncryptedObjects under the plugin's
// current key ID.
func TestSecretsEncryptedAtRest(t *testing.T) {
	setup(t)
	ns := newNamespace(t)
	keyID := pluginKeyID(t)
	secrets := createSecrets(t, ns, "at-rest", 10)

	ctx := context.Background()
	for name, data := range secrets {
		raw, err := c.RawSecret(ctx, ns, name)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(raw, []byte(cluster.StoredPrefix(c.ProviderName))) {
			t.Errorf("%s: raw value starts with %q, want prefix %q", name, raw[:min(len(raw), 40)], cluster.StoredPrefix(c.ProviderName))
		}
		for k, v := range data {
			if bytes.Contains(raw, v) || bytes.Contains(raw, []byte(base64.StdEncoding.EncodeToString(v))) {
				t.Errorf("%s: raw etcd value contains the plaintext of data[%s]", name, k)
			}
		}
		if bytes.Contains(raw, []byte(name)) {
			t.Errorf("%s: raw etcd value contains the secret's name in clear", name)
		}
		obj, err := cluster.DecodeStored(raw, c.ProviderName)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if obj.KeyID != keyID {
			t.Errorf("%s: stored key ID %q, want the plugin's %q", name, obj.KeyID, keyID)
		}
		for k := range obj.Annotations {
			if !strings.HasSuffix(k, cluster.AnnotationSuffix) {
				t.Errorf("%s: annotation %q does not end in %q", name, k, cluster.AnnotationSuffix)
			}
		}
	}
	checkSecrets(t, ns, secrets)
}

// TestAPIServerRestart restarts kube-apiserver and reads every Secret back;
// reading does not rewrite them.
func TestAPIServerRestart(t *testing.T) {
	setup(t)
	restoreOnExit(t)
	ns := newNamespace(t)
	secrets := createSecrets(t, ns, "restart", 20)
	before := rawSecrets(t, ns, secrets)

	start := time.Now()
	if err := c.APIServer.Restart(context.Background()); err != nil {
		t.Fatalf("restart kube-apiserver: %v", err)
	}
	t.Logf("kube-apiserver restarted and ready in %v", time.Since(start).Round(time.Millisecond))

	checkSecrets(t, ns, secrets)
	after := rawSecrets(t, ns, secrets)
	for name := range secrets {
		if !bytes.Equal(before[name], after[name]) {
			t.Errorf("%s: stored value changed across an apiserver restart without writes", name)
		}
	}
}

// TestPluginOutage kills the plugin, checks kube-apiserver reports the KMS
// provider unready within a bounded time, restarts the plugin on the same
// socket (left behind by the crash) and keyset, checks kube-apiserver
// recovers, and then, after an apiserver restart that empties its DEK cache,
// reads every Secret back through the restarted plugin.
func TestPluginOutage(t *testing.T) {
	setup(t)
	restoreOnExit(t)
	ns := newNamespace(t)
	secrets := createSecrets(t, ns, "outage", 20)
	keyID := pluginKeyID(t)
	if code, body := apiGet(t, "/readyz/"+kmsCheck); code != http.StatusOK {
		t.Fatalf("before the outage /readyz/%s = %d %q, want 200", kmsCheck, code, body)
	}

	if err := c.Plugin.Kill(); err != nil {
		t.Fatalf("kill kms-plugin: %v", err)
	}
	killed := time.Now()
	// kube-apiserver caches a good Status for 20s, then a Status call times
	// out after the provider's 3s timeout.
	cluster.WaitFor(context.Background(), t, 90*time.Second, 2*time.Second, "/readyz/"+kmsCheck+" to fail with the plugin down", func() error {
		code, body := apiGet(t, "/readyz/"+kmsCheck)
		if code == http.StatusOK {
			return fmt.Errorf("/readyz/%s = %d %q", kmsCheck, code, body)
		}
		return nil
	})
	t.Logf("/readyz/%s failed %v after the plugin was killed", kmsCheck, time.Since(killed).Round(time.Millisecond))
	if code, _ := apiGet(t, "/readyz"); code == http.StatusOK {
		t.Errorf("/readyz = 200 while /readyz/%s fails", kmsCheck)
	}

	if err := c.Plugin.Start(context.Background()); err != nil {
		t.Fatalf("restart kms-plugin over its stale socket: %v", err)
	}
	restarted := time.Now()
	if got := pluginKeyID(t); got != keyID {
		t.Fatalf("after restart the plugin reports key ID %q, want %q as before", got, keyID)
	}
	cluster.WaitFor(context.Background(), t, 90*time.Second, 2*time.Second, "/readyz/"+kmsCheck+" to recover", func() error {
		if code, body := apiGet(t, "/readyz/"+kmsCheck); code != http.StatusOK {
			return fmt.Errorf("/readyz/%s = %d %q", kmsCheck, code, body)
		}
		return nil
	})
	t.Logf("/readyz/%s recovered %v after the plugin restarted", kmsCheck, time.Since(restarted).Round(time.Millisecond))

	for name, data := range createSecrets(t, ns, "after-outage", 5) {
		secrets[name] = data
	}
	checkSecrets(t, ns, secrets)

	// A fresh apiserver has no cached DEK seeds: every read decrypts
	// through the restarted plugin.
	if err := c.APIServer.Restart(context.Background()); err != nil {
		t.Fatalf("restart kube-apiserver: %v", err)
	}
	list, err := c.Client.CoreV1().Secrets(ns).List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatalf("list secrets after restarts: %v", err)
	}
	if len(list.Items) != len(secrets) {
		t.Errorf("listed %d secrets in %s, want %d", len(list.Items), ns, len(secrets))
	}
	checkSecrets(t, ns, secrets)
}

// TestKeyRotation rotates the local keyset and checks that kube-apiserver
// picks up the new key ID, and that a no-op update rewrites an old Secret
// under it without changing what it reads back.
func TestKeyRotation(t *testing.T) {
	setup(t)
	ctx := context.Background()
	ns := newNamespace(t)
	oldKeyID := pluginKeyID(t)
	secrets := createSecrets(t, ns, "old", 10)
	for name := range secrets {
		if got := storedKeyID(t, ns, name); got != oldKeyID {
			t.Fatalf("%s: stored under key ID %q before rotation, want the plugin's %q", name, got, oldKeyID)
		}
	}

	if _, err := c.Plugin.RotateKeyset(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := c.Plugin.WaitForKeyIDChange(ctx, oldKeyID, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	newKeyID := st.KeyID

	// kube-apiserver polls Status every minute, and on every /readyz probe
	// older than 20s, as the kubelet's readiness probe does; a write shows
	// which key ID it encrypts with.
	rotated := time.Now()
	canary := 0
	cluster.WaitFor(context.Background(), t, 3*time.Minute, 2*time.Second, "kube-apiserver to write with the new key ID", func() error {
		apiGet(t, "/readyz")
		canary++
		name := fmt.Sprintf("canary-%d", canary)
		createSecret(t, ns, name, map[string][]byte{"canary": []byte(name)})
		if got := storedKeyID(t, ns, name); got != newKeyID {
			return fmt.Errorf("%s stored under key ID %q, want %q", name, got, newKeyID)
		}
		return nil
	})
	t.Logf("kube-apiserver wrote with the new key ID %v after the plugin reported it", time.Since(rotated).Round(time.Millisecond))

	for name, data := range secrets {
		s, err := c.Client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("get %s: %v", name, err)
		}
		updated, err := c.Client.CoreV1().Secrets(ns).Update(ctx, s, metav1.UpdateOptions{})
		if err != nil {
			t.Fatalf("no-op update of %s: %v", name, err)
		}
		if updated.ResourceVersion == s.ResourceVersion {
			t.Errorf("%s: no-op update kept resourceVersion %s; a stale object must be rewritten", name, s.ResourceVersion)
		}
		if got := storedKeyID(t, ns, name); got != newKeyID {
			t.Errorf("%s: after a no-op update stored under key ID %q, want %q", name, got, newKeyID)
		}
		if !equalData(updated.Data, data) {
			t.Errorf("%s: no-op update returned different data", name)
		}
	}
	checkSecrets(t, ns, secrets)
}

// controlPlaneBinaries returns the kube-apiserver and etcd binaries the
// tests run (cluster.KubeAPIServerBinary, cluster.EtcdBinary), or fails t.
func controlPlaneBinaries(t *testing.T) (apiserver, etcd string) {
	t.Helper()
	apiserver, err := cluster.KubeAPIServerBinary()
	if err != nil {
		t.Fatal(err)
	}
	etcd, err = cluster.EtcdBinary()
	if err != nil {
		t.Fatal(err)
	}
	return apiserver, etcd
}

// setup makes t dump the process logs if it fails.
func setup(t *testing.T) {
	t.Helper()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process logs:\n%s", c.LogTails(60))
		}
	})
}

// restoreOnExit makes sure that, whatever t did, the plugin and
// kube-apiserver run and are ready when t ends.
func restoreOnExit(t *testing.T) {
	t.Helper()
	t.Cleanup(func() {
		ctx := context.Background()
		if !c.Plugin.Process().Running() {
			if err := c.Plugin.Start(ctx); err != nil {
				t.Errorf("restore kms-plugin: %v", err)
			}
		}
		if !c.APIServer.Process().Running() {
			if err := c.APIServer.Start(ctx); err != nil {
				t.Errorf("restore kube-apiserver: %v", err)
			}
		}
		if err := c.APIServer.WaitReady(ctx, "/readyz", 2*time.Minute); err != nil {
			t.Errorf("restore: %v", err)
		}
	})
}

var unsafeName = regexp.MustCompile(`[^a-z0-9]+`)

// newNamespace creates a namespace named after t.
func newNamespace(t *testing.T) string {
	t.Helper()
	slug := strings.Trim(unsafeName.ReplaceAllString(strings.ToLower(t.Name()), "-"), "-")
	name := fmt.Sprintf("%.40s-%s", slug, cluster.RandomHex(3))
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if _, err := c.Client.CoreV1().Namespaces().Create(context.Background(), ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create namespace %s: %v", name, err)
	}
	return name
}

// createSecrets creates n Secrets named prefix-i with random values and
// returns their data by name.
func createSecrets(t *testing.T, ns, prefix string, n int) map[string]map[string][]byte {
	t.Helper()
	secrets := make(map[string]map[string][]byte, n)
	for i := range n {
		name := fmt.Sprintf("%s-%d", prefix, i)
		data := map[string][]byte{
			"username": []byte("e2e-user-" + cluster.RandomHex(8)),
			"password": []byte("e2e-password-" + cluster.RandomHex(16)),
		}
		createSecret(t, ns, name, data)
		secrets[name] = data
	}
	return secrets
}

func createSecret(t *testing.T, ns, name string, data map[string][]byte) {
	t.Helper()
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Data: data}
	if _, err := c.Client.CoreV1().Secrets(ns).Create(context.Background(), s, metav1.CreateOptions{}); err != nil {
		t.Fatalf("create secret %s/%s: %v", ns, name, err)
	}
}

// checkSecrets reads every Secret through the API and compares its data.
func checkSecrets(t *testing.T, ns string, want map[string]map[string][]byte) {
	t.Helper()
	for name, data := range want {
		s, err := c.Client.CoreV1().Secrets(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			t.Errorf("get secret %s/%s: %v", ns, name, err)
			continue
		}
		if !equalData(s.Data, data) {
			t.Errorf("secret %s/%s: data differs from what was written", ns, name)
		}
	}
}

func equalData(a, b map[string][]byte) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

func rawSecrets(t *testing.T, ns string, secrets map[string]map[string][]byte) map[string][]byte {
	t.Helper()
	raw := make(map[string][]byte, len(secrets))
	for name := range secrets {
		v, err := c.RawSecret(context.Background(), ns, name)
		if err != nil {
			t.Fatal(err)
		}
		raw[name] = v
	}
	return raw
}

func storedKeyID(t *testing.T, ns, name string) string {
	t.Helper()
	obj, err := c.StoredSecret(context.Background(), ns, name)
	if err != nil {
		t.Fatal(err)
	}
	return obj.KeyID
}

func pluginKeyID(t *testing.T) string {
	t.Helper()
	st, err := c.Plugin.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st.KeyID
}

// apiGet does an authenticated GET on kube-apiserver; transport errors fail t.
func apiGet(t *testing.T, path string) (int, string) {
	t.Helper()
	code, body, err := c.APIServer.Get(context.Background(), path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return code, body
}
