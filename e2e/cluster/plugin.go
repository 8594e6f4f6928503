package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// PluginConfig configures a kms-plugin serve process.
type PluginConfig struct {
	// Binary is the kms-plugin binary.
	Binary string
	// Dir holds the socket, the keyset file and the log. Keep it short: a
	// Unix socket path is limited to 107 bytes.
	Dir string
	// PollInterval is --provider-poll-interval; zero means 1s.
	PollInterval time.Duration
	// Args are appended to serve's arguments (later flags win), for
	// another provider; Env is added to its environment.
	Args []string
	Env  []string
	// Admin, when set, makes the admin port serve HTTPS and admit only
	// requests with its client certificate or token (loopback too); the
	// harness's own requests present the client certificate.
	Admin *AdminPKI
}

// Plugin is a `kms-plugin serve` process with the local provider.
type Plugin struct {
	Socket   string // absolute path of the KMS v2 Unix socket
	Keyset   string // absolute path of the local Tink keyset file
	HTTPAddr string // 127.0.0.1:port of the health/status/metrics server

	binary string
	proc   *Process
	http   *http.Client
	scheme string // http, or https with PluginConfig.Admin
}

// PluginStatus is the plugin's GET /status document.
type PluginStatus struct {
	Provider      string `json:"provider"`
	KeyID         string `json:"keyID"`
	KeyIDHash     string `json:"keyIDHash"`
	RemoteVersion string `json:"remoteVersion"`
	Ready         bool   `json:"ready"`
}

// pluginStatusFields are the /status fields the tests rely on.
var pluginStatusFields = []string{"provider", "keyID", "keyIDHash", "remoteVersion", "ready"}

// NewPlugin prepares a plugin in cfg.Dir on a free loopback port; Start runs it.
func NewPlugin(cfg PluginConfig) (*Plugin, error) {
	if cfg.Binary == "" || cfg.Dir == "" {
		return nil, fmt.Errorf("plugin: Binary and Dir are required")
	}
	if cfg.PollInterval == 0 {
		cfg.PollInterval = time.Second
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, err
	}
	port, err := FreePort()
	if err != nil {
		return nil, err
	}
	p := &Plugin{
		Socket:   filepath.Join(dir, "kms.sock"),
		Keyset:   filepath.Join(dir, "keyset.json"),
		HTTPAddr: fmt.Sprintf("127.0.0.1:%d", port),
		binary:   cfg.Binary,
		http:     &http.Client{Timeout: 5 * time.Second},
		scheme:   "http",
	}
	if cfg.Admin != nil {
		if p.http, err = cfg.Admin.HTTPClient(true); err != nil {
			return nil, err
		}
		p.scheme = "https"
	}
	if len(p.Socket) > 107 {
		return nil, fmt.Errorf("plugin: socket path %q is longer than 107 bytes", p.Socket)
	}
	p.proc = &Process{
		Name:    "kms-plugin",
		Path:    cfg.Binary,
		LogPath: filepath.Join(dir, "kms-plugin.log"),
		Args: []string{
			"serve",
			"--endpoint", p.Endpoint(),
			"--local-keyset", p.Keyset,
			"--http-addr", p.HTTPAddr,
			"--provider-poll-interval", cfg.PollInterval.String(),
			"--log-format", "console",
		},
	}
	if cfg.Admin != nil {
		p.proc.Args = append(p.proc.Args, cfg.Admin.ServeArgs()...)
	}
	p.proc.Args = append(p.proc.Args, cfg.Args...)
	p.proc.Env = cfg.Env
	return p, nil
}

// StartPlugin is NewPlugin followed by Start.
func StartPlugin(ctx context.Context, cfg PluginConfig) (*Plugin, error) {
	p, err := NewPlugin(cfg)
	if err != nil {
		return nil, err
	}
	if err := p.Start(ctx); err != nil {
		_ = p.Kill()
		return nil, err
	}
	return p, nil
}

// URL is the admin port's base, http://HTTPAddr (https:// with
// PluginConfig.Admin), for --plugin-endpoints.
func (p *Plugin) URL() string { return p.scheme + "://" + p.HTTPAddr }

// Endpoint is the --endpoint URL, unix:///abs/path.
func (p *Plugin) Endpoint() string { return "unix://" + p.Socket }

// Process is the serve process.
func (p *Plugin) Process() *Process { return p.proc }

// Start starts serve and waits until its socket exists, /readyz answers 200
// and /status reports ready with a key ID.
func (p *Plugin) Start(ctx context.Context) error {
	if err := p.proc.Start(); err != nil {
		return err
	}
	return waitUntil(ctx, p.proc, 30*time.Second, 100*time.Millisecond, "kms-plugin ready (socket, /readyz 200, /status ready)", func(ctx context.Context) (bool, error) {
		if _, err := os.Stat(p.Socket); err != nil {
			return false, err
		}
		code, body, err := p.Get(ctx, "/readyz")
		if err != nil {
			return false, err
		}
		if code != http.StatusOK {
			return false, fmt.Errorf("/readyz: %d %q", code, body)
		}
		st, err := p.Status(ctx)
		if err != nil {
			return false, err
		}
		if !st.Ready || st.KeyID == "" {
			return false, fmt.Errorf("/status: %+v", st)
		}
		return true, nil
	})
}

// Stop sends SIGTERM and waits; it returns an error unless serve exits 0.
func (p *Plugin) Stop() error { return p.proc.Stop() }

// Kill sends SIGKILL and waits, leaving the socket file behind.
func (p *Plugin) Kill() error { return p.proc.Kill() }

// Restart stops serve gracefully and starts it again on the same socket,
// keyset and HTTP address.
func (p *Plugin) Restart(ctx context.Context) error {
	if err := p.Stop(); err != nil {
		return err
	}
	return p.Start(ctx)
}

// Get does GET path on the plugin's HTTP server (with the client
// certificate, with PluginConfig.Admin).
func (p *Plugin) Get(ctx context.Context, path string) (int, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, p.URL()+path, nil)
	if err != nil {
		return 0, nil, err
	}
	resp, err := p.http.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	return resp.StatusCode, body, err
}

// Status fetches and decodes GET /status; every field of PluginStatus must
// be present.
func (p *Plugin) Status(ctx context.Context) (PluginStatus, error) {
	code, body, err := p.Get(ctx, "/status")
	if err != nil {
		return PluginStatus{}, err
	}
	if code != http.StatusOK {
		return PluginStatus{}, fmt.Errorf("GET /status: %d %q", code, body)
	}
	return decodePluginStatus(body)
}

func decodePluginStatus(body []byte) (PluginStatus, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return PluginStatus{}, fmt.Errorf("GET /status: %w in %q", err, body)
	}
	for _, f := range pluginStatusFields {
		if _, ok := fields[f]; !ok {
			return PluginStatus{}, fmt.Errorf("GET /status: field %q missing in %s", f, body)
		}
	}
	var st PluginStatus
	if err := json.Unmarshal(body, &st); err != nil {
		return PluginStatus{}, fmt.Errorf("GET /status: %w in %s", err, body)
	}
	return st, nil
}

// WaitForKeyIDChange polls /status until its keyID differs from old and the
// plugin is ready, for at most timeout.
func (p *Plugin) WaitForKeyIDChange(ctx context.Context, old string, timeout time.Duration) (PluginStatus, error) {
	var st PluginStatus
	err := waitUntil(ctx, p.proc, timeout, 200*time.Millisecond, "kms-plugin /status keyID to change from "+old, func(ctx context.Context) (bool, error) {
		var err error
		st, err = p.Status(ctx)
		if err != nil {
			return false, err
		}
		return st.KeyID != old && st.KeyID != "" && st.Ready, fmt.Errorf("/status: %+v", st)
	})
	return st, err
}

// RotateKeyset runs `kms-plugin keyset rotate` on the plugin's keyset and
// returns its trimmed stdout, the new key version.
func (p *Plugin) RotateKeyset(ctx context.Context) (string, error) {
	stdout, err := RunPlugin(ctx, p.binary, "keyset", "rotate", "--local-keyset", p.Keyset)
	if err != nil {
		return "", err
	}
	version := strings.TrimSpace(stdout)
	if version == "" {
		return "", fmt.Errorf("kms-plugin keyset rotate printed no version")
	}
	return version, nil
}

// RetireKeyset runs `kms-plugin keyset retire VERSION` on the plugin's keyset.
func (p *Plugin) RetireKeyset(ctx context.Context, version string) error {
	_, err := RunPlugin(ctx, p.binary, "keyset", "retire", version, "--local-keyset", p.Keyset)
	return err
}

// RunPlugin runs a one-shot kms-plugin command and returns its stdout. A
// non-zero exit is an error that includes stderr.
func RunPlugin(ctx context.Context, binary string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("kms-plugin %s: %w; stderr: %s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return stdout.String(), nil
}
