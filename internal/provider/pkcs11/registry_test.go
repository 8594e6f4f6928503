//go:build pkcs11

package pkcs11_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/pkcs11"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

const softHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

// TestRegistryOpensTheStore: a config file's pkcs11 section, through the
// one table of stores, opens the real store in this build.
func TestRegistryOpensTheStore(t *testing.T) {
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("SoftHSM2 is missing: bash hack/apt-install.sh softhsm2 opensc")
		}
		t.Skip("SoftHSM2 is not installed (bash hack/apt-install.sh softhsm2 opensc)")
	}
	dir := t.TempDir()
	conf, pinFile := filepath.Join(dir, "softhsm2.conf"), filepath.Join(dir, "pin")
	os.Mkdir(filepath.Join(dir, "tokens"), 0o700)
	os.WriteFile(conf, []byte("directories.tokendir = "+filepath.Join(dir, "tokens")+"\nobjectstore.backend = file\n"), 0o600)
	os.WriteFile(pinFile, []byte("5678\n"), 0o600)
	initToken := exec.Command("softhsm2-util", "--init-token", "--free", "--label", "reg", "--so-pin", "1234", "--pin", "5678")
	initToken.Env = append(os.Environ(), "SOFTHSM2_CONF="+conf)
	if out, err := initToken.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util: %v %s", err, out)
	}
	// The module finds its config through moduleEnv, as in a static pod.
	t.Setenv("SOFTHSM2_CONF", "")
	body := "provider: pkcs11\npkcs11:\n  module: " + softHSMModule + "\n  tokenLabel: reg\n  pinFile: " + pinFile +
		"\n  keyLabel: kek\n  nodeLocal: false\n  moduleEnv:\n    SOFTHSM2_CONF: " + conf + "\n"
	path := filepath.Join(dir, "config.yaml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	r := registry.Builtin()
	cfg, err := config.Load(path, r.Default())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Validate(cfg); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	p, err := r.Open(context.Background(), cfg, provider.OpenOptions{Create: true})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer p.(*pkcs11.Provider).Close()
	if p.Name() != pkcs11.Name || provider.IsNodeLocal(p) {
		t.Fatalf("opened %s, node-local %v; want pkcs11, shared (nodeLocal: false)", p.Name(), provider.IsNodeLocal(p))
	}
	w, err := p.Wrap(context.Background(), make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Unwrap(context.Background(), w); err != nil {
		t.Fatal(err)
	}
}
