//go:build !serveonly

package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

func newID(t *testing.T) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// TestDoctorAzure runs doctor against the fake vault with one failure
// injected per case, and checks the failed check and its fix.
func TestDoctorAzure(t *testing.T) {
	type env struct {
		srv    *kvtest.Server
		app    string
		config map[string]string // YAML lines under azure:, by key
		dir    string
	}
	for _, tt := range []struct {
		name   string
		setup  func(t *testing.T, e *env)
		failed string   // the check expected to fail; "" means none
		want   []string // in the output
	}{
		{"healthy", nil, "", []string{"[ok]    credential     client secret", "[ok]    token", "[ok]    round trip", "No problems found."}},
		{"wrong vault", func(t *testing.T, e *env) { e.config["vaultURL"] = "https://nosuchvault.vault.azure.net" },
			"vault", []string{"cannot resolve nosuchvault.vault.azure.net", "fix: DNS cannot resolve", "[skip]"}},
		{"vault down", func(t *testing.T, e *env) { e.srv.SetOutage(true) },
			"vault", []string{"fix: cannot reach kvtest.vault.azure.net over HTTPS"}},
		{"key disabled", func(t *testing.T, e *env) {
			if err := e.srv.SetEnabled("kms-kek", "", false); err != nil {
				t.Fatal(err)
			}
		}, "key", []string{"key version disabled", "fix: the key version is disabled", "az keyvault key set-attributes"}},
		{"no such key", func(t *testing.T, e *env) { e.config["keyName"] = "kms-kek-typo" },
			"key", []string{"key kms-kek-typo not found in vault", "check azure.keyName and azure.vaultURL"}},
		{"missing get permission", func(t *testing.T, e *env) {
			e.srv.SetPermissions(kvtest.App(e.app), kvtest.PermWrapKey, kvtest.PermUnwrapKey)
		}, "key", []string{"lacks key permission keys/get", "az keyvault set-policy", "--key-permissions get wrapKey unwrapKey"}},
		{"missing unwrapKey permission", func(t *testing.T, e *env) {
			e.srv.SetPermissions(kvtest.App(e.app), kvtest.PermGet, kvtest.PermWrapKey)
		}, "unwrap", []string{"lacks key permission keys/unwrapKey"}},
		{"missing wrapKey permission when wrapping in the vault", func(t *testing.T, e *env) {
			e.config["wrapInVault"] = "true"
			e.srv.SetPermissions(kvtest.App(e.app), kvtest.PermGet, kvtest.PermUnwrapKey)
		}, "wrap", []string{"lacks key permission keys/wrapKey"}},
		{"clock skew", func(t *testing.T, e *env) { e.srv.SetClockSkew(10 * time.Minute) },
			"clock", []string{"this node's clock is ", "behind the vault's", "fix: synchronize the clock"}},
		{"wrong secret", func(t *testing.T, e *env) {
			e.config["clientSecretFile"] = writeTemp(t, e.dir, "wrong", "not-the-secret")
		},
			"token", []string{"AADSTS7000215", "fix: the client secret is wrong or expired"}},
		{"wrong tenant", func(t *testing.T, e *env) { e.config["tenantID"] = "11111111-2222-3333-4444-555555555555" },
			"tenant", []string{"the vault belongs to tenant " + kvtest.DefaultTenantID, "[FAIL]  token"}},
		{"bad configuration", func(t *testing.T, e *env) { delete(e.config, "keyName") },
			"configuration", []string{"azure.keyName"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv, err := kvtest.Start(kvtest.Options{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(srv.Close)
			if _, err := srv.CreateKey("kms-kek", kvtest.KeyTypeRSA, 0); err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			app, secret := newID(t), "secret-"+newID(t)
			srv.AddClientSecret(app, secret)
			e := &env{srv: srv, app: app, dir: dir, config: map[string]string{
				"vaultURL": srv.VaultURL(), "keyName": "kms-kek", "authorityHost": srv.AuthorityHost(),
				"tenantID": srv.TenantID(), "clientID": app, "clientSecretFile": writeTemp(t, dir, "secret", secret),
			}}
			if tt.setup != nil {
				tt.setup(t, e)
			}
			var cfg strings.Builder
			cfg.WriteString("provider: azurekeyvault\nazure:\n")
			for _, k := range []string{"vaultURL", "keyName", "authorityHost", "wrapInVault"} {
				if v, ok := e.config[k]; ok {
					cfg.WriteString("  " + k + ": " + v + "\n")
				}
			}
			cfg.WriteString("  credential:\n    type: clientSecret\n")
			for _, k := range []string{"tenantID", "clientID", "clientSecretFile"} {
				cfg.WriteString("    " + k + ": " + e.config[k] + "\n")
			}
			path := writeTemp(t, dir, "kms.yaml", cfg.String())

			var out, errOut bytes.Buffer
			err = doctorMain(context.Background(), []string{"--config", path}, &out, &errOut, srv.HTTPClient())
			text := out.String()
			t.Log("\n" + text)
			if (tt.failed == "") != (err == nil) {
				t.Fatalf("doctor = %v; want failure %q\n%s", err, tt.failed, text)
			}
			if tt.failed != "" {
				if !errors.Is(err, errProblems) {
					t.Fatalf("doctor = %v; want errProblems", err)
				}
				if !strings.Contains(text, "[FAIL]  "+tt.failed) {
					t.Fatalf("output does not fail check %q:\n%s", tt.failed, text)
				}
			}
			for _, w := range tt.want {
				if !strings.Contains(text, w) {
					t.Fatalf("output does not contain %q:\n%s", w, text)
				}
			}
			if strings.Contains(text, "not-the-secret") || strings.Contains(text, secret) {
				t.Fatalf("output contains a secret:\n%s", text)
			}
		})
	}
}

func TestDoctorLocal(t *testing.T) {
	dir := t.TempDir()
	keyset := filepath.Join(dir, "keyset.json")
	if _, err := local.New(local.Config{Path: keyset, Create: true}); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name   string
		args   []string
		setup  func(t *testing.T)
		failed string
		want   string
	}{
		{"healthy", []string{"--local-keyset", keyset}, nil, "", "[ok]    round trip"},
		{"missing keyset", []string{"--local-keyset", filepath.Join(dir, "absent.json")}, nil, "key store", "doctor does not"},
		{"readable by others", []string{"--local-keyset", keyset}, func(t *testing.T) {
			if err := os.Chmod(keyset, 0o644); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = os.Chmod(keyset, 0o600) })
		}, "key store", "chmod 600"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if tt.setup != nil {
				tt.setup(t)
			}
			var out, errOut bytes.Buffer
			err := run(context.Background(), append([]string{"doctor"}, tt.args...), &out, &errOut)
			text := out.String()
			if (tt.failed == "") != (err == nil) || (tt.failed != "" && !strings.Contains(text, "[FAIL]  "+tt.failed)) {
				t.Fatalf("doctor = %v; want failure %q\n%s", err, tt.failed, text)
			}
			if !strings.Contains(text, tt.want) {
				t.Fatalf("output does not contain %q:\n%s", tt.want, text)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "absent.json")); !os.IsNotExist(err) {
		t.Fatalf("doctor created a keyset: %v", err)
	}
}

func writeTemp(t *testing.T, dir, name, data string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}
