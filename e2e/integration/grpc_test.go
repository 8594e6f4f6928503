package integration

import (
	"bytes"
	"context"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	grpcstatus "google.golang.org/grpc/status"
	"k8s.io/apiserver/pkg/storage/value"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// kmsClient dials the plugin's socket the way kube-apiserver does (authority
// localhost, wait for ready) and closes the connection when t ends.
func kmsClient(t *testing.T, p *cluster.Plugin) kmsapi.KeyManagementServiceClient {
	t.Helper()
	conn, err := grpc.NewClient(p.Endpoint(),
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithAuthority("localhost"),
		grpc.WithDefaultCallOptions(grpc.WaitForReady(true)),
	)
	if err != nil {
		t.Fatalf("grpc.NewClient(%s): %v", p.Endpoint(), err)
	}
	t.Cleanup(func() { conn.Close() })
	return kmsapi.NewKeyManagementServiceClient(conn)
}

func callCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// checkHealthy checks that the plugin answers Status with healthz ok and
// keyID, and that its /readyz is 200.
func checkHealthy(t *testing.T, p *cluster.Plugin, c kmsapi.KeyManagementServiceClient, keyID string) {
	t.Helper()
	st, err := c.Status(callCtx(t), &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.Healthz != "ok" || st.Version != "v2" || st.KeyId != keyID {
		t.Fatalf("Status = {healthz %q, version %q, key_id %q}, want {ok, v2, %q}", st.Healthz, st.Version, st.KeyId, keyID)
	}
	if code, body, err := p.Get(callCtx(t), "/readyz"); err != nil || code != http.StatusOK {
		t.Fatalf("GET /readyz = %d %q, %v; want 200", code, body, err)
	}
	if !p.Process().Running() {
		t.Fatalf("kms-plugin exited: %v", p.Process().ExitError())
	}
}

// TestGRPCContract checks the plugin's answers to well-formed requests
// against the KMS v2 rules kube-apiserver enforces.
func TestGRPCContract(t *testing.T) {
	e := newEnv(t)
	c := kmsClient(t, e.plugin)
	st, err := c.Status(callCtx(t), &kmsapi.StatusRequest{})
	if err != nil {
		t.Fatalf("Status: %v", err)
	}
	if st.Healthz != "ok" || st.Version != "v2" {
		t.Errorf("Status healthz %q version %q, want ok, v2", st.Healthz, st.Version)
	}
	if st.KeyId == "" || len(st.KeyId) > 1024 {
		t.Errorf("Status key_id is %d bytes, want 1..1024", len(st.KeyId))
	}
	if want := status(t, e.plugin).KeyID; st.KeyId != want {
		t.Errorf("Status key_id %q != /status keyID %q", st.KeyId, want)
	}

	plaintext := []byte(strings.Repeat("k", 32))
	enc, err := c.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: plaintext, Uid: "contract-1"})
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	if enc.KeyId != st.KeyId {
		t.Errorf("Encrypt key_id %q != Status key_id %q", enc.KeyId, st.KeyId)
	}
	if n := len(enc.Ciphertext); n == 0 || n > 1024 {
		t.Errorf("Encrypt ciphertext is %d bytes, want 1..1024", n)
	}
	if bytes.Contains(enc.Ciphertext, plaintext) {
		t.Errorf("Encrypt ciphertext contains the plaintext")
	}
	size := 0
	for k, v := range enc.Annotations {
		size += len(k) + len(v)
		if !strings.HasSuffix(k, cluster.AnnotationSuffix) || strings.Contains(k, "/") || k != strings.ToLower(k) {
			t.Errorf("annotation key %q: want a lowercase DNS name ending in %q", k, cluster.AnnotationSuffix)
		}
	}
	if size >= 32<<10 {
		t.Errorf("annotations total %d bytes, want < 32 KiB", size)
	}
	enc2, err := c.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: plaintext, Uid: "contract-2"})
	if err != nil {
		t.Fatalf("second Encrypt: %v", err)
	}
	if bytes.Equal(enc.Ciphertext, enc2.Ciphertext) {
		t.Errorf("two Encrypts of the same plaintext returned the same ciphertext")
	}
	for i, r := range []*kmsapi.EncryptResponse{enc, enc2} {
		dec, err := c.Decrypt(callCtx(t), &kmsapi.DecryptRequest{Ciphertext: r.Ciphertext, KeyId: r.KeyId, Annotations: r.Annotations, Uid: "contract-d"})
		if err != nil {
			t.Fatalf("Decrypt of Encrypt #%d: %v", i+1, err)
		}
		if !bytes.Equal(dec.Plaintext, plaintext) {
			t.Fatalf("Decrypt of Encrypt #%d returned %x, want %x", i+1, dec.Plaintext, plaintext)
		}
	}
}

// TestBadInput sends requests kube-apiserver would never send and checks
// each gets the documented error code, leaves the plugin healthy and does
// not disturb later valid requests.
func TestBadInput(t *testing.T) {
	e := newEnv(t)
	c := kmsClient(t, e.plugin)
	plaintext := bytes.Repeat([]byte{0x5a}, 32)
	valid, err := c.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: plaintext, Uid: "bad-input-setup"})
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	if len(valid.Annotations) == 0 || len(valid.Ciphertext) == 0 || len(valid.Ciphertext) > 1024 {
		t.Fatalf("Encrypt returned %d annotations and %d ciphertext bytes; want annotations and 1..1024 bytes", len(valid.Annotations), len(valid.Ciphertext))
	}
	oldKeyID := valid.KeyId
	// Rotate so that a second, valid key ID exists to move ciphertext to.
	newKeyID := rotate(t, e.plugin).KeyID
	checkHealthy(t, e.plugin, c, newKeyID)

	decryptValid := func(t *testing.T) {
		t.Helper()
		dec, err := c.Decrypt(callCtx(t), &kmsapi.DecryptRequest{Ciphertext: valid.Ciphertext, KeyId: valid.KeyId, Annotations: valid.Annotations, Uid: "bad-input-valid"})
		if err != nil {
			t.Fatalf("Decrypt of a valid ciphertext under the previous key ID: %v", err)
		}
		if !bytes.Equal(dec.Plaintext, plaintext) {
			t.Fatalf("Decrypt of a valid ciphertext = %x, want %x", dec.Plaintext, plaintext)
		}
	}
	decryptValid(t)

	ct := valid.Ciphertext
	annotationKeys := slices.Sorted(maps.Keys(valid.Annotations))
	firstKey := annotationKeys[0]
	// with returns a copy of the valid request changed by f.
	with := func(f func(r *kmsapi.DecryptRequest)) *kmsapi.DecryptRequest {
		r := &kmsapi.DecryptRequest{
			Ciphertext:  bytes.Clone(ct),
			KeyId:       valid.KeyId,
			Annotations: maps.Clone(valid.Annotations),
			Uid:         "bad-input",
		}
		for k, v := range r.Annotations {
			r.Annotations[k] = bytes.Clone(v)
		}
		f(r)
		return r
	}
	flip := func(b []byte, i int) []byte { b[i] ^= 0x01; return b }

	decryptTests := []struct {
		name string
		req  *kmsapi.DecryptRequest
		want codes.Code
	}{
		{"garbage ciphertext", with(func(r *kmsapi.DecryptRequest) { r.Ciphertext = bytes.Repeat([]byte("garbage!"), 8) }), codes.InvalidArgument},
		{"empty ciphertext", with(func(r *kmsapi.DecryptRequest) { r.Ciphertext = nil }), codes.InvalidArgument},
		{"ciphertext truncated to half", with(func(r *kmsapi.DecryptRequest) { r.Ciphertext = r.Ciphertext[:len(ct)/2] }), codes.InvalidArgument},
		{"ciphertext without its last byte", with(func(r *kmsapi.DecryptRequest) { r.Ciphertext = r.Ciphertext[:len(ct)-1] }), codes.InvalidArgument},
		{"ciphertext first byte flipped", with(func(r *kmsapi.DecryptRequest) { flip(r.Ciphertext, 0) }), codes.InvalidArgument},
		{"ciphertext middle byte flipped", with(func(r *kmsapi.DecryptRequest) { flip(r.Ciphertext, len(ct)/2) }), codes.InvalidArgument},
		{"ciphertext last byte flipped", with(func(r *kmsapi.DecryptRequest) { flip(r.Ciphertext, len(ct)-1) }), codes.InvalidArgument},
		{"ciphertext of 1025 bytes", with(func(r *kmsapi.DecryptRequest) {
			r.Ciphertext = append(r.Ciphertext, make([]byte, 1025-len(ct))...)
		}), codes.InvalidArgument},
		{"ciphertext of 4 KiB", with(func(r *kmsapi.DecryptRequest) {
			r.Ciphertext = append(r.Ciphertext, make([]byte, 4<<10-len(ct))...)
		}), codes.InvalidArgument},
		{"ciphertext of 64 KiB", with(func(r *kmsapi.DecryptRequest) {
			r.Ciphertext = append(r.Ciphertext, make([]byte, 64<<10-len(ct))...)
		}), codes.InvalidArgument},
		// A key_id that does not name the key in the annotations makes the
		// request inconsistent in itself, whatever the key store holds:
		// InvalidArgument. FailedPrecondition is for a consistent request
		// whose key the store no longer has (TestRetiredKey).
		{"unknown key_id", with(func(r *kmsapi.DecryptRequest) { r.KeyId = "kms-plugin-e2e-unknown-key-id" }), codes.InvalidArgument},
		{"empty key_id", with(func(r *kmsapi.DecryptRequest) { r.KeyId = "" }), codes.InvalidArgument},
		{"key_id of 1025 bytes", with(func(r *kmsapi.DecryptRequest) { r.KeyId = strings.Repeat("k", 1025) }), codes.InvalidArgument},
		{"missing annotations", with(func(r *kmsapi.DecryptRequest) { r.Annotations = nil }), codes.InvalidArgument},
		{"annotation " + firstKey + " removed", with(func(r *kmsapi.DecryptRequest) { delete(r.Annotations, firstKey) }), codes.InvalidArgument},
		{"annotation " + firstKey + " value tampered", with(func(r *kmsapi.DecryptRequest) {
			v := r.Annotations[firstKey]
			flip(v, len(v)/2)
		}), codes.InvalidArgument},
		{"annotation " + firstKey + " value empty", with(func(r *kmsapi.DecryptRequest) { r.Annotations[firstKey] = nil }), codes.InvalidArgument},
		{"annotation " + firstKey + " renamed", with(func(r *kmsapi.DecryptRequest) {
			r.Annotations["renamed"+cluster.AnnotationSuffix] = r.Annotations[firstKey]
			delete(r.Annotations, firstKey)
		}), codes.InvalidArgument},
		{"extra annotation making 40 KiB of annotations", with(func(r *kmsapi.DecryptRequest) {
			r.Annotations["padding"+cluster.AnnotationSuffix] = make([]byte, 40<<10)
		}), codes.InvalidArgument},
		{"ciphertext and annotations moved to the new key_id", with(func(r *kmsapi.DecryptRequest) { r.KeyId = newKeyID }), codes.InvalidArgument},
	}
	// One case per further annotation, so every annotation is bound.
	for _, k := range annotationKeys[1:] {
		decryptTests = append(decryptTests, struct {
			name string
			req  *kmsapi.DecryptRequest
			want codes.Code
		}{"annotation " + k + " value tampered", with(func(r *kmsapi.DecryptRequest) {
			v := r.Annotations[k]
			flip(v, len(v)/2)
		}), codes.InvalidArgument})
	}
	for _, tt := range decryptTests {
		t.Run("Decrypt/"+tt.name, func(t *testing.T) {
			resp, err := c.Decrypt(callCtx(t), tt.req)
			if got := grpcstatus.Code(err); got != tt.want {
				t.Errorf("Decrypt = %d plaintext bytes, code %v (%v); want code %v", len(resp.GetPlaintext()), got, err, tt.want)
			}
			checkHealthy(t, e.plugin, c, newKeyID)
		})
	}

	encryptTests := []struct {
		name      string
		plaintext []byte
		want      codes.Code
	}{
		{"empty plaintext", nil, codes.InvalidArgument},
		{"4 KiB plaintext", make([]byte, 4<<10), codes.InvalidArgument},
		{"64 KiB plaintext", make([]byte, 64<<10), codes.InvalidArgument},
	}
	for _, tt := range encryptTests {
		t.Run("Encrypt/"+tt.name, func(t *testing.T) {
			resp, err := c.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: tt.plaintext, Uid: "bad-input"})
			if got := grpcstatus.Code(err); got != tt.want {
				t.Errorf("Encrypt = %d ciphertext bytes, code %v (%v); want code %v", len(resp.GetCiphertext()), got, err, tt.want)
			}
			checkHealthy(t, e.plugin, c, newKeyID)
		})
	}

	// Nothing above changed what valid requests get.
	decryptValid(t)
	enc, err := c.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: plaintext, Uid: "bad-input-after"})
	if err != nil {
		t.Fatalf("Encrypt after bad input: %v", err)
	}
	if enc.KeyId != newKeyID || enc.KeyId == oldKeyID {
		t.Fatalf("Encrypt after rotation: key_id %q, want the new key ID %q", enc.KeyId, newKeyID)
	}
}

// TestRetiredKey retires the previous key version of the local keyset and
// checks that, once the plugin no longer holds it in memory, Decrypt of what
// it wrapped is refused with FailedPrecondition, the current key keeps
// working, and the current version cannot be retired.
func TestRetiredKey(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	old := status(t, e.plugin)
	tr := e.load(t)
	oldObjs := e.writeObjects(t, tr, "old", 5)
	c := kmsClient(t, e.plugin)
	plaintext := bytes.Repeat([]byte{0xa5}, 32)
	oldEnc, err := c.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: plaintext, Uid: "retire-old"})
	if err != nil {
		t.Fatalf("Encrypt: %v", err)
	}
	cur := rotate(t, e.plugin)

	if err := e.plugin.RetireKeyset(ctx, cur.RemoteVersion); err == nil {
		t.Errorf("keyset retire of the current version %s succeeded, want an error", cur.RemoteVersion)
	}
	if err := e.plugin.RetireKeyset(ctx, old.RemoteVersion); err != nil {
		t.Fatalf("keyset retire %s: %v", old.RemoteVersion, err)
	}
	// Restart so that no unwrapped key of the old version is cached.
	if err := e.plugin.Restart(ctx); err != nil {
		t.Fatalf("restart kms-plugin: %v", err)
	}
	c = kmsClient(t, e.plugin)
	checkHealthy(t, e.plugin, c, cur.KeyID)

	resp, err := c.Decrypt(callCtx(t), &kmsapi.DecryptRequest{Ciphertext: oldEnc.Ciphertext, KeyId: oldEnc.KeyId, Annotations: oldEnc.Annotations, Uid: "retire-old"})
	if got := grpcstatus.Code(err); got != codes.FailedPrecondition {
		t.Errorf("Decrypt under retired version %s = %d plaintext bytes, code %v (%v); want FailedPrecondition", old.RemoteVersion, len(resp.GetPlaintext()), got, err)
	}
	checkHealthy(t, e.plugin, c, cur.KeyID)

	// kube-apiserver can no longer read what only the retired key can open,
	// and still reads and writes everything else.
	tr = e.load(t)
	for _, o := range oldObjs {
		if _, _, err := tr.TransformFromStorage(ctx, get(t, o.key), value.DefaultContext(o.key)); err == nil {
			t.Errorf("%s: read succeeded although its key version %s is retired", o.key, old.RemoteVersion)
		}
	}
	fresh := e.writeObjects(t, tr, "new", 5)
	checkKeyIDs(t, e, fresh, cur.KeyID)
	readObjects(t, tr, fresh, false)
}
