// Package config holds the generic settings of `kms-plugin serve`: their
// defaults, the YAML file that carries them, and their validation. It names
// no key store: each store's section stays raw JSON here, for the provider
// registry (internal/provider/registry) to decode and validate. Flags are
// applied by cmd/kms-plugin on top of a loaded Config.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// Production paths used by the manifests in manifests/.
const (
	ProductionEndpoint   = "unix:///var/run/kmsplugin/socket.sock"
	ProductionKeysetPath = "/etc/kubernetes/kms-plugin/keyset.json"
)

// Config is the whole configuration of `kms-plugin serve`. Its YAML form uses
// the json field names, plus one section per key store.
type Config struct {
	// Endpoint is the gRPC listen address, unix:///ABSOLUTE/PATH, as in
	// kube-apiserver's EncryptionConfiguration.
	Endpoint string `json:"endpoint"`
	// SocketGroup, when set, is the group name or numeric gid given to the
	// socket, which then gets mode 0660 instead of 0600.
	SocketGroup string `json:"socketGroup,omitempty"`
	// Provider names the key store; the provider registry knows the names.
	Provider string `json:"provider"`
	// HTTPAddr is where /livez, /readyz, /metrics, /status and /refresh listen.
	// Empty disables the HTTP server.
	HTTPAddr string `json:"httpAddr"`
	// HTTPTLS serves the admin port over HTTPS and names who may call
	// /status and /refresh with a client certificate. Required, with
	// HTTPAuth or a client CA, when HTTPAddr is not a loopback address.
	HTTPTLS HTTPTLSConfig `json:"httpTLS,omitzero"`
	// HTTPAuth accepts a bearer token for /status and /refresh (and
	// /metrics when ProtectMetrics).
	HTTPAuth HTTPAuthConfig `json:"httpAuth,omitzero"`
	// ProviderPollInterval is how often the key store is asked for its
	// current key version.
	ProviderPollInterval Duration `json:"providerPollInterval"`
	// KEK bounds local key-encryption keys.
	KEK KEKConfig `json:"kek"`
	// Log configures logging.
	Log LogConfig `json:"log"`
	// ShutdownTimeout bounds the graceful drain on SIGTERM.
	ShutdownTimeout Duration `json:"shutdownTimeout"`
	// Sections holds the key stores' settings as JSON, by top-level YAML key
	// (such as "azure"). Its keys are the sections Parse accepts: any other
	// top-level key of a file is an unknown field. A nil value means the
	// file has no such section (the store's defaults apply). The provider
	// registry fills the keys in, and decodes and validates the configured
	// store's section.
	Sections map[string]json.RawMessage `json:"-"`
}

// HTTPTLSConfig is the admin port's TLS: a serving certificate (re-read
// when it changes on disk) and, optionally, the CA whose client
// certificates with one of ClientNames as CommonName may call /status and
// /refresh.
type HTTPTLSConfig struct {
	CertFile     string `json:"certFile,omitempty"`
	KeyFile      string `json:"keyFile,omitempty"`
	ClientCAFile string `json:"clientCAFile,omitempty"`
	// ClientNames are the accepted client certificate CommonNames. Default
	// kms-plugin-admin.
	ClientNames []string `json:"clientNames,omitempty"`
}

// HTTPAuthConfig is the admin port's bearer token.
type HTTPAuthConfig struct {
	// TokenFile holds the token (mode 0600 or 0400, owned by the plugin's
	// user or root); it is re-read when it changes.
	TokenFile string `json:"tokenFile,omitempty"`
	// ProtectMetrics requires the credential for /metrics too.
	ProtectMetrics bool `json:"protectMetrics,omitempty"`
}

// KEKConfig bounds local KEKs.
type KEKConfig struct {
	MaxAge    Duration `json:"maxAge"`
	MaxUses   uint64   `json:"maxUses"`
	CacheSize int      `json:"cacheSize"`
	// CacheTTL bounds how long an unwrapped local KEK is kept before it is
	// unwrapped again; zero means the default (3h).
	CacheTTL Duration `json:"cacheTTL,omitzero"`
	// UnwrapRate and UnwrapBurst bound remote unwraps per second (cached
	// Decrypts are never limited); zero means the defaults (100/s, 200).
	UnwrapRate  float64 `json:"unwrapRate,omitempty"`
	UnwrapBurst int     `json:"unwrapBurst,omitempty"`
}

// LogConfig configures logging.
type LogConfig struct {
	// Format is "json" (default) or "console".
	Format string `json:"format"`
	// Level is debug, info (default), warn or error.
	Level string `json:"level"`
}

// Duration is a time.Duration written as "60s" or "5m" in YAML.
type Duration struct{ time.Duration }

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration must be a string such as \"60s\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("invalid duration %q", s)
	}
	d.Duration = v
	return nil
}

// Default returns the generic settings used with no file and no flags, with
// the socket under the user's state directory so that an unprivileged
// `kms-plugin serve` just works. It names no provider and no section: the
// provider registry's Default adds its default store and its sections.
func Default() Config {
	dir := StateDir()
	return Config{
		Endpoint:             "unix://" + filepath.Join(dir, "socket.sock"),
		HTTPAddr:             "127.0.0.1:8787",
		ProviderPollInterval: Duration{60 * time.Second},
		KEK:                  KEKConfig{MaxAge: Duration{7 * 24 * time.Hour}, MaxUses: 1 << 20, CacheSize: 10000},
		Log:                  LogConfig{Format: "json", Level: "info"},
		ShutdownTimeout:      Duration{10 * time.Second},
	}
}

// StateDir is the default directory for the socket and keyset:
// $KMS_PLUGIN_STATE_DIR, else $XDG_STATE_HOME/kms-plugin, else
// ~/.local/state/kms-plugin, else a directory under the system temp dir.
func StateDir() string {
	if d := os.Getenv("KMS_PLUGIN_STATE_DIR"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "kms-plugin")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "kms-plugin")
	}
	return filepath.Join(os.TempDir(), "kms-plugin")
}

// Load reads a YAML config file over base, usually the provider registry's
// Default. Unknown fields are errors. base is not modified.
func Load(path string, base Config) (Config, error) {
	cfg := base
	data, err := os.ReadFile(path)
	if err != nil {
		return cfg, fmt.Errorf("read config: %w", err)
	}
	if err := Parse(data, &cfg); err != nil {
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// Parse decodes YAML data into cfg, keeping the fields data does not set.
// A top-level key that matches a key of cfg.Sections (ignoring case, as
// for the other fields) is a section: its JSON replaces the value there,
// in a copy of the map. Any other unknown key is an error naming it.
func Parse(data []byte, cfg *Config) error {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return fmt.Errorf("parse YAML: %w", err)
	}
	if bytes.Equal(bytes.TrimSpace(js), []byte("null")) {
		return nil // empty file
	}
	var top map[string]json.RawMessage
	if json.Unmarshal(js, &top) == nil {
		sections := maps.Clone(cfg.Sections)
		for key, raw := range top {
			if name, ok := sectionKey(sections, key); ok {
				sections[name] = raw
				delete(top, key)
			}
		}
		if js, err = json.Marshal(top); err != nil {
			return fmt.Errorf("decode: %w", err)
		}
		cfg.Sections = sections
	} // else not an object: the strict decode below says so.
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	return nil
}

// sectionKey returns the key of sections that a file's top-level key
// names, matching case-insensitively as encoding/json matches fields.
func sectionKey(sections map[string]json.RawMessage, key string) (string, bool) {
	if _, ok := sections[key]; ok {
		return key, true
	}
	for name := range sections {
		if strings.EqualFold(name, key) {
			return name, true
		}
	}
	return "", false
}

// SocketPath returns the filesystem path of a unix:// endpoint.
func SocketPath(endpoint string) (string, error) {
	path, ok := strings.CutPrefix(endpoint, "unix://")
	if !ok {
		return "", fmt.Errorf("endpoint %q: must start with unix://", endpoint)
	}
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("endpoint %q: socket path must be absolute (unix:///path/to/socket.sock)", endpoint)
	}
	// sun_path is 108 bytes on Linux, including the terminating NUL.
	if len(path) > 107 {
		return "", fmt.Errorf("endpoint %q: socket path is %d bytes, more than the 107 a Unix socket allows", endpoint, len(path))
	}
	return filepath.Clean(path), nil
}

// Validate checks the generic fields and returns one error per bad field,
// each naming the field. The provider registry checks Provider and the
// store's section.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if _, err := SocketPath(c.Endpoint); err != nil {
		bad("endpoint", "%v", err)
	}
	if c.HTTPAddr != "" {
		if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
			bad("httpAddr", "%q is not HOST:PORT", c.HTTPAddr)
		}
	}
	abs := func(field, path string) {
		if path != "" && !filepath.IsAbs(path) {
			bad(field, "%q must be an absolute path", path)
		}
	}
	abs("httpTLS.certFile", c.HTTPTLS.CertFile)
	abs("httpTLS.keyFile", c.HTTPTLS.KeyFile)
	abs("httpTLS.clientCAFile", c.HTTPTLS.ClientCAFile)
	abs("httpAuth.tokenFile", c.HTTPAuth.TokenFile)
	if (c.HTTPTLS.CertFile == "") != (c.HTTPTLS.KeyFile == "") {
		bad("httpTLS.keyFile", "httpTLS.certFile and httpTLS.keyFile go together")
	}
	if c.HTTPTLS.CertFile == "" && (c.HTTPTLS.ClientCAFile != "" || c.HTTPAuth.TokenFile != "") {
		bad("httpTLS.certFile", "required with httpTLS.clientCAFile or httpAuth.tokenFile: credentials are only accepted over HTTPS")
	}
	if c.HTTPAuth.ProtectMetrics && c.HTTPTLS.ClientCAFile == "" && c.HTTPAuth.TokenFile == "" {
		bad("httpAuth.protectMetrics", "needs httpTLS.clientCAFile or httpAuth.tokenFile")
	}
	if d := c.ProviderPollInterval.Duration; d < time.Second || d > 24*time.Hour {
		bad("providerPollInterval", "%s is outside 1s..24h", d)
	}
	if d := c.KEK.MaxAge.Duration; d < time.Minute {
		bad("kek.maxAge", "%s is less than 1m", d)
	}
	if c.KEK.MaxUses < 1 || c.KEK.MaxUses > 1<<32 {
		bad("kek.maxUses", "%d is outside 1..4294967296", c.KEK.MaxUses)
	}
	if d := c.KEK.CacheTTL.Duration; d != 0 && (d < time.Minute || d > 30*24*time.Hour) {
		bad("kek.cacheTTL", "%s is outside 1m..720h", d)
	}
	if r := c.KEK.UnwrapRate; r < 0 || r > 100_000 {
		bad("kek.unwrapRate", "%g is outside 0..100000", r)
	}
	if b := c.KEK.UnwrapBurst; b < 0 || b > 100_000 {
		bad("kek.unwrapBurst", "%d is outside 0..100000", b)
	}
	if c.KEK.CacheSize < 1 || c.KEK.CacheSize > 1_000_000 {
		bad("kek.cacheSize", "%d is outside 1..1000000", c.KEK.CacheSize)
	}
	switch c.Log.Format {
	case "json", "console":
	default:
		bad("log.format", "%q must be json or console", c.Log.Format)
	}
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		bad("log.level", "%q must be debug, info, warn or error", c.Log.Level)
	}
	if d := c.ShutdownTimeout.Duration; d <= 0 || d > 10*time.Minute {
		bad("shutdownTimeout", "%s is outside (0, 10m]", d)
	}
	return errors.Join(errs...)
}
