//go:build pkcs11

package pkcs11

import (
	"bytes"
	"context"
	"encoding/hex"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// TestGoldenVectorsInTheHSM: the vectors made with crypto/aes unwrap in
// the token once their AES key is a token object with the vector's CKA_ID:
// the HSM path speaks exactly the frozen format.
func TestGoldenVectorsInTheHSM(t *testing.T) {
	ctx := context.Background()
	g := loadGolden(t)
	p := newToken(t).open(t, func(c *Config) { c.Create, c.RelistAfter = false, -1 })
	key, _ := hex.DecodeString(g.AESKey)
	imported := map[string]bool{}
	for _, v := range g.Vectors {
		if !imported[v.Version] {
			id, _ := hex.DecodeString(v.Version)
			importKey(t, p, key, id, false)
			imported[v.Version] = true
		}
	}
	for _, v := range g.Vectors {
		wrapped, _ := hex.DecodeString(v.Wrapped)
		want, _ := hex.DecodeString(v.Plaintext)
		got, err := p.Unwrap(ctx, provider.WrappedKey{Version: v.Version, Ciphertext: wrapped})
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("Unwrap of golden vector (version %s) = %x, %v; want %x", v.Version, got, err, want)
		}
		// The associated data binds the version: the same bytes under the
		// other imported version do not authenticate.
		for other := range imported {
			if other == v.Version {
				continue
			}
			if _, err := p.Unwrap(ctx, provider.WrappedKey{Version: other, Ciphertext: wrapped}); err == nil {
				t.Fatalf("a vector of version %s unwrapped under version %s (same key material)", v.Version, other)
			}
		}
	}
	// The provider's own version (counter 3) is the newest: the foreign
	// CKA_ID 01 counts as counter 0.
	if cur, err := p.CurrentVersion(ctx); err != nil || cur != g.Vectors[0].Version {
		t.Fatalf("CurrentVersion = %q, %v; want %q", cur, err, g.Vectors[0].Version)
	}
	// And a rotation continues the counter.
	next, err := p.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	id, _ := ParseVersion(next)
	if c := parseID(id).counter; c != 4 {
		t.Fatalf("Rotate after counter 3 made counter %d; want 4", c)
	}
}
