package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// Durations of the Azure fault scenarios, scaled down from the "several
// minutes" of a real incident to keep the run short.
const (
	azureOutage = 2 * time.Minute
	azureStorm  = 45 * time.Second
)

// kvtestState is the state file kvtestd writes (kvtest.State).
type kvtestState struct {
	VaultURL      string `json:"vaultURL"`
	AuthorityHost string `json:"authorityHost"`
	TenantID      string `json:"tenantID"`
	ProxyURL      string `json:"proxyURL"`
	AdminURL      string `json:"adminURL"`
	CAFile        string `json:"caFile"`
}

// fakeVault is a kvtestd process: the in-repo Key Vault protocol server with
// its Entra ID token endpoint and proxy, driven over its admin API.
type fakeVault struct {
	kvtestState
	proc *cluster.Process
	http *http.Client
}

// startFakeVault builds and starts kvtestd in dir.
func startFakeVault(t *testing.T, dir string) *fakeVault {
	t.Helper()
	root, err := cluster.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "kvtestd")
	cmd := exec.Command("go", "build", "-o", bin, "./internal/provider/azurekv/kvtest/kvtestd")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build kvtestd: %v\n%s", err, out)
	}
	statePath := filepath.Join(dir, "kvtest-state.json")
	v := &fakeVault{
		proc: &cluster.Process{Name: "kvtestd", Path: bin, Args: []string{"-state", statePath}, LogPath: filepath.Join(dir, "kvtestd.log")},
		http: &http.Client{Timeout: 10 * time.Second},
	}
	if err := v.proc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = v.proc.Stop() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		data, err := os.ReadFile(statePath)
		if err == nil {
			if err := json.Unmarshal(data, &v.kvtestState); err != nil {
				t.Fatal(err)
			}
			return v
		}
		if time.Now().After(deadline) || !v.proc.Running() {
			t.Fatalf("kvtestd did not start: %v\n%s", err, v.proc.LogTail(20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// admin calls kvtestd's admin API and decodes its JSON answer into out.
func (v *fakeVault) admin(t *testing.T, method, path string, out any) {
	t.Helper()
	req, err := http.NewRequest(method, v.AdminURL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := v.http.Do(req)
	if err != nil {
		t.Fatalf("kvtestd %s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("kvtestd %s %s: %d %s", method, path, resp.StatusCode, body)
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			t.Fatalf("kvtestd %s %s: %v in %s", method, path, err, body)
		}
	}
}

func (v *fakeVault) post(t *testing.T, path string) map[string]string {
	t.Helper()
	out := map[string]string{}
	var raw map[string]any
	v.admin(t, http.MethodPost, path, &raw)
	for k, x := range raw {
		out[k] = fmt.Sprint(x)
	}
	return out
}

func (v *fakeVault) vaultCalls(t *testing.T) int64 {
	t.Helper()
	var calls map[string]int64
	v.admin(t, http.MethodGet, "/calls", &calls)
	return calls["vault"]
}

// TestAzureKeyVault runs a cluster whose plugin uses the azurekeyvault
// provider against kvtestd: the plugin process reaches the fake vault and
// Entra ID under their real-looking host names through HTTPS_PROXY, and
// trusts the fake's CA through SSL_CERT_FILE, with a client secret read
// from a file. The subtests share the cluster and run in order.
func TestAzureKeyVault(t *testing.T) {
	ctx := context.Background()
	pluginBin, cleanup, err := cluster.PluginBinary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	apiserverBin, etcdBin := controlPlaneBinaries(t)
	dir, err := os.MkdirTemp("", "kms-az-")
	if err != nil {
		t.Fatal(err)
	}
	vault := startFakeVault(t, dir)
	const keyName, clientID, secret = "kms-kek", "0b5bdb30-f5b6-4bb3-9c67-54f3c7cdb0e1", "e2e-client-secret-value"
	vault.post(t, "/keys?name="+keyName+"&kty=RSA&bits=3072")
	vault.post(t, "/secret?clientID="+clientID+"&secret="+secret)
	secretFile := filepath.Join(dir, "client-secret")
	if err := os.WriteFile(secretFile, []byte(secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	az, err := cluster.Start(ctx, cluster.Config{
		PluginBinary: pluginBin, KubeAPIServerBinary: apiserverBin, EtcdBinary: etcdBin, Dir: dir,
		ProviderName: "azure-e2e",
		PluginArgs: []string{
			"--provider", "azurekeyvault",
			"--azure-vault-url", vault.VaultURL,
			"--azure-key-name", keyName,
			"--azure-credential", "clientSecret",
			"--azure-tenant-id", vault.TenantID,
			"--azure-client-id", clientID,
			"--azure-client-secret-file", secretFile,
			"--azure-authority-host", vault.AuthorityHost,
		},
		PluginEnv: []string{"HTTPS_PROXY=" + vault.ProxyURL, "HTTP_PROXY=" + vault.ProxyURL, "NO_PROXY=", "no_proxy=", "SSL_CERT_FILE=" + vault.CAFile},
	})
	if err != nil {
		t.Fatalf("start cluster with the Azure provider (state in %s): %v", dir, err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process logs:\n%s\n%s", az.LogTails(60), vault.proc.LogTail(20))
			t.Logf("state kept in %s", dir)
		}
		if err := az.Close(); err != nil {
			t.Errorf("stop cluster: %v", err)
		}
		if !t.Failed() {
			os.RemoveAll(dir)
		}
	})
	e := &azEnv{t: t, c: az, vault: vault}
	ns := e.namespace("azure")
	written := map[string]map[string][]byte{}

	t.Run("EncryptsWithTheVaultKey", func(t *testing.T) {
		e.t = t
		st, err := az.Plugin.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if st.Provider != "azurekeyvault" || !strings.HasPrefix(st.RemoteVersion, vault.VaultURL+"/keys/"+keyName+"/") {
			t.Fatalf("plugin status %+v; want provider azurekeyvault on a version of %s/keys/%s", st, vault.VaultURL, keyName)
		}
		for i := range 5 {
			name := fmt.Sprintf("first-%d", i)
			written[name] = e.create(ns, name)
			if got := e.storedKeyID(ns, name); got != st.KeyID {
				t.Fatalf("%s stored under key_id %q; want the plugin's %q", name, got, st.KeyID)
			}
		}
		e.check(ns, written)
	})

	t.Run("NewKeyVersionWithoutRestart", func(t *testing.T) {
		e.t = t
		before, err := az.Plugin.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		kid := vault.post(t, "/rotate?name="+keyName)["kid"]
		st, err := az.Plugin.WaitForKeyIDChange(ctx, before.KeyID, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if st.RemoteVersion != kid {
			t.Fatalf("plugin follows %q; want the new version %q", st.RemoteVersion, kid)
		}
		// kube-apiserver notices the new key_id at its next Status (its
		// /readyz check asks every 20 s); then new writes carry it.
		e.waitNewWritesUse(ns, st.KeyID, 2*time.Minute)
		// Old Secrets: still readable, still under the old key_id until a
		// no-op update rewrites them.
		e.check(ns, written)
		if got := e.storedKeyID(ns, "first-0"); got != before.KeyID {
			t.Fatalf("first-0 under %q before its update; want the old %q", got, before.KeyID)
		}
		s, err := az.Client.CoreV1().Secrets(ns).Get(ctx, "first-0", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := az.Client.CoreV1().Secrets(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		if got := e.storedKeyID(ns, "first-0"); got != st.KeyID {
			t.Fatalf("first-0 under %q after a no-op update; want the new %q", got, st.KeyID)
		}
		e.check(ns, written)
	})

	t.Run("VaultOutage", func(t *testing.T) {
		e.t = t
		vault.post(t, "/outage?on=true")
		outageEnd := time.Now().Add(azureOutage)
		defer vault.post(t, "/outage?on=false")
		load := e.startLoad(ns, "outage")
		// The plugin reports the outage on /readyz...
		e.waitPluginReady(false, 30*time.Second)
		// ...while kube-apiserver keeps serving, and one restarted during
		// the outage still reads every Secret: their local KEKs are in the
		// plugin's cache.
		e.restarting.Store(true)
		err := az.APIServer.Restart(ctx)
		e.restarting.Store(false)
		if err != nil {
			t.Fatalf("restart kube-apiserver during the outage: %v", err)
		}
		e.check(ns, written)
		time.Sleep(time.Until(outageEnd))
		ok, failed, errs := load.stop()
		if failed > 0 || ok == 0 {
			t.Fatalf("during the outage %d requests succeeded and %d failed: %v", ok, failed, errs)
		}
		t.Logf("vault outage of %s: %d API writes and reads, none failed, kube-apiserver restarted in between", azureOutage, ok)
		for name, data := range load.written() {
			written[name] = data
		}
		vault.post(t, "/outage?on=false")
		e.waitPluginReady(true, 90*time.Second)
		e.check(ns, written)
	})

	t.Run("ThrottlingStorm", func(t *testing.T) {
		e.t = t
		before, err := az.Plugin.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		calls0 := vault.vaultCalls(t)
		vault.post(t, "/throttle?n=-1&retryAfter=1s")
		stormEnd := time.Now().Add(azureStorm)
		load := e.startLoad(ns, "storm")
		kid := vault.post(t, "/rotate?name="+keyName)["kid"] // a rotation the plugin cannot see yet
		time.Sleep(time.Until(stormEnd))
		ok, failed, errs := load.stop()
		vault.post(t, "/throttle?n=0")
		calls := vault.vaultCalls(t) - calls0
		if failed > 0 || ok == 0 {
			t.Fatalf("during the storm %d requests succeeded and %d failed: %v", ok, failed, errs)
		}
		// Bounded retries and the circuit breaker keep the plugin from
		// piling on: a few attempts per poll, then a 30 s pause.
		if limit := int64(azureStorm / time.Second); calls > limit {
			t.Fatalf("the plugin sent %d requests to a throttling vault in %s; want at most %d", calls, azureStorm, limit)
		}
		t.Logf("throttling storm of %s: %d API requests, none failed; %d vault calls", azureStorm, ok, calls)
		for name, data := range load.written() {
			written[name] = data
		}
		st, err := az.Plugin.WaitForKeyIDChange(ctx, before.KeyID, 90*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if st.RemoteVersion != kid {
			t.Fatalf("after the storm the plugin follows %q; want %q", st.RemoteVersion, kid)
		}
		e.check(ns, written)
	})

	t.Run("DisabledCurrentVersion", func(t *testing.T) {
		e.t = t
		e.disableCurrentVersion(ctx, ns, keyName, written)
	})
}

// disableCurrentVersion makes a new key version, writes under it, and
// disables it while writes continue. Within a poll the plugin wraps with
// the newest usable version and refuses to decrypt the disabled one's data
// (asked as a restarted kube-apiserver would ask); kube-apiserver follows
// at its next Status; no write fails, and none after the switch is under
// the disabled version. The writes that kube-apiserver made under the
// disabled version before it switched (KMS v2 keeps its write DEK until its
// next Status) are rewritten while it still holds their DEKs, as an
// operator revoking a version must do before a restart (kube-apiserver
// cannot list a resource holding an object it cannot decrypt). After a
// restart of the plugin and kube-apiserver, everything written reads back.
func (e *azEnv) disableCurrentVersion(ctx context.Context, ns, keyName string, written map[string]map[string][]byte) {
	t, az, vault := e.t, e.c, e.vault
	start := time.Now()
	fallback, err := az.Plugin.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	kid := vault.post(t, "/rotate?name="+keyName)["kid"]
	cur, err := az.Plugin.WaitForKeyIDChange(ctx, fallback.KeyID, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	e.waitNewWritesUse(ns, cur.KeyID, time.Minute)
	all := maps.Clone(written)
	for i := range 3 {
		name := fmt.Sprintf("revoked-%d", i)
		all[name] = e.create(ns, name)
	}

	load := e.startLoad(ns, "revoking")
	time.Sleep(time.Second)
	id := kid[strings.LastIndex(kid, "/")+1:]
	vault.post(t, "/enable?name="+keyName+"&version="+id+"&enabled=false")
	defer vault.post(t, "/enable?name="+keyName+"&version="+id+"&enabled=true")
	disabled := time.Now()
	st, err := az.Plugin.WaitForKeyIDChange(ctx, cur.KeyID, 10*time.Second)
	if err != nil {
		t.Fatalf("the plugin kept the disabled version: %v", err)
	}
	if want := fallback.RemoteVersion + "#after=" + id; st.RemoteVersion != want {
		t.Fatalf("after disabling the current version the plugin follows %q; want %q", st.RemoteVersion, want)
	}
	moved := time.Since(disabled)
	// The plugin no longer decrypts the disabled version's data, though
	// it held that local KEK unwrapped a poll ago.
	obj, err := az.StoredSecret(ctx, ns, "revoked-0")
	if err != nil {
		t.Fatal(err)
	}
	if err := az.Plugin.DecryptStored(ctx, obj); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("the plugin's Decrypt of data under the disabled version = %v; want FailedPrecondition", err)
	}
	e.waitNewWritesUse(ns, st.KeyID, time.Minute)
	time.Sleep(time.Second)
	ok, failed, errs := load.stop()
	if failed > 0 || ok == 0 {
		t.Fatalf("while the version was disabled %d requests succeeded and %d failed: %v", ok, failed, errs)
	}
	maps.Copy(all, load.written())

	// In write order: once a write is under the new key_id, none after it
	// is under the disabled version's.
	switched := false
	for i := 0; ; i++ {
		obj, err := az.StoredSecret(ctx, ns, fmt.Sprintf("revoking-%d", i))
		if err != nil {
			break // past the last write
		}
		switch {
		case obj.KeyID == cur.KeyID && switched:
			t.Fatalf("revoking-%d was written under the disabled version after writes moved to the usable one", i)
		case obj.KeyID != cur.KeyID:
			switched = true
		}
	}
	if !switched {
		t.Fatal("no write moved to the usable version")
	}

	// Rewrite what is under the disabled version while kube-apiserver
	// still holds its DEKs, then restart the node's plugin and apiserver.
	list, err := az.Client.CoreV1().Secrets(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	stale := 0
	for i := range list.Items {
		s := &list.Items[i]
		if obj, err := az.StoredSecret(ctx, s.Namespace, s.Name); err != nil || obj.KeyID != cur.KeyID {
			continue
		}
		stale++
		if _, err := az.Client.CoreV1().Secrets(s.Namespace).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		if obj, err := az.StoredSecret(ctx, s.Namespace, s.Name); err != nil || obj.KeyID == cur.KeyID {
			t.Fatalf("%s/%s still under the disabled version after a rewrite (%v)", s.Namespace, s.Name, err)
		}
	}
	if err := az.Plugin.Restart(ctx); err != nil {
		t.Fatalf("restart the plugin with the current version disabled: %v", err)
	}
	if err := az.APIServer.Restart(ctx); err != nil {
		t.Fatalf("restart kube-apiserver: %v", err)
	}
	e.check(ns, all)
	maps.Copy(written, all)
	t.Logf("disabled the current version under load: the plugin moved in %s; %d writes, none failed; %d Secrets under the disabled version (rewritten); all %d read back after a restart; %s",
		moved.Round(10*time.Millisecond), ok, stale, len(all), time.Since(start).Round(time.Second))
}

// azEnv holds the Azure cluster for the helpers.
type azEnv struct {
	t     *testing.T
	c     *cluster.Cluster
	vault *fakeVault
	// restarting is set while the test restarts kube-apiserver on purpose;
	// requests that fail meanwhile do not count.
	restarting atomic.Bool
}

func (e *azEnv) namespace(prefix string) string {
	e.t.Helper()
	name := prefix + "-" + cluster.RandomHex(3)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if _, err := e.c.Client.CoreV1().Namespaces().Create(context.Background(), ns, metav1.CreateOptions{}); err != nil {
		e.t.Fatal(err)
	}
	return name
}

func (e *azEnv) create(ns, name string) map[string][]byte {
	e.t.Helper()
	data, err := e.tryCreate(context.Background(), ns, name)
	if err != nil {
		e.t.Fatal(err)
	}
	return data
}

func (e *azEnv) tryCreate(ctx context.Context, ns, name string) (map[string][]byte, error) {
	data := map[string][]byte{"password": []byte("azure-e2e-" + name + "-" + cluster.RandomHex(8))}
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns}, Data: data}
	if _, err := e.c.Client.CoreV1().Secrets(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("create %s/%s: %w", ns, name, err)
	}
	return data, nil
}

func (e *azEnv) check(ns string, want map[string]map[string][]byte) {
	e.t.Helper()
	for name, data := range want {
		s, err := e.c.Client.CoreV1().Secrets(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			e.t.Fatalf("get %s/%s: %v", ns, name, err)
		}
		if !equalData(s.Data, data) {
			e.t.Fatalf("%s/%s: data differs from what was written", ns, name)
		}
	}
}

func (e *azEnv) storedKeyID(ns, name string) string {
	e.t.Helper()
	obj, err := e.c.StoredSecret(context.Background(), ns, name)
	if err != nil {
		e.t.Fatal(err)
	}
	return obj.KeyID
}

// waitNewWritesUse writes probe Secrets until one is stored under keyID,
// asking kube-apiserver's KMS readiness check in between (it calls Status).
func (e *azEnv) waitNewWritesUse(ns, keyID string, timeout time.Duration) {
	e.t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	tag := cluster.RandomHex(3)
	for i := 0; ; i++ {
		_, _, _ = e.c.APIServer.Get(ctx, "/readyz/"+kmsCheck)
		name := fmt.Sprintf("probe-%s-%d", tag, i)
		e.create(ns, name)
		if e.storedKeyID(ns, name) == keyID {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("after %s new writes still do not use key_id %q", timeout, keyID)
		}
		time.Sleep(2 * time.Second)
	}
}

// waitPluginReady waits until the plugin's /readyz is 200 (ready) or not.
func (e *azEnv) waitPluginReady(ready bool, timeout time.Duration) {
	e.t.Helper()
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	for {
		code, body, err := e.c.Plugin.Get(ctx, "/readyz")
		if err == nil && (code == http.StatusOK) == ready {
			return
		}
		if time.Now().After(deadline) {
			e.t.Fatalf("plugin /readyz = %d %q, %v after %s; want ready=%v", code, body, err, timeout, ready)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// load writes a Secret and reads back an earlier one every 200 ms until
// stopped, counting successes and failures.
type load struct {
	ok, failed atomic.Int64
	cancel     context.CancelFunc
	done       chan struct{}
	mu         sync.Mutex
	errs       []error
	data       map[string]map[string][]byte
}

func (e *azEnv) startLoad(ns, prefix string) *load {
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{cancel: cancel, done: make(chan struct{}), data: map[string]map[string][]byte{}}
	go func() {
		defer close(l.done)
		for i := 0; ctx.Err() == nil; i++ {
			name := fmt.Sprintf("%s-%d", prefix, i)
			restarting := e.restarting.Load()
			rctx, rcancel := context.WithTimeout(ctx, 20*time.Second)
			data, err := e.tryCreate(rctx, ns, name)
			if err == nil {
				var s *corev1.Secret
				s, err = e.c.Client.CoreV1().Secrets(ns).Get(rctx, name, metav1.GetOptions{})
				if err == nil && !bytes.Equal(s.Data["password"], data["password"]) {
					err = errors.New(name + ": read back other data")
				}
			}
			rcancel()
			switch {
			case err == nil:
				l.ok.Add(1)
				l.mu.Lock()
				l.data[name] = data
				l.mu.Unlock()
			case ctx.Err() != nil:
			case restarting || e.restarting.Load():
				// kube-apiserver is being restarted by the test: wait.
				time.Sleep(time.Second)
			default:
				l.failed.Add(1)
				l.mu.Lock()
				l.errs = append(l.errs, err)
				l.mu.Unlock()
			}
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	return l
}

func (l *load) stop() (ok, failed int64, errs []error) {
	l.cancel()
	<-l.done
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.ok.Load(), l.failed.Load(), l.errs
}

func (l *load) written() map[string]map[string][]byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.data
}
