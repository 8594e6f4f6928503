// Package integration drives the kms-plugin binary with kube-apiserver's own
// KMS v2 client code (encryptionconfig.LoadEncryptionConfig and the
// transformer it returns) over a real Unix socket, storing into a real
// embedded etcd, and with the raw KMS v2 gRPC client for inputs
// kube-apiserver would never send.
package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apiserver/pkg/server/options/encryptionconfig"
	"k8s.io/apiserver/pkg/storage/value"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"

	"github.com/kms-plugin/kms-plugin/e2e/cluster"
)

// Set by TestMain, read-only afterwards.
var (
	pluginBin string
	etcd      *clientv3.Client
)

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	ctx := context.Background()
	bin, cleanup, err := cluster.ServePluginBinary(ctx)
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration: kms-plugin binary: %v\n", err)
		return 1
	}
	defer cleanup()
	pluginBin = bin

	dir, err := os.MkdirTemp("", "kms-integration-etcd-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration: %v\n", err)
		return 1
	}
	server, client, err := startEmbeddedEtcd(dir)
	if err != nil {
		fmt.Fprintf(os.Stderr, "integration: embedded etcd: %v\n", err)
		os.RemoveAll(dir)
		return 1
	}
	etcd = client
	code := m.Run()
	client.Close()
	server.Close()
	if code == 0 {
		os.RemoveAll(dir)
	} else {
		fmt.Fprintf(os.Stderr, "integration: kept embedded etcd data and log in %s\n", dir)
	}
	return code
}

// startEmbeddedEtcd runs an in-process single-member etcd on free loopback
// ports with its data and log in dir.
func startEmbeddedEtcd(dir string) (*embed.Etcd, *clientv3.Client, error) {
	clientPort, err := cluster.FreePort()
	if err != nil {
		return nil, nil, err
	}
	peerPort, err := cluster.FreePort()
	if err != nil {
		return nil, nil, err
	}
	clientURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", clientPort)}
	peerURL := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", peerPort)}

	cfg := embed.NewConfig()
	cfg.Name = "integration"
	cfg.Dir = filepath.Join(dir, "data")
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.LogLevel = "warn"
	cfg.LogOutputs = []string{filepath.Join(dir, "etcd.log")}
	cfg.UnsafeNoFsync = true // test data only

	server, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, nil, err
	}
	select {
	case <-server.Server.ReadyNotify():
	case err := <-server.Err():
		server.Close()
		return nil, nil, err
	case <-time.After(time.Minute):
		server.Close()
		return nil, nil, fmt.Errorf("not ready after 1m")
	}
	client, err := clientv3.New(clientv3.Config{Endpoints: []string{clientURL.String()}, DialTimeout: 10 * time.Second})
	if err != nil {
		server.Close()
		return nil, nil, err
	}
	return server, client, nil
}

// env is one test's plugin, with its own keyset, socket and provider name,
// and its own key space in the shared etcd.
type env struct {
	plugin    *cluster.Plugin
	name      string // KMS provider name
	encConfig string // EncryptionConfiguration file
	keyPrefix string // etcd keys of this test's objects start with this
}

var unsafeName = regexp.MustCompile(`[^a-z0-9]+`)

// newEnv starts a plugin for t and writes an EncryptionConfiguration that
// points at it. Everything is stopped and removed when t ends.
func newEnv(t *testing.T) *env {
	t.Helper()
	// Not t.TempDir: Unix socket paths must stay short.
	dir, err := os.MkdirTemp("", "kmsit-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })

	p, err := cluster.StartPlugin(context.Background(), cluster.PluginConfig{Binary: pluginBin, Dir: dir})
	if err != nil {
		t.Fatalf("start kms-plugin: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kms-plugin log tail:\n%s", p.Process().LogTail(60))
		}
		if err := p.Stop(); err != nil {
			t.Errorf("stop kms-plugin: %v", err)
		}
	})

	slug := strings.Trim(unsafeName.ReplaceAllString(strings.ToLower(t.Name()), "-"), "-")
	e := &env{
		plugin:    p,
		name:      "it-" + slug,
		encConfig: filepath.Join(dir, "encryption-config.yaml"),
		keyPrefix: "/registry/secrets/" + slug + "/",
	}
	if err := cluster.WriteEncryptionConfig(e.encConfig, e.name, p.Endpoint(), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if _, err := etcd.Delete(context.Background(), e.keyPrefix, clientv3.WithPrefix()); err != nil {
			t.Errorf("clean etcd: %v", err)
		}
	})
	return e
}

// load does what kube-apiserver does at start: it loads the
// EncryptionConfiguration, waits until its KMS health check passes, and
// returns the transformer for secrets. Each call is a fresh apiserver: own
// gRPC connection, own DEK seed, empty decrypt cache.
func (e *env) load(t *testing.T) value.Transformer {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel) // closes the gRPC connection and stops the Status polling
	cfg, err := encryptionconfig.LoadEncryptionConfig(ctx, e.encConfig, false, "it-apiserver-"+cluster.RandomHex(4))
	if err != nil {
		t.Fatalf("LoadEncryptionConfig: %v", err)
	}
	// With only KMS v2 providers the apiserver registers a single check.
	if len(cfg.HealthChecks) != 1 || cfg.HealthChecks[0].Name() != "kms-providers" {
		names := make([]string, len(cfg.HealthChecks))
		for i, c := range cfg.HealthChecks {
			names[i] = c.Name()
		}
		t.Fatalf("health checks = %q, want [kms-providers]", names)
	}
	check := cfg.HealthChecks[0]
	cluster.WaitFor(context.Background(), t, 30*time.Second, 100*time.Millisecond, "the kms-providers health check to pass", func() error {
		return check.Check(httptest.NewRequestWithContext(ctx, "GET", "/readyz/kms-providers", nil))
	})
	tr, ok := cfg.Transformers[schema.GroupResource{Resource: "secrets"}]
	if !ok {
		t.Fatalf("no transformer for secrets in %v", cfg.Transformers)
	}
	return tr
}

func (e *env) key(name string) string { return e.keyPrefix + name }

// object is a plaintext stored under an etcd key.
type object struct {
	key       string
	plaintext []byte
}

// writeObjects encrypts n fresh plaintexts with tr and puts them into etcd
// under e.key(namePrefix-i). Sizes vary from 1 byte to 256 KiB.
func (e *env) writeObjects(t *testing.T, tr value.Transformer, namePrefix string, n int) []object {
	t.Helper()
	ctx := context.Background()
	sizes := []int{1, 31, 32, 33, 100, 1000, 4096, 20_000}
	objs := make([]object, n)
	for i := range objs {
		size := sizes[i%len(sizes)]
		if i == n-1 && n > 10 {
			size = 256 << 10
		}
		key := e.key(fmt.Sprintf("%s-%04d", namePrefix, i))
		objs[i] = object{key: key, plaintext: plaintext(t, key, size)}
		stored, err := tr.TransformToStorage(ctx, objs[i].plaintext, value.DefaultContext(key))
		if err != nil {
			t.Fatalf("TransformToStorage(%s): %v", key, err)
		}
		if p := objs[i].plaintext; len(p) >= len(key)+32 && (bytes.Contains(stored, []byte(key)) || bytes.Contains(stored, p[len(p)-32:])) {
			t.Fatalf("stored value of %s contains its plaintext", key)
		}
		if _, err := etcd.Put(ctx, key, string(stored)); err != nil {
			t.Fatalf("etcd put %s: %v", key, err)
		}
	}
	return objs
}

// plaintext returns size bytes that start with a marker naming key (when
// it fits) followed by random bytes.
func plaintext(t *testing.T, key string, size int) []byte {
	t.Helper()
	p := make([]byte, size)
	if _, err := rand.Read(p); err != nil {
		t.Fatal(err)
	}
	copy(p, key)
	return p
}

// readObjects reads objs back from etcd through tr and checks each equals
// what was written and has the wanted staleness.
func readObjects(t *testing.T, tr value.Transformer, objs []object, wantStale bool) {
	t.Helper()
	ctx := context.Background()
	failures := 0
	for _, o := range objs {
		stored := get(t, o.key)
		got, stale, err := tr.TransformFromStorage(ctx, stored, value.DefaultContext(o.key))
		switch {
		case err != nil:
			t.Errorf("TransformFromStorage(%s): %v", o.key, err)
		case !bytes.Equal(got, o.plaintext):
			t.Errorf("TransformFromStorage(%s) = %d bytes that differ from the %d written", o.key, len(got), len(o.plaintext))
		case stale != wantStale:
			t.Errorf("TransformFromStorage(%s): stale = %v, want %v", o.key, stale, wantStale)
		default:
			continue
		}
		if failures++; failures >= 10 {
			t.Fatalf("stopping after %d failed reads of %d", failures, len(objs))
		}
	}
}

// storedObject reads key from etcd and decodes it as the EncryptedObject of
// provider name.
func storedObject(t *testing.T, key, name string) *kmstypes.EncryptedObject {
	t.Helper()
	obj, err := cluster.DecodeStored(get(t, key), name)
	if err != nil {
		t.Fatalf("%s: %v", key, err)
	}
	return obj
}

// checkKeyIDs checks that every object is stored under keyID.
func checkKeyIDs(t *testing.T, e *env, objs []object, keyID string) {
	t.Helper()
	for _, o := range objs {
		if got := storedObject(t, o.key, e.name).KeyID; got != keyID {
			t.Fatalf("%s stored with key ID %q, want %q", o.key, got, keyID)
		}
	}
}

func get(t *testing.T, key string) []byte {
	t.Helper()
	resp, err := etcd.Get(context.Background(), key)
	if err != nil {
		t.Fatalf("etcd get %s: %v", key, err)
	}
	if len(resp.Kvs) != 1 {
		t.Fatalf("etcd get %s: %d values, want 1", key, len(resp.Kvs))
	}
	return resp.Kvs[0].Value
}

// status returns the plugin's /status.
func status(t *testing.T, p *cluster.Plugin) cluster.PluginStatus {
	t.Helper()
	st, err := p.Status(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// rotate rotates the plugin's local keyset and waits until the running
// plugin reports a new key ID, which it returns with the new status.
func rotate(t *testing.T, p *cluster.Plugin) cluster.PluginStatus {
	t.Helper()
	ctx := context.Background()
	before := status(t, p)
	version, err := p.RotateKeyset(ctx)
	if err != nil {
		t.Fatal(err)
	}
	after, err := p.WaitForKeyIDChange(ctx, before.KeyID, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if after.RemoteVersion != version {
		t.Errorf("after `keyset rotate` printed %q, /status remoteVersion = %q; want them equal", version, after.RemoteVersion)
	}
	if after.RemoteVersion == before.RemoteVersion {
		t.Errorf("/status remoteVersion %q did not change with the key ID", after.RemoteVersion)
	}
	return after
}
