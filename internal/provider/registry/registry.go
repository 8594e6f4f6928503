// Package registry is the one table of the key stores kms-plugin can use
// (Builtin, in builtin.go) and the glue that turns a config.Config into the
// configured store: it knows every store's config section, registers the
// stores' flags and applies them, decodes and validates the configured
// store's settings, and opens the store. Nothing else names a concrete
// store. A Registry is a plain value; the package holds no state.
package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"strings"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Registry lists key stores by registration; the first is the default.
// Names and sections are unique.
type Registry []provider.Registration

// Names returns the stores' names, in order.
func (r Registry) Names() []string {
	names := make([]string, len(r))
	for i, reg := range r {
		names[i] = reg.Name
	}
	return names
}

// Usage describes the stores for --provider's help: "local (a Tink keyset
// file on this node) or azurekeyvault (...)".
func (r Registry) Usage() string {
	parts := make([]string, len(r))
	for i, reg := range r {
		parts[i] = reg.Name
		if reg.Summary != "" {
			parts[i] += " (" + reg.Summary + ")"
		}
	}
	if len(parts) < 2 {
		return strings.Join(parts, "")
	}
	return strings.Join(parts[:len(parts)-1], ", ") + " or " + parts[len(parts)-1]
}

// Lookup returns the registration named name. The error, for an empty or
// unknown name, starts with "provider:" and lists the known names.
func (r Registry) Lookup(name string) (provider.Registration, error) {
	known := strings.Join(r.Names(), ", ")
	if name == "" {
		return provider.Registration{}, fmt.Errorf("provider: required (one of: %s)", known)
	}
	for _, reg := range r {
		if reg.Name == name {
			return reg, nil
		}
	}
	return provider.Registration{}, fmt.Errorf("provider: unknown provider %q (one of: %s)", name, known)
}

// Default returns config.Default with the default store (the first) as
// Provider, and Sections holding every store's section key (with no JSON:
// each store's defaults), so that config.Load and config.Parse accept
// them.
func (r Registry) Default() config.Config {
	cfg := config.Default()
	if len(r) > 0 {
		cfg.Provider = r[0].Name
	}
	cfg.Sections = make(map[string]json.RawMessage, len(r))
	for _, reg := range r {
		cfg.Sections[reg.Section] = nil
	}
	return cfg
}

// Settings returns the registration of cfg.Provider and its settings: the
// store's defaults with its section of cfg decoded over them. They are not
// validated (see Validate). It fails on an unknown provider and on an
// unknown field in any store's section, as config.Parse does for the
// generic fields.
func (r Registry) Settings(cfg config.Config) (provider.Registration, provider.Settings, error) {
	var (
		errs []error
		want provider.Settings
	)
	for _, reg := range r {
		if cfg.Provider != reg.Name && cfg.Sections[reg.Section] == nil {
			continue
		}
		s, err := decode(reg, cfg.Sections[reg.Section])
		if err != nil {
			errs = append(errs, err)
		}
		if cfg.Provider == reg.Name {
			want = s
		}
	}
	reg, err := r.Lookup(cfg.Provider)
	if err != nil {
		errs = append([]error{err}, errs...)
	}
	if err := errors.Join(errs...); err != nil {
		return provider.Registration{}, nil, err
	}
	return reg, want, nil
}

// decode returns reg's defaults with raw decoded over them, refusing
// unknown fields.
func decode(reg provider.Registration, raw json.RawMessage) (provider.Settings, error) {
	s := reg.NewSettings()
	if len(raw) == 0 {
		return s, nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(s); err != nil {
		return nil, fmt.Errorf("%s: %w", reg.Section, err)
	}
	return s, nil
}

// Validate checks all of cfg: the generic fields (config.Config.Validate),
// the provider's name and its settings. It returns one error per bad
// field, each starting with the field's YAML path.
func (r Registry) Validate(cfg config.Config) error {
	errs := []error{cfg.Validate()}
	if _, s, err := r.Settings(cfg); err != nil {
		errs = append(errs, err)
	} else {
		errs = append(errs, s.Validate())
	}
	return errors.Join(errs...)
}

// Open builds the store cfg configures, with o. cfg's store settings must
// be valid; o.Create is for serve only.
func (r Registry) Open(ctx context.Context, cfg config.Config, o provider.OpenOptions) (provider.Provider, error) {
	reg, s, err := r.Settings(cfg)
	if err != nil {
		return nil, oneLine(err)
	}
	if err := s.Validate(); err != nil {
		return nil, fmt.Errorf("invalid %s settings: %w", reg.Name, oneLine(err))
	}
	return s.Open(ctx, o)
}

// Flags registers every store's flags on fs. The returned function, called
// after fs is parsed and cfg loaded, applies the configured store's flags
// that were set over its settings in cfg, and stores the result as cfg's
// section (in a copy of cfg.Sections). It does nothing for an unknown
// provider, which Validate reports.
func (r Registry) Flags(fs *flag.FlagSet) func(cfg *config.Config) error {
	apply := make(map[string]func(provider.Settings), len(r))
	for _, reg := range r {
		if reg.Flags != nil {
			apply[reg.Name] = reg.Flags(fs)
		}
	}
	return func(cfg *config.Config) error {
		f, ok := apply[cfg.Provider]
		if !ok {
			return nil
		}
		reg, s, err := r.Settings(*cfg)
		if err != nil {
			return err
		}
		f(s)
		raw, err := json.Marshal(s)
		if err != nil {
			return fmt.Errorf("%s: encode settings: %w", reg.Section, err)
		}
		sections := maps.Clone(cfg.Sections)
		if sections == nil {
			sections = map[string]json.RawMessage{}
		}
		sections[reg.Section] = raw
		cfg.Sections = sections
		return nil
	}
}

// oneLine joins the lines of a joined error with "; ".
func oneLine(err error) error {
	if msg := err.Error(); strings.Contains(msg, "\n") {
		return errors.New(strings.ReplaceAll(msg, "\n", "; "))
	}
	return err
}
