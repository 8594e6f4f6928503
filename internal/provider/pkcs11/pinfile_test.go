package pkcs11

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestReadPIN(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string, mode os.FileMode) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), mode); err != nil {
			t.Fatal(err)
		}
		os.Chmod(p, mode)
		return p
	}
	good := write("good", "1234\n", 0o600)
	if pin, err := readPIN(good); err != nil || pin != "1234" {
		t.Fatalf("readPIN = %q, %v; want 1234", pin, err)
	}
	if pin, err := readPIN(write("ro", "1234", 0o400)); err != nil || pin != "1234" {
		t.Fatalf("readPIN of a 0400 file = %q, %v", pin, err)
	}

	// A symlink in a directory only its owner writes (a Kubernetes Secret
	// volume's layout) is followed.
	safe := filepath.Join(dir, "safe")
	os.Mkdir(safe, 0o700)
	if err := os.Symlink(good, filepath.Join(safe, "pin")); err != nil {
		t.Fatal(err)
	}
	if pin, err := readPIN(filepath.Join(safe, "pin")); err != nil || pin != "1234" {
		t.Fatalf("readPIN through a safe symlink = %q, %v", pin, err)
	}

	open := filepath.Join(dir, "open")
	os.Mkdir(open, 0o777)
	os.Chmod(open, 0o777)
	os.Symlink(good, filepath.Join(open, "pin"))
	world := write("world", "1234\n", 0o644)
	os.Symlink(world, filepath.Join(safe, "to-world"))

	for _, tt := range []struct {
		name, path, want, fix string
	}{
		{"world-readable", world, "mode 0644", "chmod 600"},
		{"group-readable", write("group", "1234", 0o640), "mode 0640", "chmod 600"},
		{"symlink to a world-readable file", filepath.Join(safe, "to-world"), "mode 0644", "chmod 600"},
		{"symlink in a directory anyone writes", filepath.Join(open, "pin"), "could be pointed anywhere", "directory only its owner may write"},
		{"empty", write("empty", "\n", 0o600), "empty", "user PIN"},
		{"two lines", write("two", "1234\n5678\n", 0o600), "more than one line", "one line"},
		{"a directory", safe, "not a regular file", "pinFile"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pin, err := readPIN(tt.path)
			var pe *PINFileError
			if !errors.As(err, &pe) || !strings.Contains(err.Error(), tt.want) || !strings.Contains(pe.Fix, tt.fix) {
				t.Fatalf("readPIN = %q, %v; want a PINFileError with %q and a fix with %q", pin, err, tt.want, tt.fix)
			}
			if strings.Contains(err.Error(), "1234") {
				t.Fatalf("the error shows the PIN: %v", err)
			}
		})
	}
	if _, err := readPIN(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("readPIN of a missing file = %v; want ErrNotExist", err)
	}
}
