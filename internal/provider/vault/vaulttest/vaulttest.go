// Package vaulttest starts the real Vault server the vault provider's tests
// and benchmark use: e2e/tools/vault-server, a Vault v1.21.4 core built from
// the module proxy (bash e2e/tools/build.sh vault-server), on a loopback
// port, with its storage in a directory so it can be killed and restarted
// with its data. The binary's path is $KMS_VAULT_SERVER_BIN.
package vaulttest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/vault/api"
)

// EnvBinary names the vault-server binary.
const EnvBinary = "KMS_VAULT_SERVER_BIN"

// Binary returns the vault-server binary's path. Without it the test fails
// when CI=true and is skipped otherwise.
func Binary(t testing.TB) string {
	t.Helper()
	bin := os.Getenv(EnvBinary)
	if bin == "" {
		if os.Getenv("CI") == "true" {
			t.Fatalf("%s is not set: make unit builds the Vault server (bash e2e/tools/build.sh vault-server) and sets it", EnvBinary)
		}
		t.Skipf("%s not set: run `bash e2e/tools/build.sh vault-server` and export %s=.cache/bin/vault-server", EnvBinary, EnvBinary)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%s=%s: %v", EnvBinary, bin, err)
	}
	return bin
}

// Options shape a server.
type Options struct {
	// TLS serves HTTPS with a CA written to the data directory (CAFile).
	TLS bool
	// RollbackPeriod is how often Vault runs its periodic functions
	// (transit's auto-rotation check); 0 keeps Vault's 1 m.
	RollbackPeriod time.Duration
	// Stderr receives Vault's log; nil discards it.
	Stderr io.Writer
}

// Server is one running Vault server.
type Server struct {
	// Addr is http(s)://127.0.0.1:PORT.
	Addr       string
	RootToken  string
	UnsealKeys []string
	// CAFile verifies the server's certificate (Options.TLS).
	CAFile string

	bin, dir, listen string
	opts             Options

	mu    sync.Mutex
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

type readyLine struct {
	Address    string   `json:"address"`
	RootToken  string   `json:"root_token"`
	UnsealKeys []string `json:"unseal_keys"`
	CAFile     string   `json:"ca_file"`
}

// Start starts a server with its data in dir.
func Start(bin, dir string, opts Options) (*Server, error) {
	s := &Server{bin: bin, dir: dir, listen: "127.0.0.1:0", opts: opts}
	if err := s.start(); err != nil {
		return nil, err
	}
	return s, nil
}

// MustStart starts a server for t, with its data in t.TempDir(), stopped
// at the end of the test.
func MustStart(t testing.TB, opts Options) *Server {
	t.Helper()
	s, err := Start(Binary(t), t.TempDir(), opts)
	if err != nil {
		t.Fatalf("start Vault: %v", err)
	}
	t.Cleanup(s.Stop)
	return s
}

func (s *Server) start() error {
	args := []string{"-data", s.dir, "-addr", s.listen, "-exit-on-stdin-eof"}
	if s.opts.TLS {
		args = append(args, "-tls")
	}
	if s.opts.RollbackPeriod > 0 {
		args = append(args, "-rollback-period", s.opts.RollbackPeriod.String())
	}
	cmd := exec.Command(s.bin, args...)
	cmd.Stderr = s.opts.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", s.bin, err)
	}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		_, _ = io.Copy(io.Discard, stdout)
	}()
	var line string
	select {
	case l, ok := <-lines:
		if !ok {
			_ = cmd.Wait()
			return fmt.Errorf("%s exited before it was ready (run it by hand to see why)", s.bin)
		}
		line = l
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return errors.New("Vault was not ready within 60s")
	}
	var r readyLine
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return fmt.Errorf("vault-server's ready line: %w", err)
	}
	u, err := url.Parse(r.Address)
	if err != nil {
		return err
	}
	s.mu.Lock()
	s.cmd, s.stdin = cmd, stdin
	s.Addr, s.RootToken, s.UnsealKeys, s.CAFile = r.Address, r.RootToken, r.UnsealKeys, r.CAFile
	s.listen = u.Host // a restart listens on the same port
	s.mu.Unlock()
	return nil
}

// Stop ends the server (SIGTERM, then SIGKILL after 5 s).
func (s *Server) Stop() {
	s.mu.Lock()
	cmd, stdin := s.cmd, s.stdin
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = stdin.Close()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Kill ends the server with SIGKILL, as a crash would.
func (s *Server) Kill() {
	s.mu.Lock()
	cmd, stdin := s.cmd, s.stdin
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	_ = stdin.Close()
	_ = cmd.Wait()
}

// Restart starts the server again on the same data and port. The port may
// be taken meanwhile; Restart then retries for a few seconds.
func (s *Server) Restart() error {
	var err error
	for i := 0; i < 20; i++ {
		if err = s.start(); err == nil {
			return nil
		}
		time.Sleep(250 * time.Millisecond)
	}
	return err
}

// Client returns a client of the server with token set ("" for none).
func (s *Server) Client(token string) (*api.Client, error) {
	cfg := api.DefaultConfig()
	cfg.Address = s.Addr
	cfg.MaxRetries = 0
	if s.CAFile != "" {
		if err := cfg.ConfigureTLS(&api.TLSConfig{CACert: s.CAFile}); err != nil {
			return nil, err
		}
	}
	c, err := api.NewClient(cfg)
	if err != nil {
		return nil, err
	}
	c.SetToken(token)
	return c, nil
}

// Root returns a root client or fails t.
func (s *Server) Root(t testing.TB) *api.Client {
	t.Helper()
	c, err := s.Client(s.RootToken)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// Do runs one request as root: a logical write (data non-nil) or read.
func (s *Server) Do(ctx context.Context, method, path string, data map[string]any) (*api.Secret, error) {
	c, err := s.Client(s.RootToken)
	if err != nil {
		return nil, err
	}
	switch method {
	case http.MethodGet:
		return c.Logical().ReadWithContext(ctx, path)
	case http.MethodDelete:
		return c.Logical().DeleteWithContext(ctx, path)
	default:
		if data == nil {
			data = map[string]any{}
		}
		return c.Logical().WriteWithContext(ctx, path, data)
	}
}

// Setup enables a transit engine at mount (if not yet) and creates key
// with the given extra parameters (type defaults to aes256-gcm96).
func (s *Server) Setup(ctx context.Context, mount, key string, params map[string]any) error {
	c, err := s.Client(s.RootToken)
	if err != nil {
		return err
	}
	mounts, err := c.Sys().ListMountsWithContext(ctx)
	if err != nil {
		return err
	}
	if _, ok := mounts[mount+"/"]; !ok {
		if err := c.Sys().MountWithContext(ctx, mount, &api.MountInput{Type: "transit"}); err != nil {
			return fmt.Errorf("mount transit at %s: %w", mount, err)
		}
	}
	body := map[string]any{"type": "aes256-gcm96"}
	for k, v := range params {
		body[k] = v
	}
	if _, err := c.Logical().WriteWithContext(ctx, mount+"/keys/"+key, body); err != nil {
		return fmt.Errorf("create key %s/keys/%s: %w", mount, key, err)
	}
	return nil
}

// PolicyFor is the plugin's policy on one key (the README's).
func PolicyFor(mount, key string) string {
	return fmt.Sprintf(`
path "%[1]s/encrypt/%[2]s" { capabilities = ["update"] }
path "%[1]s/decrypt/%[2]s" { capabilities = ["update"] }
path "%[1]s/keys/%[2]s" { capabilities = ["read"] }
path "%[1]s/keys/%[2]s/rotate" { capabilities = ["update"] }
path "%[1]s/keys/%[2]s/config" { capabilities = ["update"] }
`, mount, key)
}

// Token creates a token with policies. ttl and maxTTL of 0 leave Vault's
// defaults; period makes a periodic token.
func (s *Server) Token(ctx context.Context, policies []string, ttl, maxTTL time.Duration, renewable bool) (string, error) {
	c, err := s.Client(s.RootToken)
	if err != nil {
		return "", err
	}
	req := &api.TokenCreateRequest{Policies: policies, NoParent: true, Renewable: &renewable}
	if ttl > 0 {
		req.TTL = ttl.String()
	}
	if maxTTL > 0 {
		req.ExplicitMaxTTL = maxTTL.String()
	}
	sec, err := c.Auth().Token().CreateWithContext(ctx, req)
	if err != nil {
		return "", err
	}
	return sec.Auth.ClientToken, nil
}

// Seal seals Vault.
func (s *Server) Seal(ctx context.Context) error {
	c, err := s.Client(s.RootToken)
	if err != nil {
		return err
	}
	return c.Sys().SealWithContext(ctx)
}

// Unseal unseals Vault with its keys.
func (s *Server) Unseal(ctx context.Context) error {
	c, err := s.Client("")
	if err != nil {
		return err
	}
	for _, k := range s.UnsealKeys {
		if _, err := c.Sys().UnsealWithContext(ctx, k); err != nil {
			return err
		}
	}
	return nil
}

// Counter is an http.RoundTripper that counts the requests it carries, by
// path, for the tests that check the provider makes no hot loop.
type Counter struct {
	Next http.RoundTripper
	mu   sync.Mutex
	n    map[string]int
	all  int
}

// RoundTrip implements http.RoundTripper.
func (c *Counter) RoundTrip(r *http.Request) (*http.Response, error) {
	c.mu.Lock()
	if c.n == nil {
		c.n = map[string]int{}
	}
	c.n[strings.TrimPrefix(r.URL.Path, "/v1/")]++
	c.all++
	c.mu.Unlock()
	next := c.Next
	if next == nil {
		next = http.DefaultTransport
	}
	return next.RoundTrip(r)
}

// Total is every request counted so far.
func (c *Counter) Total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.all
}

// Paths returns a copy of the counts by path.
func (c *Counter) Paths() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]int{}
	for k, v := range c.n {
		out[k] = v
	}
	return out
}

// FreePort reports whether the server's port is free (it is not serving).
func (s *Server) FreePort() bool {
	u, err := url.Parse(s.Addr)
	if err != nil {
		return false
	}
	c, err := net.DialTimeout("tcp", u.Host, 200*time.Millisecond)
	if err != nil {
		return true
	}
	c.Close()
	return false
}
