//go:build !serveonly

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
	coordinationv1 "k8s.io/api/coordination/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	fakediscovery "k8s.io/client-go/discovery/fake"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	k8sfake "k8s.io/client-go/kubernetes/fake"

	"github.com/kms-plugin/kms-plugin/internal/admin"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

// rotateEnv is a fake cluster (no objects), one plugin following a local
// keyset, and no etcd.
type rotateEnv struct {
	keyset string
	plugin *httptest.Server
	client *k8sfake.Clientset
	dyn    *dynamicfake.FakeDynamicClient
	crashs int
}

func newRotateEnv(t *testing.T) *rotateEnv {
	t.Helper()
	e := &rotateEnv{keyset: filepath.Join(t.TempDir(), "keyset.json")}
	p, err := local.New(local.Config{Path: e.keyset, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	e.plugin = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		v, err := p.CurrentVersion(r.Context())
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		kid := envelope.DeriveKeyID(local.Name, v)
		_ = json.NewEncoder(w).Encode(admin.Status{Provider: local.Name, KeyID: kid, KeyIDHash: envelope.KeyIDHash(kid), RemoteVersion: v, Ready: true})
	}))
	t.Cleanup(e.plugin.Close)
	e.client = k8sfake.NewClientset()
	e.client.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{{
		GroupVersion: "v1",
		APIResources: []metav1.APIResource{{Name: "secrets", Namespaced: true, Kind: "Secret", Verbs: []string{"get", "list", "update"}}},
	}}
	e.dyn = dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{
		{Version: "v1", Resource: "secrets"}: "SecretList",
	})
	return e
}

func (e *rotateEnv) deps() rotateDeps {
	return rotateDeps{
		clients: func(string, []string, float32, int) (*clusterClients, error) {
			return &clusterClients{client: e.client, dynamic: e.dyn}, nil
		},
		dial:  func(*etcdFlags) (etcdscan.Ranger, func(), error) { return nil, func() {}, nil },
		crash: func() { e.crashs++ },
	}
}

func (e *rotateEnv) rotate(t *testing.T, extra ...string) (string, string, error) {
	t.Helper()
	args := append([]string{"--local-keyset", e.keyset, "--plugin-endpoints", e.plugin.URL, "--converge-wait", "10ms",
		"--poll-interval", "10ms", "--keep", "0", "--progress", "log", "--log-level", "warn"}, extra...)
	var out, errOut bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := rotateMain(ctx, args, &out, &errOut, e.deps())
	return out.String(), errOut.String(), err
}

func TestRotateCommand(t *testing.T) {
	e := newRotateEnv(t)
	out, _, err := e.rotate(t, "--dry-run")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "would create a new version of the local key") || !strings.Contains(out, "dry run: nothing was changed") {
		t.Fatalf("dry run output:\n%s", out)
	}
	out, _, err = e.rotate(t)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "rotation completed") || !strings.Contains(out, "not verified (no etcd configured)") {
		t.Fatalf("output %q", out)
	}
	out, _, err = e.rotate(t, "--min-age", "720h")
	if err != nil || !strings.HasPrefix(out, "not due: last rotation 0s ago, min-age 30d") {
		t.Fatalf("second run: %q, %v", out, err)
	}
	if code := exitCode(err); code != 0 && err != nil {
		t.Fatalf("exit code %d", code)
	}
}

func TestRotateCommandLeaseHeld(t *testing.T) {
	e := newRotateEnv(t)
	holder := "elsewhere/1/2"
	now := metav1.NewMicroTime(time.Now())
	secs := int32(60)
	if _, err := e.client.CoordinationV1().Leases("kube-system").Create(context.Background(), &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{Name: "kms-plugin-rotation", Namespace: "kube-system"},
		Spec:       coordinationv1.LeaseSpec{HolderIdentity: &holder, RenewTime: &now, LeaseDurationSeconds: &secs},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	_, _, err := e.rotate(t)
	if code := exitCode(err); code != 2 || !strings.Contains(err.Error(), "held by elsewhere/1/2") {
		t.Fatalf("error %v (exit code %d); want exit code 2 naming the holder", err, code)
	}
}

func TestRotateCommandCrashHook(t *testing.T) {
	e := newRotateEnv(t)
	t.Setenv(CrashEnv, "rotate")
	_, _, err := e.rotate(t)
	if !errors.Is(err, rotation.ErrCrashed) || e.crashs != 1 {
		t.Fatalf("error %v, crash hook called %d times; want one crash after rotate", err, e.crashs)
	}
	t.Setenv(CrashEnv, "sideways")
	if _, _, err := e.rotate(t); err == nil || !strings.Contains(err.Error(), CrashEnv) {
		t.Fatalf("bad hook value: %v", err)
	}
}

func TestRotateCommandErrors(t *testing.T) {
	e := newRotateEnv(t)
	for _, tt := range []struct {
		args []string
		want string
	}{
		{[]string{"--progress", "fancy"}, "--progress"},
		{[]string{"--migration", "magic"}, "migration"},
		{[]string{"--local-keyset", "/nonexistent/keyset.json"}, "rotate changes the plugin's keyset"},
		{[]string{"--encryption-config", "/nonexistent/ec.yaml"}, "--encryption-config"},
	} {
		_, _, err := e.rotate(t, tt.args...)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("rotate %q: %v; want an error mentioning %q", tt.args, err, tt.want)
		}
	}
}

func TestResourcesFromEncryptionConfig(t *testing.T) {
	dir := t.TempDir()
	ec := filepath.Join(dir, "ec.yaml")
	write := func(s string) {
		if err := os.WriteFile(ec, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets, configmaps]
    providers:
      - kms: {apiVersion: v2, name: kms-plugin, endpoint: unix:///tmp/k.sock}
      - identity: {}
  - resources: [events]
    providers:
      - identity: {}
      - kms: {apiVersion: v2, name: kms-plugin, endpoint: unix:///tmp/k.sock}
`)
	name := "kms-plugin"
	f := &resourceFlags{encryptionConfig: &ec, providerName: &name}
	got, err := f.list()
	if err != nil || strings.Join(got, ",") != "secrets,configmaps" {
		t.Fatalf("resources = %v, %v; want secrets,configmaps (events is not encrypted by it)", got, err)
	}
	other := "other"
	f.providerName = &other
	if _, err := f.list(); err == nil || !strings.Contains(err.Error(), "no resource is encrypted") {
		t.Fatalf("other provider: %v", err)
	}
	write(`apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: ["*.*"]
    providers:
      - kms: {apiVersion: v2, name: kms-plugin, endpoint: unix:///tmp/k.sock}
`)
	f.providerName = &name
	if _, err := f.list(); err == nil || !strings.Contains(err.Error(), "--resources") {
		t.Fatalf("wildcard: %v", err)
	}
	empty := ""
	f.encryptionConfig = &empty
	if got, _ := f.list(); strings.Join(got, ",") != "secrets" {
		t.Fatalf("default resources %v", got)
	}
}

// fakeRanger serves etcd ranges from a map.
type fakeRanger struct {
	mu sync.Mutex
	kv map[string][]byte
}

func (f *fakeRanger) Range(_ context.Context, start, end string, _, limit int64) ([]etcdscan.KeyValue, bool, int64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var keys []string
	for k := range f.kv {
		if k >= start && k < end {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	more := false
	if int64(len(keys)) > limit {
		keys, more = keys[:limit], true
	}
	var out []etcdscan.KeyValue
	for _, k := range keys {
		out = append(out, etcdscan.KeyValue{Key: []byte(k), Value: f.kv[k]})
	}
	return out, more, 7, nil
}

func kmsValue(keyID string) []byte {
	b := []byte(etcdscan.KMSv2Prefix("kms-plugin"))
	b = protowire.AppendTag(b, 2, protowire.BytesType)
	return protowire.AppendString(b, keyID)
}

func TestVerifyCommand(t *testing.T) {
	r := &fakeRanger{kv: map[string][]byte{
		"/registry/secrets/a/1":    kmsValue("new"),
		"/registry/secrets/a/2":    kmsValue("new"),
		"/registry/secrets/a/3":    kmsValue("old"),
		"/registry/secrets/b/4":    []byte("k8s\x00plain"),
		"/registry/configmaps/c/5": kmsValue("new"),
	}}
	dial := func(*etcdFlags) (etcdscan.Ranger, func(), error) { return r, func() {}, nil }
	verify := func(args ...string) (string, error) {
		var out, errOut bytes.Buffer
		err := verifyMain(context.Background(), args, &out, &errOut, dial)
		return out.String() + errOut.String(), err
	}
	out, err := verify("--resources", "secrets,configmaps", "--expect-key-id", "new", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var rep rotation.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v in %s", err, out)
	}
	if rep.Stale != 1 || rep.Unencrypted != 1 || rep.Current != 3 || rep.ExpectedKeyID != "new" || len(rep.Resources) != 2 {
		t.Fatalf("report %+v", rep)
	}
	if s := rep.Resources[0]; s.Resource != "secrets" || s.Total != 4 || s.ByKey[0].KeyIDHash != envelope.KeyIDHash("new") || s.ByKey[0].Count != 2 {
		t.Fatalf("secrets %+v", s)
	}
	// The JSON field names are a contract.
	for _, f := range []string{`"resources"`, `"resource"`, `"total"`, `"unencrypted"`, `"byKey"`, `"provider"`, `"keyID"`, `"keyIDHash"`, `"count"`, `"expectedKeyID"`, `"stale"`} {
		if !strings.Contains(out, f) {
			t.Errorf("JSON lacks %s", f)
		}
	}
	out, err = verify("--expect-key-id", "new", "--fail-on-stale")
	if !errors.Is(err, errStale) || !strings.Contains(out, "STALE") || !strings.Contains(out, "unencrypted") {
		t.Fatalf("fail-on-stale: %v\n%s", err, out)
	}
	if _, err := verify("--fail-on-stale"); err == nil || !strings.Contains(err.Error(), "--expect-key-id") {
		t.Fatalf("fail-on-stale without a key: %v", err)
	}
	out, err = verify("--resources", "configmaps", "--expect-key-id", "new", "--fail-on-stale")
	if err != nil || !strings.Contains(out, "1 objects: 1 current, 0 stale") {
		t.Fatalf("clean configmaps: %v\n%s", err, out)
	}
}

func TestStatusCommand(t *testing.T) {
	e := newRotateEnv(t)
	if _, _, err := e.rotate(t); err != nil {
		t.Fatal(err)
	}
	status := func(args ...string) string {
		var out, errOut bytes.Buffer
		clients := func(string, []string, float32, int) (*clusterClients, error) {
			return &clusterClients{client: e.client, dynamic: e.dyn}, nil
		}
		if err := statusMain(context.Background(), append([]string{"--plugin-endpoints", e.plugin.URL}, args...), &out, &errOut, clients, time.Now); err != nil {
			t.Fatal(err)
		}
		return out.String()
	}
	table := status()
	for _, want := range []string{"all 1 plugins ready on key_id hash", "stage:     done (completed)", "LAST COMPLETED ROTATION", "LAST VERIFY\n  none"} {
		if !strings.Contains(table, want) {
			t.Errorf("status lacks %q:\n%s", want, table)
		}
	}
	var js clusterStatus
	if err := json.Unmarshal([]byte(status("-o", "json")), &js); err != nil {
		t.Fatal(err)
	}
	if !js.Agree || len(js.Plugins) != 1 || js.State == nil || js.State.LastCompleted == nil {
		t.Fatalf("json status %+v", js)
	}
}

// TestRotationManifestsParse runs the flags of the CronJobs and the systemd
// unit through rotate's flag parsing: they stop at the missing node files,
// not at a flag.
func TestRotationManifestsParse(t *testing.T) {
	manifests := map[string][]string{}
	for _, f := range []string{"rotation-cronjob.yaml", "rotation-cronjob-svm.yaml"} {
		cron, err := os.ReadFile("../../manifests/" + f)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(cron), "\n") {
			if a, ok := strings.CutPrefix(strings.TrimSpace(l), "- --"); ok {
				manifests[f] = append(manifests[f], "--"+a)
			}
		}
	}
	unit, err := os.ReadFile("../../manifests/kms-plugin-rotate.service")
	if err != nil {
		t.Fatal(err)
	}
	_, exec, _ := strings.Cut(strings.ReplaceAll(string(unit), "\\\n", " "), "ExecStart=/usr/local/bin/kms-plugin rotate ")
	exec, _, _ = strings.Cut(exec, "\n")
	e := newRotateEnv(t)
	manifests["systemd"] = strings.Fields(exec)
	for name, args := range manifests {
		if len(args) < 5 {
			t.Fatalf("%s: args %q", name, args)
		}
		var out, errOut bytes.Buffer
		err := rotateMain(context.Background(), args, &out, &errOut, e.deps())
		if err == nil || errors.Is(err, errUsage) || !strings.Contains(err.Error(), "/etc/kubernetes/") {
			t.Errorf("%s: %v (%s); want it to stop at a node file", name, err, errOut.String())
		}
	}
}
