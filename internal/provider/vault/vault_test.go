package vault_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault"
)

func TestConformance(t *testing.T) {
	srv := sharedServer(t)
	providertest.Run(t, func(t *testing.T) provider.Provider {
		return newFixture(t, srv, fixtureOpts{}).p
	})
}

func TestConformanceChaCha(t *testing.T) {
	srv := sharedServer(t)
	providertest.Run(t, func(t *testing.T) provider.Provider {
		return newFixture(t, srv, fixtureOpts{keyParams: map[string]any{"type": "chacha20-poly1305"}}).p
	})
}

func TestRegistered(t *testing.T) {
	reg, err := registry.Builtin().Lookup(vault.Name)
	if err != nil {
		t.Fatalf("registry: %v", err)
	}
	if reg.Section != "vault" {
		t.Fatalf("section = %q", reg.Section)
	}
}

func randomKey(t *testing.T) []byte {
	t.Helper()
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		t.Fatal(err)
	}
	return k
}

// Wrap pins the version Vault used, and the version is bound as associated
// data: the same ciphertext does not decrypt without it, even by a caller
// with the key's decrypt permission.
func TestVersionPinnedAndBound(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, sharedServer(t), fixtureOpts{})
	key := randomKey(t)
	w1, err := f.p.Wrap(ctx, key)
	if err != nil || w1.Version != "1" {
		t.Fatalf("Wrap = %q, %v; want version 1", w1.Version, err)
	}
	// A rotation inside Vault (by hand, or auto_rotate_period) is followed
	// at the next read of the key.
	rootWrite(t, f.srv, f.mount+"/keys/"+f.key+"/rotate", nil)
	if cur, err := f.p.CurrentVersion(ctx); err != nil || cur != "2" {
		t.Fatalf("CurrentVersion after a rotation in Vault = %q, %v; want 2", cur, err)
	}
	w2, err := f.p.Wrap(ctx, key)
	if err != nil || w2.Version != "2" {
		t.Fatalf("Wrap after rotation = %q, %v; want 2", w2.Version, err)
	}
	for _, w := range []provider.WrappedKey{w1, w2} {
		got, err := f.p.Unwrap(ctx, w)
		if err != nil || !bytes.Equal(got, key) {
			t.Fatalf("Unwrap(version %s) = %v", w.Version, err)
		}
	}
	// Without the associated data, or with another version's, Vault
	// refuses the ciphertext.
	ct := "vault:v1:" + base64.StdEncoding.EncodeToString(w1.Ciphertext[1:])
	root := f.srv.Root(t)
	if _, err := root.Logical().Write(f.mount+"/decrypt/"+f.key, map[string]any{"ciphertext": ct}); err == nil {
		t.Fatal("Vault decrypted a wrapped key without its associated data")
	}
	aad2 := base64.StdEncoding.EncodeToString([]byte("kms-plugin/vault/v1 key_version=2"))
	if _, err := root.Logical().Write(f.mount+"/decrypt/"+f.key, map[string]any{"ciphertext": ct, "associated_data": aad2}); err == nil {
		t.Fatal("Vault decrypted a version-1 wrapped key with version 2's associated data")
	}
	// min_encryption_version does not change the current version (it is
	// at or below latest_version).
	rootWrite(t, f.srv, f.mount+"/keys/"+f.key+"/config", map[string]any{"min_encryption_version": 2})
	if cur, err := f.p.CurrentVersion(ctx); err != nil || cur != "2" {
		t.Fatalf("CurrentVersion with min_encryption_version 2 = %q, %v", cur, err)
	}
	if got, err := f.p.Unwrap(ctx, w1); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap of version 1 below min_encryption_version: %v (it must still decrypt)", err)
	}
}

// A version below min_decryption_version is disabled: Unwrap says
// ErrKeyDisabled, Versions and RevokedVersions report it, and lowering the
// minimum again brings it back (no key material is lost).
func TestMinDecryptionVersion(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, sharedServer(t), fixtureOpts{})
	key := randomKey(t)
	w1, err := f.p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	rootWrite(t, f.srv, f.mount+"/keys/"+f.key+"/rotate", nil)
	rootWrite(t, f.srv, f.mount+"/keys/"+f.key+"/config", map[string]any{"min_decryption_version": 2})
	if _, err := f.p.CurrentVersion(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := f.p.Unwrap(ctx, w1); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Unwrap below min_decryption_version = %v; want ErrKeyDisabled", err)
	}
	revoked, err := f.p.RevokedVersions(ctx, []string{"1", "2", "3", "bogus"})
	if err != nil || strings.Join(revoked, ",") != "1,3" {
		t.Fatalf("RevokedVersions = %v, %v; want [1 3]", revoked, err)
	}
	vs, err := f.p.Versions(ctx)
	if err != nil || len(vs) != 2 || vs[0].State != provider.VersionDisabled || vs[1].State != provider.VersionEnabled || !vs[1].Current || vs[0].Created.IsZero() {
		t.Fatalf("Versions = %+v, %v", vs, err)
	}
	rootWrite(t, f.srv, f.mount+"/keys/"+f.key+"/config", map[string]any{"min_decryption_version": 1})
	if _, err := f.p.CurrentVersion(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := f.p.Unwrap(ctx, w1); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap after lowering min_decryption_version again: %v", err)
	}
}

// Retire raises min_decryption_version (and min_encryption_version with it
// when set lower); it refuses the current version, accepts an already
// disabled one, and the key material stays.
func TestRetireMapping(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, sharedServer(t), fixtureOpts{})
	key := randomKey(t)
	w1, err := f.p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		if _, err := f.p.Rotate(ctx); err != nil {
			t.Fatal(err)
		}
	}
	rootWrite(t, f.srv, f.mount+"/keys/"+f.key+"/config", map[string]any{"min_encryption_version": 1})
	if err := f.p.Retire(ctx, "3"); err == nil {
		t.Fatal("Retire of the current version succeeded")
	}
	if err := f.p.Retire(ctx, "9"); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("Retire of an unknown version = %v; want ErrKeyNotFound", err)
	}
	if err := f.p.Retire(ctx, "2"); err != nil {
		t.Fatalf("Retire(2): %v", err)
	}
	d := keyConfig(t, f)
	if got := d["min_decryption_version"]; got == nil || got.(interface{ String() string }).String() != "3" {
		t.Fatalf("min_decryption_version = %v; want 3", got)
	}
	if got := d["min_encryption_version"]; got.(interface{ String() string }).String() != "3" {
		t.Fatalf("min_encryption_version = %v; want 3 (raised with it)", got)
	}
	if err := f.p.Retire(ctx, "1"); err != nil {
		t.Fatalf("Retire of an already disabled version: %v", err)
	}
	if _, err := f.p.Unwrap(ctx, w1); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Unwrap of a retired version = %v", err)
	}
	rootWrite(t, f.srv, f.mount+"/keys/"+f.key+"/config", map[string]any{"min_encryption_version": 0, "min_decryption_version": 1})
	if _, err := f.p.CurrentVersion(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := f.p.Unwrap(ctx, w1); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("a retire must be undoable (no key material deleted): %v", err)
	}
}

// Forged versions are refused by spelling, without a call to Vault; a
// version beyond the latest one costs at most one read of the key.
func TestForgedVersions(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, sharedServer(t), fixtureOpts{})
	w, err := f.p.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"", "0", "01", "+1", "-1", " 1", "1 ", "1#after=2", "1.0", "0x1", "2147483648", "99999999999", "v1", "１", "1\x00"} {
		before := f.counter.Total()
		if err := f.p.ValidVersion(v); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("ValidVersion(%q) = %v; want ErrKeyNotFound", v, err)
		}
		if _, err := f.p.Unwrap(ctx, provider.WrappedKey{Version: v, Ciphertext: w.Ciphertext}); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("Unwrap(version %q) = %v; want ErrKeyNotFound", v, err)
		}
		if n := f.counter.Total() - before; n != 0 {
			t.Errorf("version %q cost %d requests to Vault; want 0", v, n)
		}
	}
	for _, v := range []string{"1", "2147483647"} {
		if err := f.p.ValidVersion(v); err != nil {
			t.Errorf("ValidVersion(%q) = %v", v, err)
		}
	}
	// A well-spelled version beyond the latest: refused from the key state,
	// and a flood of them costs no decrypt.
	before := f.counter.Paths()["transit/decrypt/"+f.key]
	for i := 0; i < 50; i++ {
		if _, err := f.p.Unwrap(ctx, provider.WrappedKey{Version: "4242424242"[:9], Ciphertext: w.Ciphertext}); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Fatalf("Unwrap beyond the latest version = %v", err)
		}
	}
	if n := f.counter.Paths()["transit/decrypt/"+f.key] - before; n != 0 {
		t.Fatalf("versions beyond the latest cost %d decrypts", n)
	}
}

// Forged and damaged wrapped keys: refused, the cheap ones without a call.
func TestForgedCiphertext(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, sharedServer(t), fixtureOpts{})
	w, err := f.p.Wrap(ctx, randomKey(t))
	if err != nil {
		t.Fatal(err)
	}
	random := make([]byte, len(w.Ciphertext))
	_, _ = rand.Read(random)
	random[0] = 0x01
	wrongScheme := bytes.Clone(w.Ciphertext)
	wrongScheme[0] = 0x02
	swappedNonce := bytes.Clone(w.Ciphertext)
	swappedNonce[3] ^= 0xff
	tests := []struct {
		name  string
		ct    []byte
		calls bool
	}{
		{"random", random, true},
		{"nonce flipped", swappedNonce, true},
		{"wrong scheme", wrongScheme, false},
		{"too short", w.Ciphertext[:minWrapped-1], false},
		{"vault prefix text", []byte("vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := f.counter.Total()
			if _, err := f.p.Unwrap(ctx, provider.WrappedKey{Version: w.Version, Ciphertext: tt.ct}); !errors.Is(err, provider.ErrInvalidCiphertext) {
				t.Fatalf("Unwrap = %v; want ErrInvalidCiphertext", err)
			}
			if n := f.counter.Total() - before; !tt.calls && n != 0 {
				t.Fatalf("refused with %d requests; want none", n)
			}
		})
	}
}

// minWrapped mirrors the package's: scheme byte, nonce, tag.
const minWrapped = 1 + 12 + 16

// A key of a type that does not authenticate associated data is refused,
// with the types that work named.
func TestUnauthenticatedKeyType(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, sharedServer(t), fixtureOpts{keyParams: map[string]any{"type": "rsa-2048"}})
	_, err := f.p.CurrentVersion(ctx)
	if err == nil || !strings.Contains(err.Error(), "aes256-gcm96") {
		t.Fatalf("CurrentVersion on an rsa-2048 key = %v; want a refusal naming aes256-gcm96", err)
	}
}

// A derived key works with the plugin's fixed context.
func TestDerivedKey(t *testing.T) {
	ctx := context.Background()
	f := newFixture(t, sharedServer(t), fixtureOpts{keyParams: map[string]any{"derived": true}})
	key := randomKey(t)
	w, err := f.p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := f.p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap with a derived key: %v", err)
	}
}
