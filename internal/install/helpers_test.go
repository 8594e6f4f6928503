package install

import (
	"bytes"
	"context"
	"flag"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

// testImage is the plugin image the tests install.
const testImage = "registry.example.com/kms-plugin:v0.1.0"

// testNow is the fixed clock of the tests.
func testNow() time.Time { return time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC) }

// newRoot writes files (host path -> content) under a new temporary node
// root and returns it.
func newRoot(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

// kubeadmRoot returns a node root holding a kubeadm-generated manifest.
func kubeadmRoot(t *testing.T, fixture string) string {
	t.Helper()
	return newRoot(t, map[string]string{DefaultPaths().KubeAPIServer: readFile(t, fixture)})
}

func readFile(t *testing.T, name string) string {
	t.Helper()
	data, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// snapshot returns every file and directory under root (host path ->
// content, "<dir>" for directories), skipping the backup directory.
func snapshot(t *testing.T, root string) map[string]string {
	t.Helper()
	out := map[string]string{}
	backup := filepath.Join(root, DefaultPaths().BackupDir)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p == backup || strings.HasPrefix(p, backup+"/") {
			return nil
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.Join("/", rel)
		if d.IsDir() {
			out[rel] = "<dir>"
			return nil
		}
		data, err := os.ReadFile(p)
		out[rel] = string(data)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// sameTree fails the test when two snapshots differ.
func sameTree(t *testing.T, got, want map[string]string) {
	t.Helper()
	for p, w := range want {
		g, ok := got[p]
		if !ok {
			t.Errorf("%s is missing", p)
		} else if g != w {
			t.Errorf("%s changed:\n%s", p, unifiedDiff("want", "got", []byte(w), []byte(g), 2))
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("%s appeared", p)
		}
	}
}

// newInstaller returns an Installer on root with the test image and clock;
// edit may change the config first.
func newInstaller(t *testing.T, root string, edit func(*Config)) *Installer {
	t.Helper()
	cfg := Config{FS: DirFS(root), Now: testNow, Image: testImage}
	if edit != nil {
		edit(&cfg)
	}
	in, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// install plans and applies install, failing the test on error.
func install(t *testing.T, in *Installer) *Plan {
	t.Helper()
	plan, err := in.PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := in.Apply(plan); err != nil {
		t.Fatal(err)
	}
	return plan
}

// uninstall plans and applies an uninstall stage.
func uninstall(t *testing.T, in *Installer, opts UninstallOptions) *Plan {
	t.Helper()
	plan, err := in.PlanUninstall(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := in.Apply(plan); err != nil {
		t.Fatal(err)
	}
	return plan
}

// fakeStorage is a StorageScanner answering from a map of key -> value.
type fakeStorage struct {
	objects map[string]string
	err     error
	calls   [][]string
}

func (f *fakeStorage) FindPrefixed(_ context.Context, keyPrefixes []string, valuePrefix []byte, limit int) ([]string, int, error) {
	f.calls = append(f.calls, keyPrefixes)
	if f.err != nil {
		return nil, 0, f.err
	}
	var keys []string
	total := 0
	for k, v := range f.objects {
		for _, p := range keyPrefixes {
			if strings.HasPrefix(k, p) && bytes.HasPrefix([]byte(v), valuePrefix) {
				total++
				if len(keys) < limit {
					keys = append(keys, k)
				}
				break
			}
		}
	}
	return keys, total, nil
}

var _ StorageScanner = (*fakeStorage)(nil)

// checkGolden compares got with testdata/golden/name, rewriting it with
// -update.
func checkGolden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", "golden", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from its golden file (go test -update rewrites it):\n%s", name, unifiedDiff("want", "got", want, got, 3))
	}
}
