package envelope

import (
	"context"
	"errors"
	"testing"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// FuzzDecodeLocalKEK checks that the lkek annotation parser never panics and
// that what it accepts re-encodes to the same bytes.
func FuzzDecodeLocalKEK(f *testing.F) {
	f.Add(encodeLocalKEK("1234", []byte("wrapped")))
	f.Add([]byte{})
	f.Add([]byte{1})
	f.Add([]byte{1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01})
	f.Add([]byte{2, 1, 'a', 'b'})
	f.Fuzz(func(t *testing.T, b []byte) {
		v, w, err := decodeLocalKEK(b)
		if err != nil {
			return
		}
		if v == "" || len(w) == 0 {
			t.Fatalf("accepted an empty version or wrapped key from %x", b)
		}
		if got := encodeLocalKEK(v, w); string(got) != string(b) {
			t.Fatalf("re-encoding %x gave %x", b, got)
		}
	})
}

// FuzzDecrypt feeds arbitrary requests to Decrypt: it must never panic, and
// anything it rejects must be an input or key error, never a success on
// tampered data.
func FuzzDecrypt(f *testing.F) {
	fx := newFixture(f, nil)
	if err := fx.svc.Refresh(context.Background()); err != nil {
		f.Fatal(err)
	}
	good, err := fx.svc.Encrypt(context.Background(), "seed", make([]byte, 32))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good.Ciphertext, good.KeyID, good.Annotations[AnnotationVersion], good.Annotations[AnnotationLocalKEK])
	f.Add([]byte{}, "", []byte{}, []byte{})
	f.Add([]byte{1, 2, 3}, "kp1.x", []byte("1"), []byte{1, 1, 'x', 0})
	f.Fuzz(func(t *testing.T, ct []byte, keyID string, version, lkek []byte) {
		req := &kmsservice.DecryptRequest{
			Ciphertext:  ct,
			KeyID:       keyID,
			Annotations: map[string][]byte{AnnotationVersion: version, AnnotationLocalKEK: lkek},
		}
		pt, err := fx.svc.Decrypt(context.Background(), "fuzz", req)
		if err == nil {
			if string(ct) != string(good.Ciphertext) || keyID != good.KeyID || string(lkek) != string(good.Annotations[AnnotationLocalKEK]) {
				t.Fatalf("Decrypt accepted a request that differs from the one encrypted")
			}
			if len(pt) != 32 {
				t.Fatalf("Decrypt returned %d bytes", len(pt))
			}
			return
		}
		if !errors.Is(err, ErrInvalidInput) && !errors.Is(err, provider.ErrInvalidCiphertext) &&
			!errors.Is(err, provider.ErrKeyNotFound) && !errors.Is(err, provider.ErrKeyDisabled) {
			t.Fatalf("Decrypt error %v is not an input or key error", err)
		}
	})
}
