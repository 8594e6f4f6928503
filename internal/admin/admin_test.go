package admin

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
)

func TestEndpoints(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	ready := envelope.Stats{Provider: "local", KeyID: "kp1.abc", RemoteVersion: "42", Ready: true, LastSuccess: now, LastAttempt: now, CacheEntries: 3, CacheCapacity: 10, CacheHits: 7, CacheMisses: 2, ProviderUnwrap: 2, LocalKEKs: 1}
	tests := []struct {
		name       string
		stats      envelope.Stats
		path       string
		wantCode   int
		wantInBody string
	}{
		{"livez", envelope.Stats{}, "/livez", 200, "ok"},
		{"readyz ready", ready, "/readyz", 200, "ok"},
		{"readyz before first poll", envelope.Stats{}, "/readyz", 503, "no key-encryption key yet"},
		{"readyz poll failing", envelope.Stats{KeyID: "k", LastError: "local: keyset: permission denied"}, "/readyz", 503, "key store poll failed: local: keyset: permission denied"},
		{"readyz stale", envelope.Stats{KeyID: "k", LastSuccess: now}, "/readyz", 503, "stale"},
		{"status", ready, "/status", 200, `"keyID": "kp1.abc"`},
		{"metrics", ready, "/metrics", 200, "test_metric 1"},
		{"unknown", ready, "/nope", 404, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "test_metric"}, func() float64 { return 1 }))
			s, err := New(Config{Addr: "127.0.0.1:0", Stats: func() envelope.Stats { return tt.stats }, Gatherer: reg, Version: "v-test"})
			if err != nil {
				t.Fatal(err)
			}
			rec := httptest.NewRecorder()
			s.Handler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, tt.path, nil))
			if rec.Code != tt.wantCode || !strings.Contains(rec.Body.String(), tt.wantInBody) {
				t.Fatalf("GET %s = %d %q; want %d containing %q", tt.path, rec.Code, rec.Body.String(), tt.wantCode, tt.wantInBody)
			}
		})
	}
}

func TestStatusJSONContract(t *testing.T) {
	now := time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)
	st := StatusOf(envelope.Stats{Provider: "local", KeyID: "kp1.abc", RemoteVersion: "42", Ready: true, LastSuccess: now, CacheEntries: 3}, "v1")
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	// Field names other tools read: never rename them.
	for _, k := range []string{"version", "provider", "keyID", "keyIDHash", "remoteVersion", "ready", "lastRefresh", "localKEK", "cache"} {
		if _, ok := m[k]; !ok {
			t.Errorf("/status lacks %q: %s", k, b)
		}
	}
	if m["keyIDHash"] != envelope.KeyIDHash("kp1.abc") {
		t.Errorf("keyIDHash = %v", m["keyIDHash"])
	}
}

func TestServeAndShutdown(t *testing.T) {
	s, err := New(Config{Addr: "127.0.0.1:0", Stats: func() envelope.Stats { return envelope.Stats{} }})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	resp, err := http.Get("http://" + s.Addr() + "/livez")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || strings.TrimSpace(string(body)) != "ok" {
		t.Fatalf("/livez = %d %q", resp.StatusCode, body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Serve = %v", err)
	}
	if _, err := http.Get("http://" + s.Addr() + "/livez"); err == nil {
		t.Fatal("still serving after shutdown")
	}
}
