package server

import (
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	kmsapi "k8s.io/kms/apis/v2"

	"github.com/kms-plugin/kms-plugin/internal/clocktest"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// TestFailureFloodLogsOneLinePerCause sends 1,000 rejected and 1,000 failed
// requests: each cause is logged once per interval, every request is still
// counted by the observer, and the next line after the interval says how
// many were held back.
func TestFailureFloodLogsOneLinePerCause(t *testing.T) {
	core, logs := observer.New(zap.DebugLevel)
	clock := clocktest.New(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	obs := &recordingObserver{}
	svc := &scripted{encryptErr: envelope.ErrInvalidInput}
	r := start(t, Config{Service: svc, Logger: zap.New(core), Observer: obs, Now: clock.Now})
	send := func(n int) {
		for range n {
			if _, err := r.client.Encrypt(callCtx(t), &kmsapi.EncryptRequest{Plaintext: []byte("x")}); err == nil {
				t.Fatal("Encrypt succeeded; want the scripted error")
			}
		}
	}
	send(1000)
	svc.encryptErr = provider.ErrUnavailable
	send(1000)
	if got := logs.FilterMessage("request rejected").Len(); got != 1 {
		t.Fatalf("rejected-request lines for 1000 rejections = %d; want 1", got)
	}
	if got := logs.FilterMessage("request failed").Len(); got != 1 {
		t.Fatalf("failed-request lines for 1000 failures = %d; want 1", got)
	}
	obs.mu.Lock()
	counted := len(obs.calls)
	obs.mu.Unlock()
	if counted != 2000 {
		t.Fatalf("observer saw %d requests; want every one of 2000", counted)
	}

	clock.Add(DefaultFailureLogInterval)
	send(1)
	lines := logs.FilterMessage("request failed").All()
	if len(lines) != 2 {
		t.Fatalf("failed-request lines after the interval = %d; want 2", len(lines))
	}
	if got := lines[1].ContextMap()["similarSinceLastLine"]; got != uint64(999) {
		t.Fatalf("similarSinceLastLine = %v; want 999", got)
	}
}
