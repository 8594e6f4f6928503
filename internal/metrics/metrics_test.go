package metrics

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
)

func TestOutcome(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{nil, "ok"},
		{fmt.Errorf("x: %w", provider.ErrUnavailable), "unavailable"},
		{provider.ErrPermissionDenied, "permission_denied"},
		{provider.ErrKeyNotFound, "not_found"},
		{provider.ErrKeyDisabled, "disabled"},
		{provider.ErrInvalidCiphertext, "invalid_ciphertext"},
		{context.DeadlineExceeded, "timeout"},
		{errors.New("vault said: secret-token-123"), "error"},
	} {
		if got := Outcome(tt.err); got != tt.want {
			t.Errorf("Outcome(%v) = %q; want %q", tt.err, got, tt.want)
		}
	}
}

func TestProviderAndStatsMetrics(t *testing.T) {
	ctx := context.Background()
	lp, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "k.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	faulty := providertest.NewFaulty(lp)
	reg := prometheus.NewRegistry()
	var svc *envelope.Service
	m, err := New(reg, func() envelope.Stats { return svc.Stats() })
	if err != nil {
		t.Fatal(err)
	}
	svc, _ = envelope.New(envelope.Config{Provider: m.InstrumentProvider(faulty)})
	if err := svc.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	faulty.SetError(fmt.Errorf("down: %w", provider.ErrUnavailable))
	_ = svc.Refresh(ctx)
	m.ObserveRPC("Encrypt", "OK", time.Millisecond)
	m.ObserveRefresh("ok")
	m.ObserveRefresh("throttled")
	m.ObserveRefresh("throttled")
	m.ObserveRefresh("local: keyset: down") // not a result: counted as error

	want := `
# HELP kms_plugin_provider_calls_total Calls to the key store by provider, operation and outcome.
# TYPE kms_plugin_provider_calls_total counter
kms_plugin_provider_calls_total{operation="current_version",outcome="ok",provider="local"} 1
kms_plugin_provider_calls_total{operation="current_version",outcome="unavailable",provider="local"} 1
kms_plugin_provider_calls_total{operation="wrap",outcome="ok",provider="local"} 1
# HELP kms_plugin_grpc_requests_total KMS v2 gRPC requests by method and status code.
# TYPE kms_plugin_grpc_requests_total counter
kms_plugin_grpc_requests_total{code="OK",method="Encrypt"} 1
# HELP kms_plugin_refresh_requests_total POST /refresh requests by result (ok, error, throttled).
# TYPE kms_plugin_refresh_requests_total counter
kms_plugin_refresh_requests_total{result="error"} 1
kms_plugin_refresh_requests_total{result="ok"} 1
kms_plugin_refresh_requests_total{result="throttled"} 2
# HELP kms_plugin_ready 1 when the key store answered the last poll and the state is fresh.
# TYPE kms_plugin_ready gauge
kms_plugin_ready 0
# HELP kms_plugin_local_keks_created_total Local KEKs created since start.
# TYPE kms_plugin_local_keks_created_total counter
kms_plugin_local_keks_created_total 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"kms_plugin_provider_calls_total", "kms_plugin_grpc_requests_total", "kms_plugin_refresh_requests_total", "kms_plugin_ready", "kms_plugin_local_keks_created_total"); err != nil {
		t.Fatal(err)
	}
	st := svc.Stats()
	info := fmt.Sprintf(`
# HELP kms_plugin_key_id_info The current key_id, as a short hash; value 1.
# TYPE kms_plugin_key_id_info gauge
kms_plugin_key_id_info{key_id_hash=%q,provider="local"} 1
`, envelope.KeyIDHash(st.KeyID))
	if err := testutil.GatherAndCompare(reg, strings.NewReader(info), "kms_plugin_key_id_info"); err != nil {
		t.Fatal(err)
	}
	// No label value may carry an error text or a raw key_id.
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			for _, l := range mt.GetLabel() {
				if strings.Contains(l.GetValue(), "down") || l.GetValue() == st.KeyID {
					t.Errorf("%s has label %s=%q", mf.GetName(), l.GetName(), l.GetValue())
				}
			}
		}
	}
}

func TestUnwrapsAvoidedMetrics(t *testing.T) {
	ctx := context.Background()
	lp, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "k.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	writer, _ := envelope.New(envelope.Config{Provider: lp})
	if err := writer.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	resp, err := writer.Encrypt(ctx, "uid", make([]byte, 32))
	if err != nil {
		t.Fatal(err)
	}
	faulty := providertest.NewFaulty(lp)
	faulty.SetError(fmt.Errorf("revoked: %w", provider.ErrKeyDisabled))
	reg := prometheus.NewRegistry()
	var reader *envelope.Service
	if _, err := New(reg, func() envelope.Stats { return reader.Stats() }); err != nil {
		t.Fatal(err)
	}
	reader, _ = envelope.New(envelope.Config{Provider: faulty})
	for range 3 {
		req := &kmsservice.DecryptRequest{Ciphertext: resp.Ciphertext, KeyID: resp.KeyID, Annotations: resp.Annotations}
		if _, err := reader.Decrypt(ctx, "uid", req); !errors.Is(err, provider.ErrKeyDisabled) {
			t.Fatalf("Decrypt = %v; want ErrKeyDisabled", err)
		}
	}
	want := `
# HELP kms_plugin_decrypt_unwraps_avoided_total Decrypt cache misses answered without a remote unwrap, by reason: invalid_version (a spelling of the key version the store never writes), negative_cache (the same wrapped KEK was refused moments ago) or throttled (the unwrap rate or concurrency limit was reached).
# TYPE kms_plugin_decrypt_unwraps_avoided_total counter
kms_plugin_decrypt_unwraps_avoided_total{reason="invalid_version"} 0
kms_plugin_decrypt_unwraps_avoided_total{reason="negative_cache"} 2
kms_plugin_decrypt_unwraps_avoided_total{reason="throttled"} 0
# HELP kms_plugin_negative_cache_entries Refused wrapped local KEKs remembered.
# TYPE kms_plugin_negative_cache_entries gauge
kms_plugin_negative_cache_entries 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "kms_plugin_decrypt_unwraps_avoided_total", "kms_plugin_negative_cache_entries"); err != nil {
		t.Fatal(err)
	}
}

func TestAuthFailureMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := New(reg, func() envelope.Stats { return envelope.Stats{} })
	if err != nil {
		t.Fatal(err)
	}
	m.ObserveAuthFailure("refresh")
	m.ObserveAuthFailure("refresh")
	m.ObserveAuthFailure("/etc/passwd") // not an endpoint: bounded to status
	want := `
# HELP kms_plugin_admin_auth_failures_total Admin HTTP requests refused for a missing, wrong or not admitted credential, by endpoint (status, refresh, metrics).
# TYPE kms_plugin_admin_auth_failures_total counter
kms_plugin_admin_auth_failures_total{endpoint="metrics"} 0
kms_plugin_admin_auth_failures_total{endpoint="refresh"} 2
kms_plugin_admin_auth_failures_total{endpoint="status"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "kms_plugin_admin_auth_failures_total"); err != nil {
		t.Fatal(err)
	}
}
