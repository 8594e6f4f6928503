package envelope

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"testing"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

var update = flag.Bool("update", false, "rewrite the golden test vectors in testdata/")

// vector is one stored Encrypt result. JSON encodes []byte as base64.
type vector struct {
	Plaintext   []byte            `json:"plaintext"`
	Ciphertext  []byte            `json:"ciphertext"`
	KeyID       string            `json:"keyID"`
	Annotations map[string][]byte `json:"annotations"`
}

// TestGoldenVectors decrypts ciphertexts written by format version 1 with a
// test keyset kept in testdata. It is the envelope's promise made concrete:
// what it wrote once stays readable. Only -update rewrites the files, and
// only on purpose (a format change adds a new version and new files).
func TestGoldenVectors(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join("testdata", "v1")
	keysetPath := filepath.Join(dir, "keyset.json")
	vectorsPath := filepath.Join(dir, "vectors.json")
	if *update {
		writeGolden(t, dir, keysetPath, vectorsPath)
	}
	// Copy the keyset: git does not keep the 0600 mode the provider demands.
	data, err := os.ReadFile(keysetPath)
	if err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(t.TempDir(), "keyset.json")
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		t.Fatal(err)
	}
	lp, err := local.New(local.Config{Path: tmp})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := New(Config{Provider: lp})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	var vectors []vector
	if err := json.Unmarshal(raw, &vectors); err != nil {
		t.Fatal(err)
	}
	if len(vectors) == 0 {
		t.Fatal("no golden vectors")
	}
	for i, v := range vectors {
		got, err := svc.Decrypt(ctx, "golden", &kmsservice.DecryptRequest{Ciphertext: v.Ciphertext, KeyID: v.KeyID, Annotations: v.Annotations})
		if err != nil {
			t.Fatalf("vector %d: Decrypt: %v", i, err)
		}
		if !bytes.Equal(got, v.Plaintext) {
			t.Fatalf("vector %d: Decrypt returned other bytes", i)
		}
	}
}

func writeGolden(t *testing.T, dir, keysetPath, vectorsPath string) {
	t.Helper()
	ctx := context.Background()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(t.TempDir(), "keyset.json")
	lp, err := local.New(local.Config{Path: tmp, Create: true})
	if err != nil {
		t.Fatal(err)
	}
	var vectors []vector
	// Two remote versions, two local KEKs each, fixed plaintexts.
	for round := range 2 {
		if round > 0 {
			if _, err := lp.Rotate(ctx); err != nil {
				t.Fatal(err)
			}
		}
		svc, _ := New(Config{Provider: lp, KEKMaxUses: 2})
		if err := svc.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		for i := range 4 {
			pt := bytes.Repeat([]byte{byte(round*16 + i)}, 32)
			r, err := svc.Encrypt(ctx, "golden", pt)
			if err != nil {
				t.Fatal(err)
			}
			vectors = append(vectors, vector{Plaintext: pt, Ciphertext: r.Ciphertext, KeyID: r.KeyID, Annotations: r.Annotations})
		}
	}
	out, err := json.MarshalIndent(vectors, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	keyset, err := os.ReadFile(tmp)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keysetPath, keyset, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(vectorsPath, append(out, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}
