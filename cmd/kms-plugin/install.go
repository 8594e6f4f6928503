//go:build !serveonly

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/install"
)

// listFlag is a comma-separated or repeated string flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	for _, v := range strings.Split(s, ",") {
		if v = strings.TrimSpace(v); v != "" {
			*l = append(*l, v)
		}
	}
	return nil
}

// nodeFlags are the flags install and uninstall share: where the node's
// files are and how the provider is named.
type nodeFlags struct {
	root         string
	dryRun       bool
	paths        install.Paths
	providerName string
	skipAPI      bool
	keepBackups  int
}

// keep returns install.Config.KeepBackups for --keep-backups.
func (n *nodeFlags) keep() (int, error) {
	switch {
	case n.keepBackups < 0:
		return 0, fmt.Errorf("--keep-backups: %d is negative (0 keeps every backup)", n.keepBackups)
	case n.keepBackups == 0:
		return -1, nil
	}
	return n.keepBackups, nil
}

func addNodeFlags(fs *flag.FlagSet) *nodeFlags {
	def := install.DefaultPaths()
	n := &nodeFlags{}
	fs.StringVar(&n.root, "root", "/", "the node's root directory; every path below is under it")
	fs.BoolVar(&n.dryRun, "dry-run", false, "print the changes as a unified diff and change nothing")
	fs.StringVar(&n.paths.PluginConfig, "plugin-config", def.PluginConfig, "where the plugin's config is installed")
	fs.StringVar(&n.paths.StaticPod, "static-pod-manifest", def.StaticPod, "the plugin's static pod manifest (mode static-pod)")
	fs.StringVar(&n.paths.SystemdUnit, "systemd-unit", def.SystemdUnit, "the plugin's systemd unit (mode systemd)")
	fs.StringVar(&n.paths.EncryptionConfig, "encryption-config", def.EncryptionConfig, "kube-apiserver's EncryptionConfiguration")
	fs.StringVar(&n.paths.KubeAPIServer, "kube-apiserver-manifest", def.KubeAPIServer, "kube-apiserver's static pod manifest, patched in place")
	fs.StringVar(&n.paths.BackupDir, "backup-dir", def.BackupDir, "directory for timestamped backups of replaced files (sensitive: they can hold keys)")
	fs.IntVar(&n.keepBackups, "keep-backups", install.DefaultKeepBackups, "how many backups to keep in --backup-dir, the newest; 0 keeps every one")
	fs.StringVar(&n.providerName, "provider-name", install.DefaultProviderName, "name of the kms provider in the EncryptionConfiguration (part of every stored object's prefix)")
	fs.BoolVar(&n.skipAPI, "skip-kube-apiserver", false, "leave kube-apiserver's manifest alone (kubeadm's ClusterConfiguration carries the flags and mounts)")
	return n
}

// checkRoot fails unless --root is a directory.
func (n *nodeFlags) checkRoot() error {
	if info, err := os.Stat(n.root); err != nil || !info.IsDir() {
		return fmt.Errorf("--root %s is not a directory", n.root)
	}
	return nil
}

func runInstall(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kms-plugin install", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: kms-plugin install [FLAGS]

Installs kms-plugin on this control-plane node: the plugin's config, its
static pod (or systemd unit), the EncryptionConfiguration with the plugin's
kms v2 provider first, and kube-apiserver's flags and mounts. Running it
again changes nothing; --dry-run shows the diff.

`)
		fs.PrintDefaults()
	}
	node := addNodeFlags(fs)
	mode := fs.String("mode", string(install.ModeStaticPod), "how the plugin runs: static-pod or systemd")
	configFile := fs.String("config", "", "plugin config file to install (default: keep the installed one, else manifests/config.yaml)")
	image := fs.String("image", "kms-plugin:"+version, "the plugin's container image (mode static-pod)")
	binary := fs.String("binary", install.DefaultBinary, "the plugin binary on the node (mode systemd)")
	timeout := fs.Duration("kms-timeout", install.DefaultTimeout, "kube-apiserver's timeout for calls to the plugin")
	resources := listFlag{}
	fs.Var(&resources, "resources", "resources to encrypt, comma-separated (default secrets)")
	mounts := listFlag{}
	fs.Var(&mounts, "mount", "host path mounted read-only into the plugin's pod, such as a key store credential (repeatable)")
	def := install.DefaultPaths()
	fs.StringVar(&node.paths.ClusterCACert, "admin-ca-cert", def.ClusterCACert, "cluster CA certificate, under --root: signs the admin port's certificates when httpAddr is not loopback, and is its client CA")
	fs.StringVar(&node.paths.ClusterCAKey, "admin-ca-key", def.ClusterCAKey, "cluster CA key, under --root (only read)")
	adminIPs := listFlag{}
	fs.Var(&adminIPs, "admin-ip", "this node's address for the admin port's serving certificate, comma-separated or repeated (default: httpAddr's)")
	hostname, _ := os.Hostname()
	adminHostname := fs.String("admin-hostname", strings.ToLower(hostname), "DNS name for the admin port's serving certificate; empty for none")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if err := node.checkRoot(); err != nil {
		return err
	}
	keep, err := node.keep()
	if err != nil {
		return err
	}
	var ips []net.IP
	for _, s := range adminIPs {
		ip := net.ParseIP(s)
		if ip == nil {
			return fmt.Errorf("--admin-ip: %q is not an IP address", s)
		}
		ips = append(ips, ip)
	}

	cfg := install.Config{
		FS:                install.DirFS(node.root),
		Paths:             node.paths,
		Mode:              install.Mode(*mode),
		Image:             *image,
		Binary:            *binary,
		Resources:         resources,
		ProviderName:      node.providerName,
		Timeout:           *timeout,
		SkipKubeAPIServer: node.skipAPI,
		ExtraMounts:       mounts,
		KeepBackups:       keep,
		AdminIPs:          ips,
		AdminHostname:     *adminHostname,
	}
	if *configFile != "" {
		data, err := os.ReadFile(*configFile)
		if err != nil {
			return fmt.Errorf("install: %w", err)
		}
		cfg.PluginConfig = data
	}
	in, err := install.New(cfg)
	if err != nil {
		return err
	}
	plan, err := in.PlanInstall()
	if err != nil {
		return err
	}
	return carryOut(in, plan, node.dryRun, "install", stdout, stderr)
}

func runUninstall(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kms-plugin uninstall", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: kms-plugin uninstall [--finalize [--force]] [FLAGS]

Takes kms-plugin off this control-plane node in two stages that keep every
object readable:

  kms-plugin uninstall             new writes go back to the provider used
                                   before install (identity: plaintext); the
                                   plugin keeps serving reads
  kms-plugin reencrypt --target off-kms
                                   rewrites every object, then checks etcd
                                   that the plugin stores none (resumable)
  kms-plugin uninstall --finalize  checks etcd for objects still encrypted by
                                   the plugin, then removes the provider,
                                   kube-apiserver's flags and mounts, and the plugin

`)
		fs.PrintDefaults()
	}
	node := addNodeFlags(fs)
	finalize := fs.Bool("finalize", false, "last stage: remove the provider and the plugin once etcd holds nothing they encrypted")
	force := fs.Bool("force", false, "with --finalize: skip the checks; objects still encrypted become unreadable")
	endpoints := listFlag{}
	fs.Var(&endpoints, "etcd-endpoints", "etcd client URLs, comma-separated (default https://127.0.0.1:2379)")
	// The same flag names as rotate and verify; kube-apiserver's names
	// (--etcd-cafile, --etcd-certfile, --etcd-keyfile) are accepted too.
	caFile, certFile, keyFile := new(string), new(string), new(string)
	for _, f := range []struct {
		p              *string
		name, alias, v string
		usage          string
	}{
		{caFile, "etcd-cacert", "etcd-cafile", "/etc/kubernetes/pki/etcd/ca.crt", "etcd CA, under --root"},
		{certFile, "etcd-cert", "etcd-certfile", "/etc/kubernetes/pki/apiserver-etcd-client.crt", "etcd client certificate, under --root"},
		{keyFile, "etcd-key", "etcd-keyfile", "/etc/kubernetes/pki/apiserver-etcd-client.key", "etcd client key, under --root"},
	} {
		fs.StringVar(f.p, f.name, f.v, f.usage)
		fs.StringVar(f.p, f.alias, f.v, "same as --"+f.name)
	}
	etcdTimeout := fs.Duration("etcd-timeout", 2*time.Minute, "how long the etcd check may take")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if len(endpoints) == 0 {
		endpoints = listFlag{"https://127.0.0.1:2379"}
	}
	if err := node.checkRoot(); err != nil {
		return err
	}
	keep, err := node.keep()
	if err != nil {
		return err
	}

	in, err := install.New(install.Config{
		FS:                install.DirFS(node.root),
		Paths:             node.paths,
		ProviderName:      node.providerName,
		SkipKubeAPIServer: node.skipAPI,
		Mode:              install.ModeSystemd, // no image needed to take it off
		KeepBackups:       keep,
	})
	if err != nil {
		return err
	}
	etcd := &lazyEtcd{cfg: etcdscan.Config{
		Endpoints: endpoints,
		CAFile:    filepath.Join(node.root, *caFile),
		CertFile:  filepath.Join(node.root, *certFile),
		KeyFile:   filepath.Join(node.root, *keyFile),
	}}
	defer etcd.close()
	ctx, cancel := context.WithTimeout(ctx, *etcdTimeout)
	defer cancel()
	opts := install.UninstallOptions{Finalize: *finalize, Force: *force, Storage: etcd}
	plan, err := in.PlanUninstall(ctx, opts)
	if err != nil {
		return err
	}
	return carryOut(in, plan, node.dryRun, "uninstall", stdout, stderr)
}

// lazyEtcd connects to etcd when uninstall first needs it.
type lazyEtcd struct {
	cfg     etcdscan.Config
	etcd    *etcdscan.Etcd
	scanner *etcdscan.Scanner
}

// FindPrefixed implements install.StorageScanner.
func (l *lazyEtcd) FindPrefixed(ctx context.Context, keyPrefixes []string, valuePrefix []byte, limit int) ([]string, int, error) {
	if l.scanner == nil {
		etcd, err := etcdscan.Dial(l.cfg)
		if err != nil {
			return nil, 0, err
		}
		l.etcd, l.scanner = etcd, etcdscan.New(etcd, 0)
	}
	return l.scanner.FindPrefixed(ctx, keyPrefixes, valuePrefix, limit)
}

func (l *lazyEtcd) close() {
	if l.etcd != nil {
		l.etcd.Close()
	}
}

// carryOut prints or applies a plan, then its notes.
func carryOut(in *install.Installer, plan *install.Plan, dryRun bool, op string, stdout, stderr io.Writer) error {
	if dryRun {
		if plan.Empty() {
			fmt.Fprintf(stderr, "%s: no changes\n", op)
		}
		stdout.Write(plan.Diff()) //nolint:errcheck // nothing to do about a failed write to stdout
		printNotes(stderr, plan.Notes)
		return nil
	}
	if plan.Empty() {
		fmt.Fprintf(stdout, "%s: no changes: the node is already as wanted\n", op)
		return nil
	}
	res, err := in.Apply(plan)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	for _, p := range res.Written {
		fmt.Fprintf(stdout, "%s: wrote %s\n", op, p)
	}
	for _, p := range res.Removed {
		fmt.Fprintf(stdout, "%s: removed %s\n", op, p)
	}
	if res.BackupDir != "" {
		fmt.Fprintf(stdout, "%s: previous files backed up in %s\n", op, res.BackupDir)
	}
	if len(res.Pruned) > 0 {
		fmt.Fprintf(stdout, "%s: removed %d older backups (--keep-backups)\n", op, len(res.Pruned))
	}
	if res.PruneErr != nil {
		fmt.Fprintf(stderr, "%s: warning: %v\n", op, res.PruneErr)
	}
	printNotes(stdout, plan.Notes)
	return nil
}

func printNotes(w io.Writer, notes []string) {
	if len(notes) == 0 {
		return
	}
	fmt.Fprintln(w, "next:")
	for _, n := range notes {
		fmt.Fprintf(w, "  - %s\n", n)
	}
}
