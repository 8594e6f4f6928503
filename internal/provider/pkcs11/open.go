//go:build pkcs11

package pkcs11

import (
	"context"
	"fmt"
	"os"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// openStore reads the PIN file, sets the module's environment and opens
// the store.
func openStore(ctx context.Context, s *Settings, o provider.OpenOptions) (provider.Provider, error) {
	cfg, err := s.config(o)
	if err != nil {
		return nil, err
	}
	return New(ctx, cfg)
}

// config reads the PIN file and sets ModuleEnv, returning the store's
// Config.
func (s *Settings) config(o provider.OpenOptions) (Config, error) {
	pin, err := readPIN(s.PINFile)
	if err != nil {
		return Config{}, pinFileText(err)
	}
	if err := s.setEnv(); err != nil {
		return Config{}, err
	}
	return Config{
		Module: s.Module, TokenLabel: s.TokenLabel, Slot: s.Slot, PIN: pin, PINFile: s.PINFile,
		KeyLabel: s.KeyLabel, HSMGeneratedIV: s.HSMGeneratedIV, Sessions: s.Sessions, NodeLocal: s.NodeLocal,
		Create: o.Create, Timeout: s.timeout(),
	}, nil
}

// setEnv sets ModuleEnv for the module, which reads it when loaded.
func (s *Settings) setEnv() error {
	for _, k := range sortedKeys(s.ModuleEnv) {
		if err := os.Setenv(k, s.ModuleEnv[k]); err != nil {
			return fmt.Errorf("pkcs11: set %s for the module: %w", k, err)
		}
	}
	return nil
}

// pinFileText is a PIN file error with its fix, for errors returned at
// start-up, where no Remedy is printed.
func pinFileText(err error) error {
	if pe, ok := err.(*PINFileError); ok {
		return fmt.Errorf("%w: %s", pe, pe.Fix)
	}
	return err
}
