package pkcs11

import (
	"bytes"
	"errors"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// FuzzParseVersion: a version string is accepted only in the one spelling
// formatVersion writes, and never panics.
func FuzzParseVersion(f *testing.F) {
	for _, s := range []string{"01", "6b00000003000000006955b900bb6b24bf139992", "", "0", "AB", "0x01", " 01"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		id, err := ParseVersion(v)
		if err != nil {
			if !errors.Is(err, provider.ErrKeyNotFound) {
				t.Fatalf("ParseVersion(%q) error %v does not wrap ErrKeyNotFound", v, err)
			}
			return
		}
		if formatVersion(id) != v {
			t.Fatalf("ParseVersion accepted %q, which formats as %q", v, formatVersion(id))
		}
	})
}

// FuzzDecodeWrapped: whatever the input, DecodeWrapped either refuses it
// with ErrInvalidCiphertext or returns the parts EncodeWrapped rebuilds.
func FuzzDecodeWrapped(f *testing.F) {
	f.Add(EncodeWrapped(make([]byte, IVSize), make([]byte, 32+TagSize)))
	f.Add([]byte{})
	f.Add([]byte{0x02, 1, 2, 3})
	f.Fuzz(func(t *testing.T, w []byte) {
		iv, sealed, err := DecodeWrapped(w)
		if err != nil {
			if !errors.Is(err, provider.ErrInvalidCiphertext) {
				t.Fatalf("DecodeWrapped error %v does not wrap ErrInvalidCiphertext", err)
			}
			return
		}
		if !bytes.Equal(EncodeWrapped(iv, sealed), w) {
			t.Fatalf("DecodeWrapped(%x) parts do not rebuild it", w)
		}
	})
}
