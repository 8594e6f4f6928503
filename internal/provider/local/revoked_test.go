package local

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

var _ provider.VersionChecker = (*Provider)(nil)

func TestRevokedVersions(t *testing.T) {
	ctx := context.Background()
	p, err := New(Config{Path: filepath.Join(t.TempDir(), "keyset.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	v1, _ := p.CurrentVersion(ctx)
	v2, err := p.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := p.RevokedVersions(ctx, []string{v1, v2}); err != nil || len(got) != 0 {
		t.Fatalf("RevokedVersions before retire = %v, %v; want none", got, err)
	}
	if err := p.Retire(ctx, v1); err != nil {
		t.Fatal(err)
	}
	got, err := p.RevokedVersions(ctx, []string{v1, v2, "4294967295", "not-a-version"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(got, []string{v1, "4294967295"}) {
		t.Fatalf("RevokedVersions after retiring %s = %v; want [%s 4294967295] (retired, and unknown to the keyset)", v1, got, v1)
	}
}

// TestVersionSpellingsAreCanonical replays a genuine wrapped key under
// other spellings of its version: each is refused without touching the
// keyset, so forged variants cannot multiply cache entries.
func TestVersionSpellingsAreCanonical(t *testing.T) {
	ctx := context.Background()
	p, err := New(Config{Path: filepath.Join(t.TempDir(), "keyset.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	w, err := p.Wrap(ctx, make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Unwrap(ctx, w); err != nil {
		t.Fatalf("Unwrap of the genuine version %q: %v", w.Version, err)
	}
	for _, variant := range []string{"0" + w.Version, "00" + w.Version, "+" + w.Version, w.Version + " ", " " + w.Version, w.Version + "#x"} {
		forged := provider.WrappedKey{Version: variant, Ciphertext: w.Ciphertext}
		if _, err := p.Unwrap(ctx, forged); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("Unwrap with version %q = %v; want ErrKeyNotFound", variant, err)
		}
	}
}
