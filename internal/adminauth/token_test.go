package adminauth_test

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/adminauth/adminauthtest"
)

const testToken = "s3cr3t-T0ken-0123456789abcdef"

// secretVolume lays out dir as kubelet does a Secret volume: dir/NAME ->
// ..data/NAME, ..data -> ..TIMESTAMP, the real file in ..TIMESTAMP.
// Calling it again swaps ..data atomically to a new timestamped directory.
func secretVolume(t *testing.T, dir, stamp, name, content string) string {
	t.Helper()
	ts := filepath.Join(dir, ".."+stamp)
	if err := os.Mkdir(ts, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ts, name), []byte(content), 0o400); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, "..data_tmp")
	if err := os.Symlink(".."+stamp, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if _, err := os.Lstat(path); errors.Is(err, os.ErrNotExist) {
		if err := os.Symlink(filepath.Join("..data", name), path); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// TestTokenFileChecks attacks NewTokenFile with files an operator must
// not use: readable by others, not regular, links out of the directory.
func TestTokenFileChecks(t *testing.T) {
	tests := []struct {
		name string
		// setup returns the path to open, in the test's directory dir.
		setup func(t *testing.T, dir string) string
		want  string // "" when the file is accepted
	}{
		{"0600", func(t *testing.T, dir string) string {
			return adminauthtest.WriteFile(t, dir, "token", []byte(testToken+"\n"), 0o600)
		}, ""},
		{"0400", func(t *testing.T, dir string) string {
			return adminauthtest.WriteFile(t, dir, "token", []byte(testToken), 0o400)
		}, ""},
		{"0644", func(t *testing.T, dir string) string {
			return adminauthtest.WriteFile(t, dir, "token", []byte(testToken), 0o644)
		}, "has mode 0644: group and others must have no access: chmod 600 "},
		{"0640", func(t *testing.T, dir string) string {
			return adminauthtest.WriteFile(t, dir, "token", []byte(testToken), 0o640)
		}, "chmod 600"},
		{"0604", func(t *testing.T, dir string) string {
			return adminauthtest.WriteFile(t, dir, "token", []byte(testToken), 0o604)
		}, "chmod 600"},
		{"directory", func(t *testing.T, dir string) string {
			p := filepath.Join(dir, "token")
			if err := os.Mkdir(p, 0o700); err != nil {
				t.Fatal(err)
			}
			return p
		}, "is not a regular file"},
		{"missing", func(t *testing.T, dir string) string { return filepath.Join(dir, "token") }, "no such file"},
		{"empty", func(t *testing.T, dir string) string {
			return adminauthtest.WriteFile(t, dir, "token", []byte(" \n"), 0o600)
		}, "is empty"},
		{"two words", func(t *testing.T, dir string) string {
			return adminauthtest.WriteFile(t, dir, "token", []byte("two words"), 0o600)
		}, "one line of printable ASCII"},
		{"too large", func(t *testing.T, dir string) string {
			return adminauthtest.WriteFile(t, dir, "token", []byte(strings.Repeat("a", 5000)), 0o600)
		}, "larger than"},
		{"symlink inside its directory", func(t *testing.T, dir string) string {
			adminauthtest.WriteFile(t, dir, "real", []byte(testToken), 0o600)
			p := filepath.Join(dir, "token")
			if err := os.Symlink("real", p); err != nil {
				t.Fatal(err)
			}
			return p
		}, ""},
		{"kubernetes secret volume", func(t *testing.T, dir string) string {
			return secretVolume(t, dir, "2026_01_02_03_04_05.1", "token", testToken)
		}, ""},
		{"symlink out of its directory", func(t *testing.T, dir string) string {
			outside := adminauthtest.WriteFile(t, t.TempDir(), "elsewhere", []byte(testToken), 0o600)
			p := filepath.Join(dir, "token")
			if err := os.Symlink(outside, p); err != nil {
				t.Fatal(err)
			}
			return p
		}, "is a symbolic link to"},
		{"relative symlink climbing out", func(t *testing.T, dir string) string {
			sub := filepath.Join(dir, "sub")
			if err := os.Mkdir(sub, 0o700); err != nil {
				t.Fatal(err)
			}
			adminauthtest.WriteFile(t, dir, "up", []byte(testToken), 0o600)
			p := filepath.Join(sub, "token")
			if err := os.Symlink("../up", p); err != nil {
				t.Fatal(err)
			}
			return p
		}, "outside"},
		{"symlink to a world-readable file inside", func(t *testing.T, dir string) string {
			adminauthtest.WriteFile(t, dir, "real", []byte(testToken), 0o644)
			p := filepath.Join(dir, "token")
			if err := os.Symlink("real", p); err != nil {
				t.Fatal(err)
			}
			return p
		}, "chmod 600"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := tt.setup(t, t.TempDir())
			tf, err := adminauth.NewTokenFile(path)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("NewTokenFile = %v; want it accepted", err)
				}
				if got, err := tf.Token(); err != nil || got != testToken {
					t.Fatalf("Token() = %q, %v; want the token, trimmed", got, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("NewTokenFile error = %v; want one containing %q", err, tt.want)
			}
			if !strings.Contains(err.Error(), path) && tt.name != "missing" && tt.name != "directory" {
				t.Errorf("error %q does not name the file %s", err, path)
			}
			if strings.Contains(err.Error(), testToken) {
				t.Errorf("error %q holds the token", err)
			}
		})
	}
}

func TestTokenFileCheck(t *testing.T) {
	path := adminauthtest.WriteFile(t, t.TempDir(), "token", []byte(testToken+"\n"), 0o600)
	tf, err := adminauth.NewTokenFile(path)
	if err != nil {
		t.Fatal(err)
	}
	oneByte := []byte(testToken)
	oneByte[len(oneByte)/2] ^= 1
	tests := []struct {
		name    string
		headers []string
		want    error // nil: admitted
	}{
		{"right token", []string{"Bearer " + testToken}, nil},
		{"scheme in lower case", []string{"bearer " + testToken}, nil},
		{"no header", nil, adminauth.ErrNoCredential},
		{"wrong token", []string{"Bearer wrong"}, adminauth.ErrBadCredential},
		{"same length, one byte differs", []string{"Bearer " + string(oneByte)}, adminauth.ErrBadCredential},
		{"prefix of the token", []string{"Bearer " + testToken[:len(testToken)-1]}, adminauth.ErrBadCredential},
		{"token and more", []string{"Bearer " + testToken + "x"}, adminauth.ErrBadCredential},
		{"basic scheme", []string{"Basic " + testToken}, adminauth.ErrBadCredential},
		{"no scheme", []string{testToken}, adminauth.ErrBadCredential},
		{"empty bearer", []string{"Bearer "}, adminauth.ErrBadCredential},
		{"two headers", []string{"Bearer wrong", "Bearer " + testToken}, adminauth.ErrBadCredential},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodGet, "/status", nil)
			for _, h := range tt.headers {
				r.Header.Add("Authorization", h)
			}
			err := tf.Check(r)
			if tt.want == nil && err != nil || tt.want != nil && !errors.Is(err, tt.want) {
				t.Fatalf("Check = %v; want %v", err, tt.want)
			}
			if err != nil && strings.Contains(err.Error(), testToken[:8]) {
				t.Errorf("error %q holds the token", err)
			}
		})
	}
}

// TestTokenFileRotation changes the token on disk: the new one is
// admitted and the old one refused at once, with the same TokenFile.
func TestTokenFileRotation(t *testing.T) {
	check := func(t *testing.T, tf *adminauth.TokenFile, tok string) error {
		t.Helper()
		r := httptest.NewRequest(http.MethodGet, "/status", nil)
		r.Header.Set("Authorization", "Bearer "+tok)
		return tf.Check(r)
	}
	t.Run("rename over", func(t *testing.T) {
		dir := t.TempDir()
		tf, err := adminauth.NewTokenFile(adminauthtest.WriteFile(t, dir, "token", []byte("old-token"), 0o600))
		if err != nil {
			t.Fatal(err)
		}
		if err := check(t, tf, "old-token"); err != nil {
			t.Fatalf("old token before the change: %v", err)
		}
		adminauthtest.WriteFile(t, dir, "token", []byte("new-token"), 0o600)
		if err := check(t, tf, "new-token"); err != nil {
			t.Errorf("new token after the change: %v", err)
		}
		if err := check(t, tf, "old-token"); !errors.Is(err, adminauth.ErrBadCredential) {
			t.Errorf("old token after the change: %v; want ErrBadCredential", err)
		}
	})
	t.Run("secret volume update", func(t *testing.T) {
		dir := t.TempDir()
		path := secretVolume(t, dir, "1", "token", "old-token")
		tf, err := adminauth.NewTokenFile(path)
		if err != nil {
			t.Fatal(err)
		}
		secretVolume(t, dir, "2", "token", "new-token")
		if err := check(t, tf, "new-token"); err != nil {
			t.Errorf("new token after the update: %v", err)
		}
		if err := check(t, tf, "old-token"); !errors.Is(err, adminauth.ErrBadCredential) {
			t.Errorf("old token after the update: %v; want ErrBadCredential", err)
		}
	})
	t.Run("made world-readable fails closed", func(t *testing.T) {
		dir := t.TempDir()
		path := adminauthtest.WriteFile(t, dir, "token", []byte("old-token"), 0o600)
		tf, err := adminauth.NewTokenFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, 0o644); err != nil {
			t.Fatal(err)
		}
		err = check(t, tf, "old-token")
		if err == nil || errors.Is(err, adminauth.ErrBadCredential) || !strings.Contains(err.Error(), "chmod 600") {
			t.Errorf("token after chmod 644: %v; want the file's error", err)
		}
		if err := os.Chmod(path, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := check(t, tf, "old-token"); err != nil {
			t.Errorf("token after chmod 600 again: %v", err)
		}
	})
	t.Run("relinked out of the directory", func(t *testing.T) {
		dir := t.TempDir()
		adminauthtest.WriteFile(t, dir, "real", []byte("old-token"), 0o600)
		path := filepath.Join(dir, "token")
		if err := os.Symlink("real", path); err != nil {
			t.Fatal(err)
		}
		tf, err := adminauth.NewTokenFile(path)
		if err != nil {
			t.Fatal(err)
		}
		outside := adminauthtest.WriteFile(t, t.TempDir(), "evil", []byte("evil-token"), 0o600)
		if err := os.Remove(path); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(outside, path); err != nil {
			t.Fatal(err)
		}
		for _, tok := range []string{"evil-token", "old-token"} {
			if err := check(t, tf, tok); err == nil || !strings.Contains(err.Error(), "outside") {
				t.Errorf("token %s after the link left the directory: %v; want refused", tok, err)
			}
		}
	})
}
