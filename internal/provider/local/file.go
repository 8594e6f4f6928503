package local

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/tink-crypto/tink-go/v2/insecurecleartextkeyset"
	"github.com/tink-crypto/tink-go/v2/keyset"
)

// fileID identifies one written version of the keyset file.
type fileID struct {
	ino   uint64
	size  int64
	mtime time.Time
}

func readKeyset(path string) (*keyset.Handle, fileID, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, fileID{}, fmt.Errorf("local: keyset: %w", err)
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		// Kubernetes Secret volumes use symlinks; follow them but check the
		// target's mode below.
		if fi, err = os.Stat(path); err != nil {
			return nil, fileID{}, fmt.Errorf("local: keyset: %w", err)
		}
	}
	if !fi.Mode().IsRegular() {
		return nil, fileID{}, fmt.Errorf("local: keyset %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fileID{}, fmt.Errorf("local: keyset %s has mode %#o; it holds the root key and must be readable by its owner only (chmod 600)", path, perm)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fileID{}, fmt.Errorf("local: read keyset: %w", err)
	}
	h, err := insecurecleartextkeyset.Read(keyset.NewJSONReader(bytes.NewReader(data)))
	if err != nil {
		return nil, fileID{}, fmt.Errorf("local: parse keyset %s: %w", path, err)
	}
	return h, fileIDOf(fi), nil
}

func writeKeyset(path string, h *keyset.Handle) error {
	var buf bytes.Buffer
	if err := insecurecleartextkeyset.Write(h, keyset.NewJSONWriter(&buf)); err != nil {
		return fmt.Errorf("local: serialize keyset: %w", err)
	}
	if err := writeFileAtomic(path, buf.Bytes(), 0o600); err != nil {
		return fmt.Errorf("local: write keyset: %w", err)
	}
	return nil
}

// writeFileAtomic writes data to a temporary file beside path, syncs it and
// renames it over path, then syncs the directory.
func writeFileAtomic(path string, data []byte, perm fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = f.Close()
			_ = os.Remove(f.Name())
		}
	}()
	if err = f.Chmod(perm); err != nil {
		return err
	}
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(f.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// lockFile takes an exclusive advisory lock that serializes writers of the
// keyset across processes.
func lockFile(path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("local: open lock %s: %w", path, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("local: lock %s: %w", path, err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		f.Close()
	}, nil
}

func statFile(path string) (fileID, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileID{}, fmt.Errorf("local: keyset: %w", err)
	}
	return fileIDOf(fi), nil
}

func fileIDOf(fi fs.FileInfo) fileID {
	id := fileID{size: fi.Size(), mtime: fi.ModTime()}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		id.ino = st.Ino
	}
	return id
}
