// Package pkcs11 is the provider backed by an AES-256 secret key in a
// PKCS#11 token or HSM (SoftHSM2, Thales Luna, Entrust nShield, YubiHSM,
// Utimaco, a cloud HSM's PKCS#11 library), through github.com/miekg/pkcs11.
//
// The store itself needs cgo: it is compiled in with the build tag pkcs11
// (CGO_ENABLED=1 go build -tags pkcs11 ./cmd/kms-plugin, make
// build-pkcs11). The files without the tag (settings, flags, the wrapped
// form, versions, the PIN file) build everywhere, so that a static binary
// parses a pkcs11 configuration, prints its help, and fails to open it with
// one line naming the build to use.
//
// # Versions
//
// Each key version is one CKO_SECRET_KEY object of type CKK_AES (32
// bytes), all with the same CKA_LABEL and each with its own CKA_ID. A
// version string is the CKA_ID in lowercase hex, its only accepted
// spelling. The versions this provider creates have a 20-byte CKA_ID:
//
//	0x6b ('k') | counter (uint32, big-endian) | created (Unix seconds, uint64) | 7 random bytes
//
// where counter is one more than the highest counter on the token. The
// newest version is the one with the highest counter, ties (two rotations
// at once on a shared HSM) broken by comparing the whole CKA_ID, so every
// node picks the same one without trusting clocks. Objects with any other
// CKA_ID (made by hand, with pkcs11-tool --keygen --id 01) count as
// counter 0, older than any version this provider made.
//
// The current version, which wraps, is the newest with CKA_ENCRYPT true.
// Rotate generates a new version (sensitive, never extractable, a token
// object) and sets CKA_ENCRYPT false on the versions it supersedes: they
// are retired, they still unwrap. Retire (provider.Retirer, rotation's
// retire stage, kms-plugin keyset retire) sets CKA_DECRYPT false too: the
// version is disabled, and the HSM itself refuses to unwrap with it
// (CKR_KEY_FUNCTION_NOT_PERMITTED). Nothing is ever destroyed; an operator
// re-enables a version by setting CKA_DECRYPT true again.
//
// # Wrapped form
//
//	scheme (1 byte) | IV (12 bytes) | AES-256-GCM ciphertext | tag (16 bytes)
//
// Scheme 0x01 is AES-256-GCM in the HSM with the associated data
// "kms-plugin pkcs11 wrapped local KEK" 0x00 scheme version, binding the
// wrap to the version that made it. Scheme values are never reused;
// testdata/golden.json freezes them.
package pkcs11

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Wrapped form constants.
const (
	// SchemeAESGCM is AES-256-GCM with a 12-byte IV and a 16-byte tag.
	SchemeAESGCM byte = 0x01
	// IVSize and TagSize are the GCM parameters of SchemeAESGCM.
	IVSize  = 12
	TagSize = 16
	// MaxKeySize bounds what Wrap accepts: the plugin wraps 32-byte
	// local KEKs.
	MaxKeySize = 1024
)

// aadPrefix starts the associated data of every wrap.
const aadPrefix = "kms-plugin pkcs11 wrapped local KEK"

// AssociatedData is the GCM associated data of a wrap with scheme under
// version: it binds the ciphertext to both.
func AssociatedData(scheme byte, version string) []byte {
	aad := make([]byte, 0, len(aadPrefix)+2+len(version))
	aad = append(aad, aadPrefix...)
	aad = append(aad, 0x00, scheme)
	return append(aad, version...)
}

// EncodeWrapped returns the wrapped form of a SchemeAESGCM wrap: the
// scheme byte, iv and sealed (ciphertext with its tag).
func EncodeWrapped(iv, sealed []byte) []byte {
	out := make([]byte, 0, 1+len(iv)+len(sealed))
	out = append(out, SchemeAESGCM)
	out = append(out, iv...)
	return append(out, sealed...)
}

// DecodeWrapped splits a wrapped form into its IV and sealed part. It
// returns an error wrapping provider.ErrInvalidCiphertext for an unknown
// scheme or a length no wrap of a non-empty key has.
func DecodeWrapped(w []byte) (iv, sealed []byte, err error) {
	switch {
	case len(w) == 0:
		return nil, nil, fmt.Errorf("empty wrapped key: %w", provider.ErrInvalidCiphertext)
	case w[0] != SchemeAESGCM:
		return nil, nil, fmt.Errorf("unknown wrap scheme 0x%02x: %w", w[0], provider.ErrInvalidCiphertext)
	case len(w) < 1+IVSize+TagSize+1:
		return nil, nil, fmt.Errorf("wrapped key of %d bytes is too short: %w", len(w), provider.ErrInvalidCiphertext)
	case len(w) > 1+IVSize+MaxKeySize+TagSize:
		return nil, nil, fmt.Errorf("wrapped key of %d bytes is too long: %w", len(w), provider.ErrInvalidCiphertext)
	}
	return w[1 : 1+IVSize], w[1+IVSize:], nil
}

// Version IDs.
const (
	idMagic   byte = 0x6b // 'k'
	idSize         = 20
	idRandom       = 7
	maxIDSize      = 64
)

// versionID is a parsed CKA_ID.
type versionID struct {
	raw     []byte
	counter uint32    // 0 for an ID not made by this provider
	created time.Time // zero for an ID not made by this provider
}

// newVersionID builds the CKA_ID of a new version with counter, created
// at now, with random bytes from rnd.
func newVersionID(counter uint32, now time.Time, rnd []byte) []byte {
	id := make([]byte, 0, idSize)
	id = append(id, idMagic)
	id = binary.BigEndian.AppendUint32(id, counter)
	id = binary.BigEndian.AppendUint64(id, uint64(now.Unix()))
	return append(id, rnd[:idRandom]...)
}

// parseID interprets a CKA_ID read from the token.
func parseID(raw []byte) versionID {
	v := versionID{raw: bytes.Clone(raw)}
	if len(raw) == idSize && raw[0] == idMagic {
		v.counter = binary.BigEndian.Uint32(raw[1:5])
		v.created = time.Unix(int64(binary.BigEndian.Uint64(raw[5:13])), 0).UTC()
	}
	return v
}

// newer reports whether a is newer than b: a higher counter, or the same
// counter and a greater CKA_ID.
func (a versionID) newer(b versionID) bool {
	if a.counter != b.counter {
		return a.counter > b.counter
	}
	return bytes.Compare(a.raw, b.raw) > 0
}

// formatVersion is the version string of a CKA_ID.
func formatVersion(id []byte) string { return hex.EncodeToString(id) }

// ParseVersion returns the CKA_ID a version string names. It accepts
// exactly the spelling formatVersion writes (lowercase hex, 1 to 64 bytes)
// so that no two strings name one version; anything else is an error
// wrapping provider.ErrKeyNotFound. It costs O(len) and no call.
func ParseVersion(v string) ([]byte, error) {
	if len(v) == 0 || len(v) > 2*maxIDSize || len(v)%2 != 0 {
		return nil, fmt.Errorf("version %q is not a CKA_ID in hex: %w", clip(v), provider.ErrKeyNotFound)
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return nil, fmt.Errorf("version %q is not a CKA_ID in lowercase hex: %w", clip(v), provider.ErrKeyNotFound)
		}
	}
	id, err := hex.DecodeString(v)
	if err != nil {
		return nil, fmt.Errorf("version %q: %w", clip(v), provider.ErrKeyNotFound)
	}
	return id, nil
}

// clip shortens an untrusted string for an error message.
func clip(s string) string {
	if len(s) > 48 {
		return s[:48] + "..."
	}
	return s
}
