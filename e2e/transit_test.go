package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// TestVaultTransit runs a one-node control plane (real etcd and
// kube-apiserver) whose plugin uses the vault provider against a real
// Vault core (e2e/tools/vault-server): Secrets encrypted at rest under the
// transit key, kube-apiserver and plugin restarts, Vault killed and
// restarted, `kms-plugin rotate` end to end, a rotation made by Vault's
// auto_rotate_period followed by the plugin, and min_decryption_version
// raised by rotate's retire only once verify shows nothing under the old
// versions. The subtests share the control plane and run in order.
func TestVaultTransit(t *testing.T) {
	ctx := context.Background()
	if _, err := cluster.VaultServerBinary(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("the Vault server is needed: %v", err)
		}
		t.Skipf("no Vault server (bash e2e/tools/build.sh vault-server): %v", err)
	}
	pluginBin, cleanup, err := cluster.PluginBinary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	apiserverBin, etcdBin := controlPlaneBinaries(t)
	dir := cluster.TempDir(t, "kmsv-")
	start := time.Now()
	v, err := cluster.StartTransitVault(dir, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.Stop)
	const mount, key = "transit", "etcd-kek"
	// Exportable with plaintext backup only so that the test can age the
	// key for auto_rotate_period; a production key needs neither.
	token, err := v.SetupTransit(ctx, mount, key, map[string]any{"exportable": true, "allow_plaintext_backup": true})
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "vault-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	vaultArgs := []string{"--provider", "vault", "--vault-address", v.Addr, "--vault-key-name", key, "--vault-token-file", tokenFile}
	h, err := cluster.StartHA(ctx, cluster.HAConfig{
		PluginBinary: pluginBin, KubeAPIServerBinary: apiserverBin, EtcdBinary: etcdBin,
		Dir: dir, Nodes: 1, Resources: []string{"secrets"}, PluginArgs: vaultArgs, PluginPollInterval: time.Second,
	})
	if err != nil {
		t.Fatalf("start control plane with the vault provider: %v\n%s", err, v.LogTail(20))
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process logs:\n%s\n----- vault -----\n%s", h.LogTails(40), v.LogTail(30))
		}
		if err := h.Close(); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	t.Logf("Vault and a control plane with the vault provider ready in %v", time.Since(start).Round(time.Millisecond))
	e := &transitEnv{t: t, h: h, v: v, pluginBin: pluginBin, vaultArgs: vaultArgs, log: filepath.Join(dir, "rotate.log")}
	node := h.Nodes[0]
	ns := "vault-e2e"
	if _, err := h.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	written := map[string][]byte{}
	for i := range 20 {
		name := fmt.Sprintf("s-%02d", i)
		written[name] = e.create(ns, name)
	}

	t.Run("EncryptedAtRest", func(t *testing.T) {
		e.t = t
		st := e.status("1")
		objs, err := cluster.ScanStored(ctx, h.EtcdClient, "secrets", h.ProviderName)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, o := range objs {
			if o.Namespace != ns {
				continue
			}
			n++
			if !o.Encrypted || o.KeyID != st.KeyID {
				t.Fatalf("%s: encrypted %v under key_id %q (%v); want the plugin's %q", o.Key, o.Encrypted, o.KeyID, o.Err, st.KeyID)
			}
			if bytes.Contains(o.Raw, written[o.Name]) {
				t.Fatalf("%s: the plaintext is in etcd", o.Key)
			}
		}
		if n != len(written) {
			t.Fatalf("%d Secrets of %s in etcd; want %d", n, ns, len(written))
		}
		e.check(ns, written)
	})

	t.Run("APIServerRestart", func(t *testing.T) {
		e.t = t
		if err := node.APIServer.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		e.check(ns, written)
	})

	t.Run("PluginKill", func(t *testing.T) {
		e.t = t
		if err := node.Plugin.Kill(); err != nil {
			t.Fatal(err)
		}
		if err := node.Plugin.Start(ctx); err != nil {
			t.Fatal(err)
		}
		e.status("1")
		// A plugin started afresh unwraps every local KEK from Vault.
		if err := node.APIServer.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		e.check(ns, written)
		written["after-plugin-kill"] = e.create(ns, "after-plugin-kill")
	})

	t.Run("VaultKilledAndRestarted", func(t *testing.T) {
		e.t = t
		v.Kill()
		// kube-apiserver keeps reading and writing: the plugin encrypts
		// with its local KEK and decrypts from its cache.
		e.check(ns, written)
		written["during-outage"] = e.create(ns, "during-outage")
		e.waitReady(false, 15*time.Second)
		if err := v.Restart(); err != nil {
			t.Fatal(err)
		}
		back := time.Now()
		e.waitReady(true, 30*time.Second)
		t.Logf("plugin ready %v after Vault's restart", time.Since(back).Round(100*time.Millisecond))
		e.check(ns, written)
	})

	var v2 cluster.PluginStatus
	t.Run("Rotate", func(t *testing.T) {
		e.t = t
		before := e.status("1")
		e.rotate("--keep", "1")
		v2 = e.status("2")
		if v2.KeyID == before.KeyID {
			t.Fatal("key_id unchanged by rotate")
		}
		e.verifyClean(v2.KeyID, len(written))
		k, err := v.Key(ctx, mount, key)
		if err != nil || k.LatestVersion != 2 || k.MinDecryptionVersion != 1 {
			t.Fatalf("Vault key after rotate --keep 1 = %+v, %v; want latest 2, version 1 kept decryptable", k, err)
		}
		e.check(ns, written)
	})

	t.Run("AutoRotatePeriodFollowed", func(t *testing.T) {
		e.t = t
		// Vault rotates a key whose newest version is older than its
		// auto_rotate_period (at least 1h). Age version 2 by two hours
		// through a backup and restore, then seal and unseal so the transit
		// engine checks at once instead of within the hour.
		if err := v.Do(ctx, http.MethodPost, mount+"/keys/"+key+"/config", map[string]any{"auto_rotate_period": "1h"}, nil); err != nil {
			t.Fatal(err)
		}
		e.ageLatestVersion(mount, key, 2*time.Hour)
		if err := v.Seal(ctx); err != nil {
			t.Fatal(err)
		}
		if err := v.Unseal(ctx); err != nil {
			t.Fatal(err)
		}
		cluster.WaitFor(ctx, t, 30*time.Second, 200*time.Millisecond, "Vault's own rotation to version 3", func() error {
			k, err := v.Key(ctx, mount, key)
			if err != nil {
				return err
			}
			if k.LatestVersion != 3 {
				return fmt.Errorf("latest_version %d", k.LatestVersion)
			}
			return nil
		})
		rotatedAt := time.Now()
		st, err := node.Plugin.WaitForKeyIDChange(ctx, v2.KeyID, 30*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if st.RemoteVersion != "3" {
			t.Fatalf("plugin follows version %q; want 3", st.RemoteVersion)
		}
		t.Logf("plugin on Vault's new version %v after it appeared (poll 1s)", time.Since(rotatedAt).Round(100*time.Millisecond))
		e.check(ns, written)
		// kube-apiserver takes the new key_id from the plugin's Status (it
		// asks about once a minute, sooner after a key_id change shows in an
		// Encrypt): wait until new writes carry it.
		i := 0
		cluster.WaitFor(ctx, t, 2*time.Minute, 2*time.Second, "new writes under Vault's new version", func() error {
			i++
			name := fmt.Sprintf("probe-%d", i)
			written[name] = e.create(ns, name)
			if e.storedKeyID(ns, name) != st.KeyID {
				return fmt.Errorf("%s stored under another key_id", name)
			}
			return nil
		})
		// The key is rotated already: kms-plugin rotate, though min-age
		// says no rotation is due, adopts Vault's version 3 and only
		// converges, re-encrypts and verifies, creating no version. (Keep 2:
		// the ageing above made version 2 look older than version 1, which
		// a real Vault never does; RetireAfterVerify retires them.)
		e.rotate("--keep", "2", "--min-age", "720h")
		e.verifyClean(st.KeyID, len(written))
		k, err := v.Key(ctx, mount, key)
		if err != nil || k.LatestVersion != 3 || k.MinDecryptionVersion != 1 {
			t.Fatalf("Vault key after rotate = %+v, %v; want still latest 3 (adopted, none created), versions 1 and 2 kept", k, err)
		}
		e.check(ns, written)
	})

	t.Run("RetireAfterVerify", func(t *testing.T) {
		e.t = t
		// rotate --keep 0: a new version 4, every Secret re-encrypted under
		// it, verified, and only then versions 1-3 retired: Vault's
		// min_decryption_version rises to 4.
		e.rotate("--keep", "0")
		v4 := e.status("4")
		e.verifyClean(v4.KeyID, len(written))
		k, err := v.Key(ctx, mount, key)
		if err != nil || k.LatestVersion != 4 || k.MinDecryptionVersion != 4 {
			t.Fatalf("Vault key after rotate --keep 0 = %+v, %v; want latest 4, min_decryption_version 4", k, err)
		}
		// Nothing used the old versions: everything still reads, also
		// through a plugin that starts without a cache.
		if err := node.Plugin.Kill(); err != nil {
			t.Fatal(err)
		}
		if err := node.Plugin.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if err := node.APIServer.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		e.check(ns, written)
		// The old versions are gone for decryption: Vault refuses them.
		var ct struct {
			Ciphertext string `json:"ciphertext"`
		}
		if err := v.Do(ctx, http.MethodPost, mount+"/encrypt/"+key, map[string]any{"plaintext": base64.StdEncoding.EncodeToString([]byte("x"))}, &ct); err != nil {
			t.Fatal(err)
		}
		old := strings.Replace(ct.Ciphertext, "vault:v4:", "vault:v3:", 1)
		if err := v.Do(ctx, http.MethodPost, mount+"/decrypt/"+key, map[string]any{"ciphertext": old}, nil); err == nil || !strings.Contains(err.Error(), "too old") {
			t.Fatalf("decrypt under retired version 3 = %v; want Vault's too old", err)
		}
	})
}

type transitEnv struct {
	t         *testing.T
	h         *cluster.HA
	v         *cluster.TransitVault
	pluginBin string
	vaultArgs []string
	log       string
}

func (e *transitEnv) create(ns, name string) []byte {
	e.t.Helper()
	val := []byte("value-" + cluster.RandomHex(16))
	_, err := e.h.Client.CoreV1().Secrets(ns).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: name}, Data: map[string][]byte{"v": val},
	}, metav1.CreateOptions{})
	if err != nil {
		e.t.Fatalf("create %s/%s: %v", ns, name, err)
	}
	return val
}

// storedKeyID is the key_id etcd holds ns/name under.
func (e *transitEnv) storedKeyID(ns, name string) string {
	e.t.Helper()
	objs, err := cluster.ScanStored(context.Background(), e.h.EtcdClient, "secrets", e.h.ProviderName)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, o := range objs {
		if o.Namespace == ns && o.Name == name {
			return o.KeyID
		}
	}
	e.t.Fatalf("%s/%s not in etcd", ns, name)
	return ""
}

func (e *transitEnv) check(ns string, want map[string][]byte) {
	e.t.Helper()
	for name, val := range want {
		s, err := e.h.Client.CoreV1().Secrets(ns).Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			e.t.Fatalf("get %s/%s: %v", ns, name, err)
		}
		if !bytes.Equal(s.Data["v"], val) {
			e.t.Fatalf("%s/%s holds %q; want %q", ns, name, s.Data["v"], val)
		}
	}
}

// status waits for the plugin to be ready on the vault provider at
// version and returns its status.
func (e *transitEnv) status(version string) cluster.PluginStatus {
	e.t.Helper()
	var st cluster.PluginStatus
	cluster.WaitFor(context.Background(), e.t, 30*time.Second, 200*time.Millisecond, "plugin on Vault key version "+version, func() error {
		var err error
		st, err = e.h.Nodes[0].Plugin.Status(context.Background())
		if err != nil {
			return err
		}
		if st.Provider != "vault" || st.RemoteVersion != version {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	return st
}

func (e *transitEnv) waitReady(ready bool, timeout time.Duration) {
	e.t.Helper()
	cluster.WaitFor(context.Background(), e.t, timeout, 200*time.Millisecond, fmt.Sprintf("plugin /readyz ready=%v", ready), func() error {
		code, _, err := e.h.Nodes[0].Plugin.Get(context.Background(), "/readyz")
		if err != nil {
			return err
		}
		if (code == http.StatusOK) != ready {
			return fmt.Errorf("/readyz %d", code)
		}
		return nil
	})
}

func (e *transitEnv) rotate(extra ...string) {
	e.t.Helper()
	args := append(e.h.RotateArgs(), e.vaultArgs...)
	args = append(args, "--min-age", "0s", "--converge-timeout", "2m", "--migration", "update")
	start := time.Now()
	res, err := cluster.Command{Binary: e.pluginBin, Args: append(args, extra...), Timeout: 4 * time.Minute, LogPath: e.log}.Run(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	if res.ExitCode != 0 {
		e.t.Fatalf("rotate %v: %s", extra, res)
	}
	e.t.Logf("rotate %v: exit 0 in %v", extra, time.Since(start).Round(100*time.Millisecond))
}

func (e *transitEnv) verifyClean(keyID string, min int) {
	e.t.Helper()
	args := append(e.h.VerifyArgs(), "--expect-key-id", keyID)
	res, err := cluster.Command{Binary: e.pluginBin, Args: args, Timeout: time.Minute, LogPath: e.log}.Run(context.Background())
	if err != nil {
		e.t.Fatal(err)
	}
	if res.ExitCode != 0 {
		e.t.Fatalf("verify: %s\n%s", res, res.Stdout)
	}
	r, err := cluster.ParseVerifyReport(res.Stdout)
	if err != nil {
		e.t.Fatal(err)
	}
	sec, ok := r.Resource("secrets")
	if !ok || sec.Total < min || sec.Unencrypted != 0 || len(sec.ByKey) != 1 || sec.ByKey[0].KeyID != keyID {
		e.t.Fatalf("verify: %+v; want every Secret (at least %d) under %s", sec, min, keyID)
	}
}

// ageLatestVersion rewrites the key's newest version's creation time to
// age ago through transit's backup and restore (the key must be
// exportable with plaintext backup allowed).
func (e *transitEnv) ageLatestVersion(mount, key string, age time.Duration) {
	e.t.Helper()
	ctx := context.Background()
	var b struct {
		Backup string `json:"backup"`
	}
	if err := e.v.Do(ctx, http.MethodGet, mount+"/backup/"+key, nil, &b); err != nil {
		e.t.Fatal(err)
	}
	raw, err := base64.StdEncoding.DecodeString(b.Backup)
	if err != nil {
		e.t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var doc map[string]any
	if err := dec.Decode(&doc); err != nil {
		e.t.Fatal(err)
	}
	policy, _ := doc["policy"].(map[string]any)
	keys, _ := policy["keys"].(map[string]any)
	latest, _ := policy["latest_version"].(json.Number)
	entry, _ := keys[latest.String()].(map[string]any)
	if entry == nil {
		e.t.Fatalf("backup has no key entry for version %s", latest)
	}
	old := time.Now().Add(-age).UTC()
	// KeyEntry: "time" is the creation time auto-rotation reads,
	// "creation_time" its older Unix-seconds copy.
	entry["time"] = old.Format(time.RFC3339Nano)
	entry["creation_time"] = old.Unix()
	out, err := json.Marshal(doc)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := e.v.Do(ctx, http.MethodPost, mount+"/restore/"+key, map[string]any{"backup": base64.StdEncoding.EncodeToString(out), "force": true}, nil); err != nil {
		e.t.Fatal(err)
	}
}
