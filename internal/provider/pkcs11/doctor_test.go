//go:build pkcs11

package pkcs11

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// checklist records doctor's checks.
type checklist struct {
	lines []string
	fails map[string]string // check -> fix
}

func (c *checklist) OK(check, detail string) { c.lines = append(c.lines, "ok "+check+": "+detail) }
func (c *checklist) Fail(check string, err error, fix string) {
	if c.fails == nil {
		c.fails = map[string]string{}
	}
	c.fails[check] = fix
	c.lines = append(c.lines, "FAIL "+check+": "+err.Error()+" | fix: "+fix)
}
func (c *checklist) Skip(check, why string) { c.lines = append(c.lines, "skip "+check+": "+why) }

func runDoctor(t *testing.T, s *Settings) (*checklist, provider.Provider) {
	t.Helper()
	c := &checklist{}
	p := s.Doctor(context.Background(), c, provider.OpenOptions{})
	if p != nil {
		t.Cleanup(func() { p.(*Provider).Close() })
	}
	t.Logf("doctor:\n%s", strings.Join(c.lines, "\n"))
	for _, line := range c.lines {
		if strings.Contains(line, testUserPIN) {
			t.Fatalf("doctor printed the PIN: %s", line)
		}
	}
	return c, p
}

func TestDoctor(t *testing.T) {
	t.Run("healthy", func(t *testing.T) {
		tk := newToken(t)
		tk.open(t, nil).Close() // serve's first start made the first version
		c, p := runDoctor(t, tk.settings())
		if p == nil || len(c.fails) != 0 || !strings.Contains(strings.Join(c.lines, "\n"), "ok attributes") {
			t.Fatalf("doctor on a healthy token failed: %v", c.lines)
		}
	})
	for _, tt := range []struct {
		name, check, fix string
		setup            func(t *testing.T, tk *token, s *Settings)
	}{
		{"module missing", "module", "pkcs11.module", func(t *testing.T, tk *token, s *Settings) {
			s.Module = filepath.Join(t.TempDir(), "libnothere.so")
		}},
		{"module not a library", "module", "pkcs11.module", func(t *testing.T, tk *token, s *Settings) {
			s.Module = tk.pinFile
		}},
		{"token label wrong", "token", "pkcs11-tool --module MODULE --list-slots", func(t *testing.T, tk *token, s *Settings) {
			s.TokenLabel = "no-such-token"
		}},
		{"PIN file readable by others", "PIN file", "chmod 600", func(t *testing.T, tk *token, s *Settings) {
			os.Chmod(tk.pinFile, 0o644)
		}},
		{"wrong PIN", "login", "never tried twice", func(t *testing.T, tk *token, s *Settings) {
			writeFile(t, tk.pinFile, "0000", 0o600)
		}},
		{"no key", "key objects", "generates the first one", func(t *testing.T, tk *token, s *Settings) {
			s.KeyLabel = "other-key"
		}},
		{"every version retired", "key objects", "kms-plugin keyset rotate", func(t *testing.T, tk *token, s *Settings) {
			p := tk.open(t, nil)
			v, _ := p.CurrentVersion(context.Background())
			setAttr(t, p, v, 0x104 /* CKA_ENCRYPT */, false)
			p.Close()
		}},
		{"extractable key", "attributes", "never leaves the token", func(t *testing.T, tk *token, s *Settings) {
			p := tk.open(t, nil)
			importKey(t, p, make([]byte, 32), []byte{0x01}, true)
			p.Close()
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tk := newToken(t)
			if tt.name != "no key" {
				tk.open(t, nil).Close()
			}
			s := tk.settings()
			tt.setup(t, tk, s)
			c, _ := runDoctor(t, s)
			fix, failed := c.fails[tt.check]
			if !failed || len(c.fails) != 1 {
				t.Fatalf("doctor failures = %v; want exactly check %q", c.fails, tt.check)
			}
			if !strings.Contains(fix, tt.fix) {
				t.Fatalf("fix for %q = %q; want it to mention %q", tt.check, fix, tt.fix)
			}
		})
	}
}
