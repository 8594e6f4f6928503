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
	"io/fs"
	"net"
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

// Mode is how the plugin runs on the node.
type Mode string

// Modes.
const (
	// ModeStaticPod runs the plugin as a static pod next to kube-apiserver.
	ModeStaticPod Mode = "static-pod"
	// ModeSystemd runs the plugin as a systemd service.
	ModeSystemd Mode = "systemd"
)

// Defaults.
const (
	DefaultProviderName = "kms-plugin"
	DefaultTimeout      = 3 * time.Second
	DefaultBinary       = "/usr/local/bin/kms-plugin"
)

// DefaultResources are the resources encrypted when none are given.
func DefaultResources() []string { return []string{"secrets"} }

// Paths are the host-absolute locations of the files the installer reads
// and writes. Zero fields take the DefaultPaths value.
type Paths struct {
	// PluginConfig is the plugin's config file.
	PluginConfig string
	// StaticPod is the plugin's static pod manifest (ModeStaticPod).
	StaticPod string
	// SystemdUnit is the plugin's unit file (ModeSystemd).
	SystemdUnit string
	// EncryptionConfig is the EncryptionConfiguration for kube-apiserver.
	EncryptionConfig string
	// KubeAPIServer is kube-apiserver's static pod manifest.
	KubeAPIServer string
	// BackupDir receives a timestamped copy of every replaced file. It is
	// outside the manifest directory on purpose: kubelet would run a
	// backed-up manifest.
	BackupDir string
	// AdminDir receives the admin port's certificates and keys that
	// install issues (tls.crt, tls.key, client.crt, client.key) when the
	// plugin's httpAddr is not loopback.
	AdminDir string
	// ClusterCACert and ClusterCAKey are the cluster CA that signs them
	// (kubeadm's); the certificate is also the plugin's client CA. The key
	// is only read.
	ClusterCACert string
	ClusterCAKey  string
}

// DefaultPaths returns the kubeadm layout.
func DefaultPaths() Paths {
	return Paths{
		PluginConfig:     "/etc/kubernetes/kms-plugin/config.yaml",
		StaticPod:        "/etc/kubernetes/manifests/kms-plugin.yaml",
		SystemdUnit:      "/etc/systemd/system/kms-plugin.service",
		EncryptionConfig: "/etc/kubernetes/enc/encryption-config.yaml",
		KubeAPIServer:    "/etc/kubernetes/manifests/kube-apiserver.yaml",
		BackupDir:        "/var/lib/kms-plugin/backup",
		AdminDir:         "/etc/kubernetes/kms-plugin/admin",
		ClusterCACert:    "/etc/kubernetes/pki/ca.crt",
		ClusterCAKey:     "/etc/kubernetes/pki/ca.key",
	}
}

// Config configures an Installer. The zero value installs the default
// plugin config as a static pod (Image is then required) on the node's own
// filesystem.
type Config struct {
	// FS is the node's filesystem; nil means DirFS("/").
	FS FS
	// Now is the clock naming backup directories; nil means time.Now.
	Now func() time.Time
	// Paths locates the files; zero fields take the defaults.
	Paths Paths
	// Mode is how the plugin runs; "" means ModeStaticPod.
	Mode Mode
	// PluginConfig is the plugin config file to install, written as is.
	// Nil keeps the installed one, or installs DefaultPluginConfig() when
	// there is none. It must set endpoint (and, for the local provider,
	// local.keysetPath): the defaults of `kms-plugin serve` depend on the
	// environment it runs in.
	PluginConfig []byte
	// Image is the plugin's container image (ModeStaticPod).
	Image string
	// Binary is the plugin's path on the node (ModeSystemd); "" means
	// DefaultBinary.
	Binary string
	// Resources are the resources to encrypt; nil means DefaultResources.
	Resources []string
	// ProviderName names the kms provider in the EncryptionConfiguration;
	// it is part of every stored object's prefix
	// (k8s:enc:kms:v2:NAME:). "" means DefaultProviderName.
	ProviderName string
	// Timeout is kube-apiserver's timeout for calls to the plugin; 0 means
	// DefaultTimeout.
	Timeout time.Duration
	// SkipKubeAPIServer leaves kube-apiserver's manifest alone, for nodes
	// where kubeadm writes the flags and mounts itself (ClusterConfiguration
	// extraArgs and extraVolumes) and install runs before `kubeadm init`.
	SkipKubeAPIServer bool
	// ExtraMounts are host files or directories (credentials of a key
	// store) mounted read-only at the same path into the plugin's pod.
	ExtraMounts []string
	// KeepBackups is how many backup directories Apply keeps, the newest,
	// counting the one it makes: 0 means DefaultKeepBackups, a negative
	// value keeps every one.
	KeepBackups int
	// AdminIPs are this node's addresses, put in the admin port's serving
	// certificate (with httpAddr's own address and 127.0.0.1) when install
	// issues it. Needed when httpAddr listens on every address.
	AdminIPs []net.IP
	// AdminHostname, when set, is a DNS name in that certificate too; it
	// must then be one (checked only when a certificate is issued).
	AdminHostname string
}

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

// PlanInstall reads the node and returns what install would change. It
// fails, before anything is written, on a missing or unparsable
// kube-apiserver manifest, an EncryptionConfiguration that conflicts with
// ours (another file, another endpoint for our provider name, an unknown
// provider), or an invalid plugin config.
func (i *Installer) PlanInstall() (*Plan, error) {
	plan, err := i.planInstall()
	if err != nil {
		return nil, fmt.Errorf("install: %w", err)
	}
	return plan, nil
}

func (i *Installer) planInstall() (*Plan, error) {
	ps, err := i.pluginConfig()
	if err != nil {
		return nil, err
	}
	paths := i.cfg.Paths
	plan := &Plan{}

	// kube-apiserver first: everything else depends on what it uses.
	var api *apiserverPod
	var apiChange Change
	if !i.cfg.SkipKubeAPIServer {
		if api, apiChange, err = i.readAPIServer(); err != nil {
			return nil, err
		}
	}

	// The admin port's certificates, before the config that names them.
	ps, adminChanges, adminNotes, err := i.adminCredentials(ps)
	if err != nil {
		return nil, err
	}
	for _, c := range adminChanges {
		plan.add(c)
	}

	// The plugin's own files.
	old, oldPerm, ok, err := readOptional(i.cfg.FS, paths.PluginConfig)
	if err != nil {
		return nil, err
	}
	plan.add(Change{Path: paths.PluginConfig, Existed: ok, Old: old, OldPerm: oldPerm, New: ps.raw, Perm: 0o600, Restyled: ps.restyled && ok})

	var unit, pod []byte
	switch i.cfg.Mode {
	case ModeStaticPod:
		if pod, err = renderStaticPod(i.cfg, ps); err != nil {
			return nil, err
		}
	case ModeSystemd:
		if _, ok := runtimeDirectory(ps.socketDir); !ok {
			return nil, fmt.Errorf("mode %s needs the socket directory directly under /run or /var/run (systemd creates it as the RuntimeDirectory), not %s", ModeSystemd, ps.socketDir)
		}
		unit = renderUnit(i.cfg, ps)
	}
	for _, f := range []struct {
		path string
		data []byte
		perm fs.FileMode
	}{{paths.StaticPod, pod, 0o600}, {paths.SystemdUnit, unit, 0o644}} {
		old, oldPerm, ok, err := readOptional(i.cfg.FS, f.path)
		if err != nil {
			return nil, err
		}
		c := Change{Path: f.path, Existed: ok, Old: old, OldPerm: oldPerm, New: f.data, Perm: f.perm}
		if f.data == nil {
			// The other mode's file: two plugins would fight over the socket.
			c.Remove = true
			if ok && f.path == paths.SystemdUnit {
				plan.Notes = append(plan.Notes, fmt.Sprintf("the plugin now runs as a static pod: stop the old service first: systemctl disable --now %s", filepath.Base(f.path)))
			}
		}
		plan.add(c)
	}

	// The EncryptionConfiguration.
	ecChange, err := i.encryptionChange(func(ec *encryptionConfig) error {
		return ec.install(i.kms(ps), i.cfg.Resources)
	})
	if err != nil {
		return nil, err
	}
	plan.add(ecChange)

	// kube-apiserver last: kubelet restarts it as soon as its manifest
	// changes, and everything it needs must be in place by then.
	if api != nil {
		if err := api.setFlag(flagEncryptionConfig, paths.EncryptionConfig); err != nil {
			return nil, fmt.Errorf("%s: %w", paths.KubeAPIServer, err)
		}
		if err := api.setFlag(flagAutomaticReload, "true"); err != nil {
			return nil, fmt.Errorf("%s: %w", paths.KubeAPIServer, err)
		}
		for _, hm := range []hostMount{
			{name: VolumeEncryptionConfig, path: filepath.Dir(paths.EncryptionConfig), readOnly: true},
			{name: VolumeSocket, path: ps.socketDir},
		} {
			if err := api.ensureMount(hm); err != nil {
				return nil, fmt.Errorf("%s: %w", paths.KubeAPIServer, err)
			}
		}
		if apiChange.New, err = api.doc.encode(); err != nil {
			return nil, fmt.Errorf("%s: %w", paths.KubeAPIServer, err)
		}
		apiChange.Restyled = api.doc.restyled && string(apiChange.New) != string(apiChange.Old)
		plan.add(apiChange)
	}

	plan.Notes = append(plan.Notes, adminNotes...)
	plan.Notes = append(plan.Notes, i.installNotes(ps)...)
	return plan, nil
}

// readAPIServer reads and parses kube-apiserver's manifest and checks that
// it uses no EncryptionConfiguration other than ours.
func (i *Installer) readAPIServer() (*apiserverPod, Change, error) {
	path := i.cfg.Paths.KubeAPIServer
	data, perm, ok, err := readOptional(i.cfg.FS, path)
	if err != nil {
		return nil, Change{}, err
	}
	if !ok {
		return nil, Change{}, fmt.Errorf("kube-apiserver manifest %s does not exist (is this a control-plane node set up by kubeadm? use --kube-apiserver-manifest, or --skip-kube-apiserver when kubeadm's ClusterConfiguration carries the flags)", path)
	}
	api, err := parseAPIServer(data)
	if err != nil {
		return nil, Change{}, fmt.Errorf("%s: %w", path, err)
	}
	if cur, ok := api.flag(flagEncryptionConfig); ok && filepath.Clean(cur.value) != i.cfg.Paths.EncryptionConfig {
		return nil, Change{}, fmt.Errorf("%s: kube-apiserver already uses --%s=%s; rerun with --encryption-config=%s to add the kms provider to that file", path, flagEncryptionConfig, cur.value, cur.value)
	}
	return api, Change{Path: path, Existed: true, Old: data, OldPerm: perm, Perm: perm}, nil
}

// encryptionChange reads the EncryptionConfiguration (or starts an empty
// one), applies edit, and returns the change; an edit leaving no entry
// removes the file.
func (i *Installer) encryptionChange(edit func(*encryptionConfig) error) (Change, error) {
	path := i.cfg.Paths.EncryptionConfig
	data, perm, ok, err := readOptional(i.cfg.FS, path)
	if err != nil {
		return Change{}, err
	}
	ec := newEncryptionConfig()
	if ok {
		if ec, err = parseEncryptionConfig(data); err != nil {
			return Change{}, fmt.Errorf("%s: %w", path, err)
		}
	}
	if err := edit(ec); err != nil {
		return Change{}, fmt.Errorf("%s: %w", path, err)
	}
	c := Change{Path: path, Existed: ok, Old: data, OldPerm: perm, Perm: 0o600, Sensitive: true}
	if ok {
		c.Perm = perm
	}
	if len(ec.entries.Content) == 0 {
		c.Remove = true
		return c, nil
	}
	if c.New, err = ec.doc.encode(); err != nil {
		return Change{}, fmt.Errorf("%s: %w", path, err)
	}
	c.Restyled = ec.doc.restyled && ok && string(c.New) != string(c.Old)
	return c, nil
}

func (i *Installer) installNotes(ps pluginSettings) []string {
	var notes []string
	if i.cfg.Mode == ModeSystemd {
		notes = append(notes, fmt.Sprintf("start the plugin: systemctl daemon-reload && systemctl enable --now %s", filepath.Base(i.cfg.Paths.SystemdUnit)))
	}
	for _, path := range ps.paths.PerNode {
		notes = append(notes, fmt.Sprintf("every control-plane node needs the same keyset %s: copy it from the first node before the plugin starts on the others", path))
	}
	if i.cfg.SkipKubeAPIServer {
		notes = append(notes, fmt.Sprintf("kube-apiserver must get --%s=%s, --%s=true and hostPath mounts of %s (read-only) and %s (see manifests/kubeadm-clusterconfiguration.yaml)",
			flagEncryptionConfig, i.cfg.Paths.EncryptionConfig, flagAutomaticReload, filepath.Dir(i.cfg.Paths.EncryptionConfig), ps.socketDir))
	} else {
		notes = append(notes, "kubeadm upgrade rewrites kube-apiserver's manifest from the cluster's ClusterConfiguration: add the same extraArgs and extraVolumes there (manifests/kubeadm-clusterconfiguration.yaml)")
	}
	notes = append(notes, "objects written before encryption stay in plaintext until rewritten; once every control-plane node is installed: "+RewriteCommand(i.cfg.Resources))
	return notes
}
