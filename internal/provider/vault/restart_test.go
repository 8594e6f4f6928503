package vault_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-plugin/kms-plugin/internal/plugin"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault/vaulttest"
)

// Vault killed (SIGKILL) and started again on its data, under the real
// plugin in process: the warm path keeps serving from the cached local
// KEKs with no request to Vault, /readyz reports the outage, the outage
// costs Vault few requests (no hot loop), and the plugin is ready again
// within seconds of Vault's return.
func TestVaultKilledAndRestarted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := vaulttest.MustStart(t, vaulttest.Options{})
	f := newFixture(t, srv, fixtureOpts{})

	sock := filepath.Join(t.TempDir(), "kms.sock")
	pl, err := plugin.New(plugin.Config{
		Provider:     f.p,
		Endpoint:     "unix://" + sock,
		HTTPAddr:     "127.0.0.1:0",
		PollInterval: 2 * time.Second,
		Registerer:   prometheus.NewRegistry(),
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- pl.Run(ctx) }()
	select {
	case <-pl.Ready():
	case err := <-done:
		t.Fatalf("plugin: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("plugin not ready")
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	kms := kmsapi.NewKeyManagementServiceClient(conn)
	readyz := func() int {
		resp, err := http.Get("http://" + pl.HTTPAddr() + "/readyz")
		if err != nil {
			return 0
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode
	}

	type obj struct {
		plain []byte
		enc   *kmsapi.EncryptResponse
	}
	var objs []obj
	for i := 0; i < 20; i++ {
		plain := []byte(fmt.Sprintf("seed-%02d-0123456789abcdef0123456", i))
		enc, err := kms.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: plain, Uid: "t"})
		if err != nil {
			t.Fatal(err)
		}
		objs = append(objs, obj{plain, enc})
	}
	decryptAll := func(when string) {
		t.Helper()
		for _, o := range objs {
			dec, err := kms.Decrypt(ctx, &kmsapi.DecryptRequest{Ciphertext: o.enc.Ciphertext, KeyId: o.enc.KeyId, Annotations: o.enc.Annotations, Uid: "t"})
			if err != nil || !bytes.Equal(dec.Plaintext, o.plain) {
				t.Fatalf("Decrypt %s: %v", when, err)
			}
		}
	}
	decryptAll("before the kill")
	if code := readyz(); code != http.StatusOK {
		t.Fatalf("/readyz = %d before the kill", code)
	}
	// The token's state is on /metrics (provider.StateReporter).
	if resp, err := http.Get("http://" + pl.HTTPAddr() + "/metrics"); err != nil {
		t.Fatal(err)
	} else {
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, m := range []string{"kms_plugin_provider_vault_token_expiry_timestamp_seconds", "kms_plugin_provider_vault_token_renewal_failing"} {
			if !bytes.Contains(body, []byte(m)) {
				t.Errorf("/metrics lacks %s", m)
			}
		}
	}

	srv.Kill()
	killed := time.Now()
	before := f.counter.Total()
	decryptAll("while Vault is down")
	if n := f.counter.Total() - before; n != 0 {
		t.Fatalf("the warm path cost %d requests to Vault; want 0", n)
	}
	if _, err := kms.Encrypt(ctx, &kmsapi.EncryptRequest{Plaintext: []byte("0123456789abcdef0123456789abcdef"), Uid: "t"}); err != nil {
		t.Fatalf("Encrypt while Vault is down: %v (the current local KEK must keep encrypting)", err)
	}
	eventually(t, 10*time.Second, "/readyz reporting the outage", func() error {
		if code := readyz(); code == http.StatusOK {
			return fmt.Errorf("/readyz = %d", code)
		}
		return nil
	})
	// Keep Vault down for 10 s while kube-apiserver would poll Status.
	for time.Since(killed) < 10*time.Second {
		if _, err := kms.Status(ctx, &kmsapi.StatusRequest{}); err != nil {
			t.Fatalf("Status while Vault is down: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	outage := f.counter.Total() - before
	// Polls every 2 s (retry interval), each at most one request plus one
	// client retry, thinned by the backoff: well under 20 in 10 s.
	if outage > 20 {
		t.Fatalf("10 s of outage cost %d requests: %v; want at most 20 (no hot loop)", outage, f.counter.Paths())
	}

	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	back := time.Now()
	eventually(t, 20*time.Second, "/readyz ok after Vault's return", func() error {
		if code := readyz(); code != http.StatusOK {
			return fmt.Errorf("/readyz = %d", code)
		}
		return nil
	})
	t.Logf("outage of %s cost %d requests; ready %s after Vault's return", back.Sub(killed).Round(100*time.Millisecond), outage, time.Since(back).Round(100*time.Millisecond))
	decryptAll("after the restart")
	if _, err := f.p.CurrentVersion(ctx); err != nil {
		t.Fatalf("CurrentVersion after the restart: %v", err)
	}
	cancel()
	<-done
}
