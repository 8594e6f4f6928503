package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kms-plugin/kms-plugin/internal/clocktest"
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

// results records ObserveRefresh calls.
type results struct {
	mu  sync.Mutex
	got []string
}

func (r *results) ObserveRefresh(result string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.got = append(r.got, result)
}

func (r *results) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

// keyStore stands for the key hierarchy: Refresh moves the key_id to the
// next version, or fails with err.
type keyStore struct {
	mu      sync.Mutex
	version int
	err     error
	calls   int
}

func (k *keyStore) Refresh(context.Context) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.calls++
	if k.err != nil {
		return k.err
	}
	k.version++
	return nil
}

func (k *keyStore) Stats() envelope.Stats {
	k.mu.Lock()
	defer k.mu.Unlock()
	return envelope.Stats{Provider: "local", KeyID: fmt.Sprintf("kp1.v%d", k.version), RemoteVersion: strconv.Itoa(k.version), Ready: k.err == nil}
}

func TestRefresh(t *testing.T) {
	type step struct {
		advance        time.Duration // the clock moves before the request
		method         string
		wantCode       int
		wantInBody     string
		wantRetryAfter string
	}
	post := func(advance time.Duration, code int, inBody, retryAfter string) step {
		return step{advance, http.MethodPost, code, inBody, retryAfter}
	}
	denied := errors.New("refresh: local: keyset: permission denied")
	tests := []struct {
		name        string
		noRefresh   bool // Config.Refresh left nil
		err         error
		minInterval time.Duration
		steps       []step
		wantCalls   int
		wantResults []string
	}{
		{
			name:        "ok answers the status after the refresh",
			steps:       []step{post(0, 200, `"keyID": "kp1.v1"`, "")},
			wantCalls:   1,
			wantResults: []string{"ok"},
		},
		{
			name:        "error",
			err:         denied,
			steps:       []step{post(0, 503, "refresh: local: keyset: permission denied", "")},
			wantCalls:   1,
			wantResults: []string{"error"},
		},
		{
			name: "twice within the default interval",
			steps: []step{
				post(0, 200, `"keyID": "kp1.v1"`, ""),
				post(300*time.Millisecond, 429, "retry in 1 s", "1"),
				post(700*time.Millisecond, 200, `"keyID": "kp1.v2"`, ""),
			},
			wantCalls:   2,
			wantResults: []string{"ok", "throttled", "ok"},
		},
		{
			name:        "retry-after rounds up",
			minInterval: 5 * time.Second,
			steps: []step{
				post(0, 200, "", ""),
				post(1500*time.Millisecond, 429, "", "4"),
				post(3*time.Second, 429, "", "1"),
				post(500*time.Millisecond, 200, `"keyID": "kp1.v2"`, ""),
			},
			wantCalls:   2,
			wantResults: []string{"ok", "throttled", "throttled", "ok"},
		},
		{
			name:        "a failed refresh counts toward the interval",
			err:         denied,
			steps:       []step{post(0, 503, "", ""), post(0, 429, "", "1")},
			wantCalls:   1,
			wantResults: []string{"error", "throttled"},
		},
		{
			name:      "GET is not allowed",
			steps:     []step{{0, http.MethodGet, 405, "", ""}, {0, http.MethodPut, 405, "", ""}},
			wantCalls: 0,
		},
		{
			name:      "not configured",
			noRefresh: true,
			steps:     []step{post(0, 404, "", ""), {0, http.MethodGet, 404, "", ""}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ks := &keyStore{err: tt.err}
			clock := clocktest.New(time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC))
			obs := &results{}
			cfg := Config{Addr: "127.0.0.1:0", Stats: ks.Stats, Refresh: ks.Refresh, RefreshMinInterval: tt.minInterval, Observer: obs, Now: clock.Now}
			if tt.noRefresh {
				cfg.Refresh = nil
			}
			s, err := New(cfg)
			if err != nil {
				t.Fatal(err)
			}
			h := s.Handler()
			for i, st := range tt.steps {
				clock.Add(st.advance)
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, httptest.NewRequest(st.method, "/refresh", nil))
				if rec.Code != st.wantCode || !strings.Contains(rec.Body.String(), st.wantInBody) {
					t.Fatalf("step %d: %s /refresh = %d %q; want %d containing %q", i, st.method, rec.Code, rec.Body.String(), st.wantCode, st.wantInBody)
				}
				if got := rec.Header().Get("Retry-After"); got != st.wantRetryAfter {
					t.Errorf("step %d: Retry-After = %q; want %q", i, got, st.wantRetryAfter)
				}
				wantType := "text/plain; charset=utf-8"
				if rec.Code == 200 {
					wantType = "application/json"
				}
				if got := rec.Header().Get("Content-Type"); rec.Code != 404 && got != wantType {
					t.Errorf("step %d: Content-Type = %q; want %q", i, got, wantType)
				}
				if rec.Code == 405 && rec.Header().Get("Allow") != "POST" {
					t.Errorf("step %d: Allow = %q; want POST", i, rec.Header().Get("Allow"))
				}
				if rec.Code == 200 {
					var doc Status
					if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
						t.Fatalf("step %d: body is not a status document: %v", i, err)
					}
					if want := StatusOf(ks.Stats(), ""); doc.KeyID != want.KeyID || doc.KeyIDHash != want.KeyIDHash || doc.RemoteVersion != want.RemoteVersion {
						t.Errorf("step %d: body = %+v; want the status after the refresh %+v", i, doc, want)
					}
				}
			}
			if ks.calls != tt.wantCalls {
				t.Errorf("Refresh calls = %d; want %d", ks.calls, tt.wantCalls)
			}
			if got := obs.list(); !slices.Equal(got, tt.wantResults) {
				t.Errorf("observed results = %q; want %q", got, tt.wantResults)
			}
		})
	}
}

// TestRefreshCoalesced sends a second request while the first one's refresh
// runs: both share the one call and its result.
func TestRefreshCoalesced(t *testing.T) {
	tests := []struct {
		name     string
		err      error
		wantCode int
		wantBody string
	}{
		{"success", nil, 200, `"keyID": "kp1.v1"`},
		{"failure", errors.New("refresh: azurekv: get key: key store unavailable"), 503, "refresh: azurekv: get key: key store unavailable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ks := &keyStore{err: tt.err}
			entered, release := make(chan struct{}), make(chan struct{})
			var once sync.Once
			refresh := func(ctx context.Context) error {
				once.Do(func() { close(entered) })
				select {
				case <-release:
				case <-ctx.Done():
					return ctx.Err()
				}
				return ks.Refresh(ctx)
			}
			obs := &results{}
			s, err := New(Config{Addr: "127.0.0.1:0", Stats: ks.Stats, Refresh: refresh, Observer: obs})
			if err != nil {
				t.Fatal(err)
			}
			h := s.Handler()
			recs := []*httptest.ResponseRecorder{httptest.NewRecorder(), httptest.NewRecorder()}
			var wg sync.WaitGroup
			serve := func(rec *httptest.ResponseRecorder) {
				wg.Add(1)
				go func() {
					defer wg.Done()
					h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/refresh", nil))
				}()
			}
			serve(recs[0])
			<-entered
			serve(recs[1])
			waitWaiters(t, s, 1)
			close(release)
			wg.Wait()
			for i, rec := range recs {
				if rec.Code != tt.wantCode || !strings.Contains(rec.Body.String(), tt.wantBody) {
					t.Errorf("request %d: POST /refresh = %d %q; want %d containing %q", i, rec.Code, rec.Body.String(), tt.wantCode, tt.wantBody)
				}
			}
			if ks.calls != 1 {
				t.Errorf("Refresh calls = %d; want 1", ks.calls)
			}
			if got := obs.list(); len(got) != 2 {
				t.Errorf("observed results = %q; want two", got)
			}
		})
	}
}

// waitWaiters waits until n requests joined the refresh in flight.
func waitWaiters(t *testing.T, s *Server, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		s.refreshMu.Lock()
		got := 0
		if s.refreshing != nil {
			got = s.refreshing.waiters
		}
		s.refreshMu.Unlock()
		if got == n {
			return
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("no %d requests joined the refresh in flight after 5 s", n)
}
