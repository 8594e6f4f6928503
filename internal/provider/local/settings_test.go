package local

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

func TestSettingsDefaultUsesStateDir(t *testing.T) {
	t.Setenv("KMS_PLUGIN_STATE_DIR", "/tmp/kms-plugin-test-state")
	s := NewSettings()
	if err := s.Validate(); err != nil {
		t.Fatalf("NewSettings().Validate() = %v", err)
	}
	if s.KeysetPath != "/tmp/kms-plugin-test-state/keyset.json" {
		t.Fatalf("defaults do not use the state dir: %+v", s)
	}
}

func TestSettingsValidateNamesTheField(t *testing.T) {
	for _, tt := range []struct {
		name, path, field string // field "" means valid
	}{
		{"absolute", "/etc/kubernetes/kms-plugin/keyset.json", ""},
		{"relative keyset", "keyset.json", "local.keysetPath:"},
		{"empty", "", "local.keysetPath:"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			err := (&Settings{KeysetPath: tt.path}).Validate()
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

func TestSettingsOpen(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "sub", "keyset.json")
	s := &Settings{KeysetPath: path}
	if _, err := s.Open(ctx, provider.OpenOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("Open without Create on a missing keyset = %v; want ErrNotExist", err)
	}
	p, err := s.Open(ctx, provider.OpenOptions{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	if p.Name() != Registration().Name || !provider.IsNodeLocal(p) {
		t.Fatalf("Open = %s (node-local %v); want the node-local %s store", p.Name(), provider.IsNodeLocal(p), Registration().Name)
	}
	if _, err := s.Open(ctx, provider.OpenOptions{}); err != nil {
		t.Fatalf("Open of the created keyset: %v", err)
	}
}

func TestSettingsHostPaths(t *testing.T) {
	got := (&Settings{KeysetPath: "/var/lib/kms/keyset.json"}).HostPaths()
	want := provider.HostPaths{
		Write:   []provider.HostPath{{Name: "keyset-dir", Path: "/var/lib/kms"}},
		PerNode: []string{"/var/lib/kms/keyset.json"},
		MustSet: []string{"local.keysetPath"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("HostPaths() = %+v; want %+v", got, want)
	}
}
