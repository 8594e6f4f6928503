package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider/vault/vaulttest"
)

// TestRun runs the benchmark small and fast against the real Vault core,
// and checks the claims the full run reports: warm Encrypts never reach
// Vault, a cold start decrypts once per local KEK, the peer once per seed.
func TestRun(t *testing.T) {
	vaulttest.Binary(t)
	var out bytes.Buffer
	if err := run([]string{"-scale", "3600", "-seeds", "40"}, &out); err != nil {
		t.Fatal(err)
	}
	text := out.String()
	for _, want := range []string{
		"| 40 Encrypts (new DEK seeds), warm | 0 calls,",
		"| cold start: 40 seeds decrypted by a fresh plugin | 1 call,",
	} {
		if !strings.Contains(text, want) {
			t.Fatalf("report lacks %q:\n%s", want, text)
		}
	}
	if strings.Count(text, "| 40 calls,") != 2 {
		t.Fatalf("the peer should make 40 calls for 40 Encrypts and 40 for 40 Decrypts:\n%s", text)
	}
}
