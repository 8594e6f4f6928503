// Package metrics defines the plugin's Prometheus metrics. Every label has a
// small fixed set of values (method, code, provider, operation, outcome, a
// short key_id hash): never raw errors, key ids or request data.
package metrics

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/provider"
)

const namespace = "kms_plugin"

// Metrics holds the collectors the server and the provider decorator update.
type Metrics struct {
	rpcs         *prometheus.CounterVec
	rpcDuration  *prometheus.HistogramVec
	calls        *prometheus.CounterVec
	callDuration *prometheus.HistogramVec
	refreshes    *prometheus.CounterVec
	authFailures *prometheus.CounterVec
	// store is the instrumented store when it reports its own state
	// (provider.StateReporter).
	store atomic.Pointer[storeSource]
}

// refreshResults are the result label values of refresh_requests_total.
var refreshResults = []string{"ok", "error", "throttled"}

// authEndpoints are the endpoint label values of
// admin_auth_failures_total: the admin endpoints that require a credential.
var authEndpoints = []string{"status", "refresh", "metrics"}

// New creates the metrics and registers them, with Go runtime and process
// collectors and a collector reading stats at every scrape, on reg.
func New(reg prometheus.Registerer, stats func() envelope.Stats) (*Metrics, error) {
	m := &Metrics{
		rpcs: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "grpc_requests_total",
			Help: "KMS v2 gRPC requests by method and status code.",
		}, []string{"method", "code"}),
		rpcDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "grpc_request_duration_seconds",
			Help:    "KMS v2 gRPC request latency by method.",
			Buckets: []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5},
		}, []string{"method"}),
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "provider_calls_total",
			Help: "Calls to the key store by provider, operation and outcome.",
		}, []string{"provider", "operation", "outcome"}),
		callDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: namespace, Name: "provider_call_duration_seconds",
			Help:    "Key store call latency by provider and operation.",
			Buckets: prometheus.ExponentialBuckets(.0005, 2.5, 12),
		}, []string{"provider", "operation"}),
		refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "refresh_requests_total",
			Help: "POST /refresh requests by result (ok, error, throttled).",
		}, []string{"result"}),
		authFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: namespace, Name: "admin_auth_failures_total",
			Help: "Admin HTTP requests refused for a missing, wrong or not admitted credential, by endpoint (status, refresh, metrics).",
		}, []string{"endpoint"}),
	}
	for _, e := range authEndpoints {
		m.authFailures.WithLabelValues(e)
	}
	for _, r := range refreshResults {
		m.refreshes.WithLabelValues(r) // export zeros before the first request
	}
	for _, c := range []prometheus.Collector{
		m.rpcs, m.rpcDuration, m.calls, m.callDuration, m.refreshes, m.authFailures,
		&statsCollector{stats: stats},
		storeCollector{src: &m.store},
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// ObserveRPC records one gRPC request.
func (m *Metrics) ObserveRPC(method, code string, d time.Duration) {
	m.rpcs.WithLabelValues(method, code).Inc()
	m.rpcDuration.WithLabelValues(method).Observe(d.Seconds())
}

// ObserveRefresh records one POST /refresh request by result: "ok",
// "error" or "throttled". Any other value is counted as "error", so the
// label stays bounded.
func (m *Metrics) ObserveRefresh(result string) {
	if !slices.Contains(refreshResults, result) {
		result = "error"
	}
	m.refreshes.WithLabelValues(result).Inc()
}

// ObserveAuthFailure records one admin request refused for its credential.
// An endpoint outside status, refresh and metrics is counted as status, so
// the label stays bounded.
func (m *Metrics) ObserveAuthFailure(endpoint string) {
	if !slices.Contains(authEndpoints, endpoint) {
		endpoint = "status"
	}
	m.authFailures.WithLabelValues(endpoint).Inc()
}

// Outcome classifies a provider error into a bounded label value.
func Outcome(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, provider.ErrUnavailable):
		return "unavailable"
	case errors.Is(err, provider.ErrPermissionDenied):
		return "permission_denied"
	case errors.Is(err, provider.ErrKeyNotFound):
		return "not_found"
	case errors.Is(err, provider.ErrKeyDisabled):
		return "disabled"
	case errors.Is(err, provider.ErrInvalidCiphertext):
		return "invalid_ciphertext"
	default:
		return "error"
	}
}

// InstrumentProvider returns p with every call counted and timed. The
// result keeps p's provider.VersionChecker and provider.VersionValidator:
// when p has them it forwards to them, else it answers that nothing is
// revoked and every version is valid, as a store without them means.
// When p is a provider.StateReporter, the metrics also export its breaker
// state and its own gauges (the last store instrumented wins).
func (m *Metrics) InstrumentProvider(p provider.Provider) provider.Provider {
	m.watchStore(p)
	return &instrumented{Provider: p, m: m, name: p.Name()}
}

type instrumented struct {
	provider.Provider
	m    *Metrics
	name string
}

func (i *instrumented) observe(op string, start time.Time, err error) {
	i.m.calls.WithLabelValues(i.name, op, Outcome(err)).Inc()
	i.m.callDuration.WithLabelValues(i.name, op).Observe(time.Since(start).Seconds())
}

func (i *instrumented) CurrentVersion(ctx context.Context) (v string, err error) {
	start := time.Now()
	v, err = i.Provider.CurrentVersion(ctx)
	i.observe("current_version", start, err)
	return v, err
}

func (i *instrumented) Wrap(ctx context.Context, key []byte) (w provider.WrappedKey, err error) {
	start := time.Now()
	w, err = i.Provider.Wrap(ctx, key)
	i.observe("wrap", start, err)
	return w, err
}

func (i *instrumented) Unwrap(ctx context.Context, w provider.WrappedKey) (key []byte, err error) {
	start := time.Now()
	key, err = i.Provider.Unwrap(ctx, w)
	i.observe("unwrap", start, err)
	return key, err
}

// statsCollector exports envelope.Stats at scrape time.
type statsCollector struct {
	stats func() envelope.Stats
}

var (
	descCache = prometheus.NewDesc(namespace+"_kek_cache_lookups_total",
		"Local KEK cache lookups by Decrypt, by result (hit or miss).", []string{"result"}, nil)
	descCacheEntries = prometheus.NewDesc(namespace+"_kek_cache_entries",
		"Unwrapped local KEKs held in memory.", nil, nil)
	descKEKs = prometheus.NewDesc(namespace+"_local_keks_created_total",
		"Local KEKs created since start.", nil, nil)
	descKEKUses = prometheus.NewDesc(namespace+"_local_kek_uses",
		"Encryptions made with the current local KEK.", nil, nil)
	descKeyID = prometheus.NewDesc(namespace+"_key_id_info",
		"The current key_id, as a short hash; value 1.", []string{"provider", "key_id_hash"}, nil)
	descReady = prometheus.NewDesc(namespace+"_ready",
		"1 when the key store answered the last poll and the state is fresh.", nil, nil)
	descLastSuccess = prometheus.NewDesc(namespace+"_provider_last_success_timestamp_seconds",
		"Unix time of the last successful key store poll.", nil, nil)
	descUnwrapsAvoided = prometheus.NewDesc(namespace+"_decrypt_unwraps_avoided_total",
		"Decrypt cache misses answered without a remote unwrap, by reason: invalid_version (a spelling of the key version the store never writes), negative_cache (the same wrapped KEK was refused moments ago) or throttled (the unwrap rate or concurrency limit was reached).", []string{"reason"}, nil)
	descNegativeEntries = prometheus.NewDesc(namespace+"_negative_cache_entries",
		"Refused wrapped local KEKs remembered.", nil, nil)
)

func (c *statsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descCache, descCacheEntries, descKEKs, descKEKUses, descKeyID, descReady, descLastSuccess, descUnwrapsAvoided, descNegativeEntries} {
		ch <- d
	}
}

func (c *statsCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	ch <- prometheus.MustNewConstMetric(descCache, prometheus.CounterValue, float64(st.CacheHits), "hit")
	ch <- prometheus.MustNewConstMetric(descCache, prometheus.CounterValue, float64(st.CacheMisses), "miss")
	ch <- prometheus.MustNewConstMetric(descCacheEntries, prometheus.GaugeValue, float64(st.CacheEntries))
	ch <- prometheus.MustNewConstMetric(descKEKs, prometheus.CounterValue, float64(st.LocalKEKs))
	ch <- prometheus.MustNewConstMetric(descKEKUses, prometheus.GaugeValue, float64(st.LocalKEKUses))
	ch <- prometheus.MustNewConstMetric(descUnwrapsAvoided, prometheus.CounterValue, float64(st.NegativeHits), "negative_cache")
	ch <- prometheus.MustNewConstMetric(descUnwrapsAvoided, prometheus.CounterValue, float64(st.UnwrapsThrottled), "throttled")
	ch <- prometheus.MustNewConstMetric(descUnwrapsAvoided, prometheus.CounterValue, float64(st.VersionsRefused), "invalid_version")
	ch <- prometheus.MustNewConstMetric(descNegativeEntries, prometheus.GaugeValue, float64(st.NegativeEntries))
	if st.KeyID != "" {
		ch <- prometheus.MustNewConstMetric(descKeyID, prometheus.GaugeValue, 1, st.Provider, envelope.KeyIDHash(st.KeyID))
	}
	ready := 0.0
	if st.Ready {
		ready = 1
	}
	ch <- prometheus.MustNewConstMetric(descReady, prometheus.GaugeValue, ready)
	if !st.LastSuccess.IsZero() {
		ch <- prometheus.MustNewConstMetric(descLastSuccess, prometheus.GaugeValue, float64(st.LastSuccess.UnixNano())/1e9)
	}
}

var (
	_ provider.VersionChecker   = (*instrumented)(nil)
	_ provider.VersionValidator = (*instrumented)(nil)
)

// RevokedVersions implements provider.VersionChecker for the stores that
// have it (operation check_versions); others revoke nothing.
func (i *instrumented) RevokedVersions(ctx context.Context, versions []string) (revoked []string, err error) {
	vc, ok := i.Provider.(provider.VersionChecker)
	if !ok {
		return nil, nil
	}
	start := time.Now()
	defer func() { i.observe("check_versions", start, err) }()
	return vc.RevokedVersions(ctx, versions)
}

// ValidVersion implements provider.VersionValidator for the stores that
// have it; for others every version is valid. It is not counted: it makes
// no call.
func (i *instrumented) ValidVersion(version string) error {
	if vv, ok := i.Provider.(provider.VersionValidator); ok {
		return vv.ValidVersion(version)
	}
	return nil
}
