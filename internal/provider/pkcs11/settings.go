package pkcs11

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Name is the provider name used in metrics, logs and configuration.
const Name = "pkcs11"

// Section is the config file's key of the pkcs11 settings.
const Section = "pkcs11"

// Defaults of the settings.
const (
	// DefaultSessions matches the envelope's limit of 8 concurrent
	// unwraps: one session per unwrap in flight.
	DefaultSessions = 8
	// MaxSessions bounds Sessions: HSMs limit sessions per application
	// (a Luna partition allows a few hundred in all).
	MaxSessions = 64
	// DefaultTimeout bounds each call into the module.
	DefaultTimeout = 10 * time.Second
)

// Registration describes the pkcs11 provider to the provider registry.
func Registration() provider.Registration {
	return provider.Registration{
		Name:        Name,
		Section:     Section,
		Summary:     "an AES-256 key in a PKCS#11 HSM or token (build with -tags pkcs11)",
		NewSettings: func() provider.Settings { return NewSettings() },
		Flags:       flags,
	}
}

// Settings are the pkcs11 section of the config file. The PIN is only ever
// read from PINFile.
type Settings struct {
	// Module is the vendor's PKCS#11 library, such as
	// /usr/lib/softhsm/libsofthsm2.so. Required.
	Module string `json:"module,omitempty"`
	// ModuleEnv are environment variables the module reads, set before
	// it is loaded, such as SOFTHSM2_CONF or ChrystokiConfigurationPath.
	// install mounts SOFTHSM2_CONF's file read-only; directories other
	// vendors' variables name are mounted with install --mount.
	ModuleEnv map[string]string `json:"moduleEnv,omitempty"`
	// TokenLabel selects the token by its label; Slot by slot ID. Exactly
	// one is required. A label survives re-initialization and slot
	// renumbering (SoftHSM assigns slot IDs from the token's serial).
	TokenLabel string `json:"tokenLabel,omitempty"`
	Slot       *uint  `json:"slot,omitempty"`
	// PINFile holds the user PIN (a trailing newline is ignored). Mode
	// 0600 or 0400, owned by the plugin's user or root. Required.
	PINFile string `json:"pinFile,omitempty"`
	// KeyLabel is the CKA_LABEL every version of the key carries.
	// Required.
	KeyLabel string `json:"keyLabel,omitempty"`
	// HSMGeneratedIV lets the HSM choose the GCM IV (Luna in FIPS mode
	// requires it); by default the plugin draws it from crypto/rand.
	HSMGeneratedIV bool `json:"hsmGeneratedIV,omitempty"`
	// Sessions is the size of the session pool. Default DefaultSessions.
	Sessions int `json:"sessions,omitempty"`
	// NodeLocal says the key objects live on this node only (SoftHSM, a
	// USB token, a PCIe card): rotation then refuses a control plane of
	// several nodes. Default true; set false for a network HSM (or HSM
	// cluster) that every control-plane node reaches.
	NodeLocal bool `json:"nodeLocal"`
	// TokenDir is a directory the module writes its token to (SoftHSM's
	// directories.tokendir), mounted read-write by install. Optional.
	TokenDir string `json:"tokenDir,omitempty"`
	// Timeout bounds each call into the module. Default DefaultTimeout.
	Timeout config.Duration `json:"timeout,omitzero"`
}

var (
	_ provider.Settings   = (*Settings)(nil)
	_ provider.Describer  = (*Settings)(nil)
	_ provider.Doctor     = (*Settings)(nil)
	_ provider.HostPather = (*Settings)(nil)
)

// NewSettings returns the defaults: DefaultSessions sessions, node-local.
func NewSettings() *Settings {
	return &Settings{Sessions: DefaultSessions, NodeLocal: true}
}

// flags registers the --pkcs11-* flags. The PIN is only ever named by file.
func flags(fs *flag.FlagSet) func(provider.Settings) {
	module := fs.String("pkcs11-module", "", "pkcs11: the vendor's PKCS#11 library (.so)")
	label := fs.String("pkcs11-token-label", "", "pkcs11: the token's label (or --pkcs11-slot)")
	slot := fs.Uint("pkcs11-slot", 0, "pkcs11: the token's slot ID (instead of --pkcs11-token-label)")
	pin := fs.String("pkcs11-pin-file", "", "pkcs11: file holding the user PIN (mode 0600 or 0400)")
	key := fs.String("pkcs11-key-label", "", "pkcs11: CKA_LABEL of the AES-256 key's versions")
	hsmIV := fs.Bool("pkcs11-hsm-generated-iv", false, "pkcs11: let the HSM generate the GCM IV (Luna)")
	sessions := fs.Int("pkcs11-sessions", DefaultSessions, "pkcs11: size of the session pool")
	nodeLocal := fs.Bool("pkcs11-node-local", true, "pkcs11: the key lives on this node only (false for a network HSM shared by every node)")
	tokenDir := fs.String("pkcs11-token-dir", "", "pkcs11: directory the module keeps its token in (SoftHSM), mounted read-write by install")
	return func(s provider.Settings) {
		ps := s.(*Settings)
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "pkcs11-module":
				ps.Module = *module
			case "pkcs11-token-label":
				ps.TokenLabel = *label
			case "pkcs11-slot":
				v := *slot
				ps.Slot = &v
			case "pkcs11-pin-file":
				ps.PINFile = *pin
			case "pkcs11-key-label":
				ps.KeyLabel = *key
			case "pkcs11-hsm-generated-iv":
				ps.HSMGeneratedIV = *hsmIV
			case "pkcs11-sessions":
				ps.Sessions = *sessions
			case "pkcs11-node-local":
				ps.NodeLocal = *nodeLocal
			case "pkcs11-token-dir":
				ps.TokenDir = *tokenDir
			}
		})
	}
}

// envNameRE is an environment variable's name.
var envNameRE = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Validate implements provider.Settings.
func (s *Settings) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", Section, field, fmt.Sprintf(format, args...)))
	}
	abs := func(field, path string, required bool) {
		switch {
		case path == "" && required:
			bad(field, "required with provider %s", Name)
		case path != "" && !filepath.IsAbs(path):
			bad(field, "%q must be an absolute path", path)
		}
	}
	abs("module", s.Module, true)
	abs("pinFile", s.PINFile, true)
	abs("tokenDir", s.TokenDir, false)
	switch {
	case s.TokenLabel != "" && s.Slot != nil:
		bad("tokenLabel", "set tokenLabel or slot, not both")
	case s.TokenLabel == "" && s.Slot == nil:
		bad("tokenLabel", "required with provider %s (or slot)", Name)
	case len(s.TokenLabel) > 32:
		bad("tokenLabel", "%q is longer than a token label's 32 bytes", s.TokenLabel)
	}
	switch {
	case s.KeyLabel == "":
		bad("keyLabel", "required with provider %s", Name)
	case len(s.KeyLabel) > 128:
		bad("keyLabel", "longer than 128 bytes")
	}
	if s.Sessions < 1 || s.Sessions > MaxSessions {
		bad("sessions", "%d is outside 1..%d", s.Sessions, MaxSessions)
	}
	if d := s.Timeout.Duration; d != 0 && (d < time.Second || d > 5*time.Minute) {
		bad("timeout", "%s is outside 1s..5m", d)
	}
	for _, k := range sortedKeys(s.ModuleEnv) {
		if !envNameRE.MatchString(k) {
			bad("moduleEnv", "%q is not an environment variable name", k)
		}
	}
	return errors.Join(errs...)
}

// Open implements provider.Settings. With o.Create (serve) it generates
// the first key version when the token holds none with KeyLabel. A build
// without the pkcs11 tag fails with one line naming the build to use.
func (s *Settings) Open(ctx context.Context, o provider.OpenOptions) (provider.Provider, error) {
	return openStore(ctx, s, o)
}

// Doctor implements provider.Doctor: module, token, login, key, its
// attributes; doctor's generic checks then run a round trip.
func (s *Settings) Doctor(ctx context.Context, c provider.Checklist, o provider.OpenOptions) provider.Provider {
	return doctorStore(ctx, s, c, o)
}

// Remedy implements provider.Doctor with the package's Remedy.
func (s *Settings) Remedy(err error) string { return Remedy(err) }

// Describe implements provider.Describer: module, token and key.
func (s *Settings) Describe() string {
	tok := "token " + strconv.Quote(s.TokenLabel)
	if s.Slot != nil {
		tok = "slot " + strconv.FormatUint(uint64(*s.Slot), 10)
	}
	where := "node-local"
	if !s.NodeLocal {
		where = "shared by every node"
	}
	return fmt.Sprintf("module %s, %s, key %q (%s)", s.Module, tok, s.KeyLabel, where)
}

// fileEnv are the ModuleEnv variables known to name a file, which install
// mounts read-only. Others (Luna's ChrystokiConfigurationPath, nShield's
// NFAST_HOME) name directories or sockets: the operator mounts them with
// install --mount.
var fileEnv = map[string]bool{"SOFTHSM2_CONF": true, "SOFTHSM_CONF": true}

// HostPaths implements provider.HostPather: the module, the PIN file and
// the module's config file (SOFTHSM2_CONF in ModuleEnv) read-only; the
// token directory read-write; with NodeLocal, the token directory is this
// node's own key material.
func (s *Settings) HostPaths() provider.HostPaths {
	var hp provider.HostPaths
	add := func(name, path string) {
		for _, h := range hp.Read {
			if h.Path == path {
				return
			}
		}
		hp.Read = append(hp.Read, provider.HostPath{Name: name, Path: path})
	}
	if s.Module != "" {
		add("pkcs11-module", s.Module)
	}
	n := 0
	for _, k := range sortedKeys(s.ModuleEnv) {
		if v := s.ModuleEnv[k]; fileEnv[k] && filepath.IsAbs(v) {
			add("pkcs11-config-"+strconv.Itoa(n), filepath.Clean(v))
			n++
		}
	}
	if s.PINFile != "" {
		add("pkcs11-pin", s.PINFile)
	}
	if s.TokenDir != "" {
		hp.Write = append(hp.Write, provider.HostPath{Name: "pkcs11-token-dir", Path: s.TokenDir})
		if s.NodeLocal {
			hp.PerNode = append(hp.PerNode, s.TokenDir)
		}
	}
	return hp
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// timeout is the configured timeout or the default.
func (s *Settings) timeout() time.Duration {
	if s.Timeout.Duration > 0 {
		return s.Timeout.Duration
	}
	return DefaultTimeout
}
