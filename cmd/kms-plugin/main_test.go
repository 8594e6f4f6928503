//go:build !serveonly

package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"
)

func runCmd(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err := run(context.Background(), args, &out, &errOut)
	return out.String(), errOut.String(), err
}

func TestCommands(t *testing.T) {
	t.Setenv("KMS_PLUGIN_STATE_DIR", t.TempDir())
	for _, tt := range []struct {
		name    string
		args    []string
		wantErr bool
		want    string // in stdout+stderr+error
	}{
		{"no args", nil, true, "Usage: kms-plugin COMMAND"},
		{"unknown", []string{"frobnicate"}, true, `unknown command "frobnicate"`},
		{"version", []string{"version"}, false, "kms-plugin dev"},
		{"help", []string{"help"}, false, "serve"},
		{"bad provider", []string{"serve", "--provider", "gcp"}, true, `invalid configuration: provider: unknown provider "gcp"`},
		{"bad endpoint", []string{"serve", "--endpoint", "tcp://127.0.0.1:1"}, true, "invalid configuration: endpoint:"},
		{"bad poll", []string{"serve", "--provider-poll-interval", "1ms"}, true, "invalid configuration: providerPollInterval:"},
		{"bad flag", []string{"serve", "--no-such-flag"}, true, "flag provided but not defined"},
		{"missing config", []string{"serve", "--config", "/nonexistent/kms.yaml"}, true, "read config"},
		{"keyset no sub", []string{"keyset"}, true, "Subcommands"},
		{"keyset unknown sub", []string{"keyset", "melt", "--local-keyset", "/nonexistent"}, true, `unknown subcommand "melt"`},
		{"retire without version", []string{"keyset", "retire"}, true, "missing VERSION"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			out, errOut, err := runCmd(t, tt.args...)
			if (err != nil) != tt.wantErr {
				t.Fatalf("run(%q) error = %v; wantErr %v", tt.args, err, tt.wantErr)
			}
			all := out + errOut
			if err != nil {
				all += err.Error()
			}
			if !strings.Contains(all, tt.want) {
				t.Fatalf("run(%q) output %q; want it to contain %q", tt.args, all, tt.want)
			}
			if err != nil && !errors.Is(err, errUsage) && strings.Contains(err.Error(), "\n") {
				t.Fatalf("error is not one line: %q", err)
			}
		})
	}
}

func TestKeysetCommands(t *testing.T) {
	dir := t.TempDir()
	keyset := filepath.Join(dir, "keyset.json")
	if _, _, err := runCmd(t, "keyset", "rotate", "--local-keyset", keyset); err == nil {
		t.Fatal("rotate on a missing keyset succeeded")
	}
	// serve creates the keyset; here we let the list command find it via a config file.
	cfg := filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte("local:\n  keysetPath: "+keyset+"\n"), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	done := startServe(t, ctx, dir, "--config", cfg)
	cancel()
	<-done

	first := listVersions(t, "--config", cfg)
	if len(first) != 1 || !strings.HasSuffix(first[0], "*") {
		t.Fatalf("list after create = %q; want one current version", first)
	}
	out, _, err := runCmd(t, "keyset", "rotate", "--local-keyset", keyset)
	if err != nil {
		t.Fatal(err)
	}
	next := strings.TrimSpace(out)
	old := strings.Fields(first[0])[0]
	if _, _, err := runCmd(t, "keyset", "retire", next, "--local-keyset", keyset); err == nil {
		t.Fatal("retiring the current version succeeded")
	}
	if out, _, err := runCmd(t, "keyset", "retire", old, "--local-keyset", keyset); err != nil || !strings.Contains(out, "retired "+old) {
		t.Fatalf("retire old = %q, %v", out, err)
	}
	states := map[string]string{}
	for _, line := range listVersions(t, "--local-keyset", keyset) {
		f := strings.Fields(line)
		states[f[0]] = strings.Join(f[1:], " ")
	}
	if states[old] != "disabled" || states[next] != "enabled *" || len(states) != 2 {
		t.Fatalf("list after rotate+retire = %q; want %s disabled, %s enabled and current", states, old, next)
	}
}

func listVersions(t *testing.T, args ...string) []string {
	t.Helper()
	out, _, err := runCmd(t, append([]string{"keyset", "list"}, args...)...)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	return lines[1:]
}

// startServe runs `kms-plugin serve` in-process on a socket in dir and waits
// until the socket answers.
func startServe(t *testing.T, ctx context.Context, dir string, extra ...string) <-chan error {
	t.Helper()
	sock := filepath.Join(dir, "kms.sock")
	args := append([]string{"serve", "--endpoint", "unix://" + sock, "--http-addr", freeAddr(t), "--log-level", "warn"}, extra...)
	done := make(chan error, 1)
	go func() {
		var out bytes.Buffer
		done <- run(ctx, args, &out, &out)
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return done
		}
		select {
		case err := <-done:
			t.Fatalf("serve exited early: %v", err)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatal("socket did not come up in 10 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func TestServe(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "kms.sock")
	keyset := filepath.Join(dir, "state", "keyset.json")
	httpAddr := freeAddr(t)
	// The config file sets a poll interval; flags override the keyset path
	// (startServe also passes --http-addr twice: the last one wins).
	cfg := filepath.Join(dir, "config.yaml")
	os.WriteFile(cfg, []byte(fmt.Sprintf("providerPollInterval: 1s\nhttpAddr: %s\nlocal:\n  keysetPath: /nonexistent/keyset.json\n", httpAddr)), 0o600)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := startServe(t, ctx, dir, "--config", cfg, "--local-keyset", keyset, "--http-addr", httpAddr)

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := kmsapi.NewKeyManagementServiceClient(conn)
	cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
	defer ccancel()
	st, err := client.Status(cctx, &kmsapi.StatusRequest{})
	if err != nil || st.Healthz != "ok" {
		t.Fatalf("Status = %v, %v", st, err)
	}
	enc, err := client.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: make([]byte, 32), Uid: "t"})
	if err != nil || enc.KeyId != st.KeyId {
		t.Fatalf("Encrypt = %v, %v", enc, err)
	}
	if _, err := os.Stat(keyset); err != nil {
		t.Fatalf("keyset not created at the flag's path: %v", err)
	}
	resp, err := http.Get("http://" + httpAddr + "/readyz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("/readyz = %v, %v", resp, err)
	}
	resp.Body.Close()

	// Rotation through the CLI is picked up at the next poll (1 s).
	if _, _, err := runCmd(t, "keyset", "rotate", "--local-keyset", keyset); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st2, err := client.Status(cctx, &kmsapi.StatusRequest{})
		if err == nil && st2.KeyId != st.KeyId {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("key_id did not change after keyset rotate")
		}
		time.Sleep(100 * time.Millisecond)
	}

	// A second serve on the same socket refuses to steal it.
	var out bytes.Buffer
	err = run(ctx, []string{"serve", "--endpoint", "unix://" + sock, "--local-keyset", keyset, "--http-addr", ""}, &out, &out)
	if err == nil || !strings.Contains(err.Error(), "another process is serving") {
		t.Fatalf("second serve = %v; want refusal", err)
	}

	cancel() // SIGTERM
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve = %v", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("serve did not stop")
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket left after shutdown: %v", err)
	}
}
