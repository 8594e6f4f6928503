package vault_test

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault"
)

func TestSettingsValidate(t *testing.T) {
	t.Setenv("VAULT_ADDR", "")
	t.Setenv("VAULT_TOKEN", "")
	ok := func() vault.Settings {
		return vault.Settings{Address: "https://vault.example:8200", KeyName: "kms", Auth: vault.AuthSettings{Method: "token", TokenFile: "/etc/kms/token"}}
	}
	tests := []struct {
		name   string
		change func(s *vault.Settings)
		want   string // "" = valid
	}{
		{"valid", func(*vault.Settings) {}, ""},
		{"no address", func(s *vault.Settings) { s.Address = "" }, "vault.address: required"},
		{"address with query", func(s *vault.Settings) { s.Address = "https://v?x=1" }, "vault.address"},
		{"ftp address", func(s *vault.Settings) { s.Address = "ftp://v" }, "vault.address"},
		{"no key", func(s *vault.Settings) { s.KeyName = "" }, "vault.keyName"},
		{"key with slash", func(s *vault.Settings) { s.KeyName = "a/b" }, "vault.keyName"},
		{"bad mount", func(s *vault.Settings) { s.TransitMount = "a//b" }, "vault.transitMount"},
		{"relative token file", func(s *vault.Settings) { s.Auth.TokenFile = "token" }, "vault.auth.tokenFile"},
		{"no token", func(s *vault.Settings) { s.Auth.TokenFile = "" }, "vault.auth.tokenFile: required"},
		{"approle without files", func(s *vault.Settings) { s.Auth = vault.AuthSettings{Method: "approle"} }, "vault.auth.roleIDFile"},
		{"jwt without role", func(s *vault.Settings) { s.Auth = vault.AuthSettings{Method: "jwt", JWTFile: "/j"} }, "vault.auth.role"},
		{"cert without certificate", func(s *vault.Settings) { s.Auth = vault.AuthSettings{Method: "cert"} }, "vault.clientCertFile"},
		{"cert", func(s *vault.Settings) {
			s.Auth = vault.AuthSettings{Method: "cert"}
			s.ClientCertFile, s.ClientKeyFile = "/c.pem", "/k.pem"
		}, ""},
		{"cert without key", func(s *vault.Settings) { s.ClientCertFile = "/c.pem" }, "vault.clientKeyFile"},
		{"kubernetes", func(s *vault.Settings) { s.Auth.Method = "kubernetes" }, "runs before the cluster"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := ok()
			tt.change(&s)
			err := s.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Validate = %v; want nil", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("Validate = %v; want %q", err, tt.want)
			}
		})
	}
	t.Run("VAULT_ADDR and VAULT_TOKEN", func(t *testing.T) {
		t.Setenv("VAULT_ADDR", "https://from-env:8200")
		t.Setenv("VAULT_TOKEN", "x")
		s := vault.Settings{KeyName: "kms", Auth: vault.AuthSettings{Method: "token"}}
		if err := s.Validate(); err != nil {
			t.Fatalf("Validate with VAULT_ADDR and VAULT_TOKEN: %v", err)
		}
		if d := s.Describe(); !strings.Contains(d, "https://from-env:8200") || strings.Contains(d, "x,") {
			t.Fatalf("Describe = %q", d)
		}
	})
}

func TestFlags(t *testing.T) {
	reg := vault.Registration()
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	apply := reg.Flags(fs)
	err := fs.Parse([]string{
		"--vault-address", "https://v:8200", "--vault-transit-mount", "kms/transit", "--vault-key-name", "k",
		"--vault-namespace", "team", "--vault-ca-file", "/ca.pem", "--vault-tls-server-name", "vault.internal",
		"--vault-auth", "approle", "--vault-auth-mount", "node-approle",
		"--vault-approle-role-id-file", "/r", "--vault-approle-secret-id-file", "/s",
	})
	if err != nil {
		t.Fatal(err)
	}
	s := reg.NewSettings()
	apply(s)
	v := s.(*vault.Settings)
	if v.Address != "https://v:8200" || v.TransitMount != "kms/transit" || v.KeyName != "k" || v.Namespace != "team" ||
		v.CAFile != "/ca.pem" || v.TLSServerName != "vault.internal" || v.Auth.Method != "approle" || v.Auth.Mount != "node-approle" ||
		v.Auth.RoleIDFile != "/r" || v.Auth.SecretIDFile != "/s" {
		t.Fatalf("settings = %+v", v)
	}
	if err := v.Validate(); err != nil {
		t.Fatal(err)
	}
	// Settings survive a JSON round trip (the registry stores them back).
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	back := reg.NewSettings()
	if err := json.Unmarshal(b, back); err != nil {
		t.Fatal(err)
	}
	if back.(*vault.Settings).Auth != v.Auth || back.(*vault.Settings).Address != v.Address {
		t.Fatalf("round trip = %+v", back)
	}
	if m, ok := v.Method().(vault.AppRole); !ok || m.Mount != "node-approle" {
		t.Fatalf("Method = %#v", v.Method())
	}
	hp := v.HostPaths()
	if len(hp.Read) != 3 {
		t.Fatalf("HostPaths = %+v; want the CA, role ID and secret ID files", hp)
	}
}

type checklist struct{ lines []string }

func (c *checklist) OK(check, detail string) { c.lines = append(c.lines, "ok "+check+": "+detail) }
func (c *checklist) Fail(check string, err error, fix string) {
	c.lines = append(c.lines, "FAIL "+check+": "+err.Error()+" FIX "+fix)
}
func (c *checklist) Skip(check, why string) { c.lines = append(c.lines, "skip "+check+": "+why) }
func (c *checklist) String() string         { return strings.Join(c.lines, "\n") }

func TestDoctor(t *testing.T) {
	ctx := context.Background()
	srv := sharedServer(t)
	f := newFixture(t, srv, fixtureOpts{})
	s := &vault.Settings{Address: srv.Addr, CAFile: srv.CAFile, KeyName: f.key, Auth: vault.AuthSettings{Method: "token", TokenFile: f.tokenFile}}
	var c checklist
	p := s.Doctor(ctx, &c, provider.OpenOptions{})
	if p == nil || strings.Contains(c.String(), "FAIL") {
		t.Fatalf("doctor on a good setup:\n%s", c.String())
	}
	for _, want := range []string{"ok vault:", "version 1.21.4", "ok login:", "ok token: TTL", "ok key: transit/keys/" + f.key + ": type aes256-gcm96", "ok policy:", "ok rotate:"} {
		if !strings.Contains(c.String(), want) {
			t.Errorf("doctor output lacks %q:\n%s", want, c.String())
		}
	}
	_ = p.(interface{ Close() error }).Close()

	// A token without the policy: the policy check fails with the HCL.
	tok, err := srv.Token(ctx, []string{"default"}, 0, 0, true)
	if err != nil {
		t.Fatal(err)
	}
	s.Auth.TokenFile = writeSecret(t, "weak-token", tok)
	c = checklist{}
	if p := s.Doctor(ctx, &c, provider.OpenOptions{}); p != nil {
		t.Fatalf("doctor returned a provider for a token without the policy:\n%s", c.String())
	}
	if !strings.Contains(c.String(), "FAIL key") && !strings.Contains(c.String(), "FAIL policy") {
		t.Fatalf("doctor with a weak token:\n%s", c.String())
	}
	if !strings.Contains(c.String(), `path "transit/decrypt/`+f.key+`"`) {
		t.Fatalf("doctor's fix lacks the policy:\n%s", c.String())
	}

	// An untrusted certificate: the vault check fails naming the CA file.
	s.CAFile = ""
	c = checklist{}
	if p := s.Doctor(ctx, &c, provider.OpenOptions{}); p != nil || !strings.Contains(c.String(), "caFile") {
		t.Fatalf("doctor without the CA:\n%s", c.String())
	}
	// Nothing listening.
	s.Address = "https://127.0.0.1:1"
	c = checklist{}
	if p := s.Doctor(ctx, &c, provider.OpenOptions{}); p != nil || !strings.Contains(c.String(), "FAIL vault") {
		t.Fatalf("doctor without Vault:\n%s", c.String())
	}
}

func TestRemedyEveryKind(t *testing.T) {
	for _, kind := range []error{provider.ErrPermissionDenied, provider.ErrKeyNotFound, provider.ErrKeyDisabled, provider.ErrUnavailable} {
		err := &vault.Error{Op: "decrypt", Path: "transit/decrypt/k", Kind: kind}
		if vault.Remedy(err) == "" {
			t.Errorf("no remedy for %v", kind)
		}
		if !errors.Is(err, kind) {
			t.Errorf("errors.Is(%v)", kind)
		}
	}
}
