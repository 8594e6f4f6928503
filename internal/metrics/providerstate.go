package metrics

import (
	"regexp"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// descBreaker is the circuit breaker's state, for stores that have one.
var descBreaker = prometheus.NewDesc(namespace+"_provider_circuit_breaker_state",
	"1 for the state the key store's circuit breaker is in (closed, open, half_open), 0 for the others. Only stores with a breaker export it.",
	[]string{"provider", "state"}, nil)

// gaugeName is what a store's own gauge may be called: the suffix of
// kms_plugin_provider_<name>.
var gaugeName = regexp.MustCompile(`^[a-z][a-z0-9_]{0,63}$`)

// reservedGauges are suffixes of metrics this package exports itself: a
// store's gauge may not take them.
var reservedGauges = map[string]bool{
	"calls_total":                    true,
	"call_duration_seconds":          true,
	"last_success_timestamp_seconds": true,
	"circuit_breaker_state":          true,
}

// storeSource is the store whose state the plugin exports, and its name.
type storeSource struct {
	name     string
	reporter provider.StateReporter
}

// storeCollector exports a provider.StateReporter's state at every scrape:
// the breaker state and the store's own gauges. It is unchecked (Describe
// sends nothing): which gauges a store reports is known only once it is
// built.
type storeCollector struct {
	src *atomic.Pointer[storeSource]
}

func (storeCollector) Describe(chan<- *prometheus.Desc) {}

func (c storeCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.src.Load()
	if s == nil {
		return
	}
	st := s.reporter.ReportState()
	if st.Breaker != provider.BreakerNone {
		for _, b := range provider.BreakerStates() {
			v := 0.0
			if b == st.Breaker {
				v = 1
			}
			ch <- prometheus.MustNewConstMetric(descBreaker, prometheus.GaugeValue, v, s.name, string(b))
		}
	}
	seen := map[string]bool{}
	for _, g := range st.Gauges {
		// A bad or repeated name is a bug of the store; drop it rather
		// than fail the whole scrape.
		if !gaugeName.MatchString(g.Name) || reservedGauges[g.Name] || seen[g.Name] {
			continue
		}
		seen[g.Name] = true
		help := g.Help
		if help == "" {
			help = "Key store gauge " + g.Name + "."
		}
		d := prometheus.NewDesc(namespace+"_provider_"+g.Name, help, []string{"provider"}, nil)
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, g.Value, s.name)
	}
}

// watchStore makes the metrics export p's state when p is a
// provider.StateReporter.
func (m *Metrics) watchStore(p provider.Provider) {
	if r, ok := p.(provider.StateReporter); ok {
		m.store.Store(&storeSource{name: p.Name(), reporter: r})
	}
}
