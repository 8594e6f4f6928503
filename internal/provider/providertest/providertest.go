// Package providertest is the conformance suite every provider.Provider runs
// against its real backend or a server speaking its wire protocol.
package providertest

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Factory returns a fresh provider, with its own key, for one subtest.
type Factory func(t *testing.T) provider.Provider

// Run runs the conformance suite. Optional behaviour (Rotator, Retirer,
// HealthChecker, VersionLister) is tested when the provider implements it.
func Run(t *testing.T, newProvider Factory) {
	t.Helper()
	ctx := context.Background()

	t.Run("WrapUnwrapRoundTrip", func(t *testing.T) {
		p := newProvider(t)
		for _, size := range []int{1, 16, 32, 64} {
			key := randomBytes(t, size)
			w, err := p.Wrap(ctx, key)
			if err != nil {
				t.Fatalf("Wrap(%d bytes): %v", size, err)
			}
			if w.Version == "" {
				t.Fatalf("Wrap returned an empty version")
			}
			// A short key occurs by chance in a long ciphertext (a 1-byte
			// key in a 256-byte RSA wrap more often than not).
			if size >= 16 && bytes.Contains(w.Ciphertext, key) {
				t.Fatalf("wrapped key contains the plaintext key")
			}
			cur, err := p.CurrentVersion(ctx)
			if err != nil {
				t.Fatalf("CurrentVersion: %v", err)
			}
			if cur != w.Version {
				t.Fatalf("Wrap used version %q, CurrentVersion = %q", w.Version, cur)
			}
			got, err := p.Unwrap(ctx, w)
			if err != nil {
				t.Fatalf("Unwrap: %v", err)
			}
			if !bytes.Equal(got, key) {
				t.Fatalf("Unwrap returned a different key")
			}
		}
	})

	t.Run("UnwrapRejectsBadInput", func(t *testing.T) {
		p := newProvider(t)
		w, err := p.Wrap(ctx, randomBytes(t, 32))
		if err != nil {
			t.Fatalf("Wrap: %v", err)
		}
		tampered := bytes.Clone(w.Ciphertext)
		tampered[len(tampered)-1] ^= 0x01
		tests := []struct {
			name string
			in   provider.WrappedKey
			want error
		}{
			{"tampered", provider.WrappedKey{Version: w.Version, Ciphertext: tampered}, provider.ErrInvalidCiphertext},
			{"truncated", provider.WrappedKey{Version: w.Version, Ciphertext: w.Ciphertext[:len(w.Ciphertext)/2]}, provider.ErrInvalidCiphertext},
			{"empty", provider.WrappedKey{Version: w.Version}, provider.ErrInvalidCiphertext},
			{"unknown version", provider.WrappedKey{Version: "4242424242", Ciphertext: w.Ciphertext}, provider.ErrKeyNotFound},
			{"garbage version", provider.WrappedKey{Version: "not a version", Ciphertext: w.Ciphertext}, provider.ErrKeyNotFound},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				got, err := p.Unwrap(ctx, tt.in)
				if !errors.Is(err, tt.want) {
					t.Fatalf("Unwrap = (%x, %v); want error %v", got, err, tt.want)
				}
			})
		}
	})

	t.Run("CanceledContext", func(t *testing.T) {
		p := newProvider(t)
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if _, err := p.Wrap(cctx, randomBytes(t, 32)); err == nil {
			t.Fatalf("Wrap with a canceled context succeeded")
		}
	})

	t.Run("Rotate", func(t *testing.T) {
		p := newProvider(t)
		r, ok := p.(provider.Rotator)
		if !ok {
			t.Logf("%s does not implement Rotator", p.Name())
			return
		}
		key := randomBytes(t, 32)
		old, err := p.Wrap(ctx, key)
		if err != nil {
			t.Fatalf("Wrap: %v", err)
		}
		next, err := r.Rotate(ctx)
		if err != nil {
			t.Fatalf("Rotate: %v", err)
		}
		if next == old.Version {
			t.Fatalf("Rotate returned the old version %q", next)
		}
		if cur, err := p.CurrentVersion(ctx); err != nil || cur != next {
			t.Fatalf("CurrentVersion = %q, %v; want %q", cur, err, next)
		}
		w, err := p.Wrap(ctx, key)
		if err != nil || w.Version != next {
			t.Fatalf("Wrap after Rotate = version %q, %v; want %q", w.Version, err, next)
		}
		if got, err := p.Unwrap(ctx, old); err != nil || !bytes.Equal(got, key) {
			t.Fatalf("Unwrap of a key wrapped before Rotate: %v", err)
		}
		// A ciphertext presented under another version must not unwrap.
		if _, err := p.Unwrap(ctx, provider.WrappedKey{Version: next, Ciphertext: old.Ciphertext}); err == nil {
			t.Fatalf("Unwrap accepted a ciphertext under the wrong version")
		}

		rt, ok := p.(provider.Retirer)
		if !ok {
			return
		}
		if err := rt.Retire(ctx, next); err == nil {
			t.Fatalf("Retire of the current version succeeded")
		}
		if err := rt.Retire(ctx, old.Version); err != nil {
			t.Fatalf("Retire(%q): %v", old.Version, err)
		}
		if _, err := p.Unwrap(ctx, old); !errors.Is(err, provider.ErrKeyDisabled) {
			t.Fatalf("Unwrap with a retired version = %v; want ErrKeyDisabled", err)
		}
		if got, err := p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
			t.Fatalf("Unwrap with the current version after Retire: %v", err)
		}
		if vl, ok := p.(provider.VersionLister); ok {
			vs, err := vl.Versions(ctx)
			if err != nil {
				t.Fatalf("Versions: %v", err)
			}
			states := map[string]provider.VersionInfo{}
			for _, v := range vs {
				states[v.Version] = v
			}
			if v := states[old.Version]; v.State != provider.VersionDisabled || v.Current {
				t.Fatalf("Versions()[%q] = %+v; want disabled, not current", old.Version, v)
			}
			if v := states[next]; v.State != provider.VersionEnabled || !v.Current {
				t.Fatalf("Versions()[%q] = %+v; want enabled and current", next, v)
			}
		}
	})

	t.Run("Health", func(t *testing.T) {
		p := newProvider(t)
		h, ok := p.(provider.HealthChecker)
		if !ok {
			t.Logf("%s does not implement HealthChecker", p.Name())
			return
		}
		if err := h.Health(ctx); err != nil {
			t.Fatalf("Health: %v", err)
		}
	})
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}
