package install

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// FS is the node's filesystem as the installer sees it. Every name is a
// host-absolute path ("/etc/kubernetes/manifests/kube-apiserver.yaml"); an
// implementation may map it under another root directory. Tests wrap an FS
// to inject failures.
type FS interface {
	// ReadFile returns the content of a file; a missing file is an error
	// satisfying errors.Is(err, fs.ErrNotExist).
	ReadFile(name string) ([]byte, error)
	// Stat returns the file's information, following symlinks.
	Stat(name string) (fs.FileInfo, error)
	// Mkdir creates one directory.
	Mkdir(name string, perm fs.FileMode) error
	// WriteTemp creates a new file in dir whose base name starts with
	// prefix, writes data, sets perm, syncs and closes it, and returns its
	// host-absolute name. On error no file is left behind.
	WriteTemp(dir, prefix string, data []byte, perm fs.FileMode) (string, error)
	// Rename atomically replaces newname by oldname.
	Rename(oldname, newname string) error
	// Remove removes a file or an empty directory.
	Remove(name string) error
	// SyncDir flushes a directory's entries to stable storage.
	SyncDir(name string) error
}

// DirFS returns the FS that keeps host path p at filepath.Join(root, p):
// DirFS("/") is the node itself, DirFS(t.TempDir()) a node root for tests.
func DirFS(root string) FS { return dirFS{root: filepath.Clean(root)} }

type dirFS struct{ root string }

var _ FS = dirFS{}

func (d dirFS) path(name string) string { return filepath.Join(d.root, name) }

func (d dirFS) ReadFile(name string) ([]byte, error) { return os.ReadFile(d.path(name)) }

func (d dirFS) Stat(name string) (fs.FileInfo, error) { return os.Stat(d.path(name)) }

func (d dirFS) Mkdir(name string, perm fs.FileMode) error { return os.Mkdir(d.path(name), perm) }

func (d dirFS) WriteTemp(dir, prefix string, data []byte, perm fs.FileMode) (string, error) {
	f, err := os.CreateTemp(d.path(dir), prefix+"*")
	if err != nil {
		return "", err
	}
	fail := func(err error) (string, error) {
		f.Close()
		os.Remove(f.Name())
		return "", err
	}
	if err := f.Chmod(perm); err != nil {
		return fail(err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		os.Remove(f.Name())
		return "", err
	}
	return filepath.Join(dir, filepath.Base(f.Name())), nil
}

func (d dirFS) Rename(oldname, newname string) error {
	return os.Rename(d.path(oldname), d.path(newname))
}

func (d dirFS) Remove(name string) error { return os.Remove(d.path(name)) }

func (d dirFS) SyncDir(name string) error {
	f, err := os.Open(d.path(name))
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// readOptional reads a file, returning ok=false (and no error) when it does
// not exist.
func readOptional(fsys FS, name string) (data []byte, perm fs.FileMode, ok bool, err error) {
	data, err = fsys.ReadFile(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, false, nil
	}
	if err != nil {
		return nil, 0, false, fmt.Errorf("read %s: %w", name, err)
	}
	info, err := fsys.Stat(name)
	if err != nil {
		return nil, 0, false, fmt.Errorf("stat %s: %w", name, err)
	}
	if !info.Mode().IsRegular() {
		return nil, 0, false, fmt.Errorf("%s is not a regular file", name)
	}
	return data, info.Mode().Perm(), true, nil
}

// mkdirAll creates dir and its missing parents with perm and returns the
// directories it created, parents first.
func mkdirAll(fsys FS, dir string, perm fs.FileMode) ([]string, error) {
	var missing []string
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		info, err := fsys.Stat(d)
		if err == nil {
			if !info.IsDir() {
				return nil, fmt.Errorf("%s exists and is not a directory", d)
			}
			break
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("stat %s: %w", d, err)
		}
		missing = append(missing, d)
		if d == filepath.Dir(d) {
			break
		}
	}
	var created []string
	for i := len(missing) - 1; i >= 0; i-- {
		if err := fsys.Mkdir(missing[i], perm); err != nil && !errors.Is(err, fs.ErrExist) {
			return created, fmt.Errorf("create directory %s: %w", missing[i], err)
		}
		created = append(created, missing[i])
	}
	return created, nil
}

// writeAtomic replaces name by data: a temporary file in the same directory
// (a dot file, which kubelet ignores in its manifest directory), fsync,
// rename, fsync of the directory.
func writeAtomic(fsys FS, name string, data []byte, perm fs.FileMode) error {
	dir := filepath.Dir(name)
	tmp, err := fsys.WriteTemp(dir, "."+filepath.Base(name)+".tmp-", data, perm)
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	if err := fsys.Rename(tmp, name); err != nil {
		fsys.Remove(tmp) //nolint:errcheck // best effort; the error below matters
		return fmt.Errorf("replace %s: %w", name, err)
	}
	if err := fsys.SyncDir(dir); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// hostPath checks that p is an absolute, clean host path.
func hostPath(field, p string) error {
	if p == "" {
		return fmt.Errorf("%s: path is required", field)
	}
	if !filepath.IsAbs(p) || filepath.Clean(p) != p || strings.ContainsAny(p, " \t\n\r") {
		return fmt.Errorf("%s: %q must be a clean absolute path without spaces", field, p)
	}
	return nil
}
