package pkcs11

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/kms-plugin/kms-plugin/internal/fileowner"
)

// maxPINFileSize bounds the PIN file: PINs are a few dozen bytes (a Luna
// challenge-response secret or a YubiHSM auth key ID and password are
// longer, still far below this).
const maxPINFileSize = 4096

// PINFileError is a PIN file that fails its checks; Fix says what to do.
type PINFileError struct {
	Path string
	Msg  string
	Fix  string
}

func (e *PINFileError) Error() string { return "pkcs11: PIN file " + e.Path + ": " + e.Msg }

// readPIN reads the PIN in path after checking the file: a regular file
// (the path may be a symlink, such as a Kubernetes Secret volume's, but
// its target must be a regular file owned by the plugin's user or root,
// like the file itself), mode without any group or other access, owned by
// the plugin's user or root, not empty. The PIN never appears in an error.
func readPIN(path string) (string, error) {
	lfi, err := os.Lstat(path)
	if err != nil {
		return "", fmt.Errorf("pkcs11: read PIN file: %w", err)
	}
	if lfi.Mode()&os.ModeSymlink != 0 {
		// A symlink is followed only when the directory holding it is not
		// writable by others: otherwise anyone could point it elsewhere.
		if err := checkDir(path, filepath.Dir(path)); err != nil {
			return "", err
		}
	}
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("pkcs11: read PIN file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("pkcs11: read PIN file: %w", err)
	}
	if err := checkPINFile(path, fi); err != nil {
		return "", err
	}
	data, err := io.ReadAll(io.LimitReader(f, maxPINFileSize+1))
	if err != nil {
		return "", fmt.Errorf("pkcs11: read PIN file: %w", err)
	}
	defer clear(data)
	if len(data) > maxPINFileSize {
		return "", &PINFileError{Path: path, Msg: fmt.Sprintf("larger than %d bytes", maxPINFileSize), Fix: "write only the PIN to the file"}
	}
	pin := strings.TrimRight(string(data), "\r\n")
	if pin == "" {
		return "", &PINFileError{Path: path, Msg: "empty", Fix: "write the token's user PIN to the file"}
	}
	if strings.ContainsAny(pin, "\r\n\x00") {
		return "", &PINFileError{Path: path, Msg: "holds more than one line", Fix: "write only the PIN, on one line"}
	}
	return pin, nil
}

// checkPINFile checks the opened file's mode and owner.
func checkPINFile(path string, fi os.FileInfo) error {
	if !fi.Mode().IsRegular() {
		return &PINFileError{Path: path, Msg: fmt.Sprintf("is not a regular file (%s)", fi.Mode().Type()), Fix: "point pkcs11.pinFile at the file itself"}
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return &PINFileError{Path: path, Msg: fmt.Sprintf("has mode %04o: group and others must have no access", perm),
			Fix: fmt.Sprintf("chmod 600 %s (in a Kubernetes Secret volume: defaultMode: 0400)", path)}
	}
	if uid, ok := fileowner.UID(fi); ok && uid != 0 && uid != os.Geteuid() {
		return &PINFileError{Path: path, Msg: fmt.Sprintf("is owned by uid %d, not by the plugin's user (uid %d) or root", uid, os.Geteuid()),
			Fix: fmt.Sprintf("chown %d %s, or run the plugin as its owner", os.Geteuid(), path)}
	}
	return nil
}

// checkDir refuses to follow the symlink path when dir, which holds it, is
// writable by group or others (without the sticky bit) or owned by another
// user than the plugin's or root.
func checkDir(path, dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("pkcs11: read PIN file: %w", err)
	}
	if fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0 {
		return &PINFileError{Path: path, Msg: fmt.Sprintf("is a symlink in %s, which group or others may write (mode %04o): it could be pointed anywhere", dir, fi.Mode().Perm()),
			Fix: "keep the PIN file (or its symlink) in a directory only its owner may write"}
	}
	if uid, ok := fileowner.UID(fi); ok && uid != 0 && uid != os.Geteuid() {
		return &PINFileError{Path: path, Msg: fmt.Sprintf("is a symlink in %s, owned by uid %d", dir, uid),
			Fix: "keep the PIN file (or its symlink) in a directory owned by the plugin's user or root"}
	}
	return nil
}
