package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// HAConfig configures a control plane of several nodes on one machine.
type HAConfig struct {
	PluginBinary, KubeAPIServerBinary, EtcdBinary string

	// Dir holds all state and logs; it must exist and be short (the plugin
	// sockets live in it).
	Dir string
	// Nodes is the number of control-plane nodes, each with one kms-plugin
	// and one kube-apiserver; zero means 3.
	Nodes int
	// EtcdMembers is the size of the etcd cluster; zero means Nodes.
	EtcdMembers int
	// ProviderName is the KMS provider name in the EncryptionConfiguration;
	// empty means "kms-plugin" (the rotation commands' default).
	ProviderName string
	// Resources are the resources the EncryptionConfiguration encrypts;
	// empty means secrets.
	Resources []string
	// KMSTimeout is the provider's timeout; zero means 3s.
	KMSTimeout time.Duration
	// PluginArgs and PluginEnv are given to every node's plugin (see
	// PluginConfig); empty PluginArgs means the local keyset, one per node.
	PluginArgs, PluginEnv []string
	// LocalKeyset, when set, is a keyset file copied to every node's keyset
	// path before its plugin starts: per-node copies of one key material,
	// as a multi-node control plane with the local provider needs (else
	// each plugin creates a keyset of its own, and no node reads what
	// another wrote).
	LocalKeyset string
	// PluginPollInterval is the plugins' --provider-poll-interval; zero
	// means 1s.
	PluginPollInterval time.Duration
	// AdminTLS makes every plugin's admin port serve HTTPS and admit only
	// the client certificate or the token of HA.AdminPKI: rotate, status
	// and verify must present one (RotateArgs and VerifyArgs do).
	AdminTLS bool
	// StartTimeout bounds the whole start; zero means 6 minutes.
	StartTimeout time.Duration
}

// Node is one control-plane node: a plugin and the kube-apiserver that uses
// it over its own socket.
type Node struct {
	Name string
	Dir  string

	Plugin    *Plugin
	APIServer *APIServer
	// Client talks to this node's kube-apiserver.
	Client kubernetes.Interface
	// EncryptionConfig is the node's EncryptionConfiguration file.
	EncryptionConfig string
}

// HA is a running control plane: an etcd cluster over TLS and, per node, a
// kms-plugin and a kube-apiserver that talks to every etcd member. The
// kube-apiservers share their serving certificate, admin token and
// service-account keys, as the nodes of a kubeadm cluster share a CA.
type HA struct {
	Dir          string
	ProviderName string
	Resources    []string

	Etcd  *EtcdCluster
	Nodes []*Node

	// Client talks to node 0's kube-apiserver.
	Client kubernetes.Interface
	// EtcdClient reads the etcd cluster with its client certificate.
	EtcdClient *clientv3.Client
	// Kubeconfig is a kubeconfig file for node 0's kube-apiserver with the
	// admin token (system:masters).
	Kubeconfig string
	// AdminPKI is the plugins' admin port TLS and credentials, with
	// HAConfig.AdminTLS; else nil.
	AdminPKI *AdminPKI
}

// StartHA starts the etcd cluster, then the plugins, then the
// kube-apiservers (each group at once), and waits until each is ready. On
// error, whatever started is stopped again and the error carries the
// processes' log tails.
func StartHA(ctx context.Context, cfg HAConfig) (h *HA, err error) {
	if cfg.PluginBinary == "" || cfg.KubeAPIServerBinary == "" || cfg.EtcdBinary == "" || cfg.Dir == "" {
		return nil, errors.New("ha: PluginBinary, KubeAPIServerBinary, EtcdBinary and Dir are required")
	}
	if cfg.Nodes == 0 {
		cfg.Nodes = 3
	}
	if cfg.EtcdMembers == 0 {
		cfg.EtcdMembers = cfg.Nodes
	}
	if cfg.ProviderName == "" {
		cfg.ProviderName = "kms-plugin"
	}
	if len(cfg.Resources) == 0 {
		cfg.Resources = []string{"secrets"}
	}
	if cfg.KMSTimeout == 0 {
		cfg.KMSTimeout = 3 * time.Second
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 6 * time.Minute
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.StartTimeout)
	defer cancel()
	started := time.Now()
	stage := "etcd"
	h = &HA{Dir: cfg.Dir, ProviderName: cfg.ProviderName, Resources: cfg.Resources}
	defer func() {
		if err != nil {
			err = fmt.Errorf("ha: start %s (%v after the start): %w\n%s", stage, time.Since(started).Round(time.Millisecond), err, h.LogTails(40))
			_ = h.Close()
			h = nil
		}
	}()

	h.Etcd, err = NewEtcdCluster(EtcdClusterConfig{Binary: cfg.EtcdBinary, Dir: filepath.Join(cfg.Dir, "etcd"), Members: cfg.EtcdMembers})
	if err != nil {
		return h, err
	}
	if err = h.Etcd.Start(ctx); err != nil {
		return h, err
	}
	if h.EtcdClient, err = h.Etcd.NewClient(); err != nil {
		return h, err
	}

	stage = "plugins"
	if cfg.AdminTLS {
		if h.AdminPKI, err = WriteAdminPKI(filepath.Join(cfg.Dir, "admin-pki")); err != nil {
			return h, err
		}
	}
	for i := range cfg.Nodes {
		n := &Node{Name: fmt.Sprintf("node-%d", i), Dir: filepath.Join(cfg.Dir, fmt.Sprintf("n%d", i))}
		if err = os.MkdirAll(n.Dir, 0o700); err != nil {
			return h, err
		}
		n.Plugin, err = NewPlugin(PluginConfig{
			Binary: cfg.PluginBinary, Dir: n.Dir, PollInterval: cfg.PluginPollInterval,
			Args: cfg.PluginArgs, Env: cfg.PluginEnv, Admin: h.AdminPKI,
		})
		if err != nil {
			return h, err
		}
		n.Plugin.proc.Name = "kms-plugin@" + n.Name
		if cfg.LocalKeyset != "" {
			if err = copyFile(cfg.LocalKeyset, n.Plugin.Keyset); err != nil {
				return h, err
			}
		}
		h.Nodes = append(h.Nodes, n)
	}
	if err = h.each(func(n *Node) error { return n.Plugin.Start(ctx) }); err != nil {
		return h, err
	}

	stage = "kube-apiservers"
	creds, err := newAPIServerCreds()
	if err != nil {
		return h, err
	}
	for _, n := range h.Nodes {
		n.EncryptionConfig = filepath.Join(n.Dir, "encryption-config.yaml")
		if err = WriteEncryptionConfigFor(n.EncryptionConfig, cfg.Resources, cfg.ProviderName, n.Plugin.Endpoint(), cfg.KMSTimeout); err != nil {
			return h, err
		}
		if n.APIServer, err = newHAAPIServer(cfg.KubeAPIServerBinary, n, creds, h.Etcd); err != nil {
			return h, err
		}
	}
	if err = h.each(func(n *Node) error { return n.APIServer.Start(ctx) }); err != nil {
		return h, err
	}
	for _, n := range h.Nodes {
		if n.Client, err = kubernetes.NewForConfig(n.APIServer.RestConfig()); err != nil {
			return h, err
		}
	}
	h.Client = h.Nodes[0].Client
	h.Kubeconfig = filepath.Join(cfg.Dir, "admin.kubeconfig")
	if err = WriteKubeconfig(h.Kubeconfig, h.Nodes[0].APIServer); err != nil {
		return h, err
	}
	// A real control plane's kubelets register their Nodes; the harness
	// runs none, so it registers them, labelled as the control plane.
	stage = "nodes"
	var names []string
	for _, n := range h.Nodes {
		names = append(names, n.Name)
	}
	if err = RegisterControlPlaneNodes(ctx, h.Client, names...); err != nil {
		return h, err
	}
	return h, nil
}

// each runs f for every node at once and joins the errors.
func (h *HA) each(f func(n *Node) error) error {
	errs := make([]error, len(h.Nodes))
	var wg sync.WaitGroup
	for i, n := range h.Nodes {
		wg.Go(func() {
			if err := f(n); err != nil {
				errs[i] = fmt.Errorf("%s: %w", n.Name, err)
			}
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// Close stops the kube-apiservers, the plugins and etcd, in that order.
func (h *HA) Close() error {
	var errs []error
	errs = append(errs, h.each(func(n *Node) error {
		if n.APIServer == nil {
			return nil
		}
		return n.APIServer.Stop()
	}))
	errs = append(errs, h.each(func(n *Node) error {
		if n.Plugin == nil {
			return nil
		}
		return n.Plugin.Stop()
	}))
	if h.EtcdClient != nil {
		errs = append(errs, h.EtcdClient.Close())
	}
	if h.Etcd != nil {
		errs = append(errs, h.Etcd.Stop())
	}
	return errors.Join(errs...)
}

// PluginEndpoints are the plugins' status URLs, http://127.0.0.1:port
// (https with HAConfig.AdminTLS), for --plugin-endpoints.
func (h *HA) PluginEndpoints() []string {
	var out []string
	for _, n := range h.Nodes {
		out = append(out, n.Plugin.URL())
	}
	return out
}

// PluginCertArgs are the flags that present the plugins' client
// certificate (AdminPKI.CertArgs), or none without HAConfig.AdminTLS.
func (h *HA) PluginCertArgs() []string {
	if h.AdminPKI == nil {
		return nil
	}
	return h.AdminPKI.CertArgs()
}

// PluginTokenArgs are the flags that present the plugins' token
// (AdminPKI.TokenArgs), or none without HAConfig.AdminTLS.
func (h *HA) PluginTokenArgs() []string {
	if h.AdminPKI == nil {
		return nil
	}
	return h.AdminPKI.TokenArgs()
}

// APIServerEndpoints are the kube-apiservers' URLs, for
// --apiserver-endpoints.
func (h *HA) APIServerEndpoints() []string {
	var out []string
	for _, n := range h.Nodes {
		out = append(out, n.APIServer.URL)
	}
	return out
}

// EtcdArgs are the flags that let the rotation commands read etcd as a
// control-plane node does: --etcd-endpoints and the client certificate.
func (h *HA) EtcdArgs() []string {
	return []string{
		"--etcd-endpoints", h.Etcd.Endpoints(),
		"--etcd-cacert", h.Etcd.Client.CAFile,
		"--etcd-cert", h.Etcd.Client.CertFile,
		"--etcd-key", h.Etcd.Client.KeyFile,
	}
}

// ProbeReadyz asks every kube-apiserver for /readyz every interval until
// the returned stop is called, as the kubelet's readiness probe does on a
// real node. kube-apiserver calls the plugins' Status on such a probe when
// its cached result is older than 20 s, so it notices a new key_id within
// about 20 s instead of its one-minute poll.
func (h *HA) ProbeReadyz(interval time.Duration) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			for _, n := range h.Nodes {
				if n.APIServer.proc.Running() {
					rctx, rcancel := context.WithTimeout(ctx, 10*time.Second)
					_, _, _ = n.APIServer.Get(rctx, "/readyz")
					rcancel()
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(interval):
			}
		}
	}()
	return func() { cancel(); <-done }
}

// LogTails returns the last n lines of every process's log.
func (h *HA) LogTails(n int) string {
	var procs []*Process
	if h.Etcd != nil {
		procs = append(procs, h.Etcd.members...)
	}
	for _, node := range h.Nodes {
		if node.Plugin != nil {
			procs = append(procs, node.Plugin.proc)
		}
		if node.APIServer != nil {
			procs = append(procs, node.APIServer.proc)
		}
	}
	var b strings.Builder
	for _, p := range procs {
		if _, err := os.Stat(p.LogPath); err != nil {
			continue
		}
		fmt.Fprintf(&b, "----- %s (%s), last %d lines -----\n%s\n", p.Name, p.LogPath, n, p.LogTail(n))
	}
	return b.String()
}

// newHAAPIServer prepares node n's kube-apiserver: the flags of
// NewAPIServer, every etcd member over TLS, and the shared credentials.
func newHAAPIServer(binary string, n *Node, creds *apiServerCreds, etcd *EtcdCluster) (*APIServer, error) {
	a, port, err := creds.prepare(n.Dir)
	if err != nil {
		return nil, err
	}
	a.proc = &Process{
		Name:    "kube-apiserver@" + n.Name,
		Path:    binary,
		LogPath: filepath.Join(n.Dir, "kube-apiserver.log"),
		Args: apiServerArgs(n.Dir, port, []string{
			"--etcd-servers=" + etcd.Endpoints(),
			"--etcd-cafile=" + etcd.Client.CAFile,
			"--etcd-certfile=" + etcd.Client.CertFile,
			"--etcd-keyfile=" + etcd.Client.KeyFile,
		}, n.EncryptionConfig),
	}
	return a, nil
}

// WriteKubeconfig writes a kubeconfig for a's URL, CA and admin token.
func WriteKubeconfig(path string, a *APIServer) error {
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["e2e"] = &clientcmdapi.Cluster{Server: a.URL, CertificateAuthorityData: a.CA}
	cfg.AuthInfos["e2e-admin"] = &clientcmdapi.AuthInfo{Token: a.Token}
	cfg.Contexts["e2e"] = &clientcmdapi.Context{Cluster: "e2e", AuthInfo: "e2e-admin"}
	cfg.CurrentContext = "e2e"
	return clientcmd.WriteToFile(*cfg, path)
}

// WriteEncryptionConfigFor writes an EncryptionConfiguration that encrypts
// resources with one KMS v2 provider, and nothing else, to path.
func WriteEncryptionConfigFor(path string, resources []string, providerName, endpoint string, timeout time.Duration) error {
	var b strings.Builder
	b.WriteString("apiVersion: apiserver.config.k8s.io/v1\nkind: EncryptionConfiguration\nresources:\n  - resources:\n")
	for _, r := range resources {
		fmt.Fprintf(&b, "      - %s\n", r)
	}
	fmt.Fprintf(&b, "    providers:\n      - kms:\n          apiVersion: v2\n          name: %s\n          endpoint: %s\n          timeout: %s\n", providerName, endpoint, timeout)
	return os.WriteFile(path, []byte(b.String()), 0o600)
}

// copyFile copies src to dst with mode 0600.
func copyFile(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, data, 0o600)
}
