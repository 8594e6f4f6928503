// Package config holds the settings of `kms-plugin serve`: their defaults,
// the YAML file that carries them, and their validation. Flags are applied by
// cmd/kms-plugin on top of a loaded Config.
package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// Provider names.
const (
	ProviderLocal = "local"
)

// Production paths used by the manifests in manifests/.
const (
	ProductionEndpoint   = "unix:///var/run/kmsplugin/socket.sock"
	ProductionKeysetPath = "/etc/kubernetes/kms-plugin/keyset.json"
)

// Config is the whole configuration of `kms-plugin serve`. Its YAML form uses
// the json field names.
type Config struct {
	// Endpoint is the gRPC listen address, unix:///ABSOLUTE/PATH, as in
	// kube-apiserver's EncryptionConfiguration.
	Endpoint string `json:"endpoint"`
	// SocketGroup, when set, is the group name or numeric gid given to the
	// socket, which then gets mode 0660 instead of 0600.
	SocketGroup string `json:"socketGroup,omitempty"`
	// Provider selects the key store: "local".
	Provider string `json:"provider"`
	// Local configures the local keyset provider.
	Local LocalConfig `json:"local"`
	// HTTPAddr is where /livez, /readyz, /metrics and /status listen.
	// Empty disables the HTTP server.
	HTTPAddr string `json:"httpAddr"`
	// ProviderPollInterval is how often the key store is asked for its
	// current key version.
	ProviderPollInterval Duration `json:"providerPollInterval"`
	// KEK bounds local key-encryption keys.
	KEK KEKConfig `json:"kek"`
	// Log configures logging.
	Log LogConfig `json:"log"`
	// ShutdownTimeout bounds the graceful drain on SIGTERM.
	ShutdownTimeout Duration `json:"shutdownTimeout"`
}

// LocalConfig configures the local provider.
type LocalConfig struct {
	// KeysetPath is the Tink keyset file, created on first start.
	KeysetPath string `json:"keysetPath"`
}

// KEKConfig bounds local KEKs.
type KEKConfig struct {
	MaxAge    Duration `json:"maxAge"`
	MaxUses   uint64   `json:"maxUses"`
	CacheSize int      `json:"cacheSize"`
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

// Default returns the configuration used with no file and no flags: the
// local provider, with the socket and keyset under the user's state
// directory, so that an unprivileged `kms-plugin serve` just works.
func Default() Config {
	dir := StateDir()
	return Config{
		Endpoint:             "unix://" + filepath.Join(dir, "socket.sock"),
		Provider:             ProviderLocal,
		Local:                LocalConfig{KeysetPath: filepath.Join(dir, "keyset.json")},
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

// Load reads a YAML config file over the defaults. Unknown fields are errors.
func Load(path string) (Config, error) {
	cfg := Default()
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
func Parse(data []byte, cfg *Config) error {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return fmt.Errorf("parse YAML: %w", err)
	}
	if bytes.Equal(bytes.TrimSpace(js), []byte("null")) {
		return nil // empty file
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		return fmt.Errorf("decode: %w", err)
	}
	return nil
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

// Validate checks every field and returns one error per bad field, each
// naming the field.
func (c Config) Validate() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, args...)))
	}
	if _, err := SocketPath(c.Endpoint); err != nil {
		bad("endpoint", "%v", err)
	}
	switch c.Provider {
	case ProviderLocal:
		if c.Local.KeysetPath == "" {
			bad("local.keysetPath", "required with provider local")
		} else if !filepath.IsAbs(c.Local.KeysetPath) {
			bad("local.keysetPath", "%q must be an absolute path", c.Local.KeysetPath)
		}
	case "":
		bad("provider", "required (one of: local)")
	default:
		bad("provider", "unknown provider %q (one of: local)", c.Provider)
	}
	if c.HTTPAddr != "" {
		if _, _, err := net.SplitHostPort(c.HTTPAddr); err != nil {
			bad("httpAddr", "%q is not HOST:PORT", c.HTTPAddr)
		}
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
