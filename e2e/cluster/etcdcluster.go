package cluster

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// EtcdClusterConfig configures an etcd cluster on loopback.
type EtcdClusterConfig struct {
	Binary string
	// Dir holds the PKI (Dir/pki), each member's data and log.
	Dir string
	// Members is the number of members; zero means 3.
	Members int
	// StartTimeout bounds the wait for every member to report healthy;
	// zero means 90s.
	StartTimeout time.Duration
}

// EtcdCluster is an etcd cluster of one or more members on loopback, as
// kubeadm runs it: client and peer traffic over TLS with client
// certificate authentication, certificates from a CA of its own.
type EtcdCluster struct {
	// ClientURLs are the members' https://127.0.0.1:port client URLs.
	ClientURLs []string
	// Client is a client certificate (and the CA) accepted by every
	// member: --etcd-cacert/--etcd-cert/--etcd-key of the rotation commands.
	Client TLSFiles

	members []*Process
	http    *http.Client
	timeout time.Duration
}

// NewEtcdCluster writes the PKI, picks free ports and prepares the members;
// Start runs them.
func NewEtcdCluster(cfg EtcdClusterConfig) (*EtcdCluster, error) {
	if cfg.Binary == "" || cfg.Dir == "" {
		return nil, errors.New("etcd cluster: Binary and Dir are required")
	}
	if cfg.Members == 0 {
		cfg.Members = 3
	}
	if cfg.StartTimeout == 0 {
		cfg.StartTimeout = 90 * time.Second
	}
	pki := filepath.Join(cfg.Dir, "pki")
	if err := os.MkdirAll(pki, 0o700); err != nil {
		return nil, err
	}
	server, client, err := writeEtcdPKI(pki)
	if err != nil {
		return nil, fmt.Errorf("etcd cluster: certificates: %w", err)
	}
	tlsConfig, err := client.TLSConfig()
	if err != nil {
		return nil, fmt.Errorf("etcd cluster: %w", err)
	}
	e := &EtcdCluster{
		Client:  client,
		http:    &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConfig}},
		timeout: cfg.StartTimeout,
	}
	names := make([]string, cfg.Members)
	peerURLs := make([]string, cfg.Members)
	var initial []string
	for i := range cfg.Members {
		clientPort, err := FreePort()
		if err != nil {
			return nil, err
		}
		peerPort, err := FreePort()
		if err != nil {
			return nil, err
		}
		names[i] = fmt.Sprintf("etcd-%d", i)
		e.ClientURLs = append(e.ClientURLs, fmt.Sprintf("https://127.0.0.1:%d", clientPort))
		peerURLs[i] = fmt.Sprintf("https://127.0.0.1:%d", peerPort)
		initial = append(initial, names[i]+"="+peerURLs[i])
	}
	for i := range cfg.Members {
		dataDir := filepath.Join(cfg.Dir, names[i]+"-data")
		if err := os.MkdirAll(dataDir, 0o700); err != nil {
			return nil, err
		}
		e.members = append(e.members, &Process{
			Name:         names[i],
			Path:         cfg.Binary,
			LogPath:      filepath.Join(cfg.Dir, names[i]+".log"),
			TermSignalOK: true,
			Args: []string{
				"--name", names[i],
				"--data-dir", dataDir,
				"--listen-client-urls", e.ClientURLs[i],
				"--advertise-client-urls", e.ClientURLs[i],
				"--listen-peer-urls", peerURLs[i],
				"--initial-advertise-peer-urls", peerURLs[i],
				"--initial-cluster", strings.Join(initial, ","),
				"--initial-cluster-state", "new",
				"--initial-cluster-token", "kms-plugin-e2e",
				"--cert-file", server.CertFile,
				"--key-file", server.KeyFile,
				"--trusted-ca-file", server.CAFile,
				"--client-cert-auth",
				"--peer-cert-file", server.CertFile,
				"--peer-key-file", server.KeyFile,
				"--peer-trusted-ca-file", server.CAFile,
				"--peer-client-cert-auth",
				"--unsafe-no-fsync", // test data only; keeps a 2-core machine fast
				"--log-level", "warn",
			},
		})
	}
	return e, nil
}

// Members are the member processes.
func (e *EtcdCluster) Members() []*Process { return e.members }

// Endpoints is the comma-separated list of client URLs, for
// --etcd-servers and --etcd-endpoints.
func (e *EtcdCluster) Endpoints() string { return strings.Join(e.ClientURLs, ",") }

// Start starts every member at once (they need each other to elect a
// leader) and waits until each reports healthy on GET /health.
func (e *EtcdCluster) Start(ctx context.Context) error {
	for _, m := range e.members {
		if err := m.Start(); err != nil {
			return err
		}
	}
	errs := make([]error, len(e.members))
	var wg sync.WaitGroup
	for i := range e.members {
		wg.Go(func() { errs[i] = e.waitHealthy(ctx, i) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// StartMember starts member i again (after StopMember) and waits until it
// is healthy.
func (e *EtcdCluster) StartMember(ctx context.Context, i int) error {
	if err := e.members[i].Start(); err != nil {
		return err
	}
	return e.waitHealthy(ctx, i)
}

// StopMember stops member i gracefully.
func (e *EtcdCluster) StopMember(i int) error { return e.members[i].Stop() }

func (e *EtcdCluster) waitHealthy(ctx context.Context, i int) error {
	m, url := e.members[i], e.ClientURLs[i]
	return waitUntil(ctx, m, e.timeout, 200*time.Millisecond, m.Name+" /health", func(ctx context.Context) (bool, error) {
		return etcdHealthy(ctx, e.http, url)
	})
}

// NewClient returns a client of the whole cluster with the client
// certificate.
func (e *EtcdCluster) NewClient() (*clientv3.Client, error) {
	tlsConfig, err := e.Client.TLSConfig()
	if err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: e.ClientURLs, DialTimeout: 10 * time.Second, TLS: tlsConfig})
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	return cli, nil
}

// Stop stops every member (SIGTERM, then SIGKILL after a timeout).
func (e *EtcdCluster) Stop() error {
	errs := make([]error, len(e.members))
	var wg sync.WaitGroup
	for i, m := range e.members {
		wg.Go(func() { errs[i] = m.Stop() })
	}
	wg.Wait()
	return errors.Join(errs...)
}
