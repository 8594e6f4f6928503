package install

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// faultyFS fails the n-th call (1-based) of one operation.
type faultyFS struct {
	FS
	op    string // "WriteTemp", "Rename", "SyncDir", "Remove" or "Mkdir"
	n     int
	calls int
	// failAfter keeps failing every later call of op, to break rollback.
	failAfter bool
}

var errInjected = errors.New("injected failure")

func (f *faultyFS) fail(op string) error {
	if op != f.op {
		return nil
	}
	f.calls++
	if f.calls == f.n || (f.failAfter && f.calls > f.n) {
		return errInjected
	}
	return nil
}

func (f *faultyFS) WriteTemp(dir, prefix string, data []byte, perm fs.FileMode) (string, error) {
	if err := f.fail("WriteTemp"); err != nil {
		return "", err
	}
	return f.FS.WriteTemp(dir, prefix, data, perm)
}

func (f *faultyFS) Rename(oldname, newname string) error {
	if err := f.fail("Rename"); err != nil {
		return err
	}
	return f.FS.Rename(oldname, newname)
}

func (f *faultyFS) SyncDir(name string) error {
	if err := f.fail("SyncDir"); err != nil {
		return err
	}
	return f.FS.SyncDir(name)
}

func (f *faultyFS) Remove(name string) error {
	if err := f.fail("Remove"); err != nil {
		return err
	}
	return f.FS.Remove(name)
}

func (f *faultyFS) Mkdir(name string, perm fs.FileMode) error {
	if err := f.fail("Mkdir"); err != nil {
		return err
	}
	return f.FS.Mkdir(name, perm)
}

// TestApplyFailureLeavesNodeAsItWas injects a failure into every write of
// an install (and of a finalizing uninstall) in turn, and checks that the
// node's files are exactly as before, with no temporary file left behind.
func TestApplyFailureLeavesNodeAsItWas(t *testing.T) {
	type setup func(t *testing.T) (root string, plan func(*Installer) (*Plan, error))
	fresh := func(t *testing.T) (string, func(*Installer) (*Plan, error)) {
		return kubeadmRoot(t, fixture), (*Installer).PlanInstall
	}
	installed := func(t *testing.T) (string, func(*Installer) (*Plan, error)) {
		root := kubeadmRoot(t, fixture)
		in := newInstaller(t, root, nil)
		install(t, in)
		uninstall(t, in, UninstallOptions{})
		return root, func(in *Installer) (*Plan, error) {
			return in.PlanUninstall(t.Context(), UninstallOptions{Finalize: true, Storage: &fakeStorage{}})
		}
	}
	for _, sc := range []struct {
		name  string
		setup setup
		ops   []string
	}{
		{"install", fresh, []string{"WriteTemp", "Rename", "SyncDir", "Mkdir"}},
		{"finalize", installed, []string{"WriteTemp", "Rename", "SyncDir", "Remove"}},
	} {
		for _, op := range sc.ops {
			for n := 1; ; n++ {
				root, plan := sc.setup(t)
				// The backup directory's parent exists, so that only the
				// backup directory (which a failed apply keeps) is new.
				if err := os.MkdirAll(filepath.Join(root, "/var/lib/kms-plugin"), 0o755); err != nil {
					t.Fatal(err)
				}
				before := snapshot(t, root)
				ffs := &faultyFS{FS: DirFS(root), op: op, n: n}
				in := newInstaller(t, root, func(c *Config) { c.FS = ffs })
				p, err := plan(in)
				if err != nil {
					t.Fatal(err)
				}
				_, err = in.Apply(p)
				if ffs.calls < n {
					// Fewer calls than n: every write has had its turn.
					if err != nil {
						t.Fatalf("%s: Apply without injected failure: %v", sc.name, err)
					}
					if n == 1 {
						t.Fatalf("%s: Apply never called %s", sc.name, op)
					}
					break
				}
				t.Run(sc.name+"/"+op+"/"+strconv.Itoa(n), func(t *testing.T) {
					if !errors.Is(err, errInjected) {
						t.Fatalf("Apply error = %v; want the injected failure", err)
					}
					if !strings.Contains(err.Error(), "every file was restored") && !strings.Contains(err.Error(), "nothing was changed") {
						t.Errorf("error %q does not say the node was restored", err)
					}
					sameTree(t, snapshot(t, root), before)
					if n := leftovers(t, root); n != "" {
						t.Errorf("left behind: %s", n)
					}
					if strings.Contains(err.Error(), "nothing was changed") && sc.name == "install" {
						if _, err := os.Stat(filepath.Join(root, DefaultPaths().BackupDir)); !os.IsNotExist(err) {
							t.Errorf("a failed backup left %s behind", DefaultPaths().BackupDir)
						}
					}
				})
			}
		}
	}
}

// TestApplyReportsFailedRollback breaks the rollback too: the error must
// point at the backup.
func TestApplyReportsFailedRollback(t *testing.T) {
	root := kubeadmRoot(t, fixture)
	// Rename #1 is the backup, #2-#5 the install: fail the last (the
	// manifest, which existed) and every rename of the rollback after it.
	ffs := &faultyFS{FS: DirFS(root), op: "Rename", n: 5, failAfter: true}
	in := newInstaller(t, root, func(c *Config) { c.FS = ffs })
	plan, err := in.PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	_, err = in.Apply(plan)
	if err == nil || !strings.Contains(err.Error(), "rollback failed, restore by hand from /var/lib/kms-plugin/backup/20260102T030405Z") {
		t.Fatalf("Apply error = %v; want it to name the backup", err)
	}
}

// TestApplyRefusesChangedFiles checks that a file changed between plan and
// apply stops Apply before anything is written.
func TestApplyRefusesChangedFiles(t *testing.T) {
	root := kubeadmRoot(t, fixture)
	in := newInstaller(t, root, nil)
	plan, err := in.PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	manifest := filepath.Join(root, DefaultPaths().KubeAPIServer)
	if err := os.WriteFile(manifest, []byte("edited by someone else\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, root)
	if _, err := in.Apply(plan); !errors.Is(err, ErrChangedSincePlanned) {
		t.Fatalf("Apply error = %v; want ErrChangedSincePlanned", err)
	}
	sameTree(t, snapshot(t, root), before)
}

// TestApplyKeepsBackupsAndModes checks the backup directory and file modes.
func TestApplyKeepsBackupsAndModes(t *testing.T) {
	root := kubeadmRoot(t, fixture)
	manifest := filepath.Join(root, DefaultPaths().KubeAPIServer)
	if err := os.Chmod(manifest, 0o640); err != nil {
		t.Fatal(err)
	}
	in := newInstaller(t, root, nil)
	plan, err := in.PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	res, err := in.Apply(plan)
	if err != nil {
		t.Fatal(err)
	}
	if want := "/var/lib/kms-plugin/backup/20260102T030405Z"; res.BackupDir != want {
		t.Errorf("BackupDir = %q; want %q", res.BackupDir, want)
	}
	if len(res.Written) != 4 || len(res.Removed) != 0 {
		t.Errorf("Written %v, Removed %v; want 4 written", res.Written, res.Removed)
	}
	for path, want := range map[string]fs.FileMode{
		DefaultPaths().KubeAPIServer:    0o640, // kept
		DefaultPaths().EncryptionConfig: 0o600,
		DefaultPaths().PluginConfig:     0o600,
		DefaultPaths().StaticPod:        0o600,
	} {
		info, err := os.Stat(filepath.Join(root, path))
		if err != nil {
			t.Fatal(err)
		}
		if got := info.Mode().Perm(); got != want {
			t.Errorf("%s has mode %o; want %o", path, got, want)
		}
	}
	// A second apply in the same second gets its own backup directory.
	uplan, err := in.PlanUninstall(t.Context(), UninstallOptions{})
	if err != nil {
		t.Fatal(err)
	}
	res, err = in.Apply(uplan)
	if err != nil {
		t.Fatal(err)
	}
	if want := "/var/lib/kms-plugin/backup/20260102T030405Z.1"; res.BackupDir != want {
		t.Errorf("second BackupDir = %q; want %q", res.BackupDir, want)
	}
	got := readFile(t, filepath.Join(root, res.BackupDir, DefaultPaths().EncryptionConfig))
	if got != string(uplan.Changes[0].Old) {
		t.Error("backup of the EncryptionConfiguration differs from what was replaced")
	}
}

// leftovers lists temporary files, and backup directories without a
// complete backup, under root.
func leftovers(t *testing.T, root string) string {
	t.Helper()
	var found []string
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if strings.Contains(d.Name(), ".tmp-") {
			found = append(found, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(found, ", ")
}
