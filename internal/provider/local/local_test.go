package local

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
)

func newTestProvider(t *testing.T) *Provider {
	t.Helper()
	p, err := New(Config{Path: filepath.Join(t.TempDir(), "state", "keyset.json"), Create: true})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return p
}

func TestConformance(t *testing.T) {
	providertest.Run(t, func(t *testing.T) provider.Provider { return newTestProvider(t) })
}

func TestCreateWritesOwnerOnlyFile(t *testing.T) {
	p := newTestProvider(t)
	fi, err := os.Stat(p.Path())
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("keyset mode = %#o; want 0600", got)
	}
	di, err := os.Stat(filepath.Dir(p.Path()))
	if err != nil {
		t.Fatal(err)
	}
	if got := di.Mode().Perm(); got != 0o700 {
		t.Errorf("keyset directory mode = %#o; want 0700", got)
	}
	entries, err := os.ReadDir(filepath.Dir(p.Path()))
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}
}

func TestNewErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(data), mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		return path
	}
	good := newTestProvider(t)
	goodData, err := os.ReadFile(good.Path())
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		cfg     Config
		wantErr string
	}{
		{"empty path", Config{}, "keyset path is empty"},
		{"missing without create", Config{Path: filepath.Join(dir, "missing.json")}, "no such file"},
		{"world readable", Config{Path: write("open.json", string(goodData), 0o644)}, "must be readable by its owner only"},
		{"half written", Config{Path: write("half.json", string(goodData[:len(goodData)/2]), 0o600), Create: true}, "parse keyset"},
		{"not a keyset", Config{Path: write("junk.json", `{"hello": "world"}`, 0o600)}, "parse keyset"},
		{"directory", Config{Path: dir}, "not a regular file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before []byte
			if tt.cfg.Path != "" {
				before, _ = os.ReadFile(tt.cfg.Path)
			}
			_, err := New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("New(%+v) error = %v; want it to contain %q", tt.cfg, err, tt.wantErr)
			}
			if tt.cfg.Path != "" {
				after, _ := os.ReadFile(tt.cfg.Path)
				if !bytes.Equal(before, after) {
					t.Fatalf("New changed the file it refused")
				}
			}
		})
	}
}

func TestNoticesFileChangedByAnotherProcess(t *testing.T) {
	ctx := context.Background()
	serving := newTestProvider(t)
	before, err := serving.CurrentVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A second Provider on the same file stands for `kms-plugin keyset rotate`.
	admin, err := New(Config{Path: serving.Path()})
	if err != nil {
		t.Fatal(err)
	}
	oldWrapped, err := serving.Wrap(ctx, []byte("0123456789abcdef0123456789abcdef"))
	if err != nil {
		t.Fatal(err)
	}
	next, err := admin.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Unwrap with the new version before any poll must reload by itself.
	w, err := admin.Wrap(ctx, []byte("k"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := serving.Unwrap(ctx, w); err != nil {
		t.Fatalf("Unwrap with a version added by another process: %v", err)
	}
	got, err := serving.CurrentVersion(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got != next || got == before {
		t.Fatalf("CurrentVersion after external rotate = %q; want %q (was %q)", got, next, before)
	}
	if _, err := serving.Unwrap(ctx, oldWrapped); err != nil {
		t.Fatalf("Unwrap with the old version: %v", err)
	}
}

func TestConcurrentRotationsKeepEveryKey(t *testing.T) {
	ctx := context.Background()
	first := newTestProvider(t)
	const n = 8
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p, err := New(Config{Path: first.Path()})
			if err != nil {
				errs <- err
				return
			}
			_, err = p.Rotate(ctx)
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("Rotate: %v", err)
		}
	}
	vs, err := first.Versions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != n+1 {
		t.Fatalf("keyset has %d keys after %d concurrent rotations; want %d", len(vs), n, n+1)
	}
}

func TestRetireErrors(t *testing.T) {
	ctx := context.Background()
	p := newTestProvider(t)
	if err := p.Retire(ctx, "12345"); err == nil || !strings.Contains(err.Error(), "not found") {
		t.Fatalf("Retire(unknown) = %v; want not found", err)
	}
	if err := p.Retire(ctx, "x"); err == nil {
		t.Fatalf("Retire(garbage) succeeded")
	}
}
