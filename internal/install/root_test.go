package install

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// outsideDir returns a directory outside every node root, holding one
// file, and a function that fails the test unless it is exactly as made.
func outsideDir(t *testing.T) (dir string, untouched func()) {
	t.Helper()
	dir = t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "canary"), []byte("outside\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return dir, func() {
		t.Helper()
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		if len(names) != 1 || names[0] != "canary" {
			t.Errorf("outside the root, %s now holds %v; want only canary", dir, names)
		}
		if got := readFile(t, filepath.Join(dir, "canary")); got != "outside\n" {
			t.Errorf("outside the root, canary was rewritten: %q", got)
		}
	}
}

// relTo returns target as a relative symlink from the directory of link.
func relTo(t *testing.T, link, target string) string {
	t.Helper()
	r, err := filepath.Rel(filepath.Dir(link), target)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestInstallRefusesSymlinkOutOfRoot plants symlinks from inside a node
// root to a directory outside it, on the way to the files install and
// uninstall read and write: every one is refused with ErrOutsideRoot
// naming the link, and nothing is written outside the root.
func TestInstallRefusesSymlinkOutOfRoot(t *testing.T) {
	for _, tt := range []struct {
		name     string
		link     string // host path made a symlink to the outside directory
		relative bool
		want     string
		apply    bool // refused by Apply (the backup), not by planning
	}{
		{name: "etc/kubernetes absolute", link: "/etc/kubernetes", want: "/etc/kubernetes is an absolute symbolic link (to "},
		{name: "etc/kubernetes relative", link: "/etc/kubernetes", relative: true, want: "/etc/kubernetes is a symbolic link to ../"},
		{name: "manifest directory", link: "/etc/kubernetes/manifests", want: "/etc/kubernetes/manifests is an absolute symbolic link"},
		{name: "plugin config directory", link: "/etc/kubernetes/kms-plugin", relative: true, want: "/etc/kubernetes/kms-plugin is a symbolic link"},
		{name: "encryption config directory", link: "/etc/kubernetes/enc", want: "/etc/kubernetes/enc is an absolute symbolic link"},
		{name: "backup directory", link: "/var/lib/kms-plugin", want: "/var/lib/kms-plugin is an absolute symbolic link", apply: true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root := kubeadmRoot(t, fixture)
			outside, untouched := outsideDir(t)
			link := filepath.Join(root, tt.link)
			// A directory that exists moves outside (what it held is what an
			// attacker would want install to rewrite); a missing one is
			// planted as a link.
			if _, err := os.Stat(link); err == nil {
				if err := os.Rename(link, filepath.Join(outside, "moved")); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { os.RemoveAll(filepath.Join(outside, "moved")) })
			} else if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
				t.Fatal(err)
			}
			target := outside
			if tt.relative {
				target = relTo(t, link, outside)
			}
			if err := os.Symlink(target, link); err != nil {
				t.Fatal(err)
			}
			var moved map[string]string
			if _, err := os.Stat(filepath.Join(outside, "moved")); err == nil {
				moved = snapshot(t, filepath.Join(outside, "moved"))
			}

			in := newInstaller(t, root, nil)
			plan, err := in.PlanInstall()
			if tt.apply {
				if err != nil {
					t.Fatal(err)
				}
				_, err = in.Apply(plan)
				if err != nil && !strings.Contains(err.Error(), "nothing was changed") {
					t.Errorf("Apply error %q does not say nothing was changed", err)
				}
			}
			if !errors.Is(err, ErrOutsideRoot) || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("install error = %v; want ErrOutsideRoot saying %q", err, tt.want)
			}
			if !tt.apply {
				_, err = in.PlanUninstall(t.Context(), UninstallOptions{})
				if tt.link != "/etc/kubernetes/kms-plugin" && !errors.Is(err, ErrOutsideRoot) {
					t.Errorf("uninstall error = %v; want ErrOutsideRoot", err)
				}
			}
			if moved != nil {
				sameTree(t, snapshot(t, filepath.Join(outside, "moved")), moved)
				os.RemoveAll(filepath.Join(outside, "moved"))
			}
			untouched()
			if tt.link != "/etc/kubernetes" && tt.link != "/etc/kubernetes/manifests" {
				if got := readFile(t, filepath.Join(root, DefaultPaths().KubeAPIServer)); got != readFile(t, fixture) {
					t.Error("kube-apiserver's manifest changed")
				}
			}
		})
	}
}

// TestInstallFollowsSymlinksInsideRoot checks that a relative symlink
// that stays inside the root is followed: node images link directories.
func TestInstallFollowsSymlinksInsideRoot(t *testing.T) {
	root := kubeadmRoot(t, fixture)
	manifests := filepath.Join(root, "etc/kubernetes/manifests")
	moved := filepath.Join(root, "srv/manifests")
	if err := os.MkdirAll(filepath.Dir(moved), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(manifests, moved); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(relTo(t, manifests, moved), manifests); err != nil {
		t.Fatal(err)
	}
	install(t, newInstaller(t, root, nil))
	if _, err := os.Stat(filepath.Join(moved, "kms-plugin.yaml")); err != nil {
		t.Errorf("static pod not written through the link inside the root: %v", err)
	}
	if got := readFile(t, filepath.Join(moved, "kube-apiserver.yaml")); got != readFile(t, "testdata/kubeadm-v1.37.2/kube-apiserver.clusterconfiguration.yaml") {
		t.Error("kube-apiserver's manifest not patched through the link inside the root")
	}
}

// TestInstallRefusesSymlinkedFile makes each file install reads or
// replaces a symlink, to a file outside the root or inside it: install
// and uninstall refuse with ErrSymlink, and neither the link nor its
// target changes.
func TestInstallRefusesSymlinkedFile(t *testing.T) {
	paths := DefaultPaths()
	plain := func(t *testing.T) (string, *Installer) {
		root := kubeadmRoot(t, fixture)
		in := newInstaller(t, root, nil)
		install(t, in)
		return root, in
	}
	admin := func(t *testing.T) (string, *Installer) {
		root := adminRoot(t, testCA(t))
		install(t, newInstaller(t, root, func(c *Config) { c.PluginConfig = []byte(publicConfig) }))
		return root, newInstaller(t, root, nil) // the installed config names the admin files
	}
	for _, tt := range []struct {
		name, file string
		inside     bool
		setup      func(t *testing.T) (string, *Installer)
	}{
		{"kube-apiserver manifest to outside", paths.KubeAPIServer, false, plain},
		{"kube-apiserver manifest inside root", paths.KubeAPIServer, true, plain},
		{"encryption config to outside", paths.EncryptionConfig, false, plain},
		{"plugin config inside root", paths.PluginConfig, true, plain},
		{"static pod to outside", paths.StaticPod, false, plain},
		{"admin key to outside", "/etc/kubernetes/kms-plugin/admin/tls.key", false, admin},
		{"client certificate inside root", "/etc/kubernetes/kms-plugin/admin/client.crt", true, admin},
	} {
		t.Run(tt.name, func(t *testing.T) {
			root, in := tt.setup(t)
			dir, untouched := outsideDir(t)
			target := filepath.Join(dir, "canary")
			if tt.inside {
				target = filepath.Join(root, "srv/file")
				if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
					t.Fatal(err)
				}
			}
			link := filepath.Join(root, tt.file)
			if err := os.Rename(link, filepath.Join(root, "moved")); err != nil {
				t.Fatal(err)
			}
			if tt.inside {
				if err := os.Rename(filepath.Join(root, "moved"), target); err != nil {
					t.Fatal(err)
				}
			}
			linkTarget := target
			if tt.inside {
				linkTarget = relTo(t, link, target)
			}
			if err := os.Symlink(linkTarget, link); err != nil {
				t.Fatal(err)
			}
			before := readFile(t, target)

			for name, plan := range map[string]func() (*Plan, error){
				"install": in.PlanInstall,
				"uninstall": func() (*Plan, error) {
					return in.PlanUninstall(t.Context(), UninstallOptions{Finalize: true, Force: true})
				},
			} {
				_, err := plan()
				if !errors.Is(err, ErrSymlink) || !strings.Contains(err.Error(), tt.file+" is a symbolic link") {
					t.Errorf("%s error = %v; want ErrSymlink naming %s", name, err, tt.file)
				}
			}
			if got, err := os.Readlink(link); err != nil || got != linkTarget {
				t.Errorf("link is now %q, %v; want it kept", got, err)
			}
			if got := readFile(t, target); got != before {
				t.Error("the link's target was rewritten")
			}
			if !tt.inside {
				untouched()
			}
		})
	}
}

// TestApplyRefusesSymlinkPlantedAfterPlan replaces a planned file by a
// symlink with the same content between plan and apply: Apply refuses.
func TestApplyRefusesSymlinkPlantedAfterPlan(t *testing.T) {
	root := kubeadmRoot(t, fixture)
	in := newInstaller(t, root, nil)
	plan, err := in.PlanInstall()
	if err != nil {
		t.Fatal(err)
	}
	dir, untouched := outsideDir(t)
	target := filepath.Join(dir, "canary")
	manifest := filepath.Join(root, DefaultPaths().KubeAPIServer)
	if err := os.WriteFile(target, []byte(readFile(t, manifest)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(manifest); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, manifest); err != nil {
		t.Fatal(err)
	}
	if _, err := in.Apply(plan); !errors.Is(err, ErrSymlink) {
		t.Fatalf("Apply error = %v; want ErrSymlink", err)
	}
	if err := os.WriteFile(target, []byte("outside\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	untouched()
	for _, p := range []string{DefaultPaths().StaticPod, DefaultPaths().PluginConfig} {
		if _, err := os.Lstat(filepath.Join(root, p)); !os.IsNotExist(err) {
			t.Errorf("%s was written", p)
		}
	}
}

// TestDirFSConfined calls every operation of DirFS through a symlink out
// of the root, and checks what happens to a symlink at the very path
// written (the race past Apply's check): it is replaced, never written
// through.
func TestDirFSConfined(t *testing.T) {
	root := t.TempDir()
	outside, untouched := outsideDir(t)
	if err := os.Symlink(outside, filepath.Join(root, "out")); err != nil {
		t.Fatal(err)
	}
	fsys := DirFS(root)
	for name, op := range map[string]func() error{
		"ReadFile":  func() error { _, err := fsys.ReadFile("/out/canary"); return err },
		"Stat":      func() error { _, err := fsys.Stat("/out/canary"); return err },
		"Lstat":     func() error { _, err := fsys.Lstat("/out/canary"); return err },
		"ReadDir":   func() error { _, err := fsys.ReadDir("/out"); return err },
		"Mkdir":     func() error { return fsys.Mkdir("/out/new", 0o755) },
		"WriteTemp": func() error { _, err := fsys.WriteTemp("/out", "x", []byte("x"), 0o600); return err },
		"Rename":    func() error { return fsys.Rename("/out/canary", "/stolen") },
		"Remove":    func() error { return fsys.Remove("/out/canary") },
		"RemoveAll": func() error { return fsys.RemoveAll("/out/canary") },
		"SyncDir":   func() error { return fsys.SyncDir("/out") },
	} {
		if err := op(); !errors.Is(err, ErrOutsideRoot) {
			t.Errorf("%s through the link: error %v; want ErrOutsideRoot", name, err)
		}
	}
	untouched()

	// A link at the written path itself.
	link := filepath.Join(root, "file")
	if err := os.Symlink(filepath.Join(outside, "canary"), link); err != nil {
		t.Fatal(err)
	}
	if err := writeAtomic(fsys, "/file", []byte("new\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if info, err := os.Lstat(link); err != nil || !info.Mode().IsRegular() || readFile(t, link) != "new\n" {
		t.Errorf("the link was not replaced by the file: %v, %v", info, err)
	}
	// RemoveAll of a link removes the link only.
	if err := os.Symlink(outside, filepath.Join(root, "dirlink")); err != nil {
		t.Fatal(err)
	}
	if err := fsys.RemoveAll("/dirlink"); err != nil {
		t.Fatal(err)
	}
	untouched()
	if _, err := fsys.Lstat("/dirlink"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("RemoveAll left the link: %v", err)
	}
}
