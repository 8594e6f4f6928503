// Package cluster runs a one-node Kubernetes control plane for the e2e tests
// from real binaries on loopback: etcd, kms-plugin serve and kube-apiserver
// configured to encrypt Secrets with the plugin over KMS v2. It also holds the
// pieces the integration tests share: the plugin process, free ports, the
// EncryptionConfiguration and the decoding of stored values.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	kmstypes "k8s.io/apiserver/pkg/storage/value/encrypt/envelope/kmsv2/v2"
	"k8s.io/client-go/kubernetes"
)

// Config configures a cluster.
type Config struct {
	PluginBinary, KubeAPIServerBinary, EtcdBinary string

	// Dir holds all state and logs; it must exist and be short (the plugin
	// socket lives in it).
	Dir string
	// ProviderName is the KMS provider name in the EncryptionConfiguration;
	// empty means "kms-plugin-e2e".
	ProviderName string
	// KMSTimeout is the provider's timeout; zero means 3s.
	KMSTimeout time.Duration
	// PluginArgs and PluginEnv are passed to the plugin (PluginConfig.Args
	// and Env), for a provider other than the local keyset.
	PluginArgs, PluginEnv []string
}

// Cluster is a running etcd, kms-plugin and kube-apiserver.
type Cluster struct {
	Dir          string
	ProviderName string

	Etcd      *Etcd
	Plugin    *Plugin
	APIServer *APIServer

	Client     kubernetes.Interface
	EtcdClient *clientv3.Client
}

// Start starts etcd, the plugin and kube-apiserver, in that order, and
// waits until each is ready. On error, whatever started is stopped again.
func Start(ctx context.Context, cfg Config) (c *Cluster, err error) {
	if cfg.ProviderName == "" {
		cfg.ProviderName = "kms-plugin-e2e"
	}
	if cfg.KMSTimeout == 0 {
		cfg.KMSTimeout = 3 * time.Second
	}
	c = &Cluster{Dir: cfg.Dir, ProviderName: cfg.ProviderName}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w\n%s", err, c.LogTails(40))
			_ = c.Close()
			c = nil
		}
	}()

	if c.Etcd, err = NewEtcd(cfg.EtcdBinary, cfg.Dir); err != nil {
		return c, err
	}
	if err = c.Etcd.Start(ctx); err != nil {
		return c, err
	}
	c.EtcdClient, err = clientv3.New(clientv3.Config{
		Endpoints:   []string{c.Etcd.ClientURL},
		DialTimeout: 10 * time.Second,
	})
	if err != nil {
		return c, fmt.Errorf("etcd client: %w", err)
	}

	if c.Plugin, err = NewPlugin(PluginConfig{Binary: cfg.PluginBinary, Dir: cfg.Dir, Args: cfg.PluginArgs, Env: cfg.PluginEnv}); err != nil {
		return c, err
	}
	if err = c.Plugin.Start(ctx); err != nil {
		return c, err
	}

	encConfig := filepath.Join(cfg.Dir, "encryption-config.yaml")
	if err = WriteEncryptionConfig(encConfig, cfg.ProviderName, c.Plugin.Endpoint(), cfg.KMSTimeout); err != nil {
		return c, err
	}
	c.APIServer, err = NewAPIServer(APIServerConfig{
		Binary:                 cfg.KubeAPIServerBinary,
		Dir:                    cfg.Dir,
		EtcdURL:                c.Etcd.ClientURL,
		EncryptionProviderFile: encConfig,
	})
	if err != nil {
		return c, err
	}
	if err = c.APIServer.Start(ctx); err != nil {
		return c, err
	}
	if c.Client, err = kubernetes.NewForConfig(c.APIServer.RestConfig()); err != nil {
		return c, err
	}
	return c, nil
}

// Close stops kube-apiserver, the plugin and etcd, in that order.
func (c *Cluster) Close() error {
	var errs []error
	if c.APIServer != nil {
		errs = append(errs, c.APIServer.Stop())
	}
	if c.Plugin != nil {
		errs = append(errs, c.Plugin.Stop())
	}
	if c.EtcdClient != nil {
		errs = append(errs, c.EtcdClient.Close())
	}
	if c.Etcd != nil {
		errs = append(errs, c.Etcd.Stop())
	}
	return errors.Join(errs...)
}

// SecretKey is the etcd key kube-apiserver stores a Secret under.
func SecretKey(namespace, name string) string {
	return "/registry/secrets/" + namespace + "/" + name
}

// RawSecret reads the value stored in etcd for a Secret.
func (c *Cluster) RawSecret(ctx context.Context, namespace, name string) ([]byte, error) {
	key := SecretKey(namespace, name)
	resp, err := c.EtcdClient.Get(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("etcd get %s: %w", key, err)
	}
	if len(resp.Kvs) != 1 {
		return nil, fmt.Errorf("etcd get %s: %d values, want 1", key, len(resp.Kvs))
	}
	return resp.Kvs[0].Value, nil
}

// StoredSecret reads a Secret's value from etcd and decodes it as a KMS v2
// EncryptedObject of the cluster's provider.
func (c *Cluster) StoredSecret(ctx context.Context, namespace, name string) (*kmstypes.EncryptedObject, error) {
	raw, err := c.RawSecret(ctx, namespace, name)
	if err != nil {
		return nil, err
	}
	obj, err := DecodeStored(raw, c.ProviderName)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", SecretKey(namespace, name), err)
	}
	return obj, nil
}

// LogTails returns the last n lines of every process's log.
func (c *Cluster) LogTails(n int) string {
	var procs []*Process
	if c.Etcd != nil {
		procs = append(procs, c.Etcd.Process())
	}
	if c.Plugin != nil {
		procs = append(procs, c.Plugin.Process())
	}
	if c.APIServer != nil {
		procs = append(procs, c.APIServer.Process())
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
