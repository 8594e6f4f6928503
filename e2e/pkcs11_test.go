package e2e

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// TestPKCS11 runs a one-node control plane whose plugin is the PKCS#11
// build on a SoftHSM2 token: Secrets encrypted at rest, kube-apiserver
// restarted, the plugin killed and restarted, `kms-plugin rotate` end to
// end (the superseded version retired on the token, CKA_ENCRYPT false, its
// data still readable), and the old version disabled with `kms-plugin
// keyset retire` (CKA_DECRYPT false) refused with a clear error. The
// subtests share the cluster and run in order.
func TestPKCS11(t *testing.T) {
	ctx := context.Background()
	if err := cluster.SoftHSMTools(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	bin, cleanup, err := cluster.PKCS11PluginBinary(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer cleanup()
	apiserverBin, etcdBin := controlPlaneBinaries(t)
	dir := cluster.TempDir(t, "kmsp-")
	hsm, err := cluster.NewSoftHSM(ctx, dir, "kms-e2e")
	if err != nil {
		t.Fatal(err)
	}
	const keyLabel = "etcd-kek"
	providerArgs := hsm.ProviderArgs(keyLabel)
	start := time.Now()
	h, err := cluster.StartHA(ctx, cluster.HAConfig{
		PluginBinary: bin, KubeAPIServerBinary: apiserverBin, EtcdBinary: etcdBin, Dir: dir, Nodes: 1,
		PluginArgs: providerArgs, PluginEnv: hsm.Env(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("process logs:\n%s", h.LogTails(40))
		}
		if err := h.Close(); err != nil {
			t.Errorf("stop control plane: %v", err)
		}
	})
	t.Logf("1-node control plane on SoftHSM ready in %v", time.Since(start).Round(time.Millisecond))
	n := h.Nodes[0]

	const ns = "pkcs11"
	if _, err := h.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	for i := range 20 {
		name := "secret-" + string(rune('a'+i))
		value := "pkcs11-plaintext-" + name
		want[name] = value
		if _, err := h.Client.CoreV1().Secrets(ns).Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: name},
			Data: map[string][]byte{"v": []byte(value)}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	readAll := func(t *testing.T) {
		t.Helper()
		for name, value := range want {
			s, err := h.Client.CoreV1().Secrets(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil || string(s.Data["v"]) != value {
				t.Fatalf("get secret %s: %v (data %q)", name, err, s.Data["v"])
			}
		}
	}
	raw := func(t *testing.T, name string) []byte {
		t.Helper()
		resp, err := h.EtcdClient.Get(ctx, cluster.SecretKey(ns, name))
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("etcd get %s: %v", name, err)
		}
		return resp.Kvs[0].Value
	}
	status := func(t *testing.T) cluster.PluginStatus {
		t.Helper()
		st, err := n.Plugin.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}

	var v1 cluster.PluginStatus
	var oldRaw []byte
	t.Run("EncryptedAtRest", func(t *testing.T) {
		v1 = status(t)
		if v1.Provider != "pkcs11" || v1.RemoteVersion == "" {
			t.Fatalf("/status = %+v; want provider pkcs11 and a version", v1)
		}
		keys, err := hsm.SecretKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		k, ok := keys[v1.RemoteVersion]
		if !ok || k.Label != keyLabel || !k.Has("encrypt") || !k.Has("decrypt") || !slices.Contains(k.Access, "sensitive") || !slices.Contains(k.Access, "never extractable") {
			t.Fatalf("token objects %+v; want version %s labelled %s, encrypt and decrypt, sensitive, never extractable", keys, v1.RemoteVersion, keyLabel)
		}
		for name, value := range want {
			r := raw(t, name)
			if bytes.Contains(r, []byte(value)) {
				t.Fatalf("secret %s is stored in clear", name)
			}
			obj, err := cluster.DecodeStored(r, h.ProviderName)
			if err != nil {
				t.Fatal(err)
			}
			if obj.KeyID != v1.KeyID {
				t.Fatalf("secret %s stored under key_id %s; want %s", name, obj.KeyID, v1.KeyID)
			}
		}
		oldRaw = raw(t, "secret-a")
		readAll(t)
		code, body, err := n.Plugin.Get(ctx, "/metrics")
		if err != nil || code != 200 {
			t.Fatalf("GET /metrics: %d %v", code, err)
		}
		for _, line := range []string{`kms_plugin_provider_pkcs11_pin_refused{provider="pkcs11"} 0`, `kms_plugin_provider_pkcs11_token_lost{provider="pkcs11"} 0`} {
			if !bytes.Contains(body, []byte(line+"\n")) {
				t.Errorf("/metrics lacks %q", line)
			}
		}
	})

	t.Run("APIServerRestart", func(t *testing.T) {
		if err := n.APIServer.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := n.APIServer.Start(ctx); err != nil {
			t.Fatal(err)
		}
		readAll(t)
	})

	t.Run("PluginKill", func(t *testing.T) {
		if err := n.Plugin.Kill(); err != nil {
			t.Fatal(err)
		}
		if err := n.Plugin.Start(ctx); err != nil {
			t.Fatal(err)
		}
		if st := status(t); st.KeyID != v1.KeyID {
			t.Fatalf("restarted plugin reports key_id %s; want %s", st.KeyID, v1.KeyID)
		}
		// A restarted apiserver too: every DEK seed goes through the new
		// plugin process, which unwraps its local KEK in the token.
		if err := n.APIServer.Stop(); err != nil {
			t.Fatal(err)
		}
		if err := n.APIServer.Start(ctx); err != nil {
			t.Fatal(err)
		}
		readAll(t)
	})

	var v2 cluster.PluginStatus
	t.Run("Rotate", func(t *testing.T) {
		args := append(h.RotateArgs(), providerArgs...)
		args = append(args, "--min-age", "0s", "--converge-timeout", "2m")
		res, err := cluster.Command{Binary: bin, Args: args, Env: hsm.Env(), Timeout: 4 * time.Minute, LogPath: filepath.Join(dir, "rotate.log")}.Run(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if res.ExitCode != 0 {
			t.Fatalf("kms-plugin rotate: %s", res)
		}
		t.Logf("rotate: exit 0 in %v", res.Duration.Round(time.Millisecond))
		v2 = status(t)
		if v2.KeyID == v1.KeyID || v2.RemoteVersion == v1.RemoteVersion {
			t.Fatalf("key_id %s unchanged by rotate", v2.KeyID)
		}
		for name := range want {
			obj, err := cluster.DecodeStored(raw(t, name), h.ProviderName)
			if err != nil || obj.KeyID != v2.KeyID {
				t.Fatalf("secret %s after rotate: %v, key_id %v; want %s", name, err, obj, v2.KeyID)
			}
		}
		readAll(t)
		// The token's own view: the superseded version retired (no
		// encrypt), still decrypts; the new one does both.
		keys, err := hsm.SecretKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if old := keys[v1.RemoteVersion]; old.Has("encrypt") || !old.Has("decrypt") {
			t.Fatalf("old version %s on the token: usage %v; want decrypt without encrypt (CKA_ENCRYPT false)", v1.RemoteVersion, old.Usage)
		}
		if cur := keys[v2.RemoteVersion]; !cur.Has("encrypt") || !cur.Has("decrypt") {
			t.Fatalf("new version %s on the token: usage %v; want encrypt and decrypt", v2.RemoteVersion, cur.Usage)
		}
	})

	t.Run("RetiredVersionStillDecrypts", func(t *testing.T) {
		// A value written under the old version, as a backup restored
		// into etcd would bring it back: the restarted plugin (nothing
		// cached) unwraps its local KEK with the retired version.
		if err := n.Plugin.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		obj, err := cluster.DecodeStored(oldRaw, h.ProviderName)
		if err != nil {
			t.Fatal(err)
		}
		if err := n.Plugin.DecryptStored(ctx, obj); err != nil {
			t.Fatalf("decrypt of data stored under the retired version: %v", err)
		}
		if _, err := h.EtcdClient.Put(ctx, cluster.SecretKey(ns, "secret-a"), string(oldRaw)); err != nil {
			t.Fatal(err)
		}
		readAll(t)
	})

	t.Run("DisabledVersionRefused", func(t *testing.T) {
		// Put the current data back first: nothing stored depends on v1.
		s, err := h.Client.CoreV1().Secrets(ns).Get(ctx, "secret-a", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := h.Client.CoreV1().Secrets(ns).Update(ctx, s, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		res, err := cluster.Command{Binary: bin, Args: append([]string{"keyset", "retire", v1.RemoteVersion}, providerArgs...), Env: hsm.Env(), Timeout: time.Minute}.Run(ctx)
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("kms-plugin keyset retire: %v %s", err, res)
		}
		t.Logf("keyset retire: %s", strings.TrimSpace(string(res.Stdout)))
		keys, err := hsm.SecretKeys(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if old := keys[v1.RemoteVersion]; old.Has("encrypt") || old.Has("decrypt") {
			t.Fatalf("disabled version %s on the token: usage %v; want neither encrypt nor decrypt", v1.RemoteVersion, old.Usage)
		}
		if _, ok := keys[v1.RemoteVersion]; !ok {
			t.Fatalf("the disabled version's object is gone: nothing may be destroyed")
		}
		if err := n.Plugin.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		obj, err := cluster.DecodeStored(oldRaw, h.ProviderName)
		if err != nil {
			t.Fatal(err)
		}
		err = n.Plugin.DecryptStored(ctx, obj)
		if err == nil || !strings.Contains(err.Error(), "CKA_DECRYPT is false (the version is disabled)") {
			t.Fatalf("decrypt of data under the disabled version = %v; want a refusal saying the version is disabled", err)
		}
		t.Logf("decrypt under the disabled version: %v", err)
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(n.Plugin.Process().LogTail(200), "CKA_DECRYPT is false") {
			if time.Now().After(deadline) {
				t.Fatalf("the plugin's log does not say why (CKA_DECRYPT is false):\n%s", n.Plugin.Process().LogTail(20))
			}
			time.Sleep(100 * time.Millisecond)
		}
		// Everything stored now is under the current version.
		readAll(t)
	})

	t.Run("NoPINInLogs", func(t *testing.T) {
		for _, f := range []string{n.Plugin.Process().LogPath, filepath.Join(dir, "rotate.log")} {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if bytes.Contains(data, []byte(hsm.PIN)) {
				t.Fatalf("%s holds the PIN", f)
			}
		}
	})
}
