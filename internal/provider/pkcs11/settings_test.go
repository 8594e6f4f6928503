package pkcs11

import (
	"encoding/json"
	"flag"
	"reflect"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

func validSettings() *Settings {
	s := NewSettings()
	s.Module, s.TokenLabel, s.PINFile, s.KeyLabel = "/usr/lib/softhsm/libsofthsm2.so", "kms", "/etc/kms-plugin/pin", "kek"
	return s
}

func TestSettingsValidateNamesTheField(t *testing.T) {
	slot := uint(3)
	for _, tt := range []struct {
		name   string
		mutate func(*Settings)
		field  string // "" means valid
	}{
		{"valid", func(*Settings) {}, ""},
		{"slot instead of label", func(s *Settings) { s.TokenLabel, s.Slot = "", &slot }, ""},
		{"no module", func(s *Settings) { s.Module = "" }, "pkcs11.module:"},
		{"relative module", func(s *Settings) { s.Module = "libsofthsm2.so" }, "pkcs11.module:"},
		{"no pin file", func(s *Settings) { s.PINFile = "" }, "pkcs11.pinFile:"},
		{"relative pin file", func(s *Settings) { s.PINFile = "pin" }, "pkcs11.pinFile:"},
		{"label and slot", func(s *Settings) { s.Slot = &slot }, "pkcs11.tokenLabel:"},
		{"no token", func(s *Settings) { s.TokenLabel = "" }, "pkcs11.tokenLabel:"},
		{"long label", func(s *Settings) { s.TokenLabel = strings.Repeat("x", 33) }, "pkcs11.tokenLabel:"},
		{"no key label", func(s *Settings) { s.KeyLabel = "" }, "pkcs11.keyLabel:"},
		{"no sessions", func(s *Settings) { s.Sessions = 0 }, "pkcs11.sessions:"},
		{"too many sessions", func(s *Settings) { s.Sessions = MaxSessions + 1 }, "pkcs11.sessions:"},
		{"bad env name", func(s *Settings) { s.ModuleEnv = map[string]string{"A=B": "x"} }, "pkcs11.moduleEnv:"},
		{"relative token dir", func(s *Settings) { s.TokenDir = "tokens" }, "pkcs11.tokenDir:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			s := validSettings()
			tt.mutate(s)
			err := s.Validate()
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

func TestSettingsDefaultsAreSafe(t *testing.T) {
	s := NewSettings()
	if !s.NodeLocal || s.Sessions != DefaultSessions {
		t.Fatalf("defaults = %+v; want nodeLocal true and %d sessions", s, DefaultSessions)
	}
	// nodeLocal false survives the registry's JSON round trip.
	s = validSettings()
	s.NodeLocal = false
	data, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	back := NewSettings()
	if err := json.Unmarshal(data, back); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(s, back) {
		t.Fatalf("round trip = %+v; want %+v", back, s)
	}
}

func TestFlags(t *testing.T) {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	apply := Registration().Flags(fs)
	err := fs.Parse([]string{"--pkcs11-module", "/m.so", "--pkcs11-slot", "0", "--pkcs11-pin-file", "/pin",
		"--pkcs11-key-label", "k", "--pkcs11-node-local=false", "--pkcs11-sessions", "4", "--pkcs11-hsm-generated-iv"})
	if err != nil {
		t.Fatal(err)
	}
	s := NewSettings()
	s.TokenLabel = "" // from the file, say
	apply(s)
	if s.Module != "/m.so" || s.Slot == nil || *s.Slot != 0 || s.PINFile != "/pin" || s.KeyLabel != "k" || s.NodeLocal || s.Sessions != 4 || !s.HSMGeneratedIV {
		t.Fatalf("flags applied = %+v", s)
	}
	if err := s.Validate(); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	// Flags not given leave the file's values.
	fs = flag.NewFlagSet("serve", flag.ContinueOnError)
	apply = Registration().Flags(fs)
	fs.Parse(nil)
	s = validSettings()
	apply(s)
	if !reflect.DeepEqual(s, validSettings()) {
		t.Fatalf("no flags changed the settings: %+v", s)
	}
}

func TestHostPaths(t *testing.T) {
	s := validSettings()
	s.ModuleEnv = map[string]string{"SOFTHSM2_CONF": "/etc/softhsm/softhsm2.conf", "OTHER": "not-a-path", "ChrystokiConfigurationPath": "/etc/lunaclient"}
	s.TokenDir = "/var/lib/softhsm/tokens"
	got := s.HostPaths()
	want := provider.HostPaths{
		Read: []provider.HostPath{
			{Name: "pkcs11-module", Path: "/usr/lib/softhsm/libsofthsm2.so"},
			{Name: "pkcs11-config-0", Path: "/etc/softhsm/softhsm2.conf"},
			{Name: "pkcs11-pin", Path: "/etc/kms-plugin/pin"},
		},
		Write:   []provider.HostPath{{Name: "pkcs11-token-dir", Path: "/var/lib/softhsm/tokens"}},
		PerNode: []string{"/var/lib/softhsm/tokens"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("HostPaths = %+v; want %+v", got, want)
	}
	s.NodeLocal = false
	if hp := s.HostPaths(); len(hp.PerNode) != 0 {
		t.Fatalf("a shared HSM has per-node material: %+v", hp)
	}
}

func TestDescribeHoldsNoSecret(t *testing.T) {
	s := validSettings()
	d := s.Describe()
	if !strings.Contains(d, "/usr/lib/softhsm/libsofthsm2.so") || !strings.Contains(d, `"kms"`) || !strings.Contains(d, "node-local") || strings.Contains(d, "/etc/kms-plugin/pin") {
		t.Fatalf("Describe = %q", d)
	}
}
