//go:build !serveonly

package main

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	k8stesting "k8s.io/client-go/testing"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

// reencryptEnv is rotateEnv with Secrets stored in a fake etcd, which the
// fake apiserver's updates rewrite as kms v2 values under the plugin's
// key_id (or, with offKMS, in plaintext).
type reencryptEnv struct {
	*rotateEnv
	etcd   *fakeRanger
	offKMS bool
	writes int
}

func newReencryptEnv(t *testing.T, secrets int, stored []byte) *reencryptEnv {
	t.Helper()
	e := &reencryptEnv{rotateEnv: newRotateEnv(t), etcd: &fakeRanger{kv: map[string][]byte{}}}
	gvr := schema.GroupVersionResource{Version: "v1", Resource: "secrets"}
	for i := range secrets {
		name := string(rune('a' + i))
		u := &unstructured.Unstructured{Object: map[string]any{"apiVersion": "v1", "kind": "Secret",
			"metadata": map[string]any{"name": name, "namespace": "ns"}}}
		if _, err := e.dyn.Resource(gvr).Namespace("ns").Create(context.Background(), u, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		e.etcd.kv["/registry/secrets/ns/"+name] = stored
	}
	e.dyn.PrependReactor("update", "secrets", func(a k8stesting.Action) (bool, runtime.Object, error) {
		m := a.(k8stesting.UpdateAction).GetObject().(*unstructured.Unstructured)
		e.etcd.mu.Lock()
		defer e.etcd.mu.Unlock()
		e.writes++
		e.etcd.kv["/registry/secrets/"+m.GetNamespace()+"/"+m.GetName()] = e.written(t)
		return false, nil, nil
	})
	return e
}

// written is the value the fake apiserver writes now.
func (e *reencryptEnv) written(t *testing.T) []byte {
	if e.offKMS {
		return []byte("k8s\x00plain")
	}
	return kmsValue(e.keyID(t))
}

// keyID is the plugin's key_id.
func (e *reencryptEnv) keyID(t *testing.T) string {
	p, err := local.New(local.Config{Path: e.keyset})
	if err != nil {
		t.Fatal(err)
	}
	v, err := p.CurrentVersion(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return envelope.DeriveKeyID(local.Name, v)
}

func (e *reencryptEnv) deps() rotateDeps {
	d := e.rotateEnv.deps()
	d.dial = func(*etcdFlags) (etcdscan.Ranger, func(), error) { return e.etcd, func() {}, nil }
	return d
}

func (e *reencryptEnv) reencrypt(t *testing.T, extra ...string) (string, string, error) {
	t.Helper()
	args := append([]string{"--plugin-endpoints", e.plugin.URL, "--poll-interval", "10ms", "--progress", "log", "--log-level", "warn", "--etcd-endpoints", "http://fake"}, extra...)
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := reencryptMain(ctx, args, &out, &errOut, e.deps())
	return out.String(), errOut.String(), err
}

// stored counts the Secrets' etcd values by kind.
func (e *reencryptEnv) stored() map[etcdscan.Kind]int {
	e.etcd.mu.Lock()
	defer e.etcd.mu.Unlock()
	out := map[etcdscan.Kind]int{}
	for _, v := range e.etcd.kv {
		c, _ := etcdscan.Classify(v)
		out[c.Kind]++
	}
	return out
}

const aescbcStored = "k8s:enc:aescbc:v1:key1:\x00ciphertext"

func TestReencryptCommand(t *testing.T) {
	e := newReencryptEnv(t, 5, []byte(aescbcStored))
	out, _, err := e.reencrypt(t, "--dry-run")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "reencrypt: would rewrite (update, 32 workers, 1000 QPS) secrets: 5 of 5 objects") || !strings.Contains(out, "dry run: nothing was changed") || e.writes != 0 {
		t.Fatalf("dry run (%d writes):\n%s", e.writes, out)
	}
	out, _, err = e.reencrypt(t)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "re-encryption completed (every object under kms provider kms-plugin, key_id hash "+envelope.KeyIDHash(e.keyID(t))+"): 5 objects rewritten; verify: 5 objects, 0 stale, 0 unencrypted") {
		t.Fatalf("output %q", out)
	}
	if got := e.stored(); got[etcdscan.KindKMSv2] != 5 || len(got) != 1 {
		t.Fatalf("etcd holds %v", got)
	}
	// Again: nothing left to rewrite.
	if out, _, err = e.reencrypt(t); err != nil || !strings.Contains(out, ": 0 objects rewritten") || e.writes != 5 {
		t.Fatalf("second run: %v, %d writes in all:\n%s", err, e.writes, out)
	}

	// Uninstall: the apiserver now writes in plaintext first.
	e.offKMS = true
	out, _, err = e.reencrypt(t, "--target", "off-kms")
	if err != nil || !strings.Contains(out, "re-encryption completed (no object stored by kms provider kms-plugin): 5 objects rewritten; verify: 5 objects, 0 stale, 5 unencrypted") {
		t.Fatalf("off-kms: %v\n%s", err, out)
	}
	if got := e.stored(); got[etcdscan.KindUnencrypted] != 5 || len(got) != 1 {
		t.Fatalf("etcd holds %v", got)
	}
}

// TestReencryptCommandVerifyFails: toward kms while the apiserver still
// writes in plaintext, verify fails with exit code 1 and says so.
func TestReencryptCommandVerifyFails(t *testing.T) {
	e := newReencryptEnv(t, 3, []byte(aescbcStored))
	e.offKMS = true
	_, _, err := e.reencrypt(t)
	if err == nil || exitCode(err) != 1 || !strings.Contains(err.Error(), "re-encryption stopped at stage verify: 3 objects are not under kms provider kms-plugin") {
		t.Fatalf("error %v (exit %d)", err, exitCode(err))
	}
}

func TestReencryptCommandLeaseHeld(t *testing.T) {
	e := newReencryptEnv(t, 2, []byte(aescbcStored))
	holder := "rotate-elsewhere/1/2"
	now, secs := metav1.NewMicroTime(time.Now()), int32(60)
	if _, err := e.client.CoordinationV1().Leases("kube-system").Create(context.Background(), &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "kms-plugin-rotation", Namespace: "kube-system"},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &now, LeaseDurationSeconds: &secs},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	_, _, err := e.reencrypt(t)
	if code := exitCode(err); code != 2 || !strings.Contains(err.Error(), "held by rotate-elsewhere/1/2") {
		t.Fatalf("error %v (exit code %d); want exit code 2 naming the holder", err, code)
	}
	if e.writes != 0 {
		t.Fatalf("%d writes under someone else's Lease", e.writes)
	}
	// Another Lease name is another lock.
	if _, _, err := e.reencrypt(t, "--name", "other"); err != nil {
		t.Fatal(err)
	}
}

// TestReencryptCommandCrashHook kills a run after 2 of 4 rewrites with
// the crash hook, then resumes it.
func TestReencryptCommandCrashHook(t *testing.T) {
	e := newReencryptEnv(t, 4, []byte(aescbcStored))
	t.Setenv(CrashEnv, "reencrypt:2")
	_, _, err := e.reencrypt(t, "--workers", "1", "--page-size", "1")
	if !errors.Is(err, rotation.ErrCrashed) || e.crashs != 1 {
		t.Fatalf("error %v, crash hook called %d times; want one crash", err, e.crashs)
	}
	st, err := rotation.LoadState(context.Background(), e.client, "kube-system", "kms-plugin-rotation")
	if err != nil || st.Reencryption == nil || st.Reencryption.Status != rotation.StatusRunning {
		t.Fatalf("state after the crash: %+v, %v", st.Reencryption, err)
	}
	t.Setenv(CrashEnv, "")
	// The same process identity takes its own Lease back at once.
	out, _, err := e.reencrypt(t)
	if err != nil || !strings.Contains(out, "verify: 4 objects, 0 stale") || e.writes != 4 {
		t.Fatalf("resumed: %v, %d writes in all:\n%s", err, e.writes, out)
	}
	st, _ = rotation.LoadState(context.Background(), e.client, "kube-system", "kms-plugin-rotation")
	if st.Reencryption.Runs != 2 || st.Reencryption.Status != rotation.StatusCompleted {
		t.Fatalf("state %+v", st.Reencryption)
	}
}

func TestReencryptCommandErrors(t *testing.T) {
	e := newReencryptEnv(t, 1, []byte(aescbcStored))
	for _, tt := range []struct {
		args []string
		env  string
		code int
		want string
	}{
		{args: []string{"--target", "sideways"}, code: 2, want: ""},
		{args: []string{"--target", "off-kms", "--expect-key-id", "k"}, code: 2, want: ""},
		{args: []string{"--workers", "many"}, code: 2, want: ""},
		{args: []string{"stray"}, code: 2, want: ""},
		{args: []string{"--progress", "fancy"}, code: 1, want: "--progress"},
		{args: []string{"--migration", "magic"}, code: 1, want: "migration"},
		{args: []string{"--encryption-config", "/nonexistent/ec.yaml"}, code: 1, want: "--encryption-config"},
		{args: []string{"--target", "off-kms", "--encryption-config", "/nonexistent/ec.yaml"}, code: 1, want: "--encryption-config"},
		{args: []string{"--resources", "*.apps"}, code: 1, want: "wildcards are not supported"},
		{env: "rotate", code: 1, want: "reencrypt runs the stages reencrypt and verify only"},
		{env: "sideways", code: 1, want: CrashEnv},
	} {
		t.Run(strings.Join(tt.args, " ")+tt.env, func(t *testing.T) {
			t.Setenv(CrashEnv, tt.env)
			_, errOut, err := e.reencrypt(t, tt.args...)
			if err == nil {
				t.Fatal("no error")
			}
			code := 1
			if errors.Is(err, errUsage) {
				code = 2
			}
			if code != tt.code || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v (stderr %q), exit %d; want exit %d and %q", err, errOut, code, tt.code, tt.want)
			}
			if e.writes != 0 {
				t.Fatalf("%d writes", e.writes)
			}
		})
	}
}

// TestReencryptCommandLine checks the command as run from main: help on
// stdout with exit 0, an unknown flag with one line and exit 2.
func TestReencryptCommandLine(t *testing.T) {
	for _, args := range [][]string{{"reencrypt", "-h"}, {"reencrypt", "--help"}, {"help", "reencrypt"}} {
		out, errOut, err := runCmd(t, args...)
		if codeOf(err) != 0 || !strings.Contains(out, "Usage: kms-plugin reencrypt") || !strings.Contains(out, "--target") || errOut != "" {
			t.Errorf("%q: exit %d, stdout %q, stderr %q", args, codeOf(err), out, errOut)
		}
	}
	out, errOut, err := runCmd(t, "reencrypt", "--no-such-flag")
	if codeOf(err) != 2 || out != "" || !strings.Contains(errOut, "no-such-flag") || strings.Count(strings.TrimSpace(errOut), "\n") != 0 {
		t.Errorf("unknown flag: exit %d, stdout %q, stderr %q", codeOf(err), out, errOut)
	}
	out, errOut, err = runCmd(t, "reencrypt", "--target", "sideways")
	if codeOf(err) != 2 || !strings.Contains(errOut, `--target "sideways"`) {
		t.Errorf("bad target: exit %d, stdout %q, stderr %q", codeOf(err), out, errOut)
	}
	if out, _, _ := runCmd(t, "help"); !strings.Contains(out, "reencrypt") {
		t.Errorf("the command list lacks reencrypt:\n%s", out)
	}
}

func TestReencryptResources(t *testing.T) {
	ec := filepath.Join(t.TempDir(), "ec.yaml")
	// After uninstall's first stage: identity first, the kms provider second.
	if err := os.WriteFile(ec, []byte(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets, configmaps]
    providers:
      - identity: {}
      - kms: {apiVersion: v2, name: kms-plugin, endpoint: unix:///tmp/k.sock}
  - resources: [events]
    providers:
      - aescbc: {keys: [{name: k, secret: c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=}]}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	name, other := "kms-plugin", "other"
	f := &resourceFlags{encryptionConfig: &ec, providerName: &name}
	if got, err := reencryptResources(f, rotation.TargetOffKMS); err != nil || strings.Join(got, ",") != "secrets,configmaps" {
		t.Errorf("off-kms: %v, %v; want secrets,configmaps", got, err)
	}
	// For kms, the provider must be first: it is not, so nothing.
	if _, err := reencryptResources(f, rotation.TargetKMS); err == nil || !strings.Contains(err.Error(), "no resource is encrypted") {
		t.Errorf("kms: %v", err)
	}
	f.providerName = &other
	if _, err := reencryptResources(f, rotation.TargetOffKMS); err == nil || !strings.Contains(err.Error(), `holds no kms provider "other"`) {
		t.Errorf("other provider: %v", err)
	}
	f.resources = listFlag{"widgets.example.com"}
	if got, err := reencryptResources(f, rotation.TargetOffKMS); err != nil || strings.Join(got, ",") != "widgets.example.com" {
		t.Errorf("--resources: %v, %v", got, err)
	}
}
