package config

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestDefaultIsValid(t *testing.T) {
	t.Setenv("KMS_PLUGIN_STATE_DIR", "/tmp/kms-plugin-test-state")
	cfg := Default()
	if err := cfg.Validate(); err != nil {
		t.Fatalf("Default().Validate() = %v", err)
	}
	if cfg.Endpoint != "unix:///tmp/kms-plugin-test-state/socket.sock" {
		t.Fatalf("defaults do not use the state dir: %+v", cfg)
	}
	if !strings.HasPrefix(cfg.HTTPAddr, "127.0.0.1:") {
		t.Fatalf("default httpAddr %q is not loopback", cfg.HTTPAddr)
	}
}

// base is what the provider registry's Default gives Load: a provider and
// the sections it knows.
func base() Config {
	c := Default()
	c.Provider = "local"
	c.Sections = map[string]json.RawMessage{"local": nil, "azure": nil}
	return c
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	full := write("full.yaml", `
endpoint: unix:///var/run/kmsplugin/socket.sock
socketGroup: kms
provider: local
local:
  keysetPath: /etc/kubernetes/kms-plugin/keyset.json
httpAddr: 127.0.0.1:9000
providerPollInterval: 30s
kek:
  maxAge: 24h
  maxUses: 1000
  cacheSize: 50
log:
  format: console
  level: debug
shutdownTimeout: 5s
`)
	cfg, err := Load(full, base())
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Endpoint: ProductionEndpoint, SocketGroup: "kms", Provider: "local",
		Sections:             map[string]json.RawMessage{"local": json.RawMessage(`{"keysetPath":"` + ProductionKeysetPath + `"}`), "azure": nil},
		HTTPAddr:             "127.0.0.1:9000",
		ProviderPollInterval: Duration{30 * time.Second},
		KEK:                  KEKConfig{MaxAge: Duration{24 * time.Hour}, MaxUses: 1000, CacheSize: 50},
		Log:                  LogConfig{Format: "console", Level: "debug"},
		ShutdownTimeout:      Duration{5 * time.Second},
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Fatalf("Load = %+v\nwant %+v", cfg, want)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}

	partial, err := Load(write("partial.yaml", "providerPollInterval: 5s\n"), base())
	if err != nil {
		t.Fatal(err)
	}
	if partial.ProviderPollInterval.Duration != 5*time.Second || partial.Provider != "local" || partial.KEK.CacheSize != 10000 {
		t.Fatalf("partial file did not keep defaults: %+v", partial)
	}
	if _, err := Load(write("empty.yaml", ""), base()); err != nil {
		t.Fatalf("empty file: %v", err)
	}

	for _, tt := range []struct{ name, body, want string }{
		{"unknown field", "endpiont: unix:///x\n", `unknown field "endpiont"`},
		{"bad duration", "providerPollInterval: soon\n", "invalid duration"},
		{"numeric duration", "providerPollInterval: 60\n", "duration must be a string"},
		{"not yaml", "endpoint: [\n", "parse YAML"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Load(write(tt.name+".yaml", tt.body), base())
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("Load error = %v; want it to contain %q", err, tt.want)
			}
		})
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml"), base()); err == nil {
		t.Fatal("Load of a missing file succeeded")
	}
}

func TestValidateNamesTheField(t *testing.T) {
	for _, tt := range []struct {
		name   string
		mutate func(*Config)
		field  string
	}{
		{"tcp endpoint", func(c *Config) { c.Endpoint = "tcp://127.0.0.1:1" }, "endpoint:"},
		{"relative socket", func(c *Config) { c.Endpoint = "unix://sock" }, "endpoint:"},
		{"long socket", func(c *Config) { c.Endpoint = "unix:///" + strings.Repeat("a", 120) }, "endpoint:"},
		{"bad http addr", func(c *Config) { c.HTTPAddr = "8080" }, "httpAddr:"},
		{"poll too fast", func(c *Config) { c.ProviderPollInterval.Duration = time.Millisecond }, "providerPollInterval:"},
		{"max uses zero", func(c *Config) { c.KEK.MaxUses = 0 }, "kek.maxUses:"},
		{"cache zero", func(c *Config) { c.KEK.CacheSize = 0 }, "kek.cacheSize:"},
		{"cache TTL too short", func(c *Config) { c.KEK.CacheTTL.Duration = time.Second }, "kek.cacheTTL:"},
		{"negative unwrap rate", func(c *Config) { c.KEK.UnwrapRate = -1 }, "kek.unwrapRate:"},
		{"huge unwrap burst", func(c *Config) { c.KEK.UnwrapBurst = 1 << 30 }, "kek.unwrapBurst:"},
		{"TLS key without cert", func(c *Config) { c.HTTPTLS.KeyFile = "/k" }, "httpTLS.keyFile:"},
		{"token over plain HTTP", func(c *Config) { c.HTTPAuth.TokenFile = "/t" }, "httpTLS.certFile:"},
		{"relative token file", func(c *Config) {
			c.HTTPTLS.CertFile, c.HTTPTLS.KeyFile, c.HTTPAuth.TokenFile = "/c", "/k", "token"
		}, "httpAuth.tokenFile:"},
		{"max age", func(c *Config) { c.KEK.MaxAge.Duration = time.Second }, "kek.maxAge:"},
		{"log format", func(c *Config) { c.Log.Format = "xml" }, "log.format:"},
		{"log level", func(c *Config) { c.Log.Level = "loud" }, "log.level:"},
		{"shutdown", func(c *Config) { c.ShutdownTimeout.Duration = 0 }, "shutdownTimeout:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Default()
			tt.mutate(&cfg)
			err := cfg.Validate()
			if err == nil || !strings.HasPrefix(err.Error(), tt.field) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("Validate = %v; want one line starting with %q", err, tt.field)
			}
		})
	}
}

func TestParseSections(t *testing.T) {
	for _, tt := range []struct {
		name string
		body string
		want map[string]json.RawMessage // nil: an error containing err
		err  string
	}{
		{"none", "providerPollInterval: 5s\n", map[string]json.RawMessage{"local": nil, "azure": nil}, ""},
		{"one", "local:\n  keysetPath: /k\n", map[string]json.RawMessage{"local": json.RawMessage(`{"keysetPath":"/k"}`), "azure": nil}, ""},
		{"key ignores case", "Azure: {keyName: k}\n", map[string]json.RawMessage{"local": nil, "azure": json.RawMessage(`{"keyName":"k"}`)}, ""},
		{"kept raw", "azure: {whatever: [1]}\n", map[string]json.RawMessage{"local": nil, "azure": json.RawMessage(`{"whatever":[1]}`)}, ""},
		{"unknown section", "vault: {keyName: k}\n", nil, `unknown field "vault"`},
		{"not a mapping", "- a\n", nil, "cannot unmarshal array"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := base()
			cfg := b
			err := Parse([]byte(tt.body), &cfg)
			if tt.want == nil {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("Parse error = %v; want it to contain %q", err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(cfg.Sections, tt.want) {
				t.Fatalf("Sections = %q; want %q", cfg.Sections, tt.want)
			}
			if b.Sections["local"] != nil || b.Sections["azure"] != nil {
				t.Fatalf("Parse changed the base's sections: %q", b.Sections)
			}
		})
	}
}
