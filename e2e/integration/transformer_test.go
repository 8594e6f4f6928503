package integration

import (
	"context"
	"os"
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/apiserver/pkg/storage/value"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// TestRoundTrip1000 writes 1,000 secrets through kube-apiserver's KMS v2
// transformer into etcd and reads every one back.
func TestRoundTrip1000(t *testing.T) {
	e := newEnv(t)
	tr := e.load(t)
	objs := e.writeObjects(t, tr, "secret", 1000)

	resp, err := etcd.Get(context.Background(), e.keyPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.Count; got != int64(len(objs)) {
		t.Fatalf("etcd holds %d objects under %s, want %d", got, e.keyPrefix, len(objs))
	}
	readObjects(t, tr, objs, false)
}

// TestStoredFormat checks what lands in etcd: the KMS v2 prefix of the
// provider, then a valid EncryptedObject carrying the plugin's current key
// ID, its encrypted DEK seed and its kms-plugin.io annotations.
func TestStoredFormat(t *testing.T) {
	e := newEnv(t)
	st := status(t, e.plugin)
	if st.Provider != "local" {
		t.Errorf("/status provider = %q, want %q", st.Provider, "local")
	}
	if st.KeyIDHash == "" || st.RemoteVersion == "" {
		t.Errorf("/status keyIDHash = %q, remoteVersion = %q; want both non-empty", st.KeyIDHash, st.RemoteVersion)
	}
	tr := e.load(t)
	objs := e.writeObjects(t, tr, "secret", 20)

	for _, o := range objs {
		raw := get(t, o.key)
		if !strings.HasPrefix(string(raw), cluster.StoredPrefix(e.name)) {
			t.Fatalf("%s: stored value starts with %q, want prefix %q", o.key, raw[:min(len(raw), 40)], cluster.StoredPrefix(e.name))
		}
		obj := storedObject(t, o.key, e.name)
		if obj.KeyID != st.KeyID {
			t.Errorf("%s: stored key ID %q, want the plugin's /status keyID %q", o.key, obj.KeyID, st.KeyID)
		}
		if len(obj.EncryptedDEKSource) == 0 || len(obj.EncryptedDEKSource) > 1024 {
			t.Errorf("%s: encrypted DEK source is %d bytes, want 1..1024", o.key, len(obj.EncryptedDEKSource))
		}
		if obj.EncryptedDEKSourceType != kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED {
			t.Errorf("%s: DEK source type %v, want %v", o.key, obj.EncryptedDEKSourceType, kmstypes.EncryptedDEKSourceType_HKDF_SHA256_XNONCE_AES_GCM_SEED)
		}
		if len(obj.Annotations) == 0 {
			t.Errorf("%s: no annotations", o.key)
		}
		for k, v := range obj.Annotations {
			if !strings.HasSuffix(k, cluster.AnnotationSuffix) {
				t.Errorf("%s: annotation key %q does not end in %q", o.key, k, cluster.AnnotationSuffix)
			}
			if len(v) == 0 {
				t.Errorf("%s: annotation %q is empty", o.key, k)
			}
		}
	}
}

// TestAADMismatch checks that a stored value only decrypts with the etcd key
// it was written under as authenticated data.
func TestAADMismatch(t *testing.T) {
	e := newEnv(t)
	tr := e.load(t)
	objs := e.writeObjects(t, tr, "secret", 2)
	stored := get(t, objs[0].key)
	if _, _, err := tr.TransformFromStorage(context.Background(), stored, value.DefaultContext(objs[0].key)); err != nil {
		t.Fatalf("TransformFromStorage with its own key: %v", err)
	}

	tests := []struct {
		name string
		aad  string
	}{
		{"another object's key", objs[1].key},
		{"key without its last byte", objs[0].key[:len(objs[0].key)-1]},
		{"key with a byte appended", objs[0].key + "x"},
		{"same name in another namespace", strings.Replace(objs[0].key, e.keyPrefix, "/registry/secrets/other/", 1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, _, err := tr.TransformFromStorage(context.Background(), stored, value.DefaultContext(tt.aad))
			if err == nil {
				t.Fatalf("TransformFromStorage with authenticated data %q returned %d bytes, want an error", tt.aad, len(got))
			}
		})
	}
}

// TestKeyRotation rotates the local keyset under a running plugin: a
// restarted apiserver reads old objects (reporting them stale, so a no-op
// update rewrites them), writes new ones under the new key ID, and key IDs
// are never reused.
func TestKeyRotation(t *testing.T) {
	e := newEnv(t)
	st1 := status(t, e.plugin)
	tr1 := e.load(t)
	old := e.writeObjects(t, tr1, "old", 50)
	checkKeyIDs(t, e, old, st1.KeyID)

	st2 := rotate(t, e.plugin)
	tr2 := e.load(t) // an apiserver restart
	readObjects(t, tr2, old, true)
	fresh := e.writeObjects(t, tr2, "new", 50)
	checkKeyIDs(t, e, fresh, st2.KeyID)
	readObjects(t, tr2, fresh, false)

	st3 := rotate(t, e.plugin)
	if st3.KeyID == st1.KeyID || st3.KeyID == st2.KeyID {
		t.Fatalf("third key ID %q reuses an earlier one (%q, %q)", st3.KeyID, st1.KeyID, st2.KeyID)
	}
	tr3 := e.load(t)
	readObjects(t, tr3, old, true)
	readObjects(t, tr3, fresh, true)
}

// TestPluginRestart restarts the plugin on the same socket and keyset, after
// a graceful stop and after a crash, and checks that a fresh apiserver reads
// back every object written under both of its key IDs.
func TestPluginRestart(t *testing.T) {
	tests := []struct {
		name string
		stop func(*cluster.Plugin) error
		// socketRemoved: after a graceful stop the plugin removes its socket.
		socketRemoved bool
	}{
		{"SIGTERM", (*cluster.Plugin).Stop, true},
		{"SIGKILL", (*cluster.Plugin).Kill, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			st1 := status(t, e.plugin)
			a := e.writeObjects(t, e.load(t), "a", 100)
			checkKeyIDs(t, e, a, st1.KeyID)
			st2 := rotate(t, e.plugin)
			b := e.writeObjects(t, e.load(t), "b", 100)
			checkKeyIDs(t, e, b, st2.KeyID)

			if err := tt.stop(e.plugin); err != nil {
				t.Fatalf("stop kms-plugin: %v", err)
			}
			if _, err := os.Stat(e.plugin.Socket); tt.socketRemoved && err == nil {
				t.Errorf("socket %s still exists after a graceful stop", e.plugin.Socket)
			}
			if err := e.plugin.Start(context.Background()); err != nil {
				t.Fatalf("restart kms-plugin: %v", err)
			}
			if got := status(t, e.plugin).KeyID; got != st2.KeyID {
				t.Fatalf("after restart /status keyID = %q, want %q as before", got, st2.KeyID)
			}
			tr := e.load(t)
			readObjects(t, tr, a, true)
			readObjects(t, tr, b, false)
		})
	}
}

// TestPluginVersion runs `kms-plugin version`.
func TestPluginVersion(t *testing.T) {
	out, err := cluster.RunPlugin(context.Background(), pluginBin, "version")
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(out) == "" {
		t.Fatal("kms-plugin version printed nothing")
	}
}

// TestHTTPEndpoints checks the plugin's health, metrics and status endpoints.
func TestHTTPEndpoints(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		path     string
		wantBody func(string) bool
		desc     string
	}{
		{"/livez", func(b string) bool { return strings.TrimSpace(b) == "ok" }, `"ok"`},
		{"/readyz", func(string) bool { return true }, "anything"},
		{"/metrics", func(b string) bool { return strings.Contains(b, "# TYPE ") }, "Prometheus text"},
		{"/status", func(b string) bool { return strings.Contains(b, `"keyID"`) }, "a JSON document with keyID"},
	}
	for _, tt := range tests {
		t.Run(strings.TrimPrefix(tt.path, "/"), func(t *testing.T) {
			code, body, err := e.plugin.Get(context.Background(), tt.path)
			if err != nil {
				t.Fatal(err)
			}
			if code != 200 {
				t.Fatalf("GET %s: status %d, want 200; body %q", tt.path, code, body)
			}
			if !tt.wantBody(string(body)) {
				t.Fatalf("GET %s: body %.200q, want %s", tt.path, body, tt.desc)
			}
		})
	}
}
