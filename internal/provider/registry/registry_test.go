package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

// load parses a config file body over the registry's defaults, as
// cmd/kms-plugin does.
func load(t *testing.T, r Registry, body string) (config.Config, error) {
	t.Helper()
	cfg := r.Default()
	if body == "" {
		return cfg, nil
	}
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return config.Load(p, cfg)
}

func TestBuiltin(t *testing.T) {
	r := Builtin()
	if got, want := r.Names(), []string{local.Name, azurekv.Name, "pkcs11", "vault"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("Names() = %q; want %q (local first: the default)", got, want)
	}
	if got := r.Default().Provider; got != local.Name {
		t.Errorf("Default().Provider = %q; want %q", got, local.Name)
	}
	// Sections must not shadow a generic field of the file.
	generic := config.Default()
	generic.SocketGroup = "x" // omitempty
	js, err := json.Marshal(generic)
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(js, &fields); err != nil {
		t.Fatal(err)
	}
	names, sections := map[string]bool{}, map[string]bool{}
	fs := flag.NewFlagSet("all", flag.ContinueOnError)
	r.Flags(fs) // panics on two stores defining one flag
	for _, reg := range r {
		if names[reg.Name] || sections[strings.ToLower(reg.Section)] {
			t.Errorf("%s: name or section %q used twice", reg.Name, reg.Section)
		}
		names[reg.Name], sections[strings.ToLower(reg.Section)] = true, true
		for f := range fields {
			if strings.EqualFold(f, reg.Section) {
				t.Errorf("%s: section %q is a generic field", reg.Name, reg.Section)
			}
		}
		if reg.Summary == "" || reg.NewSettings == nil {
			t.Errorf("%s: no summary or no settings", reg.Name)
		}
		// Flags store settings back as JSON: they must round-trip.
		s := reg.NewSettings()
		raw, err := json.Marshal(s)
		if err != nil {
			t.Fatalf("%s: %v", reg.Name, err)
		}
		back, err := decode(reg, raw)
		if err != nil || !reflect.DeepEqual(back, s) {
			t.Errorf("%s: settings after a JSON round trip = %+v, %v; want %+v", reg.Name, back, err, s)
		}
	}
}

func TestLookup(t *testing.T) {
	for _, tt := range []struct {
		name, want string // want: "" for success, else the error
	}{
		{"local", ""},
		{"azurekeyvault", ""},
		{"", "provider: required (one of: local, azurekeyvault, pkcs11, vault)"},
		{"gcp", `provider: unknown provider "gcp" (one of: local, azurekeyvault, pkcs11, vault)`},
		{"Local", `provider: unknown provider "Local" (one of: local, azurekeyvault, pkcs11, vault)`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			reg, err := Builtin().Lookup(tt.name)
			switch {
			case tt.want == "" && (err != nil || reg.Name != tt.name):
				t.Fatalf("Lookup(%q) = %q, %v; want it", tt.name, reg.Name, err)
			case tt.want != "" && (err == nil || err.Error() != tt.want):
				t.Fatalf("Lookup(%q) error = %v; want %q", tt.name, err, tt.want)
			}
		})
	}
}

func TestSettings(t *testing.T) {
	t.Setenv("KMS_PLUGIN_STATE_DIR", "/tmp/kms-plugin-test-state")
	for _, tt := range []struct {
		name string
		body string
		want provider.Settings // nil: an error containing err
		err  string
	}{
		{"defaults", "", &local.Settings{KeysetPath: "/tmp/kms-plugin-test-state/keyset.json"}, ""},
		{"local section", "local:\n  keysetPath: /k/keyset.json\n", &local.Settings{KeysetPath: "/k/keyset.json"}, ""},
		{"empty section", "local:\n", &local.Settings{KeysetPath: "/tmp/kms-plugin-test-state/keyset.json"}, ""},
		{"section key ignores case", "Local:\n  KeysetPath: /k/keyset.json\n", &local.Settings{KeysetPath: "/k/keyset.json"}, ""},
		{"other section ignored", "local:\n  keysetPath: /k/keyset.json\nazure:\n  keyName: k\n", &local.Settings{KeysetPath: "/k/keyset.json"}, ""},
		{"azure", "provider: azurekeyvault\nazure:\n  vaultName: v\n  keyName: k\n  timeout: 5s\n  credential: {type: managedIdentity}\n",
			&azurekv.Settings{VaultName: "v", KeyName: "k", Timeout: config.Duration{Duration: 5e9}, Credential: azurekv.CredentialSettings{Type: "managedIdentity"}}, ""},
		{"unknown field in the section", "local:\n  keysetPth: /k\n", nil, `local: json: unknown field "keysetPth"`},
		{"unknown field in a nested field", "provider: azurekeyvault\nazure:\n  credential: {type: clientSecret, secret: x}\n", nil, `azure: json: unknown field "secret"`},
		{"unknown field in another section", "azure:\n  keyNmae: k\n", nil, `azure: json: unknown field "keyNmae"`},
		{"bad section type", "local: [a]\n", nil, "local: json: cannot unmarshal array"},
		{"unknown provider", "provider: gcp\n", nil, `provider: unknown provider "gcp"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg, err := load(t, Builtin(), tt.body)
			if err != nil {
				t.Fatal(err)
			}
			reg, s, err := Builtin().Settings(cfg)
			if tt.want == nil {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("Settings error = %v; want it to contain %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if reg.Name != cfg.Provider || !reflect.DeepEqual(s, tt.want) {
				t.Fatalf("Settings = %s %+v; want %s %+v", reg.Name, s, cfg.Provider, tt.want)
			}
		})
	}
}

func TestUnknownTopLevelKey(t *testing.T) {
	_, err := load(t, Builtin(), "gcp:\n  keyName: k\n")
	if err == nil || !strings.Contains(err.Error(), `unknown field "gcp"`) {
		t.Fatalf("Load error = %v; want an unknown field", err)
	}
}

func TestValidateNamesTheField(t *testing.T) {
	for _, tt := range []struct {
		name  string
		body  string
		field string // "" means valid
	}{
		{"defaults", "", ""},
		{"unknown provider", "provider: gcp\n", "provider:"},
		{"empty provider", "provider: \"\"\n", "provider:"},
		{"relative keyset", "local:\n  keysetPath: keyset.json\n", "local.keysetPath:"},
		{"empty keyset", "local:\n  keysetPath: \"\"\n", "local.keysetPath:"},
		{"azure without key", "provider: azurekeyvault\nazure:\n  vaultURL: https://v.vault.azure.net\n  credential: {type: managedIdentity}\n", "azure.keyName:"},
		{"generic field", "endpoint: tcp://127.0.0.1:1\n", "endpoint:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("KMS_PLUGIN_STATE_DIR", "/tmp/kms-plugin-test-state")
			cfg, err := load(t, Builtin(), tt.body)
			if err != nil {
				t.Fatal(err)
			}
			err = Builtin().Validate(cfg)
			if tt.field == "" {
				if err != nil {
					t.Fatalf("Validate = %v; want nil", err)
				}
				return
			}
			if err == nil || !strings.HasPrefix(err.Error(), tt.field) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("Validate = %v; want one line starting with %q", err, tt.field)
			}
		})
	}
}

func TestFlagsOverFile(t *testing.T) {
	t.Setenv("KMS_PLUGIN_STATE_DIR", "/tmp/kms-plugin-test-state")
	const azureFile = "provider: azurekeyvault\nazure:\n  vaultURL: https://v.vault.azure.net\n  keyName: from-file\n  credential: {type: managedIdentity}\n"
	for _, tt := range []struct {
		name string
		body string
		args []string
		want provider.Settings
	}{
		{"neither", "", nil, &local.Settings{KeysetPath: "/tmp/kms-plugin-test-state/keyset.json"}},
		{"file", "local: {keysetPath: /file/keyset.json}\n", nil, &local.Settings{KeysetPath: "/file/keyset.json"}},
		{"flag", "", []string{"--local-keyset", "/flag/keyset.json"}, &local.Settings{KeysetPath: "/flag/keyset.json"}},
		{"flag over file", "local: {keysetPath: /file/keyset.json}\n", []string{"--local-keyset", "/flag/keyset.json"}, &local.Settings{KeysetPath: "/flag/keyset.json"}},
		{"another store's flag", "local: {keysetPath: /file/keyset.json}\n", []string{"--azure-key-name", "k"}, &local.Settings{KeysetPath: "/file/keyset.json"}},
		{"azure flags over file", azureFile, []string{"--azure-key-name", "from-flag", "--azure-wrap-in-vault"},
			&azurekv.Settings{VaultURL: "https://v.vault.azure.net", KeyName: "from-flag", WrapInVault: true, Credential: azurekv.CredentialSettings{Type: "managedIdentity"}}},
		{"azure file", azureFile, []string{"--local-keyset", "/flag/keyset.json"},
			&azurekv.Settings{VaultURL: "https://v.vault.azure.net", KeyName: "from-file", Credential: azurekv.CredentialSettings{Type: "managedIdentity"}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := Builtin()
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			apply := r.Flags(fs)
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			base := r.Default()
			cfg, err := load(t, r, tt.body)
			if err != nil {
				t.Fatal(err)
			}
			if err := apply(&cfg); err != nil {
				t.Fatal(err)
			}
			_, s, err := r.Settings(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(s, tt.want) {
				t.Fatalf("settings = %+v; want %+v", s, tt.want)
			}
			if err := r.Validate(cfg); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(base.Sections, r.Default().Sections) {
				t.Fatalf("applying flags changed the defaults' sections: %v", base.Sections)
			}
		})
	}
}

// TestOpenCreate checks that only OpenOptions.Create (serve) creates key
// material, and that Open refuses invalid settings.
func TestOpenCreate(t *testing.T) {
	for _, tt := range []struct {
		name     string
		existing bool
		create   bool
		path     string // "" means a keyset in a temp dir
		err      string // "" means success
	}{
		{"serve creates a missing keyset", false, true, "", ""},
		{"others do not create", false, false, "", "no such file"},
		{"others open an existing keyset", true, false, "", ""},
		{"serve keeps an existing keyset", true, true, "", ""},
		{"invalid settings", false, true, "keyset.json", "invalid local settings: local.keysetPath:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.path
			if path == "" {
				path = filepath.Join(t.TempDir(), "keyset.json")
			}
			var before []byte
			if tt.existing {
				if _, err := local.New(local.Config{Path: path, Create: true}); err != nil {
					t.Fatal(err)
				}
				before = readFile(t, path)
			}
			cfg := Builtin().Default()
			cfg.Sections[local.Section] = json.RawMessage(`{"keysetPath":"` + path + `"}`)
			p, err := Builtin().Open(context.Background(), cfg, provider.OpenOptions{Create: tt.create})
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("Open error = %v; want it to contain %q", err, tt.err)
				}
				if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
					t.Fatalf("a failed Open left a keyset: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.Name() != cfg.Provider {
				t.Errorf("store name %q; want the registration's %q", p.Name(), cfg.Provider)
			}
			if tt.existing && !bytes.Equal(readFile(t, path), before) {
				t.Error("Open changed an existing keyset")
			}
		})
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
