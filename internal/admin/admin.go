// Package admin is the plugin's HTTP endpoint for operators and tools:
// /livez (the process answers), /readyz (the key store answered recently),
// /metrics (Prometheus), /status (JSON read by `kms-plugin rotate` and
// `kms-plugin status`) and POST /refresh (re-read the key store's current
// version now, rate-limited). It serves no key material and no request data.
//
// On a loopback address it may serve plain HTTP to anyone on the node. On
// any other address it serves HTTPS only and admits to /status, /refresh
// (and optionally /metrics) only the requests Config.Authenticate admits;
// /livez and /readyz stay open for kubelet probes and then say nothing
// about the key store but whether it is ready.
package admin

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/logthrottle"
)

// Config configures a Server.
type Config struct {
	// Addr is HOST:PORT to listen on. Required.
	Addr string
	// Stats returns the key hierarchy's state. Required.
	Stats func() envelope.Stats
	// Gatherer serves /metrics. Optional: without it /metrics is 404.
	Gatherer prometheus.Gatherer
	// Version is reported by /status.
	Version string
	// Logger receives server errors. Default: no logging.
	Logger *zap.Logger

	// Refresh makes the key hierarchy ask the key store for its current
	// version now, as envelope.Service.Refresh does. Optional: without it
	// /refresh is 404. Its error's text is sent to the client as is, so it
	// must say what failed and hold no secret (provider errors qualify).
	Refresh func(context.Context) error
	// RefreshMinInterval is the least time between the end of one refresh
	// and the start of the next: POST /refresh sooner than that gets 429.
	// Default DefaultRefreshMinInterval.
	RefreshMinInterval time.Duration
	// Observer records every POST /refresh. Optional. When it also
	// implements AuthObserver, it counts failed authentications too.
	Observer RefreshObserver
	// Now returns the current time. Default time.Now.
	Now func() time.Time

	// TLS, when set, makes the server serve HTTPS only (HTTP/1.1) with a
	// copy of this configuration, as adminauth.ServerTLS builds it. It
	// must provide a certificate (Certificates, GetCertificate or
	// GetConfigForClient). Required, with Authenticate, unless Addr is a
	// loopback address (adminauth.IsLoopback).
	TLS *tls.Config
	// Authenticate, when set, checks each request to /status, /refresh
	// and, with ProtectMetrics, /metrics before it is served, as
	// (*adminauth.Authenticator).Authenticate does: nil admits it; an
	// error wrapping adminauth.ErrForbidden answers 403, one wrapping
	// adminauth.ErrNoCredential or adminauth.ErrBadCredential answers 401
	// with "WWW-Authenticate: Bearer", any other 500 (the server could not
	// check, such as an unreadable token file). The error goes to the log,
	// never to the client, so it must not hold the credential. With it,
	// /readyz no longer tells the key store's last error.
	Authenticate func(*http.Request) error
	// ProtectMetrics puts /metrics behind Authenticate as well. It needs
	// Authenticate.
	ProtectMetrics bool
	// AuthFailureLogInterval is how often failed authentications are
	// logged at most per endpoint; the next line carries the count of
	// those held back. Default DefaultAuthFailureLogInterval. The
	// AuthObserver counts every one.
	AuthFailureLogInterval time.Duration
}

// DefaultRefreshMinInterval is RefreshMinInterval when left zero.
const DefaultRefreshMinInterval = time.Second

// refreshTimeout bounds one refresh started by POST /refresh, on top of the
// request's own context.
const refreshTimeout = 15 * time.Second

// RefreshObserver records POST /refresh requests; *metrics.Metrics
// implements it.
type RefreshObserver interface {
	// ObserveRefresh records one request by result: "ok" when the refresh
	// it ran or joined succeeded, "error" when that refresh failed or the
	// request ended first, "throttled" when it got 429.
	ObserveRefresh(result string)
}

// Results passed to RefreshObserver.ObserveRefresh.
const (
	resultOK        = "ok"
	resultError     = "error"
	resultThrottled = "throttled"
)

// Status is the JSON document served at /status. Its field names are a
// contract with the rotation tool: add fields, never rename them.
type Status struct {
	Version       string      `json:"version"`
	Provider      string      `json:"provider"`
	KeyID         string      `json:"keyID"`
	KeyIDHash     string      `json:"keyIDHash"`
	RemoteVersion string      `json:"remoteVersion"`
	Ready         bool        `json:"ready"`
	LastRefresh   *time.Time  `json:"lastRefresh,omitempty"`
	LastAttempt   *time.Time  `json:"lastAttempt,omitempty"`
	LastError     string      `json:"lastError,omitempty"`
	LocalKEK      LocalKEK    `json:"localKEK"`
	Cache         CacheStatus `json:"cache"`
}

// LocalKEK describes the local KEK Encrypt uses now.
type LocalKEK struct {
	AgeSeconds        float64 `json:"ageSeconds"`
	Uses              uint64  `json:"uses"`
	CreatedSinceStart uint64  `json:"createdSinceStart"`
}

// CacheStatus describes the cache of unwrapped local KEKs.
type CacheStatus struct {
	Entries         int    `json:"entries"`
	Capacity        int    `json:"capacity"`
	Hits            uint64 `json:"hits"`
	Misses          uint64 `json:"misses"`
	ProviderUnwraps uint64 `json:"providerUnwraps"`
}

// Server is the admin HTTP server.
type Server struct {
	cfg  Config
	log  *zap.Logger
	http *http.Server
	lis  net.Listener

	// loopbackOnly is set when the server is open to anyone who reaches
	// it: Listen then refuses an address that is not loopback after all.
	loopbackOnly bool
	authFailures *logthrottle.Throttle
	authObserver AuthObserver // nil without one

	refreshMu   sync.Mutex
	refreshing  *refreshFlight // the refresh running now, or nil
	lastRefresh time.Time      // when the last refresh finished
}

// refreshFlight is one call of Config.Refresh, shared by every request that
// arrives while it runs.
type refreshFlight struct {
	done    chan struct{} // closed when err is set
	err     error
	waiters int // requests that joined the leader, under Server.refreshMu
}

// New returns a Server. It opens nothing: call Listen, then Serve. It
// refuses an Addr other than a loopback address unless TLS and
// Authenticate are both set.
func New(cfg Config) (*Server, error) {
	if cfg.Addr == "" {
		return nil, errors.New("admin: no address")
	}
	if cfg.Stats == nil {
		return nil, errors.New("admin: no stats source")
	}
	loopback, err := checkExposure(cfg)
	if err != nil {
		return nil, err
	}
	if cfg.TLS != nil {
		cfg.TLS = cfg.TLS.Clone()
		cfg.TLS.NextProtos = []string{"http/1.1"}
	}
	if cfg.AuthFailureLogInterval <= 0 {
		cfg.AuthFailureLogInterval = DefaultAuthFailureLogInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.RefreshMinInterval <= 0 {
		cfg.RefreshMinInterval = DefaultRefreshMinInterval
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{cfg: cfg, log: cfg.Logger, loopbackOnly: loopback && (cfg.TLS == nil || cfg.Authenticate == nil)}
	s.authFailures = logthrottle.New(cfg.AuthFailureLogInterval, cfg.Now)
	s.authObserver, _ = cfg.Observer.(AuthObserver)
	s.http = &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		ErrorLog:          log.New(&errorLogWriter{log: cfg.Logger, failures: s.authFailures}, "", 0),
	}
	return s, nil
}

// Handler returns the routes, for tests and embedding.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /livez", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", s.readyz)
	mux.Handle("GET /status", s.guard(endpointStatus, http.HandlerFunc(s.status)))
	if s.cfg.Refresh != nil {
		mux.Handle("POST /refresh", s.guard(endpointRefresh, http.HandlerFunc(s.refresh)))
	}
	if s.cfg.Gatherer != nil {
		var h http.Handler = promhttp.HandlerFor(s.cfg.Gatherer, promhttp.HandlerOpts{ErrorLog: zap.NewStdLog(s.log)})
		if s.cfg.ProtectMetrics {
			h = s.guard(endpointMetrics, h)
		}
		mux.Handle("GET /metrics", h)
	}
	return mux
}

// Addr returns the listening address once Listen succeeded.
func (s *Server) Addr() string {
	if s.lis == nil {
		return ""
	}
	return s.lis.Addr().String()
}

// Listen opens the TCP listener (with TLS when Config.TLS is set). A
// server without TLS and Authenticate refuses to listen when its loopback
// name resolved to another address.
func (s *Server) Listen() error {
	lis, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("admin: listen on %s: %w", s.cfg.Addr, err)
	}
	if s.loopbackOnly {
		if a, ok := lis.Addr().(*net.TCPAddr); !ok || !a.IP.IsLoopback() {
			lis.Close()
			return fmt.Errorf("admin: %s opened %s, not a loopback address: %s", s.cfg.Addr, lis.Addr(), exposureFix(s.cfg))
		}
	}
	if s.cfg.TLS != nil {
		lis = tls.NewListener(lis, s.cfg.TLS)
	}
	s.lis = lis
	return nil
}

// Serve serves until ctx ends, then shuts down within 5 s.
func (s *Server) Serve(ctx context.Context) error {
	if s.lis == nil {
		return errors.New("admin: Serve before Listen")
	}
	errc := make(chan error, 1)
	go func() { errc <- s.http.Serve(s.lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("admin: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := s.http.Shutdown(sctx); err != nil {
		return fmt.Errorf("admin: shutdown: %w", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("admin: %w", err)
	}
	return nil
}

func (s *Server) readyz(w http.ResponseWriter, _ *http.Request) {
	st := s.cfg.Stats()
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	if st.Ready {
		fmt.Fprintln(w, "ok")
		return
	}
	w.WriteHeader(http.StatusServiceUnavailable)
	switch {
	case st.KeyID == "":
		fmt.Fprintln(w, "not ready: no key-encryption key yet; the key store has not answered since start")
	case st.LastError != "" && s.cfg.Authenticate != nil:
		// The error may name the key store's URL and key: it is for
		// /status, behind authentication, and the log.
		fmt.Fprintln(w, "not ready: key store poll failed; /status and the plugin's log tell why")
	case st.LastError != "":
		fmt.Fprintf(w, "not ready: key store poll failed: %s\n", st.LastError)
	default:
		fmt.Fprintf(w, "not ready: last successful key store poll at %s is stale\n", st.LastSuccess.UTC().Format(time.RFC3339))
	}
}

func (s *Server) status(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(StatusOf(s.cfg.Stats(), s.cfg.Version)); err != nil {
		s.log.Warn("write /status", zap.Error(err))
	}
}

// refresh serves POST /refresh: it runs Config.Refresh, or joins the call
// already running, and answers like GET /status once it finished. A request
// that would start a call sooner than RefreshMinInterval after the previous
// one finished gets 429 with Retry-After.
func (s *Server) refresh(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	s.refreshMu.Lock()
	fl := s.refreshing
	leader := fl == nil
	if leader {
		if wait := s.refreshWait(); wait > 0 {
			s.refreshMu.Unlock()
			s.observe(resultThrottled)
			secs := int64((wait + time.Second - 1) / time.Second)
			w.Header().Set("Retry-After", strconv.FormatInt(secs, 10))
			plainText(w, http.StatusTooManyRequests, fmt.Sprintf("refresh: the key store was asked less than %s ago; retry in %d s", s.cfg.RefreshMinInterval, secs))
			return
		}
		fl = &refreshFlight{done: make(chan struct{})}
		s.refreshing = fl
	} else {
		fl.waiters++
	}
	s.refreshMu.Unlock()

	if leader {
		s.runRefresh(ctx, fl)
	}
	select {
	case <-fl.done:
	case <-ctx.Done():
		s.observe(resultError)
		plainText(w, http.StatusServiceUnavailable, "refresh: request ended before the refresh finished")
		return
	}
	if fl.err != nil {
		s.observe(resultError)
		plainText(w, http.StatusServiceUnavailable, strings.ReplaceAll(fl.err.Error(), "\n", "; "))
		return
	}
	s.observe(resultOK)
	s.status(w, r)
}

// refreshWait returns how long a new refresh must still wait. Callers hold
// refreshMu.
func (s *Server) refreshWait() time.Duration {
	if s.lastRefresh.IsZero() {
		return 0
	}
	wait := s.cfg.RefreshMinInterval - s.cfg.Now().Sub(s.lastRefresh)
	return min(wait, s.cfg.RefreshMinInterval) // a clock stepped back waits no longer
}

// runRefresh calls Config.Refresh for fl, bounded by ctx and refreshTimeout,
// then finishes fl and starts the next RefreshMinInterval, even if Refresh
// panics.
func (s *Server) runRefresh(ctx context.Context, fl *refreshFlight) {
	defer func() {
		s.refreshMu.Lock()
		s.refreshing = nil
		s.lastRefresh = s.cfg.Now()
		s.refreshMu.Unlock()
		close(fl.done)
	}()
	fl.err = errors.New("refresh: did not return") // replaced unless Refresh panics
	ctx, cancel := context.WithTimeout(ctx, refreshTimeout)
	defer cancel()
	fl.err = s.cfg.Refresh(ctx)
	if fl.err != nil {
		s.log.Warn("refresh requested over HTTP failed", zap.Error(fl.err))
	}
}

func (s *Server) observe(result string) {
	if s.cfg.Observer != nil {
		s.cfg.Observer.ObserveRefresh(result)
	}
}

// plainText writes one line of text with the code.
func plainText(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	fmt.Fprintln(w, msg)
}

// StatusOf builds the /status document from a stats snapshot.
func StatusOf(st envelope.Stats, version string) Status {
	out := Status{
		Version:       version,
		Provider:      st.Provider,
		KeyID:         st.KeyID,
		KeyIDHash:     envelope.KeyIDHash(st.KeyID),
		RemoteVersion: st.RemoteVersion,
		Ready:         st.Ready,
		LastError:     st.LastError,
		LocalKEK: LocalKEK{
			AgeSeconds:        st.LocalKEKAge.Seconds(),
			Uses:              st.LocalKEKUses,
			CreatedSinceStart: st.LocalKEKs,
		},
		Cache: CacheStatus{
			Entries:         st.CacheEntries,
			Capacity:        st.CacheCapacity,
			Hits:            st.CacheHits,
			Misses:          st.CacheMisses,
			ProviderUnwraps: st.ProviderUnwrap,
		},
	}
	if !st.LastSuccess.IsZero() {
		t := st.LastSuccess.UTC()
		out.LastRefresh = &t
	}
	if !st.LastAttempt.IsZero() {
		t := st.LastAttempt.UTC()
		out.LastAttempt = &t
	}
	return out
}
