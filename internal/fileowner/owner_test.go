//go:build unix

package fileowner

import (
	"os"
	"path/filepath"
	"testing"
)

func TestUID(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if uid, ok := UID(fi); !ok || uid != os.Geteuid() {
		t.Fatalf("UID of a file this process made = %d, %v; want %d, true", uid, ok, os.Geteuid())
	}
}
