package install

import (
	"errors"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ErrOutsideRoot is returned when a directory on the way to a file is a
// symbolic link that leaves the node root, or an absolute one (whose
// target os.Root cannot place inside the root). Nothing is read or written
// through it.
var ErrOutsideRoot = errors.New("symbolic link leads out of the node root")

// ErrSymlink is returned when a file the installer reads, replaces or
// removes is itself a symbolic link: replacing the link would detach the
// path from the file it named, and writing through it would change a file
// elsewhere, so the installer does neither.
var ErrSymlink = errors.New("is a symbolic link")

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
	// Lstat returns the file's information without following a symlink
	// in the last element of name.
	Lstat(name string) (fs.FileInfo, error)
	// ReadDir lists a directory.
	ReadDir(name string) ([]fs.DirEntry, error)
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
	// RemoveAll removes a directory and everything in it, without
	// following symbolic links.
	RemoveAll(name string) error
	// SyncDir flushes a directory's entries to stable storage.
	SyncDir(name string) error
}

// DirFS returns the FS that keeps host path p at filepath.Join(root, p):
// DirFS("/") is the node itself, DirFS(t.TempDir()) a node root for tests.
//
// Every operation goes through an os.Root opened on root, so no path
// leaves it: a symbolic link is followed only when it is relative and
// stays inside the root; one that leads out (or is absolute, even with
// root "/") fails with ErrOutsideRoot. The root directory itself may be
// reached through symlinks.
func DirFS(root string) FS { return dirFS{root: filepath.Clean(root)} }

type dirFS struct{ root string }

var _ FS = dirFS{}

// rel returns the name of host path name inside the root.
func rel(name string) string {
	r := strings.TrimLeft(filepath.Clean("/"+name), "/")
	if r == "" {
		return "."
	}
	return r
}

// do runs f on a freshly opened os.Root, and explains an error caused by a
// symbolic link on the way to name (or to one of others) that leaves the
// root.
func (d dirFS) do(name string, f func(r *os.Root, name string) error, others ...string) error {
	r, err := os.OpenRoot(d.root)
	if err != nil {
		return fmt.Errorf("node root: %w", err)
	}
	defer r.Close()
	err = f(r, rel(name))
	if err != nil && !errors.Is(err, fs.ErrNotExist) && !errors.Is(err, fs.ErrExist) {
		for _, n := range append([]string{name}, others...) {
			if e := escapingLink(r, d.root, rel(n)); e != nil {
				return e
			}
		}
	}
	return err
}

// escapingLink returns an ErrOutsideRoot error naming the symbolic link
// on the way to name that leads out of the root, or nil when there is
// none.
func escapingLink(r *os.Root, root, name string) error {
	parts := strings.Split(name, "/")
	for n := 1; n <= len(parts); n++ {
		p := strings.Join(parts[:n], "/")
		info, err := r.Lstat(p)
		if err != nil {
			return nil
		}
		if info.Mode()&fs.ModeSymlink == 0 {
			continue
		}
		target, err := r.Readlink(p)
		if err != nil {
			return nil
		}
		switch {
		case filepath.IsAbs(target):
			return fmt.Errorf("/%s is an absolute symbolic link (to %s); the installer follows only relative links that stay inside the node root %s: %w", p, target, root, ErrOutsideRoot)
		case !filepath.IsLocal(filepath.Join(filepath.Dir(p), target)):
			return fmt.Errorf("/%s is a symbolic link to %s, outside the node root %s: %w", p, target, root, ErrOutsideRoot)
		}
	}
	return nil
}

func (d dirFS) ReadFile(name string) (data []byte, err error) {
	err = d.do(name, func(r *os.Root, name string) error {
		data, err = r.ReadFile(name)
		return err
	})
	return data, err
}

func (d dirFS) Stat(name string) (info fs.FileInfo, err error) {
	err = d.do(name, func(r *os.Root, name string) error {
		info, err = r.Stat(name)
		return err
	})
	return info, err
}

func (d dirFS) Lstat(name string) (info fs.FileInfo, err error) {
	err = d.do(name, func(r *os.Root, name string) error {
		info, err = r.Lstat(name)
		return err
	})
	return info, err
}

func (d dirFS) ReadDir(name string) (entries []fs.DirEntry, err error) {
	err = d.do(name, func(r *os.Root, name string) error {
		f, err := r.Open(name)
		if err != nil {
			return err
		}
		defer f.Close()
		entries, err = f.ReadDir(-1)
		return err
	})
	return entries, err
}

func (d dirFS) Mkdir(name string, perm fs.FileMode) error {
	return d.do(name, func(r *os.Root, name string) error { return r.Mkdir(name, perm) })
}

func (d dirFS) WriteTemp(dir, prefix string, data []byte, perm fs.FileMode) (string, error) {
	var tmp string
	err := d.do(dir, func(r *os.Root, dir string) error {
		var f *os.File
		var err error
		for range 10000 {
			tmp = filepath.Join(dir, prefix+strconv.FormatUint(uint64(rand.Uint32()), 10))
			// O_EXCL: never an existing file, nor a symlink planted there.
			f, err = r.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if !errors.Is(err, fs.ErrExist) {
				break
			}
		}
		if err != nil {
			return err
		}
		fail := func(err error) error {
			f.Close()
			r.Remove(tmp) //nolint:errcheck // best effort; err matters
			return err
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
			r.Remove(tmp) //nolint:errcheck // best effort; err matters
			return err
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	return "/" + tmp, nil
}

func (d dirFS) Rename(oldname, newname string) error {
	// rename(2) replaces a symlink at newname, never its target.
	return d.do(newname, func(r *os.Root, newname string) error { return r.Rename(rel(oldname), newname) }, oldname)
}

func (d dirFS) Remove(name string) error {
	return d.do(name, func(r *os.Root, name string) error { return r.Remove(name) })
}

func (d dirFS) RemoveAll(name string) error {
	return d.do(name, func(r *os.Root, name string) error { return r.RemoveAll(name) })
}

func (d dirFS) SyncDir(name string) error {
	return d.do(name, func(r *os.Root, name string) error {
		f, err := r.Open(name)
		if err != nil {
			return err
		}
		defer f.Close()
		return f.Sync()
	})
}

// readOptional reads a regular file, returning ok=false (and no error)
// when it does not exist. A symbolic link is refused (ErrSymlink), as is
// any other kind of file.
func readOptional(fsys FS, name string) (data []byte, perm fs.FileMode, ok bool, err error) {
	info, err := fsys.Lstat(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, 0, false, nil
	}
	if err != nil {
		return nil, 0, false, fmt.Errorf("read %s: %w", name, err)
	}
	if info.Mode()&fs.ModeSymlink != 0 {
		return nil, 0, false, fmt.Errorf("%s %w: the installer reads and replaces only regular files (point the path flag at the file itself)", name, ErrSymlink)
	}
	if !info.Mode().IsRegular() {
		return nil, 0, false, fmt.Errorf("%s is not a regular file", name)
	}
	data, err = fsys.ReadFile(name)
	if err != nil {
		return nil, 0, false, fmt.Errorf("read %s: %w", name, err)
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
