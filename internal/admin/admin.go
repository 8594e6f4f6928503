// Package admin is the plugin's HTTP endpoint for operators and tools:
// /livez (the process answers), /readyz (the key store answered recently),
// /metrics (Prometheus) and /status (JSON read by `kms-plugin rotate` and
// `kms-plugin status`). It serves no key material and no request data.
package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
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
}

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
}

// New returns a Server. It opens nothing: call Listen, then Serve.
func New(cfg Config) (*Server, error) {
	if cfg.Addr == "" {
		return nil, errors.New("admin: no address")
	}
	if cfg.Stats == nil {
		return nil, errors.New("admin: no stats source")
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	s := &Server{cfg: cfg, log: cfg.Logger}
	s.http = &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		ErrorLog:          zap.NewStdLog(cfg.Logger),
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
	mux.HandleFunc("GET /status", s.status)
	if s.cfg.Gatherer != nil {
		mux.Handle("GET /metrics", promhttp.HandlerFor(s.cfg.Gatherer, promhttp.HandlerOpts{ErrorLog: zap.NewStdLog(s.log)}))
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

// Listen opens the TCP listener.
func (s *Server) Listen() error {
	lis, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("admin: listen on %s: %w", s.cfg.Addr, err)
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
