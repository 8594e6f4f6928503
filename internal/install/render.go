package install

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

// managedHeader starts every file the installer renders itself.
const managedHeader = "# Written by `kms-plugin install`: run it again rather than editing this file.\n"

// pluginMount is a host directory (or file) the plugin needs.
type pluginMount struct {
	name     string
	path     string
	readOnly bool
	typ      corev1.HostPathType
	// storeDir marks a directory the key store writes (HostPaths.Write),
	// which the systemd unit must let the plugin write too.
	storeDir bool
}

// pluginMounts lists the host paths the plugin uses: its socket directory,
// its config directory, the directories the key store writes when
// elsewhere, the key store's files (read-only), and the extra mounts
// (read-only).
func pluginMounts(cfg Config, ps pluginSettings) []pluginMount {
	configDir := filepath.Dir(cfg.Paths.PluginConfig)
	mounts := []pluginMount{
		{name: "socket-dir", path: ps.socketDir, typ: corev1.HostPathDirectoryOrCreate},
		{name: "config-dir", path: configDir, typ: corev1.HostPathDirectoryOrCreate},
	}
	for _, d := range ps.paths.Write {
		if !within(d.Path, configDir) {
			mounts = append(mounts, pluginMount{name: d.Name, path: d.Path, typ: corev1.HostPathDirectoryOrCreate, storeDir: true})
		}
	}
	for _, f := range ps.paths.Read {
		mounts = append(mounts, pluginMount{name: f.Name, path: f.Path, readOnly: true, typ: corev1.HostPathFile})
	}
	for n, p := range cfg.ExtraMounts {
		mounts = append(mounts, pluginMount{name: "extra-" + strconv.Itoa(n), path: p, readOnly: true})
	}
	return append(mounts, adminMounts(cfg, ps)...)
}

// adminMounts lists the admin port's credential files, read-only: the
// directory of those install issues (a directory, so that renewed files
// replaced by rename are seen) and the cluster CA certificate alone (never
// its directory, which holds the CA key); or the files the plugin config
// names itself, those outside the config directory and the extra mounts
// (a file mounted alone keeps showing the old file once replaced by
// rename: mounting its directory with ExtraMounts avoids that).
func adminMounts(cfg Config, ps pluginSettings) []pluginMount {
	switch ps.admin {
	case adminIssued:
		return []pluginMount{
			{name: "admin-tls", path: cfg.Paths.AdminDir, readOnly: true, typ: corev1.HostPathDirectory},
			{name: "admin-client-ca", path: cfg.Paths.ClusterCACert, readOnly: true, typ: corev1.HostPathFile},
		}
	case adminOwn:
		var mounts []pluginMount
		var seen []string
		t, a := ps.cfg.HTTPTLS, ps.cfg.HTTPAuth
		for _, f := range []struct{ name, path string }{
			{"admin-cert", t.CertFile}, {"admin-key", t.KeyFile}, {"admin-client-ca", t.ClientCAFile}, {"admin-token", a.TokenFile},
		} {
			covered := slices.ContainsFunc(append([]string{filepath.Dir(cfg.Paths.PluginConfig)}, cfg.ExtraMounts...), func(dir string) bool { return within(f.path, dir) })
			if f.path == "" || covered || slices.Contains(seen, f.path) {
				continue
			}
			seen = append(seen, f.path)
			mounts = append(mounts, pluginMount{name: f.name, path: f.path, readOnly: true, typ: corev1.HostPathFile})
		}
		return mounts
	}
	return nil
}

// within reports whether path is dir or below it.
func within(path, dir string) bool {
	return path == dir || strings.HasPrefix(path, strings.TrimSuffix(dir, "/")+"/")
}

// probeTarget returns where kubelet probes the plugin's HTTP server.
func probeTarget(httpAddr string) (string, int, error) {
	if httpAddr == "" {
		return "", 0, errors.New("plugin config: httpAddr must be set: the static pod's liveness probe uses /livez")
	}
	host, port, err := net.SplitHostPort(httpAddr)
	if err != nil {
		return "", 0, fmt.Errorf("plugin config: httpAddr %q: %w", httpAddr, err)
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return "", 0, fmt.Errorf("plugin config: httpAddr %q: the probe needs a numeric port", httpAddr)
	}
	if ip := net.ParseIP(host); host == "" || host == "localhost" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
	}
	return host, n, nil
}

// renderStaticPod renders the plugin's static pod: host network,
// system-node-critical, the socket and config directories (and keyset,
// credentials) mounted at their host paths, liveness on /livez and
// readiness on /readyz.
func renderStaticPod(cfg Config, ps pluginSettings) ([]byte, error) {
	host, port, err := probeTarget(ps.cfg.HTTPAddr)
	if err != nil {
		return nil, err
	}
	var scheme corev1.URIScheme // HTTP
	if ps.cfg.HTTPTLS.CertFile != "" {
		scheme = corev1.URISchemeHTTPS // kubelet does not check the certificate
	}
	probe := func(path string) corev1.ProbeHandler {
		return corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Host: host, Path: path, Port: intstr.FromInt32(int32(port)), Scheme: scheme}}
	}
	falseVal, trueVal, root := false, true, int64(0)
	pod := corev1.Pod{
		TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{
			Name:      "kms-plugin",
			Namespace: "kube-system",
			Labels:    map[string]string{"component": "kms-plugin", "tier": "control-plane"},
		},
		Spec: corev1.PodSpec{
			HostNetwork:       true,
			PriorityClassName: "system-node-critical",
			SecurityContext: &corev1.PodSecurityContext{
				SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault},
			},
			Containers: []corev1.Container{{
				Name:            "kms-plugin",
				Image:           cfg.Image,
				ImagePullPolicy: corev1.PullIfNotPresent,
				Args:            []string{"serve", "--config=" + cfg.Paths.PluginConfig},
				SecurityContext: &corev1.SecurityContext{
					// Root owns the socket directory and the root-only keyset.
					RunAsUser:                &root,
					AllowPrivilegeEscalation: &falseVal,
					ReadOnlyRootFilesystem:   &trueVal,
					Capabilities: &corev1.Capabilities{
						Drop: []corev1.Capability{"ALL"},
						Add:  []corev1.Capability{"DAC_OVERRIDE", "CHOWN"},
					},
				},
				LivenessProbe: &corev1.Probe{
					ProbeHandler:        probe("/livez"),
					InitialDelaySeconds: 5,
					PeriodSeconds:       10,
					FailureThreshold:    3,
				},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  probe("/readyz"),
					PeriodSeconds: 10,
				},
				Resources: corev1.ResourceRequirements{
					Requests: corev1.ResourceList{
						corev1.ResourceCPU:    resource.MustParse("50m"),
						corev1.ResourceMemory: resource.MustParse("32Mi"),
					},
					Limits: corev1.ResourceList{
						corev1.ResourceMemory: resource.MustParse("256Mi"),
					},
				},
			}},
		},
	}
	c := &pod.Spec.Containers[0]
	for _, m := range pluginMounts(cfg, ps) {
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: m.name, MountPath: m.path, ReadOnly: m.readOnly})
		v := corev1.Volume{Name: m.name, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: m.path}}}
		if m.typ != "" {
			typ := m.typ
			v.HostPath.Type = &typ
		}
		pod.Spec.Volumes = append(pod.Spec.Volumes, v)
	}
	out, err := yaml.Marshal(&pod)
	if err != nil {
		return nil, fmt.Errorf("render static pod: %w", err)
	}
	return append([]byte(managedHeader), out...), nil
}

// runtimeDirectory returns the systemd RuntimeDirectory= name of a socket
// directory directly under /run or /var/run.
func runtimeDirectory(dir string) (string, bool) {
	for _, parent := range []string{"/run", "/var/run"} {
		if filepath.Dir(dir) == parent {
			return filepath.Base(dir), true
		}
	}
	return "", false
}

// renderUnit renders the plugin's systemd unit
// (manifests/kms-plugin.service with the default paths).
func renderUnit(cfg Config, ps pluginSettings) []byte {
	var b bytes.Buffer
	configDir := filepath.Dir(cfg.Paths.PluginConfig)
	rw := []string{configDir}
	for _, m := range pluginMounts(cfg, ps) {
		if m.storeDir {
			rw = append(rw, "-"+m.path)
		}
	}
	rw = append(rw, ps.socketDir)
	runtimeDir, _ := runtimeDirectory(ps.socketDir)
	fmt.Fprintf(&b, `# %s: kms-plugin as a systemd service, as
# kms-plugin install --mode systemd writes it. kube-apiserver reaches the
# plugin on its socket in %s.
[Unit]
Description=kms-plugin: Kubernetes KMS v2 encryption plugin
Documentation=https://github.com/kms-plugin/kms-plugin
Before=kubelet.service
After=network-online.target

[Service]
Type=simple
ExecStart=%s serve --config=%s
Restart=always
RestartSec=2
# SIGTERM drains in-flight calls and removes the socket.
KillSignal=SIGTERM
TimeoutStopSec=20
RuntimeDirectory=%s
RuntimeDirectoryMode=0750
RuntimeDirectoryPreserve=yes
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths=%s
ProtectHome=yes
PrivateTmp=yes
UMask=0077

[Install]
WantedBy=multi-user.target
`, cfg.Paths.SystemdUnit, ps.socketDir, cfg.Binary, cfg.Paths.PluginConfig, runtimeDir, strings.Join(rw, " "))
	return b.Bytes()
}
