package install

import (
	"context"
	"errors"
	"fmt"
	"path"
	"path/filepath"
	"slices"
	"strings"
)

// ErrStillEncrypted is returned by PlanUninstall with Finalize when etcd
// still holds objects stored by the plugin's provider.
var ErrStillEncrypted = errors.New("objects are still encrypted by the kms provider")

// ErrNotDecrypted is returned by PlanUninstall with Finalize when the first
// stage has not run: the plugin's provider still encrypts writes.
var ErrNotDecrypted = errors.New("the kms provider still encrypts new writes")

// StorageScanner finds the objects a kms provider still protects.
// etcdscan.Scanner implements it over etcd.
type StorageScanner interface {
	// FindPrefixed returns how many keys under keyPrefixes hold a value
	// starting with valuePrefix, and up to limit of those keys.
	FindPrefixed(ctx context.Context, keyPrefixes []string, valuePrefix []byte, limit int) (keys []string, total int, err error)
}

// UninstallOptions select the uninstall stage.
type UninstallOptions struct {
	// Finalize runs the last stage: remove the kms provider, kube-apiserver's
	// flags and mounts (when no other provider remains) and the plugin.
	// Without it, the first stage only moves the kms provider out of first
	// place.
	Finalize bool
	// Force skips the checks of the last stage: that the first stage ran
	// and that etcd holds no object stored by the provider. Objects still
	// encrypted then become unreadable.
	Force bool
	// Storage checks etcd in the last stage; required unless Force.
	Storage StorageScanner
}

// ReencryptCommand is the command that rewrites every object of resources
// through kube-apiserver, so that each is stored by the provider now first
// in the EncryptionConfiguration, and then proves it from etcd: toward the
// kms provider providerName (off false: after install), or away from it
// (off true: after uninstall's first stage). It is meant for a
// control-plane node of kubeadm's layout: its admin kubeconfig, its etcd
// and its plugin's admin port on loopback.
func ReencryptCommand(providerName string, resources []string, off bool) string {
	args := []string{"kms-plugin reencrypt"}
	if off {
		args = append(args, "--target off-kms")
	}
	if providerName != "" && providerName != DefaultProviderName {
		args = append(args, "--provider-name "+providerName)
	}
	if len(resources) > 0 {
		args = append(args, "--resources "+strings.Join(resources, ","))
	}
	args = append(args, "--kubeconfig /etc/kubernetes/admin.conf", "--etcd-endpoints https://127.0.0.1:2379")
	if !off {
		args = append(args, "--plugin-endpoints http://127.0.0.1:8787")
	}
	return strings.Join(args, " ")
}

// ValuePrefix is how etcd values stored by kms v2 provider name start.
func ValuePrefix(name string) []byte { return []byte("k8s:enc:kms:v2:" + name + ":") }

// PlanUninstall reads the node and returns what uninstall would change.
//
// Stage one (the default): in every EncryptionConfiguration entry holding
// the plugin's provider, the provider that follows it (what the node wrote
// with before install; identity if none) moves first. New writes stop
// using the plugin; everything it stored stays readable through it.
//
// Stage two (Finalize): refuses while the plugin's provider is still first
// or etcd holds objects it stored (unless Force); then removes it from the
// EncryptionConfiguration (the file, kube-apiserver's flags and mounts go
// too when nothing else remains), the plugin's static pod or unit, and its
// config. The keyset stays: etcd backups taken while encrypted need it.
func (i *Installer) PlanUninstall(ctx context.Context, opts UninstallOptions) (*Plan, error) {
	plan, err := i.planUninstall(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("uninstall: %w", err)
	}
	return plan, nil
}

func (i *Installer) planUninstall(ctx context.Context, opts UninstallOptions) (*Plan, error) {
	paths := i.cfg.Paths
	name := i.cfg.ProviderName
	plan := &Plan{}

	var api *apiserverPod
	var apiChange Change
	etcdPrefix := "/registry"
	if !i.cfg.SkipKubeAPIServer {
		var err error
		if api, apiChange, err = i.readAPIServer(); err != nil {
			return nil, err
		}
		if p := api.flagValue("etcd-prefix"); p != "" {
			etcdPrefix = p
		}
	}

	if !opts.Finalize {
		c, err := i.encryptionChange(func(ec *encryptionConfig) error {
			if len(ec.entriesWithOurs(name)) == 0 {
				return nil
			}
			ec.decryptFirst(name)
			return nil
		})
		if err != nil {
			return nil, err
		}
		if !c.Existed && c.Remove {
			return plan, nil // nothing installed
		}
		plan.add(c)
		resources, err := i.protectedResources()
		if err != nil {
			return nil, err
		}
		plan.Notes = append(plan.Notes,
			"run this stage on every control-plane node; kube-apiserver reloads the EncryptionConfiguration by itself within about a minute (its metric apiserver_encryption_config_controller_automatic_reloads_total counts reloads)",
			"then, once every node reloaded it, rewrite every object the plugin encrypted, so it is stored by the provider now first (resumable; it checks etcd after): "+ReencryptCommand(name, resources, true),
			"then remove the provider and the plugin: kms-plugin uninstall --finalize (it checks etcd first)")
		return plan, nil
	}

	// Stage two: only when nothing depends on the provider any more.
	resources, err := i.protectedResources()
	if err != nil {
		return nil, err
	}
	if !opts.Force && len(resources) > 0 {
		if writes, err := i.writesWithOurs(); err != nil {
			return nil, err
		} else if len(writes) > 0 {
			return nil, fmt.Errorf("%w (%s): run `kms-plugin uninstall` first on every control-plane node, then rewrite the objects", ErrNotDecrypted, strings.Join(writes, ", "))
		}
		if opts.Storage == nil {
			return nil, errors.New("no way to check etcd for objects still encrypted (use --force to skip the check)")
		}
		keys, total, err := opts.Storage.FindPrefixed(ctx, etcdKeyPrefixes(etcdPrefix, resources), ValuePrefix(name), 5)
		if err != nil {
			return nil, fmt.Errorf("check etcd: %w", err)
		}
		if total > 0 {
			return nil, fmt.Errorf("%w: %d objects in etcd, such as %s; rewrite them first (%s) or use --force to make them unreadable",
				ErrStillEncrypted, total, strings.Join(keys, ", "), ReencryptCommand(name, resources, true))
		}
	}

	remaining := true
	ecChange, err := i.encryptionChange(func(ec *encryptionConfig) error {
		remaining = ec.remove(name)
		return nil
	})
	if err != nil {
		return nil, err
	}
	if api != nil {
		// kube-apiserver first: it must stop using the provider before the
		// plugin goes.
		if !remaining {
			if ref, ok := api.flag(flagEncryptionConfig); ok && filepath.Clean(ref.value) == paths.EncryptionConfig {
				api.removeFlag(flagEncryptionConfig)
				api.removeFlag(flagAutomaticReload)
			}
			api.removeVolume(VolumeEncryptionConfig)
		}
		api.removeVolume(VolumeSocket)
		if apiChange.New, err = api.doc.encode(); err != nil {
			return nil, fmt.Errorf("%s: %w", paths.KubeAPIServer, err)
		}
		apiChange.Restyled = api.doc.restyled && string(apiChange.New) != string(apiChange.Old)
		plan.add(apiChange)
	}
	plan.add(ecChange)
	// The admin credentials install issued go too: the client certificate
	// is signed by the cluster CA.
	admin := adminPaths(paths.AdminDir)
	for _, p := range []string{paths.StaticPod, paths.SystemdUnit, paths.PluginConfig, admin.cert, admin.key, admin.clientCert, admin.clientKey} {
		old, perm, ok, err := readOptional(i.cfg.FS, p)
		if err != nil {
			return nil, err
		}
		secret := p == admin.key || p == admin.clientKey
		plan.add(Change{Path: p, Existed: ok, Old: old, OldPerm: perm, Remove: true, Secret: secret})
		if ok && p == paths.SystemdUnit {
			plan.Notes = append(plan.Notes, fmt.Sprintf("stop the plugin: systemctl disable --now %s && systemctl daemon-reload", filepath.Base(p)))
		}
	}
	if !plan.Empty() {
		plan.Notes = append(plan.Notes,
			"the keyset stays where it is: etcd backups taken while encryption was on need it",
			"if kubeadm's ClusterConfiguration carries the kms-plugin extraArgs and extraVolumes, remove them too, or kubeadm upgrade puts them back")
	}
	return plan, nil
}

// protectedResources lists the resources of every entry holding our
// provider (what it may have encrypted), from the EncryptionConfiguration.
func (i *Installer) protectedResources() ([]string, error) {
	ec, err := i.readEncryptionConfig()
	if err != nil || ec == nil {
		return nil, err
	}
	var out []string
	for _, e := range ec.entriesWithOurs(i.cfg.ProviderName) {
		out = append(out, resourcesOf(e)...)
	}
	return out, nil
}

// writesWithOurs lists the resources whose writes our provider encrypts.
func (i *Installer) writesWithOurs() ([]string, error) {
	ec, err := i.readEncryptionConfig()
	if err != nil || ec == nil {
		return nil, err
	}
	return ec.writesWithOurs(i.cfg.ProviderName), nil
}

// readEncryptionConfig parses the EncryptionConfiguration, or returns nil
// when there is none.
func (i *Installer) readEncryptionConfig() (*encryptionConfig, error) {
	path := i.cfg.Paths.EncryptionConfig
	data, _, ok, err := readOptional(i.cfg.FS, path)
	if err != nil || !ok {
		return nil, err
	}
	ec, err := parseEncryptionConfig(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return ec, nil
}

// etcdKeyPrefixes returns the etcd key prefixes under which kube-apiserver
// stores resources: /registry/RESOURCE/ for the core group, and both
// /registry/RESOURCE/ and /registry/GROUP/RESOURCE/ for other groups (built-in
// and custom resources differ). A wildcard scans everything.
func etcdKeyPrefixes(etcdPrefix string, resources []string) []string {
	base := path.Clean("/"+etcdPrefix) + "/"
	var out []string
	for _, r := range resources {
		if strings.Contains(r, "*") {
			return []string{base}
		}
		name, group, _ := strings.Cut(r, ".")
		out = append(out, base+name+"/")
		if group != "" {
			out = append(out, base+group+"/"+name+"/")
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
