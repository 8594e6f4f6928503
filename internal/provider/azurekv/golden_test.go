package azurekv

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"flag"
	"os"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

var update = flag.Bool("update", false, "rewrite testdata/golden.json")

// golden freezes the wrapped key format: data wrapped by today's code must
// unwrap forever.
type golden struct {
	RSAKeyPEM  string `json:"rsaKeyPEM"`
	AESKey     string `json:"aesKey"`
	Plaintext  string `json:"plaintext"`
	RSAWrapped string `json:"rsaWrapped"` // scheme 0x01
	AESWrapped string `json:"aesWrapped"` // scheme 0x02
}

func TestGoldenWrappedKeys(t *testing.T) {
	const path = "testdata/golden.json"
	srv := startServer(t, kvtest.Options{ManagedHSM: true})
	var g golden
	if *update {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		g.RSAKeyPEM = string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))
		aes := make([]byte, 32)
		pt := make([]byte, 32)
		if _, err := rand.Read(aes); err != nil {
			t.Fatal(err)
		}
		if _, err := rand.Read(pt); err != nil {
			t.Fatal(err)
		}
		g.AESKey, g.Plaintext = hex.EncodeToString(aes), hex.EncodeToString(pt)
	} else {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(data, &g); err != nil {
			t.Fatal(err)
		}
	}
	block, _ := pem.Decode([]byte(g.RSAKeyPEM))
	if block == nil {
		t.Fatal("no PEM key in golden data")
	}
	rsaKey, err := x509.ParsePKCS1PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	aesKey, _ := hex.DecodeString(g.AESKey)
	plaintext, _ := hex.DecodeString(g.Plaintext)
	rsaKID, err := srv.ImportKey("golden-rsa", rsaKey)
	if err != nil {
		t.Fatal(err)
	}
	aesKID, err := srv.ImportKey("golden-aes", aesKey)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	rsaP := newTestProvider(t, srv, "golden-rsa", "", nil)
	aesP := newTestProvider(t, srv, "golden-aes", "", nil)

	if *update {
		w, err := rsaP.Wrap(ctx, plaintext)
		if err != nil {
			t.Fatal(err)
		}
		g.RSAWrapped = hex.EncodeToString(w.Ciphertext)
		if w, err = aesP.Wrap(ctx, plaintext); err != nil {
			t.Fatal(err)
		}
		g.AESWrapped = hex.EncodeToString(w.Ciphertext)
		data, err := json.MarshalIndent(g, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, append(data, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	rsaWrapped, _ := hex.DecodeString(g.RSAWrapped)
	aesWrapped, _ := hex.DecodeString(g.AESWrapped)
	if rsaWrapped[0] != schemeRSAOAEP256 || aesWrapped[0] != schemeA256KW {
		t.Fatalf("golden scheme bytes %#x, %#x changed", rsaWrapped[0], aesWrapped[0])
	}
	for _, tt := range []struct {
		name string
		p    *Provider
		w    provider.WrappedKey
	}{
		{"RSA-OAEP-256", rsaP, provider.WrappedKey{Version: rsaKID, Ciphertext: rsaWrapped}},
		{"A256KW", aesP, provider.WrappedKey{Version: aesKID, Ciphertext: aesWrapped}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, err := tt.p.Unwrap(ctx, tt.w)
			if err != nil || !bytes.Equal(got, plaintext) {
				t.Fatalf("Unwrap of the golden wrapped key = %x, %v; want %x", got, err, plaintext)
			}
		})
	}
	// AES key wrap is deterministic: today's Wrap still writes the same bytes.
	w, err := aesP.Wrap(ctx, plaintext)
	if err != nil || !bytes.Equal(w.Ciphertext, aesWrapped) {
		t.Fatalf("Wrap with the golden AES key = %x, %v; want %x", w.Ciphertext, err, aesWrapped)
	}
	// Written while the key went backwards (a newer version, disabled):
	// the #after= form unwraps with the same version.
	newer, err := srv.NewVersion("golden-aes")
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.SetEnabled("golden-aes", lastSegment(newer), false); err != nil {
		t.Fatal(err)
	}
	back := provider.WrappedKey{Version: aesKID + "#after=" + lastSegment(newer), Ciphertext: aesWrapped}
	if got, err := aesP.Unwrap(ctx, back); err != nil || !bytes.Equal(got, plaintext) {
		t.Fatalf("Unwrap of the golden wrapped key under %s = %x, %v", back.Version, got, err)
	}
}
