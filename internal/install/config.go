package install

import (
	"net"
	"time"
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
