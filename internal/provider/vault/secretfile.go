package vault

import (
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/kms-plugin/kms-plugin/internal/fileowner"
)

// maxSecretFileSize bounds a token, secret ID or JWT file.
const maxSecretFileSize = 64 << 10

// secretFileError is a secret file that fails its checks; Fix says what to
// do. Its message never holds the file's content.
type secretFileError struct {
	msg, Fix string
}

func (e *secretFileError) Error() string { return e.msg + ": " + e.Fix }

// readSecretFile reads a file holding a secret (a token, a secret ID, a
// JWT) after checking that it is a regular file only its owner may read or
// write, owned by this process's user or by root: a secret anyone else on
// the node can read is a leaked secret, and one another user owns can be
// replaced. Surrounding white space is trimmed; an empty file is an error.
func readSecretFile(path, what string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read %s file: %w", what, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "", fmt.Errorf("read %s file: %w", what, err)
	}
	if err := checkSecretFile(path, what, fi); err != nil {
		return "", err
	}
	data, err := io.ReadAll(io.LimitReader(f, maxSecretFileSize+1))
	if err != nil {
		return "", fmt.Errorf("read %s file: %w", what, err)
	}
	if len(data) > maxSecretFileSize {
		return "", fmt.Errorf("%s file %s is larger than %d bytes", what, path, maxSecretFileSize)
	}
	s := strings.TrimSpace(string(data))
	clear(data)
	if s == "" {
		return "", fmt.Errorf("%s file %s is empty", what, path)
	}
	return s, nil
}

func checkSecretFile(path, what string, fi os.FileInfo) error {
	if !fi.Mode().IsRegular() {
		return &secretFileError{
			msg: fmt.Sprintf("%s file %s is not a regular file (%s)", what, path, fi.Mode().Type()),
			Fix: "point the setting at the file itself",
		}
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return &secretFileError{
			msg: fmt.Sprintf("%s file %s has mode %04o: group and others must have no access", what, path, perm),
			Fix: fmt.Sprintf("chmod 600 %s (in a Kubernetes Secret or projected volume: defaultMode: 0400)", path),
		}
	}
	if uid, ok := fileowner.UID(fi); ok && uid != 0 && uid != os.Geteuid() {
		return &secretFileError{
			msg: fmt.Sprintf("%s file %s is owned by uid %d, not by the plugin's user (uid %d) or root", what, path, uid, os.Geteuid()),
			Fix: fmt.Sprintf("chown %d %s, or run the plugin as its owner", os.Geteuid(), path),
		}
	}
	return nil
}
