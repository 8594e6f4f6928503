// Package install provisions kms-plugin on a control-plane node and takes
// it off again.
//
// Install writes the plugin's config, its static pod manifest (or systemd
// unit), the EncryptionConfiguration (the plugin's kms v2 provider first,
// the providers that applied before kept after it for reads, identity last
// while plaintext may remain), and patches kube-apiserver's static pod
// manifest: --encryption-provider-config, automatic reload, and hostPath
// mounts for the config and socket directories. When the plugin's admin
// port is not on loopback, install also issues its serving certificate and
// rotate's client certificate from the cluster CA. Uninstall runs in two
// stages that keep every stored object readable: first writes go back to
// the provider used before (identity when none) while the plugin still
// serves reads; after stored objects are rewritten, --finalize checks etcd
// for objects still encrypted by the plugin and only then removes it.
//
// Every operation is a Plan first: planning reads the node and validates
// everything, writes nothing, and can be shown as a unified diff. Applying a
// plan backs up every file it replaces, writes each atomically (temporary
// file, fsync, rename), and if a write fails restores the files already
// replaced, and keeps only the newest backups. Planning again after
// applying gives an empty plan. Every path is confined to the node root
// (os.Root): no symlink leads out of it, and no file is written through one.
package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"

	"sigs.k8s.io/yaml"

	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

// Installer plans and applies install and uninstall on one node.
type Installer struct {
	cfg Config
}

var (
	providerNameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$`)
	resourceRE     = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$`)
)

// New checks cfg, fills in its defaults, and returns an Installer.
func New(cfg Config) (*Installer, error) {
	if cfg.FS == nil {
		cfg.FS = DirFS("/")
	}
	if cfg.Now == nil {
		cfg.Now = defaultNow
	}
	def := DefaultPaths()
	for _, p := range []struct{ v, d *string }{
		{&cfg.Paths.PluginConfig, &def.PluginConfig},
		{&cfg.Paths.StaticPod, &def.StaticPod},
		{&cfg.Paths.SystemdUnit, &def.SystemdUnit},
		{&cfg.Paths.EncryptionConfig, &def.EncryptionConfig},
		{&cfg.Paths.KubeAPIServer, &def.KubeAPIServer},
		{&cfg.Paths.BackupDir, &def.BackupDir},
		{&cfg.Paths.AdminDir, &def.AdminDir},
		{&cfg.Paths.ClusterCACert, &def.ClusterCACert},
		{&cfg.Paths.ClusterCAKey, &def.ClusterCAKey},
	} {
		if *p.v == "" {
			*p.v = *p.d
		}
	}
	if cfg.Mode == "" {
		cfg.Mode = ModeStaticPod
	}
	if cfg.Binary == "" {
		cfg.Binary = DefaultBinary
	}
	if cfg.ProviderName == "" {
		cfg.ProviderName = DefaultProviderName
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.KeepBackups == 0 {
		cfg.KeepBackups = DefaultKeepBackups
	}
	cfg.Resources = slices.Clone(cfg.Resources)
	if len(cfg.Resources) == 0 {
		cfg.Resources = DefaultResources()
	}
	cfg.ExtraMounts = slices.Clone(cfg.ExtraMounts)
	cfg.PluginConfig = slices.Clone(cfg.PluginConfig)
	cfg.AdminIPs = slices.Clone(cfg.AdminIPs)
	cfg.AdminHostname = strings.ToLower(cfg.AdminHostname)

	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	for _, p := range []struct{ name, v string }{
		{"plugin config path", cfg.Paths.PluginConfig},
		{"static pod path", cfg.Paths.StaticPod},
		{"systemd unit path", cfg.Paths.SystemdUnit},
		{"encryption config path", cfg.Paths.EncryptionConfig},
		{"kube-apiserver manifest path", cfg.Paths.KubeAPIServer},
		{"backup directory", cfg.Paths.BackupDir},
		{"admin directory", cfg.Paths.AdminDir},
		{"cluster CA certificate", cfg.Paths.ClusterCACert},
		{"cluster CA key", cfg.Paths.ClusterCAKey},
		{"binary", cfg.Binary},
	} {
		if err := hostPath(p.name, p.v); err != nil {
			errs = append(errs, err)
		}
	}
	switch cfg.Mode {
	case ModeStaticPod:
		if cfg.Image == "" {
			bad("image: required with mode %s", ModeStaticPod)
		}
	case ModeSystemd:
	default:
		bad("mode: unknown mode %q (want %s or %s)", cfg.Mode, ModeStaticPod, ModeSystemd)
	}
	if !providerNameRE.MatchString(cfg.ProviderName) {
		bad("provider name: %q must be lowercase letters, digits, '-' and '.'", cfg.ProviderName)
	}
	for i, r := range cfg.Resources {
		cfg.Resources[i] = strings.ToLower(strings.TrimSpace(r))
		if !resourceRE.MatchString(cfg.Resources[i]) {
			bad("resources: %q is not a resource name such as secrets or deployments.apps (wildcards are not supported)", r)
		}
	}
	cfg.Resources = slices.Compact(cfg.Resources)
	if cfg.Timeout < 0 || cfg.Timeout > 10*time.Minute {
		bad("timeout: %s is outside (0, 10m]", cfg.Timeout)
	}
	for _, m := range cfg.ExtraMounts {
		if err := hostPath("extra mount", m); err != nil {
			errs = append(errs, err)
		}
	}
	for _, ip := range cfg.AdminIPs {
		if ip == nil || ip.IsUnspecified() {
			bad("admin IP: %v is not an address of this node", ip)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("install: %w", err)
	}
	return &Installer{cfg: cfg}, nil
}

// pluginSettings is what the installer needs from the plugin's config.
type pluginSettings struct {
	raw        []byte
	cfg        config.Config
	paths      provider.HostPaths // of the configured key store
	socketPath string
	socketDir  string
	endpoint   string
	// admin says who provides the admin port's TLS (adminCredentials).
	admin adminSource
	// restyled: raw's layout differs from the given file's beyond edits.
	restyled bool
}

// pluginConfig picks the plugin config to install and validates it.
func (i *Installer) pluginConfig() (pluginSettings, error) {
	raw, source := i.cfg.PluginConfig, "the given plugin config"
	if raw == nil {
		data, _, ok, err := readOptional(i.cfg.FS, i.cfg.Paths.PluginConfig)
		if err != nil {
			return pluginSettings{}, err
		}
		raw, source = data, i.cfg.Paths.PluginConfig
		if !ok {
			raw, source = DefaultPluginConfig(), "the default plugin config"
		}
	}
	if len(raw) == 0 {
		return pluginSettings{}, fmt.Errorf("%s is empty", source)
	}
	stores := registry.Builtin()
	cfg := stores.Default()
	if err := config.Parse(raw, &cfg); err != nil {
		return pluginSettings{}, fmt.Errorf("%s: %w", source, err)
	}
	var paths provider.HostPaths
	if _, s, err := stores.Settings(cfg); err == nil {
		if hp, ok := s.(provider.HostPather); ok {
			paths = hp.HostPaths()
		}
	}
	// Fields whose default depends on the environment of `kms-plugin
	// serve` must be in the file itself.
	var errs []error
	for _, field := range append([]string{"endpoint"}, paths.MustSet...) {
		if !fileSets(raw, field) {
			errs = append(errs, fmt.Errorf("%s must be set (the default depends on the environment of `kms-plugin serve`)", field))
		}
	}
	if err := stores.Validate(cfg); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return pluginSettings{}, fmt.Errorf("%s: %s", source, strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	sock, err := config.SocketPath(cfg.Endpoint)
	if err != nil {
		return pluginSettings{}, err
	}
	return pluginSettings{raw: raw, cfg: cfg, paths: paths, socketPath: sock, socketDir: filepath.Dir(sock), endpoint: "unix://" + sock}, nil
}

// fileSets reports whether the YAML document data sets the field at path
// (JSON names joined by dots, such as "local.keysetPath", matched
// ignoring case as config.Parse does) to something other than null or "".
func fileSets(data []byte, path string) bool {
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return false
	}
	v := json.RawMessage(js)
	for _, name := range strings.Split(path, ".") {
		var obj map[string]json.RawMessage
		if err := json.Unmarshal(v, &obj); err != nil {
			return false
		}
		sub, ok := obj[name]
		for k, kv := range obj {
			if !ok && strings.EqualFold(k, name) {
				sub, ok = kv, true
			}
		}
		if !ok {
			return false
		}
		v = sub
	}
	s := string(bytes.TrimSpace(v))
	return s != "null" && s != `""`
}

// kms returns our provider entry.
func (i *Installer) kms(ps pluginSettings) kmsProvider {
	return kmsProvider{name: i.cfg.ProviderName, endpoint: ps.endpoint, timeout: i.cfg.Timeout.String()}
}
