package pkcs11

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

var update = flag.Bool("update", false, "rewrite testdata/golden.json")

const goldenPath = "testdata/golden.json"

// golden freezes the wrapped form: what today's code wraps must unwrap
// forever. The vectors are made outside any HSM, with crypto/aes, from a
// fixed AES key; the HSM test imports that key as a token object and
// unwraps them (hsm_golden_test.go).
type golden struct {
	AESKey  string         `json:"aesKey"`
	Vectors []goldenVector `json:"vectors"`
}

type goldenVector struct {
	Version   string `json:"version"` // hex CKA_ID
	Plaintext string `json:"plaintext"`
	Wrapped   string `json:"wrapped"`
}

// fixedBytes is deterministic "randomness" for -update.
func fixedBytes(label string, n int) []byte {
	var out []byte
	for i := 0; len(out) < n; i++ {
		h := sha256.Sum256([]byte(label + string(rune('a'+i))))
		out = append(out, h[:]...)
	}
	return out[:n]
}

func sealGCM(t *testing.T, key, iv, plaintext []byte, version string) []byte {
	t.Helper()
	block, err := aes.NewCipher(key)
	if err != nil {
		t.Fatal(err)
	}
	g, err := cipher.NewGCM(block)
	if err != nil {
		t.Fatal(err)
	}
	return EncodeWrapped(iv, g.Seal(nil, iv, plaintext, AssociatedData(SchemeAESGCM, version)))
}

func loadGolden(t *testing.T) golden {
	t.Helper()
	data, err := os.ReadFile(goldenPath)
	if err != nil {
		t.Fatal(err)
	}
	var g golden
	if err := json.Unmarshal(data, &g); err != nil {
		t.Fatal(err)
	}
	if len(g.Vectors) == 0 {
		t.Fatal("no golden vectors")
	}
	return g
}

func TestGoldenVectors(t *testing.T) {
	if *update {
		key := fixedBytes("aes key", 32)
		g := golden{AESKey: hex.EncodeToString(key)}
		ours := newVersionID(3, timeUnix(1767225600), fixedBytes("id", idRandom))
		for i, v := range []string{formatVersion(ours), "01"} {
			for _, size := range []int{32, 1} {
				pt := fixedBytes("plaintext"+v+string(rune('0'+size)), size)
				iv := fixedBytes("iv"+string(rune('0'+i))+string(rune('0'+size)), IVSize)
				g.Vectors = append(g.Vectors, goldenVector{Version: v, Plaintext: hex.EncodeToString(pt),
					Wrapped: hex.EncodeToString(sealGCM(t, key, iv, pt, v))})
			}
		}
		data, _ := json.MarshalIndent(g, "", "  ")
		if err := os.WriteFile(goldenPath, append(data, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	g := loadGolden(t)
	key, _ := hex.DecodeString(g.AESKey)
	for _, v := range g.Vectors {
		pt, _ := hex.DecodeString(v.Plaintext)
		wrapped, _ := hex.DecodeString(v.Wrapped)
		if _, err := ParseVersion(v.Version); err != nil {
			t.Fatalf("golden version %s: %v", v.Version, err)
		}
		iv, sealed, err := DecodeWrapped(wrapped)
		if err != nil {
			t.Fatalf("DecodeWrapped(%s): %v", v.Wrapped, err)
		}
		if wrapped[0] != 0x01 || len(iv) != 12 || len(sealed) != len(pt)+16 {
			t.Fatalf("vector %s: scheme 0x%02x, IV %d bytes, sealed %d bytes", v.Wrapped, wrapped[0], len(iv), len(sealed))
		}
		// The format, rebuilt by today's code from the same IV, is byte
		// for byte the frozen one.
		if got := sealGCM(t, key, iv, pt, v.Version); !bytes.Equal(got, wrapped) {
			t.Fatalf("today's wrap of vector %s = %x; want %x", v.Version, got, wrapped)
		}
	}
}

func TestDecodeWrappedRejects(t *testing.T) {
	ok := append([]byte{SchemeAESGCM}, make([]byte, IVSize+TagSize+32)...)
	for _, tt := range []struct {
		name string
		in   []byte
	}{
		{"empty", nil},
		{"unknown scheme", append([]byte{0x02}, ok[1:]...)},
		{"scheme zero", append([]byte{0x00}, ok[1:]...)},
		{"no key", ok[:1+IVSize+TagSize]},
		{"too long", append([]byte{SchemeAESGCM}, make([]byte, IVSize+TagSize+MaxKeySize+1)...)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := DecodeWrapped(tt.in); !errors.Is(err, provider.ErrInvalidCiphertext) {
				t.Fatalf("DecodeWrapped = %v; want ErrInvalidCiphertext", err)
			}
		})
	}
	if _, _, err := DecodeWrapped(ok); err != nil {
		t.Fatalf("DecodeWrapped of a well-formed wrap: %v", err)
	}
}
