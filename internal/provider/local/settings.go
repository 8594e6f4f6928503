package local

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"path/filepath"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Section is the config file's key of the local settings.
const Section = "local"

// Registration describes the local provider to the provider registry.
func Registration() provider.Registration {
	return provider.Registration{
		Name:        Name,
		Section:     Section,
		Summary:     "a Tink keyset file on this node",
		NewSettings: func() provider.Settings { return NewSettings() },
		Flags:       flags,
	}
}

// Settings are the local section of the config file.
type Settings struct {
	// KeysetPath is the Tink keyset file, created on the plugin's first
	// start.
	KeysetPath string `json:"keysetPath"`
}

var (
	_ provider.Settings   = (*Settings)(nil)
	_ provider.HostPather = (*Settings)(nil)
)

// NewSettings returns the defaults: the keyset in the user's state
// directory (config.StateDir), next to the default socket.
func NewSettings() *Settings {
	return &Settings{KeysetPath: filepath.Join(config.StateDir(), "keyset.json")}
}

// flags registers --local-keyset.
func flags(fs *flag.FlagSet) func(provider.Settings) {
	keyset := fs.String("local-keyset", NewSettings().KeysetPath, "local provider: Tink keyset file, created on first start")
	return func(s provider.Settings) {
		ls := s.(*Settings)
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "local-keyset" {
				ls.KeysetPath = *keyset
			}
		})
	}
}

// Validate implements provider.Settings.
func (s *Settings) Validate() error {
	switch {
	case s.KeysetPath == "":
		return errors.New("local.keysetPath: required with provider local")
	case !filepath.IsAbs(s.KeysetPath):
		return fmt.Errorf("local.keysetPath: %q must be an absolute path", s.KeysetPath)
	}
	return nil
}

// Open implements provider.Settings: it loads the keyset, creating it first
// when o.Create is set and the file does not exist.
func (s *Settings) Open(_ context.Context, o provider.OpenOptions) (provider.Provider, error) {
	p, err := New(Config{Path: s.KeysetPath, Create: o.Create})
	if err != nil {
		return nil, err
	}
	return p, nil
}

// HostPaths implements provider.HostPather: the plugin writes the keyset's
// directory (the keyset and its lock file), each node has its own keyset,
// and the default path depends on the user running serve.
func (s *Settings) HostPaths() provider.HostPaths {
	return provider.HostPaths{
		Write:   []provider.HostPath{{Name: "keyset-dir", Path: filepath.Dir(s.KeysetPath)}},
		PerNode: []string{s.KeysetPath},
		MustSet: []string{Section + ".keysetPath"},
	}
}
