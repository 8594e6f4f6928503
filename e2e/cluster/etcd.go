package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// Etcd is a single-member etcd server process on loopback.
type Etcd struct {
	ClientURL string // http://127.0.0.1:port

	proc *Process
	http *http.Client
}

// NewEtcd prepares an etcd member with its data in dir/etcd-data, on free
// loopback ports; Start runs it.
func NewEtcd(binary, dir string) (*Etcd, error) {
	clientPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	peerPort, err := FreePort()
	if err != nil {
		return nil, err
	}
	clientURL := fmt.Sprintf("http://127.0.0.1:%d", clientPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	dataDir := filepath.Join(dir, "etcd-data")
	if err := os.MkdirAll(dataDir, 0o700); err != nil {
		return nil, err
	}
	e := &Etcd{ClientURL: clientURL, http: &http.Client{Timeout: 5 * time.Second}}
	e.proc = &Process{
		Name:         "etcd",
		Path:         binary,
		LogPath:      filepath.Join(dir, "etcd.log"),
		TermSignalOK: true,
		Args: []string{
			"--name", "e2e",
			"--data-dir", dataDir,
			"--listen-client-urls", clientURL,
			"--advertise-client-urls", clientURL,
			"--listen-peer-urls", peerURL,
			"--initial-advertise-peer-urls", peerURL,
			"--initial-cluster", "e2e=" + peerURL,
			"--initial-cluster-state", "new",
			"--unsafe-no-fsync", // test data only; keeps a 2-core machine fast
			"--log-level", "warn",
		},
	}
	return e, nil
}

// Process is the etcd process.
func (e *Etcd) Process() *Process { return e.proc }

// Start starts etcd and waits until GET /health reports healthy.
func (e *Etcd) Start(ctx context.Context) error {
	if err := e.proc.Start(); err != nil {
		return err
	}
	return waitUntil(ctx, e.proc, time.Minute, 100*time.Millisecond, "etcd /health", func(ctx context.Context) (bool, error) {
		return etcdHealthy(ctx, e.http, e.ClientURL)
	})
}

// etcdHealthy asks the etcd member at clientURL for GET /health; an
// unhealthy answer comes with an error that quotes it.
func etcdHealthy(ctx context.Context, hc *http.Client, clientURL string) (bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, clientURL+"/health", nil)
	if err != nil {
		return false, err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var health struct {
		Health string `json:"health"`
	}
	if err := json.Unmarshal(body, &health); err != nil {
		return false, fmt.Errorf("/health: %d %q", resp.StatusCode, body)
	}
	return health.Health == "true", fmt.Errorf("/health: %d %q", resp.StatusCode, body)
}

// Stop sends SIGTERM and waits.
func (e *Etcd) Stop() error { return e.proc.Stop() }

// Restart stops etcd gracefully and starts it again on the same data.
func (e *Etcd) Restart(ctx context.Context) error {
	if err := e.Stop(); err != nil {
		return err
	}
	return e.Start(ctx)
}
