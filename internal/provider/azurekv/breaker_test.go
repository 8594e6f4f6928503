package azurekv

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/clocktest"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

type retryAfter interface{ RetryAfter() time.Duration }

// TestCircuitOpenSaysWhenToRetry checks that the open breaker's error,
// wrapped as callers wrap it, says how long until the breaker lets a
// probe through.
func TestCircuitOpenSaysWhenToRetry(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	clock := clocktest.New(time.Now())
	p := newTestProvider(t, srv, "k", kvtest.KeyTypeRSA, func(c *Config) {
		c.Now, c.FailureThreshold, c.OpenDuration, c.MaxRetries = clock.Now, 2, time.Minute, -1
	})
	ctx := context.Background()
	if _, err := p.CurrentVersion(ctx); err != nil {
		t.Fatal(err)
	}
	srv.SetOutage(true)
	_, err := p.CurrentVersion(ctx)
	var ra retryAfter
	if !errors.Is(err, provider.ErrUnavailable) || errors.As(err, &ra) && ra.RetryAfter() > 0 {
		t.Fatalf("a first failure = %v; want ErrUnavailable without a retry hint", err)
	}
	_, err = p.CurrentVersion(ctx)
	if !errors.Is(err, provider.ErrUnavailable) || !errors.As(err, &ra) || ra.RetryAfter() != time.Minute {
		t.Fatalf("the failure that opens the breaker = %v; want ErrUnavailable with a retry hint of a minute", err)
	}
	for _, tt := range []struct {
		after time.Duration
		want  time.Duration
	}{{0, time.Minute}, {20 * time.Second, 40 * time.Second}, {59 * time.Second, time.Second}} {
		c := clocktest.New(clock.Now().Add(tt.after))
		p.cfg.Now = c.Now
		_, err := p.Unwrap(ctx, provider.WrappedKey{Version: p.kidOf("k", "0123456789abcdef0123456789abcdef"), Ciphertext: []byte{1, 2}})
		err = fmt.Errorf("refresh: %w", err)
		if !errors.Is(err, errCircuitOpen) || !errors.As(err, &ra) {
			t.Fatalf("%s after opening: %v; want the open circuit with a retry hint", tt.after, err)
		}
		if got := ra.RetryAfter(); got != tt.want {
			t.Fatalf("%s after opening: RetryAfter = %s; want %s", tt.after, got, tt.want)
		}
	}
	p.cfg.Now = clock.Now
}

// TestRunProbesWhenTheBreakerAllows starts a plugin during an outage with
// a long retry interval: once the vault is back, the envelope's loop polls
// again when the breaker allows a probe, not a retry interval later.
func TestRunProbesWhenTheBreakerAllows(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	p := newTestProvider(t, srv, "k", kvtest.KeyTypeRSA, func(c *Config) {
		c.FailureThreshold, c.OpenDuration, c.MaxRetries = 1, 300*time.Millisecond, -1
	})
	if _, err := p.CurrentVersion(context.Background()); err != nil { // token cached
		t.Fatal(err)
	}
	srv.SetOutage(true)
	svc, err := envelope.New(envelope.Config{Provider: p, PollInterval: time.Hour, RetryInterval: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	deadline := time.Now().Add(5 * time.Second)
	for svc.Stats().LastAttempt.IsZero() {
		if time.Now().After(deadline) {
			t.Fatal("no first poll")
		}
		time.Sleep(10 * time.Millisecond)
	}
	srv.SetOutage(false)
	for !svc.Stats().Ready {
		if time.Now().After(deadline) {
			t.Fatalf("not ready %s after the vault came back: %+v", 5*time.Second, svc.Stats())
		}
		time.Sleep(20 * time.Millisecond)
	}
}
