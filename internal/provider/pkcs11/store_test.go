//go:build pkcs11

package pkcs11

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"

	p11 "github.com/miekg/pkcs11"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
)

func TestConformance(t *testing.T) {
	providertest.Run(t, func(t *testing.T) provider.Provider {
		return newToken(t).open(t, nil)
	})
}

func TestOpenCreatesFirstVersionOnlyWithCreate(t *testing.T) {
	ctx := context.Background()
	tk := newToken(t)
	p := tk.open(t, func(c *Config) { c.Create = false })
	if _, err := p.CurrentVersion(ctx); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("CurrentVersion on an empty token without Create = %v; want ErrKeyNotFound", err)
	}
	p.Close()
	p = tk.open(t, nil)
	v, err := p.CurrentVersion(ctx)
	if err != nil {
		t.Fatalf("CurrentVersion with Create: %v", err)
	}
	id, _ := ParseVersion(v)
	if parsed := parseID(id); parsed.counter != 1 || parsed.created.IsZero() {
		t.Fatalf("first version %s: counter %d, created %v; want counter 1 and a creation time", v, parsed.counter, parsed.created)
	}
	// The new object is a sensitive, never extractable token object.
	for typ, want := range map[uint]bool{p11.CKA_TOKEN: true, p11.CKA_SENSITIVE: true, p11.CKA_EXTRACTABLE: false,
		p11.CKA_ENCRYPT: true, p11.CKA_DECRYPT: true, p11.CKA_WRAP: false} {
		if got := attr(t, p, v, typ); got != want {
			t.Errorf("attribute 0x%x of the new version = %v; want %v", typ, got, want)
		}
	}
	if !p.NodeLocal() {
		t.Errorf("NodeLocal() = false; want the configured true")
	}
}

// TestRetiredStillDecryptsNotUsedToWrap: Rotate retires the versions it
// supersedes (CKA_ENCRYPT false): they unwrap, never wrap.
func TestRetiredStillDecryptsNotUsedToWrap(t *testing.T) {
	ctx := context.Background()
	p := newToken(t).open(t, nil)
	key := bytes.Repeat([]byte{7}, 32)
	old, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	next, err := p.Rotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if attr(t, p, old.Version, p11.CKA_ENCRYPT) || !attr(t, p, old.Version, p11.CKA_DECRYPT) {
		t.Fatalf("superseded version %s: want CKA_ENCRYPT false, CKA_DECRYPT true", old.Version)
	}
	if got, err := p.Unwrap(ctx, old); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap with the retired version: %v", err)
	}
	for range 5 {
		w, err := p.Wrap(ctx, key)
		if err != nil || w.Version != next {
			t.Fatalf("Wrap after Rotate used %q, %v; want %q", w.Version, err, next)
		}
	}
	vs, err := p.Versions(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != 2 || vs[0].Version != old.Version || vs[0].State != provider.VersionEnabled || vs[0].Current || !vs[1].Current {
		t.Fatalf("Versions = %+v; want the retired version enabled (it decrypts), the new one current", vs)
	}
	// An operator retiring the current version too leaves none that may
	// wrap: Wrap, told so by the token, says the key is disabled.
	setAttr(t, p, next, p11.CKA_ENCRYPT, false)
	if _, err := p.Wrap(ctx, key); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Wrap with every version retired = %v; want ErrKeyDisabled", err)
	}
}

// TestDisabledVersionRefused: CKA_DECRYPT false, set by Retire or behind
// the store's back, refuses Unwrap with ErrKeyDisabled; the token itself
// enforces it.
func TestDisabledVersionRefused(t *testing.T) {
	ctx := context.Background()
	p := newToken(t).open(t, nil)
	key := bytes.Repeat([]byte{9}, 32)
	v1, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	v2, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	// Through Retire.
	if err := p.Retire(ctx, v1.Version); err != nil {
		t.Fatal(err)
	}
	if attr(t, p, v1.Version, p11.CKA_DECRYPT) {
		t.Fatalf("Retire left CKA_DECRYPT true")
	}
	if _, err := p.Unwrap(ctx, v1); !errors.Is(err, provider.ErrKeyDisabled) {
		t.Fatalf("Unwrap with a disabled version = %v; want ErrKeyDisabled", err)
	}
	revoked, err := p.RevokedVersions(ctx, []string{v1.Version, v2.Version, "NOT-HEX"})
	if err != nil || len(revoked) != 1 || revoked[0] != v1.Version {
		t.Fatalf("RevokedVersions = %v, %v; want [%s]", revoked, err, v1.Version)
	}
	// Behind the store's back (pkcs11-tool, another node): the listing
	// still says CKA_DECRYPT true, the token refuses.
	setAttr(t, p, v2.Version, p11.CKA_DECRYPT, false)
	_, err = p.Unwrap(ctx, v2)
	if !errors.Is(err, provider.ErrKeyDisabled) || !errors.Is(err, p11.Error(p11.CKR_KEY_FUNCTION_NOT_PERMITTED)) {
		t.Fatalf("Unwrap with a version disabled on the token = %v; want ErrKeyDisabled from CKR_KEY_FUNCTION_NOT_PERMITTED", err)
	}
	// Nothing was destroyed: enabling it again makes it unwrap.
	setAttr(t, p, v2.Version, p11.CKA_DECRYPT, true)
	if got, err := p.Unwrap(ctx, v2); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap after re-enabling: %v", err)
	}
	if err := p.Retire(ctx, "00"+v2.Version[2:]); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("Retire of an unknown version = %v; want ErrKeyNotFound", err)
	}
}

// TestForgedVersionsCostNoCall: a version not spelled as the store writes
// it is refused without a call into the module; a well-formed unknown one
// costs at most one listing per RelistAfter, however many arrive.
func TestForgedVersionsCostNoCall(t *testing.T) {
	ctx := context.Background()
	p := newToken(t).open(t, func(c *Config) { c.RelistAfter = 1 << 40 })
	w, err := p.Wrap(ctx, bytes.Repeat([]byte{1}, 32))
	if err != nil {
		t.Fatal(err)
	}
	forged := []string{
		strings.ToUpper(w.Version), w.Version + "0", " " + w.Version, "0x" + w.Version, w.Version[1:],
		w.Version + "\n", "", strings.Repeat("ab", 65), "zz" + w.Version[2:],
	}
	before := p.Calls().Total()
	for _, v := range forged {
		if err := p.ValidVersion(v); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("ValidVersion(%q) = %v; want ErrKeyNotFound", v, err)
		}
		if _, err := p.Unwrap(ctx, provider.WrappedKey{Version: v, Ciphertext: w.Ciphertext}); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Errorf("Unwrap(%q) = %v; want ErrKeyNotFound", v, err)
		}
	}
	if after := p.Calls().Total(); after != before {
		t.Fatalf("forged versions cost %d calls into the module; want 0 (%v)", after-before, p.Calls())
	}
	if err := p.ValidVersion(w.Version); err != nil {
		t.Fatalf("ValidVersion of a genuine version: %v", err)
	}
	finds := p.Calls()["C_FindObjectsInit"]
	for i := range 200 {
		v := strings.Repeat("ab", 10) + randHex(t, 2) + string("0123456789"[i%10]) + "0"
		if _, err := p.Unwrap(ctx, provider.WrappedKey{Version: v, Ciphertext: w.Ciphertext}); !errors.Is(err, provider.ErrKeyNotFound) {
			t.Fatalf("Unwrap with unknown version %s = %v; want ErrKeyNotFound", v, err)
		}
	}
	if n := p.Calls()["C_FindObjectsInit"] - finds; n > 1 {
		t.Fatalf("200 unknown versions cost %d listings; want at most 1 per RelistAfter", n)
	}
	if p.Calls()["C_Decrypt"] != 0 {
		t.Fatalf("unknown versions reached C_Decrypt")
	}
}

// TestTamperedCiphertext: every changed byte is ErrInvalidCiphertext, the
// session stays healthy and the next unwrap works.
func TestTamperedCiphertext(t *testing.T) {
	ctx := context.Background()
	p := newToken(t).open(t, nil)
	key := bytes.Repeat([]byte{3}, 32)
	w, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if w.Ciphertext[0] != SchemeAESGCM || len(w.Ciphertext) != 1+IVSize+32+TagSize {
		t.Fatalf("wrapped form = %x; want scheme 0x01, IV, 32 bytes, tag", w.Ciphertext)
	}
	for _, i := range []int{0, 1, IVSize, 1 + IVSize, 1 + IVSize + 31, len(w.Ciphertext) - 1} {
		bad := bytes.Clone(w.Ciphertext)
		bad[i] ^= 0x80
		if _, err := p.Unwrap(ctx, provider.WrappedKey{Version: w.Version, Ciphertext: bad}); !errors.Is(err, provider.ErrInvalidCiphertext) {
			t.Errorf("Unwrap with byte %d changed = %v; want ErrInvalidCiphertext", i, err)
		}
	}
	if got, err := p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap after tampered ones: %v", err)
	}
	if n := p.Calls()["C_OpenSession"]; n != 1 {
		t.Fatalf("tampered ciphertexts cost %d sessions; want the one healthy session reused", n)
	}
}

// TestWrongPINNeverRetried: the token refuses the PIN once; no call tries
// it again until the PIN file changes.
func TestWrongPINNeverRetried(t *testing.T) {
	ctx := context.Background()
	tk := newToken(t)
	writeFile(t, tk.pinFile, "0000\n", 0o600)
	p := tk.open(t, func(c *Config) { c.PIN = "0000" })
	w := provider.WrappedKey{Version: strings.Repeat("ab", 20), Ciphertext: append([]byte{SchemeAESGCM}, make([]byte, 60)...)}
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 25 {
				_, err1 := p.CurrentVersion(ctx)
				_, err2 := p.Wrap(ctx, make([]byte, 32))
				_, err3 := p.Unwrap(ctx, w)
				err4 := p.Health(ctx)
				_, err5 := p.Rotate(ctx)
				for _, err := range []error{err1, err2, err3, err4, err5} {
					if !errors.Is(err, provider.ErrPermissionDenied) {
						t.Errorf("call with a refused PIN = %v; want ErrPermissionDenied", err)
					}
				}
			}
		}()
	}
	wg.Wait()
	if n := p.Calls()["C_Login"]; n != 1 {
		t.Fatalf("C_Login was called %d times with a refused PIN; want exactly 1", n)
	}
	if g := gauge(p.ReportState(), "pkcs11_pin_refused"); g != 1 {
		t.Fatalf("gauge pkcs11_pin_refused = %v; want 1", g)
	}
	_, err := p.CurrentVersion(ctx)
	if err == nil || strings.Contains(err.Error(), "0000") || !strings.Contains(err.Error(), "not tried again") {
		t.Fatalf("error = %v; want one that says the PIN is not tried again, without the PIN", err)
	}
	// The same wrong PIN written again: still no attempt.
	writeFile(t, tk.pinFile, "0000", 0o600)
	if _, err := p.CurrentVersion(ctx); !errors.Is(err, provider.ErrPermissionDenied) || p.Calls()["C_Login"] != 1 {
		t.Fatalf("after rewriting the same PIN: %v, %d logins", err, p.Calls()["C_Login"])
	}
	// The right PIN: one more login, and the store works.
	writeFile(t, tk.pinFile, testUserPIN+"\n", 0o600)
	if _, err := p.Wrap(ctx, make([]byte, 32)); err != nil {
		t.Fatalf("Wrap after fixing the PIN file: %v", err)
	}
	if n := p.Calls()["C_Login"]; n != 2 {
		t.Fatalf("C_Login calls = %d; want 2", n)
	}
	if g := gauge(p.ReportState(), "pkcs11_pin_refused"); g != 0 {
		t.Fatalf("gauge pkcs11_pin_refused = %v after the fix; want 0", g)
	}
}

func TestHSMGeneratedIVRefusedWhereTheTokenMakesNone(t *testing.T) {
	p := newToken(t).open(t, func(c *Config) { c.HSMGeneratedIV = true })
	_, err := p.Wrap(context.Background(), make([]byte, 32))
	if err == nil || !strings.Contains(err.Error(), "hsmGeneratedIV") {
		t.Fatalf("Wrap with hsmGeneratedIV on SoftHSM = %v; want a refusal naming hsmGeneratedIV (it returns the zero IV)", err)
	}
}

// TestSessionPool: concurrent unwraps share at most Sessions sessions and
// log in once.
func TestSessionPool(t *testing.T) {
	ctx := context.Background()
	p := newToken(t).open(t, func(c *Config) { c.Sessions = 4 })
	key := bytes.Repeat([]byte{5}, 32)
	w, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 20 {
				if got, err := p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
					t.Errorf("Unwrap: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	c := p.Calls()
	if c["C_OpenSession"] > 4 || c["C_Login"] != 1 || c["C_Decrypt"] != 640 {
		t.Fatalf("calls = %v; want at most 4 sessions, 1 login, 640 decrypts", c)
	}
}

// TestTokenReinitRecovery: the token re-initialized under a running store
// gives clear errors; restoring its directory brings the store back.
func TestTokenReinitRecovery(t *testing.T) {
	ctx := context.Background()
	tk := newToken(t)
	p := tk.open(t, func(c *Config) { c.ReinitAfter = -1 })
	key := bytes.Repeat([]byte{4}, 32)
	w, err := p.Wrap(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	backup := tk.dir + ".copy"
	if out, err := exec.Command("cp", "-a", tk.dir, backup).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}

	// The token directory gone: the module cannot even initialize.
	if err := os.RemoveAll(tk.dir); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Unwrap(ctx, w); !errors.Is(err, provider.ErrKeyNotFound) && !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("Unwrap with the token gone = %v; want ErrKeyNotFound or ErrUnavailable", err)
	}
	_, err = p.CurrentVersion(ctx)
	if !errors.Is(err, provider.ErrUnavailable) {
		t.Fatalf("CurrentVersion with the token directory gone = %v; want ErrUnavailable", err)
	}
	t.Logf("token directory gone: %v", err)

	// A new, empty token under the same label: the key is not found.
	if err := os.Mkdir(tk.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	tk.initToken(t)
	_, err = p.CurrentVersion(ctx)
	if !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("CurrentVersion on a re-initialized token = %v; want ErrKeyNotFound", err)
	}
	t.Logf("token re-initialized: %v", err)
	if g := gauge(p.ReportState(), "pkcs11_token_lost"); g != 1 {
		t.Fatalf("gauge pkcs11_token_lost = %v with the objects gone; want 1", g)
	}
	if _, err := p.Unwrap(ctx, w); !errors.Is(err, provider.ErrKeyNotFound) {
		t.Fatalf("Unwrap on a re-initialized token = %v; want ErrKeyNotFound", err)
	}

	// The old token back: the store finds it, logs in again, unwraps.
	if err := os.RemoveAll(tk.dir); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", backup, tk.dir).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	logins := p.Calls()["C_Login"]
	v, err := p.CurrentVersion(ctx)
	if err != nil || v != w.Version {
		t.Fatalf("CurrentVersion after restoring the token = %q, %v; want %q", v, err, w.Version)
	}
	if got, err := p.Unwrap(ctx, w); err != nil || !bytes.Equal(got, key) {
		t.Fatalf("Unwrap after restoring the token: %v", err)
	}
	if p.Calls()["C_Login"] <= logins {
		t.Fatalf("no new login after the token came back: %v", p.Calls())
	}
	if g := gauge(p.ReportState(), "pkcs11_token_lost"); g != 0 {
		t.Fatalf("gauge pkcs11_token_lost = %v after recovery; want 0", g)
	}
}

// TestOpenRefusesPINFileMode: serve refuses a PIN file others may read,
// before loading the module, with the fix in the one-line error.
func TestOpenRefusesPINFileMode(t *testing.T) {
	tk := newToken(t)
	os.Chmod(tk.pinFile, 0o644)
	_, err := tk.settings().Open(context.Background(), provider.OpenOptions{Create: true})
	var pe *PINFileError
	if !errors.As(err, &pe) || !strings.Contains(err.Error(), "chmod 600") || strings.Contains(err.Error(), "\n") {
		t.Fatalf("Open with a 0644 PIN file = %v; want a one-line PIN file error with its fix", err)
	}
	if _, loaded := modules[softHSMModule]; loaded {
		t.Fatalf("the module was loaded before the PIN file was checked")
	}
}

func gauge(st provider.StoreState, name string) float64 {
	for _, g := range st.Gauges {
		if g.Name == name {
			return g.Value
		}
	}
	return -1
}
