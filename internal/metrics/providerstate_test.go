package metrics

import (
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
)

// reporting is a real local store that also reports a state the test sets.
type reporting struct {
	provider.Provider
	mu sync.Mutex
	st provider.StoreState
}

func (r *reporting) ReportState() provider.StoreState {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.st
}

func (r *reporting) set(st provider.StoreState) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.st = st
}

func TestStoreStateMetrics(t *testing.T) {
	lp, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "k.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name  string
		state provider.StoreState
		want  string
	}{
		{name: "no breaker, no gauges", want: ""},
		{
			name:  "breaker open",
			state: provider.StoreState{Breaker: provider.BreakerOpen},
			want: `
# HELP kms_plugin_provider_circuit_breaker_state 1 for the state the key store's circuit breaker is in (closed, open, half_open), 0 for the others. Only stores with a breaker export it.
# TYPE kms_plugin_provider_circuit_breaker_state gauge
kms_plugin_provider_circuit_breaker_state{provider="local",state="closed"} 0
kms_plugin_provider_circuit_breaker_state{provider="local",state="half_open"} 0
kms_plugin_provider_circuit_breaker_state{provider="local",state="open"} 1
`,
		},
		{
			name: "store gauges: valid ones kept, bad, reserved and repeated names dropped",
			state: provider.StoreState{Breaker: provider.BreakerClosed, Gauges: []provider.Gauge{
				{Name: "token_expiry_timestamp_seconds", Help: "When the token expires.", Value: 1.7e9},
				{Name: "token_expiry_timestamp_seconds", Help: "again", Value: 1},
				{Name: "Bad-Name", Value: 2},
				{Name: "calls_total", Value: 3},
				{Name: "", Value: 4},
			}},
			want: `
# HELP kms_plugin_provider_circuit_breaker_state 1 for the state the key store's circuit breaker is in (closed, open, half_open), 0 for the others. Only stores with a breaker export it.
# TYPE kms_plugin_provider_circuit_breaker_state gauge
kms_plugin_provider_circuit_breaker_state{provider="local",state="closed"} 1
kms_plugin_provider_circuit_breaker_state{provider="local",state="half_open"} 0
kms_plugin_provider_circuit_breaker_state{provider="local",state="open"} 0
# HELP kms_plugin_provider_token_expiry_timestamp_seconds When the token expires.
# TYPE kms_plugin_provider_token_expiry_timestamp_seconds gauge
kms_plugin_provider_token_expiry_timestamp_seconds{provider="local"} 1.7e+09
`,
		},
	} {
		t.Run(tt.name, func(t *testing.T) {
			reg := prometheus.NewPedanticRegistry()
			m, err := New(reg, func() envelope.Stats { return envelope.Stats{} })
			if err != nil {
				t.Fatal(err)
			}
			r := &reporting{Provider: lp}
			r.set(tt.state)
			m.InstrumentProvider(r)
			names := []string{"kms_plugin_provider_circuit_breaker_state", "kms_plugin_provider_token_expiry_timestamp_seconds",
				"kms_plugin_provider_Bad-Name", "kms_plugin_provider_calls_total", "kms_plugin_provider_"}
			if err := testutil.GatherAndCompare(reg, strings.NewReader(tt.want), names...); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestStoreWithoutStateExportsNoBreaker checks that a store that is not a
// StateReporter gets no breaker series (an alert on it must not fire for a
// store that has no breaker).
func TestStoreWithoutStateExportsNoBreaker(t *testing.T) {
	lp, err := local.New(local.Config{Path: filepath.Join(t.TempDir(), "k.json"), Create: true})
	if err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewPedanticRegistry()
	m, err := New(reg, func() envelope.Stats { return envelope.Stats{} })
	if err != nil {
		t.Fatal(err)
	}
	m.InstrumentProvider(lp)
	n, err := testutil.GatherAndCount(reg, "kms_plugin_provider_circuit_breaker_state")
	if err != nil || n != 0 {
		t.Fatalf("breaker series %d (%v); want none", n, err)
	}
}
