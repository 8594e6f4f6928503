//go:build !serveonly

package main

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
	"github.com/kms-plugin/kms-plugin/internal/install"
	"github.com/kms-plugin/kms-plugin/internal/rotation"
)

// restConfig builds the client configuration: --kubeconfig when given, else
// the in-cluster service account, else $KUBECONFIG or ~/.kube/config.
func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		if cfg, err := rest.InClusterConfig(); err == nil {
			return cfg, nil
		}
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if kubeconfig != "" {
		rules.ExplicitPath = kubeconfig
	}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("no cluster to talk to: not in a cluster, and kubeconfig: %w (use --kubeconfig)", err)
	}
	return cfg, nil
}

// pluginTimeout bounds each request to a plugin's admin port.
const pluginTimeout = 5 * time.Second

// pluginFlags are the credentials rotate, status and verify present to the
// plugins' admin ports (internal/adminauth), when those serve HTTPS with
// client certificates or a bearer token.
type pluginFlags struct {
	caFile, certFile, keyFile, serverName, tokenFile *string
}

func addPluginFlags(fs *flag.FlagSet) *pluginFlags {
	return &pluginFlags{
		caFile:     fs.String("plugin-ca-file", "", "CA certificate (PEM) of the plugins' admin serving certificates: plugins found from the Nodes are asked over https, every https endpoint is verified against it alone"),
		certFile:   fs.String("plugin-cert-file", "", "client certificate (PEM, CommonName kms-plugin-admin) presented to the plugins; needs --plugin-ca-file and --plugin-key-file"),
		keyFile:    fs.String("plugin-key-file", "", "key (PEM) of --plugin-cert-file"),
		serverName: fs.String("plugin-server-name", "", "name the plugins' serving certificates are verified for (default: each endpoint's host, such as the Node's IP)"),
		tokenFile:  fs.String("plugin-token-file", "", "file holding the bearer token the plugins accept; sent only over https verified with --plugin-ca-file, or plain http to loopback"),
	}
}

// client returns the HTTP client that asks the plugins, and the scheme of
// plugin endpoints found from the Nodes: https with a CA file, else http.
func (f *pluginFlags) client() (*http.Client, string, error) {
	hc, err := adminauth.HTTPClient(adminauth.ClientConfig{
		CAFile: *f.caFile, CertFile: *f.certFile, KeyFile: *f.keyFile,
		ServerName: *f.serverName, TokenFile: *f.tokenFile, Timeout: pluginTimeout,
	})
	if err != nil {
		return nil, "", fmt.Errorf("--plugin-ca-file, --plugin-cert-file, --plugin-key-file, --plugin-token-file: %w", err)
	}
	if *f.caFile != "" {
		return hc, "https", nil
	}
	return hc, "http", nil
}

// etcdFlags are the flags that reach etcd, as on a kubeadm control-plane
// node.
type etcdFlags struct {
	endpoints         listFlag
	cacert, cert, key *string
	prefix            *string
	defaultEndpoints  []string
}

func addEtcdFlags(fs *flag.FlagSet, defaultEndpoints []string) *etcdFlags {
	f := &etcdFlags{defaultEndpoints: defaultEndpoints}
	def := "none: no etcd"
	if len(defaultEndpoints) > 0 {
		def = strings.Join(defaultEndpoints, ",")
	}
	fs.Var(&f.endpoints, "etcd-endpoints", "etcd client URLs, comma-separated (default "+def+")")
	f.cacert = fs.String("etcd-cacert", "/etc/kubernetes/pki/etcd/ca.crt", "etcd CA certificate (for https endpoints)")
	f.cert = fs.String("etcd-cert", "/etc/kubernetes/pki/apiserver-etcd-client.crt", "etcd client certificate (for https endpoints)")
	f.key = fs.String("etcd-key", "/etc/kubernetes/pki/apiserver-etcd-client.key", "etcd client key (for https endpoints)")
	f.prefix = fs.String("etcd-prefix", rotation.DefaultEtcdPrefix, "kube-apiserver's --etcd-prefix")
	return f
}

// dial connects to etcd, or returns nil when no endpoint is configured.
func (f *etcdFlags) dial() (*etcdscan.Etcd, error) {
	eps := []string(f.endpoints)
	if len(eps) == 0 {
		eps = f.defaultEndpoints
	}
	if len(eps) == 0 {
		return nil, nil
	}
	return etcdscan.Dial(etcdscan.Config{Endpoints: eps, CAFile: *f.cacert, CertFile: *f.cert, KeyFile: *f.key})
}

// resourceFlags choose the resources and the kms provider's name.
type resourceFlags struct {
	resources        listFlag
	encryptionConfig *string
	providerName     *string
}

func addResourceFlags(fs *flag.FlagSet) *resourceFlags {
	f := &resourceFlags{}
	fs.Var(&f.resources, "resources", "resources, comma-separated (default: those --encryption-config encrypts with --provider-name first, else secrets)")
	f.encryptionConfig = fs.String("encryption-config", "", "kube-apiserver's EncryptionConfiguration, to read the resources from")
	f.providerName = fs.String("provider-name", rotation.DefaultProviderName, "the kms provider's name in the EncryptionConfiguration (values start with k8s:enc:kms:v2:NAME:)")
	return f
}

// list returns the resources: --resources, else from --encryption-config,
// else secrets.
func (f *resourceFlags) list() ([]string, error) {
	if len(f.resources) > 0 {
		return f.resources, nil
	}
	if *f.encryptionConfig == "" {
		return []string{"secrets"}, nil
	}
	data, err := os.ReadFile(*f.encryptionConfig)
	if err != nil {
		return nil, fmt.Errorf("--encryption-config: %w", err)
	}
	rs, err := install.EncryptedResources(data, *f.providerName)
	if err != nil {
		return nil, fmt.Errorf("--encryption-config %s: %w", *f.encryptionConfig, err)
	}
	if len(rs) == 0 {
		return nil, fmt.Errorf("--encryption-config %s: no resource is encrypted with kms provider %q first; check --provider-name or name them with --resources", *f.encryptionConfig, *f.providerName)
	}
	for _, r := range rs {
		if strings.Contains(r, "*") {
			return nil, fmt.Errorf("--encryption-config %s encrypts %q with %s: name the resources with --resources", *f.encryptionConfig, r, *f.providerName)
		}
	}
	return rs, nil
}

// isTerminal reports whether f is a character device, such as a terminal.
func isTerminal(f any) bool {
	file, ok := f.(*os.File)
	if !ok {
		return false
	}
	fi, err := file.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
