package cluster

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// EnvPKCS11PluginBin names the PKCS#11 build of kms-plugin (make
// build-pkcs11: CGO_ENABLED=1, -tags pkcs11).
const EnvPKCS11PluginBin = "KMS_PLUGIN_PKCS11_BIN"

// SoftHSMModule is where Debian's softhsm2 package installs the module.
const SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

// SoftHSM is a SoftHSM2 token of its own in a directory: its config file
// (SOFTHSM2_CONF), token directory, label and a PIN file.
type SoftHSM struct {
	Conf, TokenDir, Label, PINFile string
	PIN                            string
}

// SoftHSMTools reports what of SoftHSM2 and OpenSC is missing, or nil:
// make e2e installs them (bash hack/apt-install.sh softhsm2 opensc).
func SoftHSMTools() error {
	var missing []string
	if _, err := os.Stat(SoftHSMModule); err != nil {
		missing = append(missing, SoftHSMModule)
	}
	for _, tool := range []string{"softhsm2-util", "pkcs11-tool"} {
		if _, err := exec.LookPath(tool); err != nil {
			missing = append(missing, tool)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s (bash hack/apt-install.sh softhsm2 opensc)", strings.Join(missing, ", "))
	}
	return nil
}

// NewSoftHSM initializes a token labelled label in dir/softhsm.
func NewSoftHSM(ctx context.Context, dir, label string) (*SoftHSM, error) {
	base := filepath.Join(dir, "softhsm")
	s := &SoftHSM{
		Conf: filepath.Join(base, "softhsm2.conf"), TokenDir: filepath.Join(base, "tokens"),
		Label: label, PINFile: filepath.Join(base, "pin"), PIN: "e2e-Qx7-pin",
	}
	if err := os.MkdirAll(s.TokenDir, 0o700); err != nil {
		return nil, err
	}
	conf := "directories.tokendir = " + s.TokenDir + "\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
	if err := os.WriteFile(s.Conf, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	if err := os.WriteFile(s.PINFile, []byte(s.PIN+"\n"), 0o600); err != nil {
		return nil, err
	}
	if _, err := s.run(ctx, "softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", "0815", "--pin", s.PIN); err != nil {
		return nil, err
	}
	return s, nil
}

// Env is the environment the module needs: SOFTHSM2_CONF.
func (s *SoftHSM) Env() []string { return []string{"SOFTHSM2_CONF=" + s.Conf} }

// ProviderArgs are the flags of serve, rotate and keyset for the pkcs11
// provider on this token with key label keyLabel.
func (s *SoftHSM) ProviderArgs(keyLabel string) []string {
	return []string{"--provider", "pkcs11", "--pkcs11-module", SoftHSMModule, "--pkcs11-token-label", s.Label,
		"--pkcs11-pin-file", s.PINFile, "--pkcs11-key-label", keyLabel}
}

// TokenKey is one secret key object as pkcs11-tool --list-objects shows
// it.
type TokenKey struct {
	Label, ID string
	Usage     []string // encrypt, decrypt, ...
	Access    []string // sensitive, never extractable, ...
}

// Has reports whether the key's usage includes use (encrypt, decrypt).
func (k TokenKey) Has(use string) bool {
	for _, u := range k.Usage {
		if u == use {
			return true
		}
	}
	return false
}

// SecretKeys lists the token's secret keys with pkcs11-tool, by CKA_ID in
// hex: the token's own view, independent of the plugin.
func (s *SoftHSM) SecretKeys(ctx context.Context) (map[string]TokenKey, error) {
	out, err := s.run(ctx, "pkcs11-tool", "--module", SoftHSMModule, "--token-label", s.Label, "--login", "--pin", s.PIN,
		"--list-objects", "--type", "secrkey")
	if err != nil {
		return nil, err
	}
	keys := map[string]TokenKey{}
	var cur *TokenKey
	flush := func() {
		if cur != nil && cur.ID != "" {
			keys[cur.ID] = *cur
		}
	}
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimSpace(value)
		switch {
		case strings.HasPrefix(line, "Secret Key Object"):
			flush()
			cur = &TokenKey{}
		case cur == nil:
		case field == "label":
			cur.Label = value
		case field == "ID":
			cur.ID = strings.ToLower(value)
		case field == "Usage":
			cur.Usage = splitList(value)
		case field == "Access":
			cur.Access = splitList(value)
		}
	}
	flush()
	return keys, nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func (s *SoftHSM) run(ctx context.Context, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), s.Env()...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w; stderr: %s", name, args[0], err, stderr.Bytes())
	}
	return stdout.String(), nil
}

// PKCS11PluginBinary returns $KMS_PLUGIN_PKCS11_BIN or, when unset, builds
// the PKCS#11 build of ./cmd/kms-plugin (CGO_ENABLED=1 -tags pkcs11) of the
// enclosing repository into a temporary directory. Call cleanup when done.
func PKCS11PluginBinary(ctx context.Context) (path string, cleanup func(), err error) {
	return pluginBinary(ctx, EnvPKCS11PluginBin, "kms-plugin-e2e-pkcs11-", "kms-plugin-pkcs11", []string{"CGO_ENABLED=1"}, []string{"-tags", "pkcs11"})
}
