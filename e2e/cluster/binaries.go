package cluster

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Pinned versions of the binaries e2e/tools/build.sh builds.
const (
	KubeAPIServerVersion = "v1.37.2"
	EtcdVersion          = "v3.6.16"
)

// Environment variables naming the binaries the tests run.
const (
	EnvPluginBin = "KMS_PLUGIN_BIN"
	// EnvServePluginBin names the serve-only build (kms-plugin-serve, what
	// the image's plugin runs); tests that only serve use it when set.
	EnvServePluginBin   = "KMS_PLUGIN_SERVE_BIN"
	EnvKubeAPIServerBin = "KUBE_APISERVER_BIN"
	EnvEtcdBin          = "ETCD_BIN"
	EnvCache            = "KMS_E2E_CACHE" // where build.sh caches binaries
)

const productModule = "github.com/kms-plugin/kms-plugin"

// RepoRoot returns the root of the kms-plugin repository: the nearest parent of
// the working directory whose go.mod declares the product module.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		if isProductRoot(dir) {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", fmt.Errorf("no parent directory of the working directory has a go.mod for module %s", productModule)
		}
		dir = parent
	}
}

func isProductRoot(dir string) bool {
	f, err := os.Open(filepath.Join(dir, "go.mod"))
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) == 2 && fields[0] == "module" {
			return strings.Trim(fields[1], `"`) == productModule
		}
	}
	return false
}

// cacheDir is where e2e/tools/build.sh puts the binaries it builds.
func cacheDir() (string, error) {
	if dir := os.Getenv(EnvCache); dir != "" {
		return dir, nil
	}
	root, err := RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(root, ".cache", "bin"), nil
}

// KubeAPIServerBinary returns $KUBE_APISERVER_BIN or, when unset, the
// kube-apiserver that e2e/tools/build.sh caches. The binary must exist.
func KubeAPIServerBinary() (string, error) {
	return cachedBinary(EnvKubeAPIServerBin, "kube-apiserver-"+KubeAPIServerVersion)
}

// EtcdBinary returns $ETCD_BIN or, when unset, the etcd that
// e2e/tools/build.sh caches. The binary must exist.
func EtcdBinary() (string, error) {
	return cachedBinary(EnvEtcdBin, "etcd-"+EtcdVersion)
}

func cachedBinary(env, name string) (string, error) {
	if path := os.Getenv(env); path != "" {
		return checkBinary(fmt.Sprintf("%s=%q", env, path), path)
	}
	dir, err := cacheDir()
	if err != nil {
		return "", fmt.Errorf("%s is unset and the default cache is unknown: %w", env, err)
	}
	path := filepath.Join(dir, name)
	if _, err := checkBinary(path, path); err != nil {
		return "", fmt.Errorf("%s is unset and the default is not built (run `bash e2e/tools/build.sh` at the repository root): %w", env, err)
	}
	return path, nil
}

// checkBinary checks that path is an absolute path to an executable file;
// errors start with what.
func checkBinary(what, path string) (string, error) {
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("%s: must be an absolute path", what)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("%s: %w", what, err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return "", fmt.Errorf("%s: not an executable file (mode %v)", what, fi.Mode())
	}
	return path, nil
}

// ServePluginBinary returns $KMS_PLUGIN_SERVE_BIN, the serve-only build
// that the image runs as the plugin, or PluginBinary when it is unset.
func ServePluginBinary(ctx context.Context) (path string, cleanup func(), err error) {
	if path := os.Getenv(EnvServePluginBin); path != "" {
		path, err := checkBinary(fmt.Sprintf("%s=%q", EnvServePluginBin, path), path)
		return path, func() {}, err
	}
	return PluginBinary(ctx)
}

// PluginBinary returns $KMS_PLUGIN_BIN or, when unset, builds
// ./cmd/kms-plugin of the enclosing repository into a temporary directory.
// The returned cleanup removes what was built; call it when done.
func PluginBinary(ctx context.Context) (path string, cleanup func(), err error) {
	return pluginBinary(ctx, EnvPluginBin, "kms-plugin-e2e-bin-", "kms-plugin", nil, nil)
}

// pluginBinary returns $env or, when unset, builds ./cmd/kms-plugin of the
// enclosing repository as name into a temporary directory made from
// dirPattern: go build with buildArgs, its environment plus goEnv. The
// returned cleanup removes what was built.
func pluginBinary(ctx context.Context, env, dirPattern, name string, goEnv, buildArgs []string) (path string, cleanup func(), err error) {
	if path := os.Getenv(env); path != "" {
		path, err := checkBinary(fmt.Sprintf("%s=%q", env, path), path)
		return path, func() {}, err
	}
	root, err := RepoRoot()
	if err != nil {
		return "", nil, fmt.Errorf("%s is unset and the repository to build it from is unknown: %w", env, err)
	}
	dir, err := os.MkdirTemp("", dirPattern)
	if err != nil {
		return "", nil, err
	}
	cleanup = func() { os.RemoveAll(dir) }
	path = filepath.Join(dir, name)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	args := append(append([]string{"build"}, buildArgs...), "-o", path, "./cmd/kms-plugin")
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = root
	if len(goEnv) > 0 {
		cmd.Env = append(os.Environ(), goEnv...)
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		cleanup()
		shown := strings.Join(slices.Concat(goEnv, []string{"go", "build"}, buildArgs, []string{"./cmd/kms-plugin"}), " ")
		return "", nil, fmt.Errorf("%s is unset; building it with `%s` in %s failed: %w\n%s", env, shown, root, err, out.Bytes())
	}
	return path, cleanup, nil
}
