package azurekv

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/clocktest"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

// forgedSpellings are spellings of version v (a kid of host, key name,
// version ID) that Key Vault would answer for as v itself, or that are v
// with something after it: each must be refused before any vault call.
func forgedSpellings(v, host, name, id string) map[string]string {
	kid, _, _ := strings.Cut(v, "#")
	swap := func(old, new string) string { return strings.Replace(kid, old, new, 1) }
	return map[string]string{
		"other fragment":             kid + "#forged1",
		"empty fragment":             kid + "#",
		"empty after":                kid + "#after=",
		"upper-case after":           kid + "#after=" + strings.ToUpper(id),
		"after with more":            kid + "#after=" + id + "#x",
		"after with a slash":         kid + "#after=" + id + "/",
		"after, another key's style": kid + "#after=https://" + host + "/keys/" + name + "/" + id,
		"trailing slash":             kid + "/",
		"query":                      kid + "?api-version=2025-07-01",
		"empty query":                kid + "?",
		"leading space":              " " + kid,
		"trailing space":             kid + " ",
		"trailing newline":           kid + "\n",
		"upper-case host":            swap(host, strings.ToUpper(host)),
		"mixed-case host":            swap(host, strings.ToUpper(host[:1])+host[1:]),
		"host with port 443":         swap(host, host+":443"),
		"host with a dot":            swap(host, host+"."),
		"user info":                  swap("https://", "https://user@"),
		"upper-case scheme":          swap("https://", "HTTPS://"),
		"http":                       swap("https://", "http://"),
		"no scheme":                  strings.TrimPrefix(kid, "https:"),
		"upper-case keys":            swap("/keys/", "/KEYS/"),
		"double slash":               swap("/keys/", "//keys/"),
		"dot segment":                swap("/keys/", "/keys/./"),
		"upper-case key name":        swap("/"+name+"/", "/"+strings.ToUpper(name)+"/"),
		"lower-case key name":        swap("/"+name+"/", "/"+strings.ToLower(name)+"/"),
		"percent-encoded key name":   swap("/"+name+"/", "/%"+fmt.Sprintf("%02X", name[0])+name[1:]+"/"),
		"percent-encoded slash":      swap("/"+name+"/", "/"+name+"%2F"),
		"upper-case version":         swap("/"+id, "/"+strings.ToUpper(id)),
		"percent-encoded version":    swap("/"+id, "/%"+fmt.Sprintf("%02x", id[0])+id[1:]),
		"backslash":                  swap("/"+id, "\\"+id),
		"another vault":              swap(host, "attacker.vault.azure.net"),
		"a look-alike vault":         swap(host, host+".attacker.example"),
		"an HSM of the same name":    swap(".vault.", ".managedhsm."),
		"unknown after version":      kid + "#after=0123456789abcdef0123456789abcdef",
		"versionless":                strings.TrimSuffix(kid, "/"+id),
		"versions path":              strings.TrimSuffix(kid, id) + "versions",
	}
}

// TestForgedVersionsCostNoVaultCall replays a genuine wrapped local KEK
// under other spellings of its version: each is refused with
// ErrKeyNotFound, and the vault sees no request for any of them.
func TestForgedVersionsCostNoVaultCall(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	if _, err := srv.CreateKey("Kms-Kek", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	clock := clocktest.New(time.Now())
	// Configured in another case than the vault spells the key.
	p := newTestProvider(t, srv, "kms-kek", "", func(c *Config) { c.Now = clock.Now })
	ctx := context.Background()
	key := randomSeed(t)
	w, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(w.Version, "/keys/Kms-Kek/") {
		t.Fatalf("version %q does not spell the key as the vault does", w.Version)
	}
	if _, err := p.Unwrap(ctx, w); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Versions(ctx); err != nil { // the poll's listing, as RevokedVersions makes
		t.Fatal(err)
	}
	id := lastSegment(w.Version)
	forged := forgedSpellings(w.Version, srv.VaultHost(), "Kms-Kek", id)
	srv.ResetCalls()
	for name, v := range forged {
		if v == w.Version {
			t.Fatalf("%s: the forged spelling is the genuine one", name)
		}
		_, err := p.Unwrap(ctx, provider.WrappedKey{Version: v, Ciphertext: w.Ciphertext})
		if !errors.Is(err, provider.ErrKeyNotFound) && !errors.Is(err, provider.ErrInvalidCiphertext) {
			t.Errorf("%s: Unwrap(%q) = %v; want ErrKeyNotFound", name, v, err)
		}
		if n := srv.VaultCalls(); n != 0 {
			t.Fatalf("%s: Unwrap(%q) made %d vault calls (%v); want none", name, v, n, srv.AllCalls())
		}
	}
	// The genuine version still works, once per call.
	if _, err := p.Unwrap(ctx, w); err != nil || srv.VaultCalls() != 1 {
		t.Fatalf("genuine Unwrap = %v after %d calls", err, srv.VaultCalls())
	}

	// Unknown #after= versions cost at most one listing per interval,
	// however many arrive.
	clock.Add(relistInterval)
	srv.ResetCalls()
	for i := range 50 {
		v := fmt.Sprintf("%s#after=%032x", w.Version, i)
		if _, err := p.Unwrap(ctx, provider.WrappedKey{Version: v, Ciphertext: w.Ciphertext}); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Fatalf("Unwrap(%q) = %v; want ErrKeyNotFound", v, err)
		}
	}
	if got := srv.AllCalls(); got["list"] != 1 || srv.VaultCalls() != 1 {
		t.Fatalf("50 unknown #after= versions made %v calls; want one listing", got)
	}
	// A genuine #after= version (the key went backwards) is admitted.
	newer, _ := srv.NewVersion("Kms-Kek")
	if err := srv.SetEnabled("Kms-Kek", lastSegment(newer), false); err != nil {
		t.Fatal(err)
	}
	clock.Add(relistInterval)
	back, err := p.Wrap(ctx, key)
	if err != nil || back.Version != w.Version+"#after="+lastSegment(newer) {
		t.Fatalf("Wrap after the newest was disabled = %q, %v", back.Version, err)
	}
	other := newTestProvider(t, srv, "Kms-Kek", "", nil) // a node that never listed
	if got, err := other.Unwrap(ctx, back); err != nil || string(got) != string(key) {
		t.Fatalf("Unwrap(%q) on another node = %v", back.Version, err)
	}
}

// TestVaultSpellingLearnedFromAnswers unwraps data of a key the provider
// was never told about (a former key name) under a spelling the vault
// does not use: the vault's answer names the right spelling, the forged
// one is refused, and from then on refused without a call.
func TestVaultSpellingLearnedFromAnswers(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	old := newTestProvider(t, srv, "Old-Key", kvtest.KeyTypeRSA, nil)
	ctx := context.Background()
	w, err := old.Wrap(ctx, randomSeed(t))
	if err != nil {
		t.Fatal(err)
	}
	moved := newTestProvider(t, srv, "new-key", kvtest.KeyTypeRSA, nil)
	forged := provider.WrappedKey{Version: strings.Replace(w.Version, "/Old-Key/", "/old-key/", 1), Ciphertext: w.Ciphertext}
	if _, err := moved.Unwrap(ctx, forged); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("Unwrap of the vault-normalised spelling %q = %v; want ErrKeyNotFound", forged.Version, err)
	}
	srv.ResetCalls()
	if _, err := moved.Unwrap(ctx, forged); !errors.Is(err, provider.ErrKeyNotFound) || srv.VaultCalls() != 0 {
		t.Fatalf("second Unwrap of %q = %v with %d calls; want a refusal without a call", forged.Version, err, srv.VaultCalls())
	}
	if _, err := moved.Unwrap(ctx, w); err != nil {
		t.Fatalf("Unwrap of the former key's data under its own spelling: %v", err)
	}
}

// TestDenialIsPerKeyVersion makes the vault answer 403 for a version of
// another key of the vault, as a forged annotation would: a legitimate
// cold unwrap of the configured key right after is not blocked, while the
// forged one is remembered.
func TestDenialIsPerKeyVersion(t *testing.T) {
	srv := startServer(t, kvtest.Options{RBAC: true})
	p := newTestProvider(t, srv, "real", kvtest.KeyTypeRSA, nil)
	ctx := context.Background()
	w, err := p.Wrap(ctx, randomSeed(t))
	if err != nil {
		t.Fatal(err)
	}
	app := srv.LastPrincipal()
	otherKID, err := srv.CreateKey("someone-elses", kvtest.KeyTypeRSA, 0)
	if err != nil {
		t.Fatal(err)
	}
	srv.SetKeyPermissions(app, "someone-elses") // nothing on that key
	forged := provider.WrappedKey{Version: otherKID, Ciphertext: w.Ciphertext}
	if _, err := p.Unwrap(ctx, forged); !errors.Is(err, provider.ErrPermissionDenied) {
		t.Fatalf("Unwrap with another key's version = %v; want ErrPermissionDenied", err)
	}
	if _, err := p.Unwrap(ctx, w); err != nil {
		t.Fatalf("a 403 for another key's version blocked the real key: %v", err)
	}
	srv.ResetCalls()
	for range 5 {
		if _, err := p.Unwrap(ctx, forged); !errors.Is(err, provider.ErrPermissionDenied) || !strings.Contains(err.Error(), "remembered") {
			t.Fatalf("repeated forged Unwrap = %v; want the remembered denial", err)
		}
	}
	if got := srv.VaultCalls(); got != 0 {
		t.Fatalf("the remembered denial reached the vault %d times", got)
	}
	if _, err := p.CurrentVersion(ctx); err != nil {
		t.Fatalf("a 403 for another key's version blocked the poll: %v", err)
	}
}

// TestMemoryOfForgedVersionsIsBounded sends many forged versions the vault
// refuses (403 for another key, unknown key names behind #after=): what
// the provider remembers about them stays bounded, and it never forgets
// how the vault spells the configured key.
func TestMemoryOfForgedVersionsIsBounded(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	p := newTestProvider(t, srv, "Real", kvtest.KeyTypeRSA, nil)
	ctx := context.Background()
	w, err := p.Wrap(ctx, randomSeed(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.CreateKey("fenced", kvtest.KeyTypeRSA, 0); err != nil {
		t.Fatal(err)
	}
	srv.SetKeyPermissions(srv.LastPrincipal(), "fenced")
	for i := range maxDenied + 100 {
		v := p.kidOf("fenced", fmt.Sprintf("%032x", i))
		if _, err := p.Unwrap(ctx, provider.WrappedKey{Version: v, Ciphertext: w.Ciphertext}); !errors.Is(err, provider.ErrPermissionDenied) {
			t.Fatalf("Unwrap(%s) = %v; want ErrPermissionDenied", v, err)
		}
	}
	for i := range maxBookKeys + 50 {
		v := p.kidOf(fmt.Sprintf("nokey-%d", i), lastSegment(w.Version)) + "#after=" + lastSegment(w.Version)
		if _, err := p.Unwrap(ctx, provider.WrappedKey{Version: v, Ciphertext: w.Ciphertext}); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Fatalf("Unwrap(%s) = %v; want ErrKeyNotFound", v, err)
		}
	}
	p.deniedMu.Lock()
	denied := len(p.denied)
	p.deniedMu.Unlock()
	p.book.mu.Lock()
	keys := len(p.book.keys)
	p.book.mu.Unlock()
	if denied > maxDenied || keys > maxBookKeys {
		t.Fatalf("remembered %d denials and %d keys; want at most %d and %d", denied, keys, maxDenied, maxBookKeys)
	}
	srv.ResetCalls()
	lower := provider.WrappedKey{Version: strings.Replace(w.Version, "/Real/", "/real/", 1), Ciphertext: w.Ciphertext}
	if _, err := p.Unwrap(ctx, lower); !errors.Is(err, provider.ErrKeyNotFound) || srv.VaultCalls() != 0 {
		t.Fatalf("after the flood, a case variant of the configured key = %v with %d calls; want a refusal without a call", err, srv.VaultCalls())
	}
	if _, err := p.Unwrap(ctx, w); err != nil {
		t.Fatalf("after the flood, the genuine version: %v", err)
	}
}

var _ provider.VersionValidator = (*Provider)(nil)
