package envelope

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/provider/providertest"
)

// realClockFixture is a Service on the real clock (Run uses real timers).
func realClockFixture(t *testing.T, mutate func(*Config)) (*Service, *providertest.Faulty) {
	t.Helper()
	lp, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "keyset.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	remote := providertest.NewFaulty(lp)
	cfg := Config{Provider: remote, PollInterval: time.Hour, RetryInterval: time.Hour}
	if mutate != nil {
		mutate(&cfg)
	}
	svc, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return svc, remote
}

func runInBackground(t *testing.T, svc *Service) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v", err)
		}
	})
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestRunCountsTheRefreshBeforeIt: serve polls once before opening the
// socket; Run must not poll again at once (two identical GETs at start-up).
func TestRunCountsTheRefreshBeforeIt(t *testing.T) {
	svc, remote := realClockFixture(t, nil)
	if err := svc.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	runInBackground(t, svc)
	time.Sleep(200 * time.Millisecond)
	if got := remote.CurrentVersionCalls.Load(); got != 1 {
		t.Fatalf("key store polls at start-up = %d; want 1", got)
	}
}

// TestStatusWakesRunWhileNotReady starts a plugin during an outage with a
// long retry interval: once the store is back, the apiserver's next Status
// makes it poll, so it becomes ready in about a second, not at the retry.
func TestStatusWakesRunWhileNotReady(t *testing.T) {
	svc, remote := realClockFixture(t, nil)
	remote.SetError(fmt.Errorf("down: %w", provider.ErrUnavailable))
	runInBackground(t, svc)
	waitFor(t, "the first failed poll", func() bool { return remote.CurrentVersionCalls.Load() == 1 })
	remote.SetError(nil)
	waitFor(t, "a Status call to make the plugin ready", func() bool {
		st, _ := svc.Status(context.Background())
		return st.Healthz == "ok"
	})
}

// retryAfterError is a store error that says when to retry.
type retryAfterError struct{ d time.Duration }

func (e retryAfterError) Error() string             { return "breaker open: " + provider.ErrUnavailable.Error() }
func (e retryAfterError) Unwrap() error             { return provider.ErrUnavailable }
func (e retryAfterError) RetryAfter() time.Duration { return e.d }

// TestRunHonoursRetryAfter: after an error that names its retry time (a
// circuit breaker's half-open time), Run polls then, not at RetryInterval.
func TestRunHonoursRetryAfter(t *testing.T) {
	svc, remote := realClockFixture(t, nil)
	remote.SetError(fmt.Errorf("azurekv: %w", retryAfterError{200 * time.Millisecond}))
	runInBackground(t, svc)
	waitFor(t, "the second poll, 200 ms after the first", func() bool { return remote.CurrentVersionCalls.Load() >= 2 })
}
