package vault_test

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kms-plugin/kms-plugin/internal/provider/vault"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault/vaulttest"
)

// shared is one Vault server for the tests that do not break it; tests
// that seal, kill or restart Vault start their own.
var shared struct {
	once sync.Once
	dir  string
	srv  *vaulttest.Server
	err  error
}

var keySeq atomic.Int64

func sharedServer(t *testing.T) *vaulttest.Server {
	t.Helper()
	bin := vaulttest.Binary(t)
	shared.once.Do(func() {
		dir, err := os.MkdirTemp("", "vault-shared-")
		if err != nil {
			shared.err = err
			return
		}
		shared.dir = dir
		shared.srv, shared.err = vaulttest.Start(bin, dir, vaulttest.Options{TLS: true})
	})
	if shared.err != nil {
		t.Fatalf("start Vault: %v", shared.err)
	}
	return shared.srv
}

func TestMain(m *testing.M) {
	code := m.Run()
	if shared.srv != nil {
		shared.srv.Stop()
	}
	if shared.dir != "" {
		_ = os.RemoveAll(shared.dir)
	}
	os.Exit(code)
}

// fixture is one transit key with a token holding the plugin's policy on
// it, and a provider using that token through a request counter.
type fixture struct {
	srv       *vaulttest.Server
	mount     string
	key       string
	tokenFile string
	counter   *vaulttest.Counter
	p         *vault.Provider
}

type fixtureOpts struct {
	keyParams map[string]any
	method    func(f *fixture) vault.Method // default: token file with the policy token
	ttl       time.Duration
	settings  func(s *vault.Settings)
}

func newFixture(t *testing.T, srv *vaulttest.Server, o fixtureOpts) *fixture {
	t.Helper()
	ctx := context.Background()
	f := &fixture{srv: srv, mount: "transit", key: fmt.Sprintf("k%d", keySeq.Add(1))}
	if err := srv.Setup(ctx, f.mount, f.key, o.keyParams); err != nil {
		t.Fatal(err)
	}
	root := srv.Root(t)
	if err := root.Sys().PutPolicyWithContext(ctx, "plugin-"+f.key, vaulttest.PolicyFor(f.mount, f.key)); err != nil {
		t.Fatal(err)
	}
	tok, err := srv.Token(ctx, []string{"plugin-" + f.key}, o.ttl, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	f.tokenFile = writeSecret(t, "token", tok)
	s := &vault.Settings{Address: srv.Addr, CAFile: srv.CAFile, TransitMount: f.mount, KeyName: f.key,
		Auth: vault.AuthSettings{Method: vault.AuthToken, TokenFile: f.tokenFile}}
	if o.settings != nil {
		o.settings(s)
	}
	base, err := s.NewClient(nil)
	if err != nil {
		t.Fatal(err)
	}
	f.counter = &vaulttest.Counter{Next: base.CloneConfig().HttpClient.Transport}
	hc := &http.Client{Transport: f.counter}
	c, err := s.NewClient(hc)
	if err != nil {
		t.Fatal(err)
	}
	m := s.Method()
	if o.method != nil {
		m = o.method(f)
	}
	p, err := vault.New(vault.Config{Client: c, Mount: f.mount, KeyName: f.key, Auth: m})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.Close() })
	f.p = p
	return f
}

func writeSecret(t *testing.T, name, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(content+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// keyConfig reads the key as root.
func keyConfig(t *testing.T, f *fixture) map[string]any {
	t.Helper()
	s, err := f.srv.Root(t).Logical().Read(f.mount + "/keys/" + f.key)
	if err != nil || s == nil {
		t.Fatalf("read key: %v", err)
	}
	return s.Data
}

func rootWrite(t *testing.T, srv *vaulttest.Server, path string, data map[string]any) *api.Secret {
	t.Helper()
	s, err := srv.Root(t).Logical().Write(path, data)
	if err != nil {
		t.Fatalf("write %s: %v", path, err)
	}
	return s
}

// eventually polls cond every 100 ms until it holds or limit passes.
func eventually(t *testing.T, limit time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	var err error
	for time.Now().Before(deadline) {
		if err = cond(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s not within %s: %v", what, limit, err)
}
