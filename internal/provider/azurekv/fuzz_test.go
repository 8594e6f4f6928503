package azurekv

import (
	"bytes"
	"strings"
	"testing"
)

// FuzzParseVersion checks that version strings read back from etcd
// annotations never panic the parser, that what it accepts names a
// versioned key of the configured vault in its one canonical spelling, and
// that two accepted strings the vault would take for the same version
// differ at most in the key name's case (which admit settles with the
// vault's own spelling).
func FuzzParseVersion(f *testing.F) {
	p := &Provider{vaultHost: "kvtest.vault.azure.net"}
	const kid = "https://kvtest.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef"
	for _, s := range []string{
		kid,
		kid + "#after=fedcba9876543210fedcba9876543210",
		"https://other.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef",
		"http://kvtest.vault.azure.net/keys/k/v", "", "#", "https://%zz", "https://kvtest.vault.azure.net/keys//",
		kid + "#forged", kid + "/", kid + "?x=1", " " + kid, strings.ToUpper(kid),
		"https://KVTEST.vault.azure.net/keys/k/0123456789abcdef0123456789abcdef",
		"https://kvtest.vault.azure.net:443/keys/k/0123456789abcdef0123456789abcdef",
		"https://kvtest.vault.azure.net/keys/%6B/0123456789abcdef0123456789abcdef",
		"https://kvtest.vault.azure.net/keys/K/0123456789abcdef0123456789abcdef",
	} {
		f.Add(s, kid)
	}
	f.Fuzz(func(t *testing.T, a, b string) {
		ra, err := p.parseVersion(a)
		if err != nil {
			return
		}
		if ra.String() != a || !strings.HasPrefix(a, p.kidPrefix()) || ra.kid != p.kidPrefix()+ra.name+"/"+ra.id ||
			!keyNameRE.MatchString(ra.name) || !canonicalIDRE.MatchString(ra.id) || (ra.after != "" && !canonicalIDRE.MatchString(ra.after)) {
			t.Fatalf("parseVersion(%q) = %+v: not the canonical spelling", a, ra)
		}
		for _, extra := range []string{"/", " ", "?", "#", "#x", "%", "\n"} {
			if _, err := p.parseVersion(a + extra); err == nil {
				t.Fatalf("parseVersion accepted %q and %q", a, a+extra)
			}
		}
		rb, err := p.parseVersion(b)
		if err != nil || a == b {
			return
		}
		if ra.name == rb.name && ra.id == rb.id && ra.after == rb.after {
			t.Fatalf("%q and %q both accepted for one version", a, b)
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
