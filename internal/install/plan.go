package install

import (
	"fmt"
	"io/fs"
	"path/filepath"
)

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
	notes = append(notes, "objects written before encryption stay in plaintext until rewritten; once every control-plane node is installed: "+ReencryptCommand(i.cfg.ProviderName, i.cfg.Resources, false))
	return notes
}
