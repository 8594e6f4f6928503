//go:build pkcs11

package pkcs11

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"
)

// softHSMModule is where Debian's softhsm2 package installs the module.
const softHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

const (
	testUserPIN = "Zq81-x7Lm"
	testSOPIN   = "1234"
)

// token is a SoftHSM token of its own for one test.
type token struct {
	dir      string // the token directory (directories.tokendir)
	conf     string
	label    string
	pinFile  string
	keyLabel string
}

// needSoftHSM skips the test without SoftHSM, or fails it on CI, where
// make test installs it (hack/apt-install.sh softhsm2 opensc).
func needSoftHSM(t testing.TB) {
	t.Helper()
	_, err1 := os.Stat(softHSMModule)
	_, err2 := exec.LookPath("softhsm2-util")
	if err1 == nil && err2 == nil {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("SoftHSM2 is missing (%v, %v): make unit-pkcs11 installs it (bash hack/apt-install.sh softhsm2 opensc)", err1, err2)
	}
	t.Skip("SoftHSM2 is not installed (bash hack/apt-install.sh softhsm2 opensc)")
}

// newToken initializes a fresh SoftHSM token in a temporary directory and
// points SOFTHSM2_CONF at it for the test (which therefore is not
// parallel: the module reads it at C_Initialize, once per process).
func newToken(t testing.TB) *token {
	t.Helper()
	needSoftHSM(t)
	dir := t.TempDir()
	tk := &token{
		dir:      filepath.Join(dir, "tokens"),
		conf:     filepath.Join(dir, "softhsm2.conf"),
		label:    "test-" + randHex(t, 4),
		pinFile:  filepath.Join(dir, "pin"),
		keyLabel: "kms-plugin-kek",
	}
	if err := os.Mkdir(tk.dir, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := "directories.tokendir = " + tk.dir + "\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
	if err := os.WriteFile(tk.conf, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	if s, ok := os.LookupEnv("SOFTHSM2_CONF"); ok {
		t.Cleanup(func() { os.Setenv("SOFTHSM2_CONF", s) })
	} else {
		t.Cleanup(func() { os.Unsetenv("SOFTHSM2_CONF") })
	}
	os.Setenv("SOFTHSM2_CONF", tk.conf)
	tk.initToken(t)
	writeFile(t, tk.pinFile, testUserPIN+"\n", 0o600)
	return tk
}

// initToken runs softhsm2-util --init-token on the free slot.
func (tk *token) initToken(t testing.TB) {
	t.Helper()
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", tk.label, "--so-pin", testSOPIN, "--pin", testUserPIN)
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+tk.conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
}

// config is a store configuration for the token.
func (tk *token) config() Config {
	return Config{
		Module: softHSMModule, TokenLabel: tk.label, PIN: testUserPIN, PINFile: tk.pinFile,
		KeyLabel: tk.keyLabel, NodeLocal: true, Timeout: 30 * time.Second,
	}
}

// settings are the token's Settings.
func (tk *token) settings() *Settings {
	s := NewSettings()
	s.Module, s.TokenLabel, s.PINFile, s.KeyLabel = softHSMModule, tk.label, tk.pinFile, tk.keyLabel
	return s
}

// open opens a store on the token and closes it at the test's end.
func (tk *token) open(t testing.TB, mutate func(*Config)) *Provider {
	t.Helper()
	cfg := tk.config()
	cfg.Create = true
	if mutate != nil {
		mutate(&cfg)
	}
	p, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// raw runs fn on a session of p's pool, as an operator's tool would act
// on the token behind the store's back.
func raw(t testing.TB, p *Provider, fn func(c *p11.Ctx, h p11.SessionHandle) error) {
	t.Helper()
	err := p.withSession(context.Background(), "test", func(c *p11.Ctx, s *session) error { return fn(c, s.h) })
	if err != nil {
		t.Fatalf("raw session: %v", err)
	}
}

// attr reads one boolean attribute of version's object.
func attr(t testing.TB, p *Provider, version string, typ uint) bool {
	t.Helper()
	var v bool
	raw(t, p, func(c *p11.Ctx, h p11.SessionHandle) error {
		obj := findObject(t, c, h, p.cfg.KeyLabel, version)
		a, err := c.GetAttributeValue(h, obj, []*p11.Attribute{p11.NewAttribute(typ, nil)})
		if err != nil {
			return err
		}
		v = boolean(a[0].Value)
		return nil
	})
	return v
}

// setAttr sets one boolean attribute of version's object directly.
func setAttr(t testing.TB, p *Provider, version string, typ uint, v bool) {
	t.Helper()
	raw(t, p, func(c *p11.Ctx, h p11.SessionHandle) error {
		return c.SetAttributeValue(h, findObject(t, c, h, p.cfg.KeyLabel, version), []*p11.Attribute{p11.NewAttribute(typ, v)})
	})
}

func findObject(t testing.TB, c *p11.Ctx, h p11.SessionHandle, label, version string) p11.ObjectHandle {
	t.Helper()
	id, err := hex.DecodeString(version)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.FindObjectsInit(h, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, label), p11.NewAttribute(p11.CKA_ID, id)}); err != nil {
		t.Fatal(err)
	}
	objs, _, err := c.FindObjects(h, 2)
	c.FindObjectsFinal(h)
	if err != nil || len(objs) != 1 {
		t.Fatalf("find object %s: %v, %d objects", version, err, len(objs))
	}
	return objs[0]
}

// importKey creates a token object holding the AES key value, as a
// version with CKA_ID id: how the golden vectors' key reaches the token.
func importKey(t testing.TB, p *Provider, value, id []byte, extractable bool) {
	t.Helper()
	raw(t, p, func(c *p11.Ctx, h p11.SessionHandle) error {
		tmpl := keyTemplate(p.cfg.KeyLabel, id)
		for i, a := range tmpl {
			if a.Type == p11.CKA_VALUE_LEN {
				tmpl[i] = p11.NewAttribute(p11.CKA_VALUE, value)
			}
			if a.Type == p11.CKA_EXTRACTABLE {
				tmpl[i] = p11.NewAttribute(p11.CKA_EXTRACTABLE, extractable)
			}
		}
		_, err := c.CreateObject(h, tmpl)
		return err
	})
}

func writeFile(t testing.TB, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func randHex(t testing.TB, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}
