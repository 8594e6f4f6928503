package plugin

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

// newLocal returns a local provider on a fresh keyset in a temp dir.
func newLocal(t *testing.T) *local.Provider {
	t.Helper()
	p, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "keyset.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// start runs p in the background until the test ends and waits until it is
// ready. The returned channel yields Run's result.
func start(t *testing.T, ctx context.Context, p *Plugin) <-chan error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	select {
	case <-p.Ready():
	case err := <-done:
		t.Fatalf("Run returned before ready: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("plugin not ready within 10 s")
	}
	return done
}

func wait(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(15 * time.Second):
		t.Fatal("Run did not return within 15 s of cancel")
		return nil
	}
}

func TestRun(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "kms.sock")
	core, logs := observer.New(zap.InfoLevel)
	reg := prometheus.NewRegistry()
	p, err := New(Config{
		Provider:     newLocal(t),
		Endpoint:     "unix://" + sock,
		HTTPAddr:     "127.0.0.1:0",
		PollInterval: time.Hour,
		Version:      "v0.0.0-test",
		Logger:       zap.New(core),
		Registerer:   reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("New opened the socket: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := start(t, ctx, p)

	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("socket mode = %o; want 600", got)
	}

	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := kmsapi.NewKeyManagementServiceClient(conn)
	cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
	defer ccancel()
	st, err := client.Status(cctx, &kmsapi.StatusRequest{})
	if err != nil || st.Healthz != "ok" || st.Version != "v2" || st.KeyId == "" {
		t.Fatalf("Status = %v, %v; want healthy v2 with a key_id", st, err)
	}
	plaintext := []byte("0123456789abcdef0123456789abcdef")
	enc, err := client.Encrypt(cctx, &kmsapi.EncryptRequest{Plaintext: plaintext, Uid: "t"})
	if err != nil || enc.KeyId != st.KeyId {
		t.Fatalf("Encrypt = %v, %v; want key_id %q", enc, err, st.KeyId)
	}
	dec, err := client.Decrypt(cctx, &kmsapi.DecryptRequest{Ciphertext: enc.Ciphertext, KeyId: enc.KeyId, Annotations: enc.Annotations, Uid: "t"})
	if err != nil || !bytes.Equal(dec.Plaintext, plaintext) {
		t.Fatalf("Decrypt = %v, %v; want the plaintext back", dec, err)
	}

	base := "http://" + p.HTTPAddr()
	for _, tt := range []struct{ path, want string }{
		{"/livez", "ok"},
		{"/readyz", "ok"},
		{"/metrics", "kms_plugin_grpc_requests_total"},
		{"/status", `"version": "v0.0.0-test"`},
	} {
		resp, err := http.Get(base + tt.path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), tt.want) {
			t.Errorf("GET %s = %s %q; want 200 containing %q", tt.path, resp.Status, body, tt.want)
		}
	}
	// The caller's registry holds the metrics.
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, mf := range mfs {
		found = found || mf.GetName() == "kms_plugin_provider_calls_total"
	}
	if !found {
		t.Error("kms_plugin_provider_calls_total not in the caller's registry")
	}

	if err := p.Run(ctx); err == nil || !strings.Contains(err.Error(), "twice") {
		t.Errorf("second Run = %v; want an error", err)
	}

	cancel()
	if err := wait(t, done); err != nil {
		t.Fatalf("Run = %v; want nil after cancel", err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after Run returned: %v", err)
	}
	if c, err := net.DialTimeout("tcp", p.HTTPAddr(), time.Second); err == nil {
		c.Close()
		t.Errorf("admin port %s still accepts after Run returned", p.HTTPAddr())
	}
	var msgs []string
	for _, e := range logs.All() {
		msgs = append(msgs, e.LoggerName+": "+e.Message)
	}
	for _, want := range []string{": starting", "grpc: serving KMS v2", "grpc: draining in-flight requests", ": stopped"} {
		if !strings.Contains(strings.Join(msgs, "\n"), want) {
			t.Errorf("logs %q; want one with %q", msgs, want)
		}
	}
	start := logs.FilterMessage("starting").All()
	if len(start) != 1 {
		t.Fatalf("%d starting lines; want 1", len(start))
	}
	f := start[0].ContextMap()
	if f["version"] != "v0.0.0-test" || f["provider"] != "local" || f["endpoint"] != "unix://"+sock || f["httpAddr"] != "127.0.0.1:0" || f["providerPollInterval"] != time.Hour {
		t.Errorf("starting fields = %v", f)
	}
}

// TestRunZeroConfig runs a plugin with only the required fields set: no
// admin server, default logger, registry and intervals.
func TestRunZeroConfig(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "kms.sock")
	p, err := New(Config{Provider: newLocal(t), Endpoint: "unix://" + sock})
	if err != nil {
		t.Fatal(err)
	}
	if p.HTTPAddr() != "" {
		t.Errorf("HTTPAddr = %q without an admin server", p.HTTPAddr())
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := start(t, ctx, p)
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	st, err := kmsapi.NewKeyManagementServiceClient(conn).Status(ctx, &kmsapi.StatusRequest{})
	if err != nil || st.Healthz != "ok" {
		t.Fatalf("Status = %v, %v", st, err)
	}
	cancel()
	if err := wait(t, done); err != nil {
		t.Fatalf("Run = %v; want nil after cancel", err)
	}
}

// TestRunSocketBusy checks that Run fails, naming the cause, when another
// plugin serves the socket, and releases the admin port it opened.
func TestRunSocketBusy(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "kms.sock")
	store := newLocal(t)
	first, err := New(Config{Provider: store, Endpoint: "unix://" + sock})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := start(t, ctx, first)

	second, err := New(Config{Provider: store, Endpoint: "unix://" + sock, HTTPAddr: "127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	err = second.Run(ctx)
	if err == nil || !strings.Contains(err.Error(), "another process is serving") {
		t.Fatalf("second Run = %v; want a refusal", err)
	}
	if c, err := net.DialTimeout("tcp", second.HTTPAddr(), time.Second); err == nil {
		c.Close()
		t.Errorf("admin port %s still open after a failed Run", second.HTTPAddr())
	}
	cancel()
	if err := wait(t, done); err != nil {
		t.Fatalf("first Run = %v", err)
	}
}

// TestRunParts checks that one part stopping stops the others, and which
// error Run returns.
func TestRunParts(t *testing.T) {
	boom := errors.New("boom")
	untilDone := func(ctx context.Context) error { <-ctx.Done(); return nil }
	for _, tt := range []struct {
		name   string
		cancel bool // cancel the parent context instead of a part failing
		first  func(context.Context) error
		want   string
	}{
		{"part fails", false, func(context.Context) error { return boom }, "first: boom"},
		{"part returns nil", false, func(context.Context) error { return nil }, ""},
		{"part returns canceled", false, func(context.Context) error { return context.Canceled }, ""},
		{"parent canceled", true, untilDone, ""},
		{"part fails on cancel", true, func(ctx context.Context) error { <-ctx.Done(); return boom }, "first: boom"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stopped := make(chan string, 2)
			track := func(name string, f func(context.Context) error) part {
				return part{name, func(ctx context.Context) error {
					defer func() { stopped <- name }()
					return f(ctx)
				}}
			}
			core, logs := observer.New(zap.InfoLevel)
			done := make(chan error, 1)
			go func() {
				done <- runParts(ctx, zap.New(core), []part{track("first", tt.first), track("second", untilDone)})
			}()
			if tt.cancel {
				cancel()
			}
			err := wait(t, done)
			if got := errString(err); got != tt.want {
				t.Fatalf("runParts = %q; want %q", got, tt.want)
			}
			if len(stopped) != 2 {
				t.Fatalf("%d parts stopped; want both", len(stopped))
			}
			if n := logs.FilterMessage("stopped").Len(); n != 1 {
				t.Fatalf("%d stopped lines; want 1", n)
			}
		})
	}
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func TestNewErrors(t *testing.T) {
	store := newLocal(t)
	sock := "unix://" + filepath.Join(t.TempDir(), "kms.sock")
	for _, tt := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no provider", Config{Endpoint: sock}, "plugin: no provider"},
		{"no endpoint", Config{Provider: store}, `plugin: endpoint "": must start with unix://`},
		{"tcp endpoint", Config{Provider: store, Endpoint: "tcp://127.0.0.1:1"}, "must start with unix://"},
		{"relative socket", Config{Provider: store, Endpoint: "unix://kms.sock"}, "socket path must be absolute"},
		{"long socket", Config{Provider: store, Endpoint: "unix:///" + strings.Repeat("a", 120)}, "more than the 107"},
		{"taken registry", Config{Provider: store, Endpoint: sock, Registerer: taken(t)}, "metrics: "},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p, err := New(tt.cfg)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("New = %v, %v; want an error containing %q", p, err, tt.want)
			}
		})
	}
}

// taken returns a registry that already holds the plugin's metrics.
func taken(t *testing.T) prometheus.Registerer {
	t.Helper()
	reg := prometheus.NewRegistry()
	if _, err := New(Config{Provider: newLocal(t), Endpoint: "unix:///tmp/x.sock", Registerer: reg}); err != nil {
		t.Fatal(err)
	}
	return reg
}

func TestRequestedRefreshLogsKeyIDChange(t *testing.T) {
	ctx := context.Background()
	lp := newLocal(t)
	svc, err := envelope.New(envelope.Config{Provider: lp})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.InfoLevel)
	refresh := requestedRefresh(svc, zap.New(core))

	if err := refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if n := logs.Len(); n != 0 {
		t.Fatalf("%d log entries for a refresh that changed nothing; want none", n)
	}
	old := svc.Stats().KeyID
	if _, err := lp.Rotate(ctx); err != nil {
		t.Fatal(err)
	}
	if err := refresh(ctx); err != nil {
		t.Fatal(err)
	}
	next := svc.Stats().KeyID
	entries := logs.TakeAll()
	if len(entries) != 1 {
		t.Fatalf("%d log entries; want 1", len(entries))
	}
	e := entries[0]
	fields := e.ContextMap()
	if e.Level != zap.InfoLevel || fields["keyIDHash"] != envelope.KeyIDHash(next) || fields["previousKeyIDHash"] != envelope.KeyIDHash(old) {
		t.Fatalf("log entry = %s %q %v; want info with both key_id hashes", e.Level, e.Message, fields)
	}
	for k, v := range fields {
		if s, ok := v.(string); ok && (strings.Contains(s, old) || strings.Contains(s, next)) {
			t.Errorf("log field %s carries a raw key_id", k)
		}
	}
}
