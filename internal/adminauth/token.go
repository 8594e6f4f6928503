package adminauth

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/kms-plugin/kms-plugin/internal/fileowner"
)

// maxTokenSize bounds a token file.
const maxTokenSize = 4096

// TokenFile is a bearer token kept in a file, re-read on the first use
// after the file changed (renamed over, rewritten, or a Kubernetes Secret
// volume updated), so the token can be rotated without a restart.
//
// The file must be a regular file with no permission for group or others
// (mode 0600 or 0400), owned by this process's user or by root. It may be
// reached through symbolic links only when they resolve inside the
// directory the path names, as in a Kubernetes Secret volume (TOKEN ->
// ..data/TOKEN -> ..2026_01_02_03_04_05.123/TOKEN): a link out of that
// directory is refused, so the file's protection is the protection of the
// directory an operator configured. Its content, with surrounding white
// space trimmed, is the token: one line of printable ASCII.
//
// A file that no longer passes these checks after a change fails every
// use until it is fixed: the previous token is not kept.
type TokenFile struct {
	path string

	mu    sync.Mutex
	st    stamp // the version read
	token string
	sum   [sha256.Size]byte
}

// NewTokenFile reads and checks the token file at path.
func NewTokenFile(path string) (*TokenFile, error) {
	if path == "" {
		return nil, errors.New("adminauth: no token file")
	}
	f := &TokenFile{path: path}
	if _, _, err := f.current(); err != nil {
		return nil, err
	}
	return f, nil
}

// Path returns the file's path.
func (f *TokenFile) Path() string { return f.path }

// Token returns the token now in the file.
func (f *TokenFile) Token() (string, error) {
	tok, _, err := f.current()
	return tok, err
}

// Check checks r's Authorization header, "Bearer TOKEN", against the
// token in constant time. It returns ErrNoCredential without the header,
// ErrBadCredential when the header is malformed or the token differs, and
// another error, naming the file, when the file cannot be read or no
// longer passes the checks.
func (f *TokenFile) Check(r *http.Request) error {
	vals := r.Header.Values("Authorization")
	if len(vals) == 0 {
		return ErrNoCredential
	}
	presented, ok := bearer(vals)
	if !ok {
		return fmt.Errorf("%w: the Authorization header is not one bearer token", ErrBadCredential)
	}
	_, want, err := f.current()
	if err != nil {
		return err
	}
	// Comparing digests takes the same time whatever the presented
	// token's length and content.
	got := sha256.Sum256([]byte(presented))
	if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
		return fmt.Errorf("%w: the bearer token does not match", ErrBadCredential)
	}
	return nil
}

// bearer returns the token of the one "Bearer TOKEN" header in vals.
func bearer(vals []string) (string, bool) {
	if len(vals) != 1 {
		return "", false
	}
	scheme, tok, ok := strings.Cut(vals[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}

// current returns the token and its digest, re-reading the file if it
// changed since the last read.
func (f *TokenFile) current() (string, [sha256.Size]byte, error) {
	st, err := statStamp(f.path)
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil && st.equal(f.st) {
		return f.token, f.sum, nil
	}
	tok, st, err := readTokenFile(f.path)
	if err != nil {
		f.st, f.token, f.sum = stamp{}, "", [sha256.Size]byte{}
		return "", [sha256.Size]byte{}, err
	}
	f.st, f.token, f.sum = st, tok, sha256.Sum256([]byte(tok))
	return f.token, f.sum, nil
}

// readTokenFile checks the file at path and returns its token and the
// stamp of the version read.
func readTokenFile(path string) (string, stamp, error) {
	real, err := resolveInside(path)
	if err != nil {
		return "", stamp{}, err
	}
	fh, err := os.Open(real)
	if err != nil {
		return "", stamp{}, fmt.Errorf("adminauth: token file: %w", err)
	}
	defer fh.Close()
	fi, err := fh.Stat()
	if err != nil {
		return "", stamp{}, fmt.Errorf("adminauth: token file: %w", err)
	}
	if err := checkSecretFile(path, fi); err != nil {
		return "", stamp{}, err
	}
	b, err := io.ReadAll(io.LimitReader(fh, maxTokenSize+1))
	if err != nil {
		return "", stamp{}, fmt.Errorf("adminauth: token file: %w", err)
	}
	if len(b) > maxTokenSize {
		return "", stamp{}, fmt.Errorf("adminauth: token file %s is larger than %d bytes: it must hold one token", path, maxTokenSize)
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return "", stamp{}, fmt.Errorf("adminauth: token file %s is empty", path)
	}
	for _, c := range b {
		if c < 0x21 || c > 0x7e {
			return "", stamp{}, fmt.Errorf("adminauth: token file %s must hold one line of printable ASCII without spaces", path)
		}
	}
	return string(b), stamp{fi}, nil
}

// resolveInside returns path with every symbolic link resolved, or an
// error if the links lead out of the directory path names.
func resolveInside(path string) (string, error) {
	dir, err := filepath.EvalSymlinks(filepath.Dir(path))
	if err != nil {
		return "", fmt.Errorf("adminauth: token file: %w", err)
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return "", fmt.Errorf("adminauth: token file: %w", err)
	}
	if rel, err := filepath.Rel(dir, real); err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) || filepath.IsAbs(rel) {
		return "", fmt.Errorf("adminauth: token file %s is a symbolic link to %s, outside %s: use a regular file there, or a Kubernetes Secret volume", path, real, dir)
	}
	return real, nil
}

// checkSecretFile returns an error unless fi, the file path leads to, is
// a regular file that only its owner may read, owned by this process's
// user or root.
func checkSecretFile(path string, fi os.FileInfo) error {
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("adminauth: token file %s is not a regular file (%s)", path, fi.Mode().Type())
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("adminauth: token file %s has mode %04o: group and others must have no access: chmod 600 %s (in a Kubernetes Secret volume: defaultMode: 0400)", path, perm, path)
	}
	if uid, ok := fileowner.UID(fi); ok && uid != 0 && uid != os.Getuid() {
		return fmt.Errorf("adminauth: token file %s is owned by uid %d, not by this process's user (uid %d) or root: chown %d %s", path, uid, os.Getuid(), os.Getuid(), path)
	}
	return nil
}
