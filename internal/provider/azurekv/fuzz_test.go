package azurekv

import (
	"bytes"
	"strings"
	"testing"
)

// FuzzParseVersion checks that version strings read back from etcd
// annotations never panic the parser, and that what it accepts names a
// versioned key of the configured vault.
func FuzzParseVersion(f *testing.F) {
	p := &Provider{vaultHost: "kvtest.vault.azure.net"}
	for _, s := range []string{
		"https://kvtest.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef",
		"https://kvtest.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef#after=fedcba9876543210fedcba9876543210",
		"https://other.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef",
		"http://kvtest.vault.azure.net/keys/k/v", "", "#", "https://%zz", "https://kvtest.vault.azure.net/keys//",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		ref, err := p.parseVersion(v)
		if err != nil {
			return
		}
		if ref.name == "" || ref.id == "" || !strings.HasPrefix(v, ref.kid) {
			t.Fatalf("parseVersion(%q) = %+v", v, ref)
		}
	})
}

// FuzzUnpad checks that unpad never panics and inverts pad.
func FuzzUnpad(f *testing.F) {
	f.Add([]byte{}, []byte{0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0})
	f.Add(bytes.Repeat([]byte{7}, 32), []byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, key, raw []byte) {
		if len(key) <= 64 {
			got, err := unpad(pad(key))
			if err != nil || !bytes.Equal(got, key) {
				t.Fatalf("unpad(pad(%x)) = %x, %v", key, got, err)
			}
		}
		if out, err := unpad(raw); err == nil && len(out) >= len(raw) {
			t.Fatalf("unpad(%x) = %x: not shorter than its input", raw, out)
		}
	})
}
