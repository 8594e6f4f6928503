package cluster

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// EnvVaultServerBin names the real Vault server binary
// (e2e/tools/vault-server, built by `bash e2e/tools/build.sh vault-server`
// into $KMS_E2E_CACHE/vault-server).
const EnvVaultServerBin = "KMS_VAULT_SERVER_BIN"

// VaultServerBinary returns $KMS_VAULT_SERVER_BIN or the cached build.
func VaultServerBinary() (string, error) {
	return cachedBinary(EnvVaultServerBin, "vault-server")
}

// TransitVault is a real HashiCorp Vault (v1.21.4) core on a loopback
// port, with its storage in a directory so it survives a kill and a
// restart; the tests drive it over its HTTP API as root. (Vault, in
// vault.go, is the Azure Key Vault test server.)
type TransitVault struct {
	Addr       string
	RootToken  string
	UnsealKeys []string

	bin, dir, listen, logPath string
	rollback                  time.Duration
	http                      *http.Client

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd has exited
}

// StartTransitVault starts Vault with its data and log in dir. rollback is
// how often Vault runs its periodic functions (transit's auto-rotation
// check); 0 keeps Vault's 1 minute.
func StartTransitVault(dir string, rollback time.Duration) (*TransitVault, error) {
	bin, err := VaultServerBinary()
	if err != nil {
		return nil, err
	}
	v := &TransitVault{bin: bin, dir: filepath.Join(dir, "vault"), listen: "127.0.0.1:0", logPath: filepath.Join(dir, "vault.log"),
		rollback: rollback, http: &http.Client{Timeout: 10 * time.Second}}
	if err := v.start(); err != nil {
		return nil, err
	}
	return v, nil
}

func (v *TransitVault) start() error {
	logFile, err := os.OpenFile(v.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	args := []string{"-data", v.dir, "-addr", v.listen}
	if v.rollback > 0 {
		args = append(args, "-rollback-period", v.rollback.String())
	}
	cmd := exec.Command(v.bin, args...)
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		logFile.Close()
		return err
	}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("start %s: %w", v.bin, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); logFile.Close(); close(done) }()
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		_, _ = io.Copy(io.Discard, out)
	}()
	var line string
	select {
	case l, ok := <-lines:
		if !ok {
			return fmt.Errorf("vault-server exited before it was ready (log %s)", v.logPath)
		}
		line = l
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		return errors.New("vault-server not ready within 60s")
	}
	var r struct {
		Address    string   `json:"address"`
		RootToken  string   `json:"root_token"`
		UnsealKeys []string `json:"unseal_keys"`
	}
	if err := json.Unmarshal([]byte(line), &r); err != nil {
		_ = cmd.Process.Kill()
		return fmt.Errorf("vault-server's ready line: %w", err)
	}
	u, err := url.Parse(r.Address)
	if err != nil {
		return err
	}
	v.mu.Lock()
	v.cmd, v.done, v.Addr, v.RootToken, v.UnsealKeys, v.listen = cmd, done, r.Address, r.RootToken, r.UnsealKeys, u.Host
	v.mu.Unlock()
	return nil
}

// Kill ends Vault with SIGKILL and waits for it to exit.
func (v *TransitVault) Kill() {
	v.mu.Lock()
	cmd, done := v.cmd, v.done
	v.cmd = nil
	v.mu.Unlock()
	if cmd != nil {
		_ = cmd.Process.Kill()
		<-done
	}
}

// Stop ends Vault (SIGTERM, then SIGKILL after 5 s).
func (v *TransitVault) Stop() {
	v.mu.Lock()
	cmd, done := v.cmd, v.done
	v.cmd = nil
	v.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// Restart starts Vault again on its data and port.
func (v *TransitVault) Restart() error {
	var err error
	for i := 0; i < 20; i++ {
		if err = v.start(); err == nil {
			return nil
		}
		time.Sleep(250 * time.Millisecond)
	}
	return err
}

// LogTail returns the last n lines of Vault's log.
func (v *TransitVault) LogTail(n int) string {
	data, _ := os.ReadFile(v.logPath)
	return lastLines(string(data), n)
}

// Do sends one request to Vault's API as root (body nil: no body) and
// decodes the answer's "data" into out when out is not nil.
func (v *TransitVault) Do(ctx context.Context, method, path string, body any, out any) error {
	return v.DoToken(ctx, v.RootToken, method, path, body, out)
}

// DoToken is Do with another token ("" for none).
func (v *TransitVault) DoToken(ctx context.Context, token, method, path string, body any, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, v.Addr+"/v1/"+path, rd)
	if err != nil {
		return err
	}
	if token != "" {
		req.Header.Set("X-Vault-Token", token)
	}
	resp, err := v.http.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("vault %s %s: %d %s", method, path, resp.StatusCode, bytes.TrimSpace(data))
	}
	if out != nil && len(data) > 0 {
		var env struct {
			Data json.RawMessage `json:"data"`
			Auth json.RawMessage `json:"auth"`
		}
		if err := json.Unmarshal(data, &env); err != nil {
			return fmt.Errorf("vault %s %s: %w", method, path, err)
		}
		src := env.Data
		if len(src) == 0 || string(src) == "null" {
			src = env.Auth
		}
		if err := json.Unmarshal(src, out); err != nil {
			return fmt.Errorf("vault %s %s: %w", method, path, err)
		}
	}
	return nil
}

// TransitKey is the part of a transit key read the tests use.
type TransitKey struct {
	LatestVersion        int              `json:"latest_version"`
	MinDecryptionVersion int              `json:"min_decryption_version"`
	MinEncryptionVersion int              `json:"min_encryption_version"`
	AutoRotatePeriod     int64            `json:"auto_rotate_period"`
	Keys                 map[string]int64 `json:"keys"`
}

// Key reads MOUNT/keys/NAME.
func (v *TransitVault) Key(ctx context.Context, mount, name string) (TransitKey, error) {
	var k TransitKey
	err := v.Do(ctx, http.MethodGet, mount+"/keys/"+name, nil, &k)
	return k, err
}

// SetupTransit mounts transit at mount, creates key (aes256-gcm96), writes
// the plugin's policy on it and returns a renewable orphan token holding
// that policy.
func (v *TransitVault) SetupTransit(ctx context.Context, mount, key string, keyParams map[string]any) (string, error) {
	if err := v.Do(ctx, http.MethodPost, "sys/mounts/"+mount, map[string]any{"type": "transit"}, nil); err != nil {
		return "", err
	}
	params := map[string]any{"type": "aes256-gcm96"}
	for k, x := range keyParams {
		params[k] = x
	}
	if err := v.Do(ctx, http.MethodPost, mount+"/keys/"+key, params, nil); err != nil {
		return "", err
	}
	policy := fmt.Sprintf(`path "%[1]s/encrypt/%[2]s" { capabilities = ["update"] }
path "%[1]s/decrypt/%[2]s" { capabilities = ["update"] }
path "%[1]s/keys/%[2]s" { capabilities = ["read"] }
path "%[1]s/keys/%[2]s/rotate" { capabilities = ["update"] }
path "%[1]s/keys/%[2]s/config" { capabilities = ["update"] }
`, mount, key)
	if err := v.Do(ctx, http.MethodPut, "sys/policies/acl/kms-plugin", map[string]any{"policy": policy}, nil); err != nil {
		return "", err
	}
	var auth struct {
		ClientToken string `json:"client_token"`
	}
	if err := v.Do(ctx, http.MethodPost, "auth/token/create-orphan", map[string]any{"policies": []string{"kms-plugin"}, "period": "1h"}, &auth); err != nil {
		return "", err
	}
	return auth.ClientToken, nil
}

// Seal seals Vault; Unseal unseals it with its keys.
func (v *TransitVault) Seal(ctx context.Context) error {
	return v.Do(ctx, http.MethodPut, "sys/seal", nil, nil)
}

// Unseal unseals Vault with its keys.
func (v *TransitVault) Unseal(ctx context.Context) error {
	for _, k := range v.UnsealKeys {
		if err := v.DoToken(ctx, "", http.MethodPut, "sys/unseal", map[string]any{"key": k}, nil); err != nil {
			return err
		}
	}
	return nil
}
