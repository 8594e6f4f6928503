package azurekv

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"

	"github.com/kms-plugin/kms-plugin/internal/fileowner"
)

// maxCredentialFileSize bounds a credential file (a PFX with its chain is
// a few kilobytes).
const maxCredentialFileSize = 1 << 20

// fileError is a credential file that fails its checks: it names the file
// and carries the fix.
type fileError struct {
	msg, fix string
}

func (e *fileError) Error() string { return e.msg }

// checkSecretFile returns a *fileError unless fi, the file path leads to,
// is a regular file that only its owner may read or write, owned by this
// process's user or by root: a credential file anyone else on the node can
// read is a leaked credential, and one another user owns can be replaced.
func checkSecretFile(path, what string, fi os.FileInfo) error {
	if !fi.Mode().IsRegular() {
		return &fileError{
			msg: fmt.Sprintf("azurekv: %s file %s is not a regular file (%s)", what, path, fi.Mode().Type()),
			fix: "point the setting at the file itself",
		}
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return &fileError{
			msg: fmt.Sprintf("azurekv: %s file %s has mode %04o: group and others must have no access", what, path, perm),
			fix: fmt.Sprintf("chmod 600 %s (in a Kubernetes Secret or projected volume: defaultMode: 0400)", path),
		}
	}
	if uid, ok := fileowner.UID(fi); ok && uid != 0 && uid != os.Geteuid() {
		return &fileError{
			msg: fmt.Sprintf("azurekv: %s file %s is owned by uid %d, not by the plugin's user (uid %d) or root", what, path, uid, os.Geteuid()),
			fix: fmt.Sprintf("chown %d %s, or run the plugin as its owner", os.Geteuid(), path),
		}
	}
	return nil
}

// fileErrorText is a fileError's message with its fix, for errors returned
// at start-up, where no Remedy is printed.
func fileErrorText(err error) error {
	if fe, ok := err.(*fileError); ok {
		return fmt.Errorf("%s: %s", fe.msg, fe.fix)
	}
	return err
}

// readCredentialFile reads a credential file after checking it with
// checkSecretFile.
func readCredentialFile(path, what string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("azurekv: read %s file: %w", what, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("azurekv: read %s file: %w", what, err)
	}
	if err := checkSecretFile(path, what, fi); err != nil {
		return nil, err
	}
	data, err := io.ReadAll(io.LimitReader(f, maxCredentialFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("azurekv: read %s file: %w", what, err)
	}
	if len(data) > maxCredentialFileSize {
		return nil, fmt.Errorf("azurekv: %s file %s is larger than %d bytes", what, path, maxCredentialFileSize)
	}
	return data, nil
}

// secretText is a secret file's content without the trailing newline
// editors and Kubernetes Secret volumes may add.
func secretText(path, what string, data []byte) (string, error) {
	s := strings.TrimRight(string(data), "\r\n")
	if s == "" {
		return "", fmt.Errorf("azurekv: %s file %s is empty", what, path)
	}
	return s, nil
}

// checkCredentialFile checks a credential file the SDK reads itself (the
// federated token).
func checkCredentialFile(path, what string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("azurekv: %s file: %w", what, err)
	}
	return fileErrorText(checkSecretFile(path, what, fi))
}

// credentialFile is one file a reloading credential is built from.
type credentialFile struct {
	path, what string
}

// reloadingCredential is an azidentity credential built from files, and
// built again at the first token request after their content changed, so
// that a rotated client secret or certificate is used without a restart.
// azcore asks for a token only when the one it holds nears expiry (or the
// vault refuses it), so the files are read about once an hour.
//
// A changed file that fails its permission checks fails the token request
// (the secret may have leaked; the plugin should not look away). A changed
// file that cannot be read or built from (a rewrite in progress, an empty
// file) leaves the last credential in service until the next request.
type reloadingCredential struct {
	files []credentialFile
	build func(contents [][]byte) (azcore.TokenCredential, string, error)

	mu   sync.Mutex
	sum  [sha256.Size]byte // of the contents cred was built from
	cred azcore.TokenCredential
}

// newReloadingCredential reads files and builds the first credential with
// build, which also describes it (for logs; never a secret).
func newReloadingCredential(files []credentialFile, build func([][]byte) (azcore.TokenCredential, string, error)) (azcore.TokenCredential, string, error) {
	c := &reloadingCredential{files: files, build: build}
	contents, sum, err := c.read()
	if err != nil {
		return nil, "", fileErrorText(err)
	}
	cred, desc, err := build(contents)
	wipe(contents)
	if err != nil {
		return nil, "", err
	}
	c.cred, c.sum = cred, sum
	return c, desc, nil
}

func wipe(contents [][]byte) {
	for _, b := range contents {
		clear(b)
	}
}

func (c *reloadingCredential) read() ([][]byte, [sha256.Size]byte, error) {
	contents := make([][]byte, len(c.files))
	h := sha256.New()
	for i, f := range c.files {
		data, err := readCredentialFile(f.path, f.what)
		if err != nil {
			return nil, [sha256.Size]byte{}, err
		}
		contents[i] = data
		fmt.Fprintf(h, "%d:", len(data))
		h.Write(data)
	}
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return contents, sum, nil
}

// GetToken implements azcore.TokenCredential.
func (c *reloadingCredential) GetToken(ctx context.Context, opts policy.TokenRequestOptions) (azcore.AccessToken, error) {
	cred, err := c.current()
	if err != nil {
		return azcore.AccessToken{}, err
	}
	return cred.GetToken(ctx, opts)
}

// current returns the credential for the files' content now.
func (c *reloadingCredential) current() (azcore.TokenCredential, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	contents, sum, err := c.read()
	if _, bad := err.(*fileError); bad {
		return nil, err
	}
	if err != nil || sum == c.sum {
		return c.cred, nil
	}
	cred, _, err := c.build(contents)
	wipe(contents)
	if err != nil {
		return c.cred, nil
	}
	c.cred, c.sum = cred, sum
	return cred, nil
}
