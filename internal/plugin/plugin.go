// Package plugin assembles the KMS v2 plugin that `kms-plugin serve` runs:
// the key hierarchy (envelope.Service) over a key store, the gRPC server on
// the Unix socket kube-apiserver dials, the admin HTTP server and the
// Prometheus metrics, run together so that when one part stops, all stop.
// It is the one place that wiring lives; serve and the benchmarks both use
// it, so what is measured is what ships.
package plugin

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/admin"
	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/metrics"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/server"
)

// Config configures a Plugin. Only Provider and Endpoint are required; the
// zero value of every other field is a safe default.
type Config struct {
	// Provider is the key store holding the remote KEK, already built by
	// the caller. Required.
	Provider provider.Provider
	// Endpoint is the gRPC listen address, unix:///ABSOLUTE/PATH. Required.
	Endpoint string
	// SocketGroup, when set, is a group name or numeric gid: the socket gets
	// that group and mode 0660. Otherwise it is 0600.
	SocketGroup string
	// HTTPAddr is HOST:PORT for /livez, /readyz, /metrics, /status and
	// POST /refresh. Empty: no admin HTTP server.
	HTTPAddr string
	// AdminTLS, when it names a serving certificate, makes the admin port
	// HTTPS, and its client CA and token file authenticate /status and
	// /refresh (and /metrics with ProtectMetrics). The admin server refuses
	// a non-loopback HTTPAddr without both.
	AdminTLS       adminauth.ServerConfig
	ProtectMetrics bool

	// PollInterval is how often the key store is asked for its current key
	// version. Default envelope.DefaultPollInterval.
	PollInterval time.Duration
	// KEKMaxAge and KEKMaxUses bound how long and how often one local KEK
	// encrypts; KEKCacheSize bounds the unwrapped local KEKs kept. Defaults
	// as in envelope.Config.
	KEKMaxAge    time.Duration
	KEKMaxUses   uint64
	KEKCacheSize int
	// KEKCacheTTL, UnwrapRate and UnwrapBurst are envelope.Config's
	// CacheTTL, UnwrapRate and UnwrapBurst. Defaults as there.
	KEKCacheTTL time.Duration
	UnwrapRate  float64
	UnwrapBurst int
	// ShutdownTimeout bounds the drain of in-flight gRPC calls once Run's
	// context ends. Default 10 s.
	ShutdownTimeout time.Duration

	// Version is reported by /status and logged at start.
	Version string
	// Logger is the root logger; each part logs through a named child
	// (envelope, grpc, http). Default: no logging.
	Logger *zap.Logger
	// Registerer receives the plugin's metrics. Default: a new
	// prometheus.Registry, also used as Gatherer.
	Registerer prometheus.Registerer
	// Gatherer is what /metrics serves. Default: Registerer when it is also
	// a prometheus.Gatherer (as *prometheus.Registry is); otherwise
	// /metrics is not served.
	Gatherer prometheus.Gatherer
}

// Plugin is the assembled plugin. Build it with New, then call Run once.
type Plugin struct {
	cfg   Config
	log   *zap.Logger
	svc   *envelope.Service
	grpc  *server.Server
	admin *admin.Server // nil without Config.HTTPAddr

	ready   chan struct{}
	started atomic.Bool
}

// New validates cfg and builds every part. It starts nothing and opens no
// socket or port: Run does.
func New(cfg Config) (*Plugin, error) {
	if cfg.Provider == nil {
		return nil, errors.New("plugin: no provider")
	}
	socketPath, err := config.SocketPath(cfg.Endpoint)
	if err != nil {
		return nil, fmt.Errorf("plugin: %w", err)
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = envelope.DefaultPollInterval
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.Registerer == nil {
		reg := prometheus.NewRegistry()
		cfg.Registerer = reg
		if cfg.Gatherer == nil {
			cfg.Gatherer = reg
		}
	}
	if cfg.Gatherer == nil {
		cfg.Gatherer, _ = cfg.Registerer.(prometheus.Gatherer)
	}
	log := cfg.Logger

	var svc *envelope.Service
	m, err := metrics.New(cfg.Registerer, func() envelope.Stats { return svc.Stats() })
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	svc, err = envelope.New(envelope.Config{
		Provider:     m.InstrumentProvider(cfg.Provider),
		PollInterval: cfg.PollInterval,
		KEKMaxAge:    cfg.KEKMaxAge,
		KEKMaxUses:   cfg.KEKMaxUses,
		CacheSize:    cfg.KEKCacheSize,
		CacheTTL:     cfg.KEKCacheTTL,
		UnwrapRate:   cfg.UnwrapRate,
		UnwrapBurst:  cfg.UnwrapBurst,
		Logger:       log.Named("envelope"),
	})
	if err != nil {
		return nil, err
	}
	grpcSrv, err := server.New(server.Config{
		SocketPath:      socketPath,
		SocketGroup:     cfg.SocketGroup,
		Service:         svc,
		Observer:        m,
		Logger:          log.Named("grpc"),
		ShutdownTimeout: cfg.ShutdownTimeout,
	})
	if err != nil {
		return nil, err
	}
	p := &Plugin{cfg: cfg, log: log, svc: svc, grpc: grpcSrv, ready: make(chan struct{})}
	if cfg.HTTPAddr != "" {
		httpLog := log.Named("http")
		ac := admin.Config{
			Addr:           cfg.HTTPAddr,
			Stats:          svc.Stats,
			Gatherer:       cfg.Gatherer,
			Version:        cfg.Version,
			Logger:         httpLog,
			Refresh:        requestedRefresh(svc, httpLog),
			Observer:       m,
			ProtectMetrics: cfg.ProtectMetrics,
		}
		if err := adminSecurity(&ac, cfg.AdminTLS, httpLog); err != nil {
			return nil, err
		}
		if p.admin, err = admin.New(ac); err != nil {
			return nil, err
		}
	}
	return p, nil
}

// adminSecurity sets the admin server's TLS and authentication from sc:
// HTTPS when sc names a serving certificate, and an authenticator when it
// names a client CA or a token file.
func adminSecurity(ac *admin.Config, sc adminauth.ServerConfig, log *zap.Logger) error {
	sc.Logger = log
	if sc.CertFile != "" || sc.KeyFile != "" {
		tc, err := adminauth.ServerTLS(sc)
		if err != nil {
			return fmt.Errorf("plugin: admin TLS: %w", err)
		}
		ac.TLS = tc
	}
	if sc.ClientCAFile != "" || sc.TokenFile != "" {
		a, err := adminauth.NewAuthenticator(sc)
		if err != nil {
			return fmt.Errorf("plugin: admin authentication: %w", err)
		}
		ac.Authenticate = a.Authenticate
	}
	return nil
}

// Stats returns the key hierarchy's state, as /status reports it.
func (p *Plugin) Stats() envelope.Stats { return p.svc.Stats() }

// Ready is closed once Run has opened the socket (and the admin port) and
// the plugin answers requests. It stays open if Run fails before that.
func (p *Plugin) Ready() <-chan struct{} { return p.ready }

// HTTPAddr returns the admin server's listening address once Ready is
// closed (useful with port 0), or "" without an admin server.
func (p *Plugin) HTTPAddr() string {
	if p.admin == nil {
		return ""
	}
	return p.admin.Addr()
}

// Run serves until ctx ends or a part fails. It opens the admin port, asks
// the key store for its current version once (so kube-apiserver's first
// Status is already healthy; a key store that is down is retried by the
// poll loop), opens the socket, then runs the poll loop, the gRPC server
// and the admin server. When ctx ends or any part stops, all stop: in-flight
// gRPC calls drain for up to ShutdownTimeout and the socket is removed. It
// returns nil when ctx ended, else the first part's error. Run may be
// called once.
func (p *Plugin) Run(ctx context.Context) error {
	if !p.started.CompareAndSwap(false, true) {
		return errors.New("plugin: Run called twice")
	}
	log, cfg := p.log, p.cfg
	if p.admin != nil {
		if err := p.admin.Listen(); err != nil {
			return err
		}
	}

	log.Info("starting", zap.String("version", cfg.Version), zap.String("provider", cfg.Provider.Name()),
		zap.String("endpoint", cfg.Endpoint), zap.String("httpAddr", cfg.HTTPAddr),
		zap.Duration("providerPollInterval", cfg.PollInterval))
	// A first poll before the socket opens, so kube-apiserver's first Status
	// is already healthy; Run keeps retrying if the key store is down.
	if err := p.svc.Refresh(ctx); err != nil {
		log.Warn("key store not reachable at start; Status reports not ready until it answers", zap.Error(err))
	}
	if err := p.grpc.Listen(); err != nil {
		if p.admin != nil {
			// Release the admin port: Serve on an ended context just
			// shuts the listener down.
			done, cancel := context.WithCancel(ctx)
			cancel()
			_ = p.admin.Serve(done)
		}
		return err
	}
	close(p.ready)

	parts := []part{{"key store poll", p.svc.Run}, {"grpc", p.grpc.Serve}}
	if p.admin != nil {
		parts = append(parts, part{"http", p.admin.Serve})
	}
	return runParts(ctx, log, parts)
}

// part is one long-lived piece of the plugin.
type part struct {
	name string
	run  func(context.Context) error
}

// runParts runs every part until ctx ends or one part returns, then stops
// the others and waits for them. It returns the first error a part
// returned, prefixed with its name, or nil when that error is only the
// context ending.
func runParts(ctx context.Context, log *zap.Logger, parts []part) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	for _, pt := range parts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := pt.run(ctx)
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("%s: %w", pt.name, err)
				}
				mu.Unlock()
			}
			cancel() // one part stopping stops all
		}()
	}
	<-ctx.Done()
	start := time.Now()
	wg.Wait()
	log.Info("stopped", zap.Duration("drain", time.Since(start)))
	if firstErr != nil && !errors.Is(firstErr, context.Canceled) {
		return firstErr
	}
	return nil
}

// requestedRefresh returns svc.Refresh for POST /refresh, logging when the
// refresh it ran changed the key_id (as hashes: logs carry no key material).
func requestedRefresh(svc *envelope.Service, log *zap.Logger) func(context.Context) error {
	return func(ctx context.Context) error {
		before := svc.Stats().KeyID
		err := svc.Refresh(ctx)
		if after := svc.Stats().KeyID; after != before {
			log.Info("key_id changed on a refresh requested over HTTP",
				zap.String("keyIDHash", envelope.KeyIDHash(after)),
				zap.String("previousKeyIDHash", envelope.KeyIDHash(before)))
		}
		return err
	}
}
