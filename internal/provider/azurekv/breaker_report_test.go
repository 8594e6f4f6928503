package azurekv

import (
	"context"
	"testing"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/clocktest"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv/kvtest"
)

// TestReportStateFollowsTheBreaker drives the breaker through an outage
// against the Key Vault test server and checks what ReportState says at
// each step: closed while the vault answers, open while calls fail fast,
// half-open once the next call is the probe, closed again after a
// successful probe.
func TestReportStateFollowsTheBreaker(t *testing.T) {
	srv := startServer(t, kvtest.Options{})
	clock := clocktest.New(time.Now())
	p := newTestProvider(t, srv, "k", kvtest.KeyTypeRSA, func(c *Config) {
		c.Now, c.FailureThreshold, c.OpenDuration, c.MaxRetries = clock.Now, 2, time.Minute, -1
	})
	ctx := context.Background()
	want := func(step string, s provider.BreakerState) {
		t.Helper()
		if got := p.ReportState().Breaker; got != s {
			t.Fatalf("%s: breaker reported %q; want %q", step, got, s)
		}
	}
	if _, err := p.CurrentVersion(ctx); err != nil {
		t.Fatal(err)
	}
	want("vault answering", provider.BreakerClosed)
	srv.SetOutage(true)
	_, _ = p.CurrentVersion(ctx)
	want("one failure, below the threshold", provider.BreakerClosed)
	_, _ = p.CurrentVersion(ctx)
	want("threshold reached", provider.BreakerOpen)
	clock.Add(59 * time.Second)
	want("within the open duration", provider.BreakerOpen)
	clock.Add(time.Second)
	want("open duration over: the next call probes", provider.BreakerHalfOpen)
	_, _ = p.CurrentVersion(ctx)
	want("failed probe", provider.BreakerOpen)
	srv.SetOutage(false)
	clock.Add(time.Minute)
	if _, err := p.CurrentVersion(ctx); err != nil {
		t.Fatalf("probe with the vault back: %v", err)
	}
	want("successful probe", provider.BreakerClosed)
	if g := p.ReportState().Gauges; len(g) != 0 {
		t.Fatalf("gauges %v; azurekv reports none", g)
	}
}
