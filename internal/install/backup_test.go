package install

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// backupNames lists the entries of the node's backup directory.
func backupNames(t *testing.T, root string) []string {
	t.Helper()
	entries, err := os.ReadDir(filepath.Join(root, DefaultPaths().BackupDir))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// TestApplyPrunesBackups fills the backup directory with older backups
// and things that are not backups, and checks that Apply keeps the newest
// KeepBackups backups (counting its own, ordered by time and then by
// counter as a number), and leaves everything else, and the target of a
// symlink, alone.
func TestApplyPrunesBackups(t *testing.T) {
	old := []string{ // oldest first
		"20250101T000000Z", "20250601T000000Z", "20250601T000000Z.2", "20250601T000000Z.10",
		"20251231T235959Z", "20260101T000000Z", "20260101T000000Z.1",
	}
	for _, tt := range []struct {
		name  string
		keep  int
		now   time.Time
		want  []string // backups left, besides the new one
		newer bool     // the new backup is not the newest (the clock went back)
	}{
		{name: "keep 3", keep: 3, want: old[5:]},
		{name: "keep 1", keep: 1, want: nil},
		{name: "default keeps 5, .10 newer than .2", keep: 0, want: old[3:]},
		{name: "every one", keep: -1, want: old},
		{name: "clock went back", keep: 2, now: time.Date(2025, 3, 1, 0, 0, 0, 0, time.UTC), want: old[6:]},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root := kubeadmRoot(t, fixture)
			backups := filepath.Join(root, DefaultPaths().BackupDir)
			outside, untouched := outsideDir(t)
			for _, name := range old {
				if err := os.MkdirAll(filepath.Join(backups, name, "etc/kubernetes"), 0o700); err != nil {
					t.Fatal(err)
				}
				writeNode(t, root, filepath.Join(DefaultPaths().BackupDir, name, "etc/kubernetes/x"), []byte(name))
			}
			// Not backups: left alone, whatever their age.
			for _, p := range []string{"notes.txt", "19990101T000000Z.txt"} {
				writeNode(t, root, filepath.Join(DefaultPaths().BackupDir, p), []byte("mine\n"))
			}
			if err := os.Mkdir(filepath.Join(backups, "manual"), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(outside, filepath.Join(backups, "19990101T000000Z")); err != nil {
				t.Fatal(err)
			}
			in := newInstaller(t, root, func(c *Config) {
				c.KeepBackups = tt.keep
				if !tt.now.IsZero() {
					c.Now = func() time.Time { return tt.now }
				}
			})
			plan, err := in.PlanInstall()
			if err != nil {
				t.Fatal(err)
			}
			res, err := in.Apply(plan)
			if err != nil || res.PruneErr != nil {
				t.Fatal(err, res.PruneErr)
			}
			want := append(slices.Clone(tt.want), filepath.Base(res.BackupDir), "19990101T000000Z", "19990101T000000Z.txt", "manual", "notes.txt")
			slices.Sort(want)
			if got := backupNames(t, root); !slices.Equal(got, want) {
				t.Errorf("backup directory holds %v; want %v", got, want)
			}
			var wantPruned []string
			for _, name := range old {
				if !slices.Contains(tt.want, name) {
					wantPruned = append(wantPruned, filepath.Join(DefaultPaths().BackupDir, name))
				}
			}
			if !slices.Equal(res.Pruned, wantPruned) {
				t.Errorf("Pruned = %v; want %v", res.Pruned, wantPruned)
			}
			if got := readFile(t, filepath.Join(root, res.BackupDir, DefaultPaths().KubeAPIServer)); got != readFile(t, fixture) {
				t.Error("the new backup was pruned or is incomplete")
			}
			untouched()
		})
	}
}

// TestBackupModes checks that every backup directory is 0700 and every
// backed-up file 0600, whatever the mode of the original and the umask:
// they hold the EncryptionConfiguration (with any aescbc keys) and the
// admin port's private keys.
func TestBackupModes(t *testing.T) {
	root := adminRoot(t, testCA(t))
	manifest := filepath.Join(root, DefaultPaths().KubeAPIServer)
	chmod(t, manifest, 0o644)
	install(t, adminInstaller(t, root, testNow, nil))
	// Replace every file once more: a new config, and keys issued again.
	chmod(t, filepath.Join(root, adminKey), 0o640)
	chmod(t, filepath.Join(root, adminClientKey), 0o640)
	plan := install(t, adminInstaller(t, root, testNow, func(c *Config) {
		c.Resources = []string{"secrets", "configmaps"}
		c.PluginConfig = append([]byte(publicConfig), "shutdownTimeout: 20s\n"...)
	}))
	var backedUp []string
	for _, c := range plan.Changes {
		if c.Existed {
			backedUp = append(backedUp, c.Path)
		}
	}
	if !slices.Contains(backedUp, adminKey) || !slices.Contains(backedUp, DefaultPaths().EncryptionConfig) {
		t.Fatalf("second install replaced %v; want the keys and EncryptionConfiguration among them", backedUp)
	}
	backups := filepath.Join(root, DefaultPaths().BackupDir)
	var files []string
	err := filepath.WalkDir(backups, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		want := fs.FileMode(0o600)
		if d.IsDir() {
			want = 0o700
		} else {
			files = append(files, strings.TrimPrefix(p, backups))
		}
		if got := info.Mode().Perm(); got != want {
			t.Errorf("%s has mode %04o; want %04o", p, got, want)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range backedUp {
		if !slices.ContainsFunc(files, func(f string) bool { return strings.HasSuffix(f, p) }) {
			t.Errorf("no backup of %s among %v", p, files)
		}
	}
}

// removeAllFails fails every RemoveAll.
type removeAllFails struct{ FS }

func (removeAllFails) RemoveAll(string) error { return errInjected }

// TestApplyReportsFailedPrune checks that a backup that cannot be pruned
// leaves the change applied and says why, in Result.PruneErr.
func TestApplyReportsFailedPrune(t *testing.T) {
	root := kubeadmRoot(t, fixture)
	old := filepath.Join(DefaultPaths().BackupDir, "20250101T000000Z")
	if err := os.MkdirAll(filepath.Join(root, old), 0o700); err != nil {
		t.Fatal(err)
	}
	in := newInstaller(t, root, func(c *Config) { c.FS = removeAllFails{DirFS(root)}; c.KeepBackups = 1 })
	plan, err := in.PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	res, err := in.Apply(plan)
	if err != nil {
		t.Fatalf("Apply error = %v; a failed prune must not fail the change", err)
	}
	if !errors.Is(res.PruneErr, errInjected) || !strings.Contains(res.PruneErr.Error(), "prune backups: remove "+old) {
		t.Errorf("PruneErr = %v; want the injected failure naming %s", res.PruneErr, old)
	}
	if len(res.Written) != 4 {
		t.Errorf("Written = %v", res.Written)
	}
}
