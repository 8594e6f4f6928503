package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/admin"
	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/envelope"
	"github.com/kms-plugin/kms-plugin/internal/logging"
	"github.com/kms-plugin/kms-plugin/internal/metrics"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/server"
)

// configFlags registers the flags that override config file fields and
// returns a function that loads the file (if any), applies the flags that
// were set, and validates the result.
func configFlags(fs *flag.FlagSet) func() (config.Config, error) {
	def := config.Default()
	path := fs.String("config", "", "YAML config file; flags override its fields")
	endpoint := fs.String("endpoint", def.Endpoint, "gRPC listen address, unix:///ABSOLUTE/PATH")
	socketGroup := fs.String("socket-group", "", "group (name or gid) given to the socket, which then gets mode 0660")
	prov := fs.String("provider", def.Provider, "key store: local or azurekeyvault")
	keyset := fs.String("local-keyset", def.Local.KeysetPath, "local provider: Tink keyset file, created on first start")
	httpAddr := fs.String("http-addr", def.HTTPAddr, "HOST:PORT for /livez, /readyz, /metrics, /status and /refresh (empty disables)")
	poll := fs.Duration("provider-poll-interval", def.ProviderPollInterval.Duration, "how often to ask the key store for its current key version")
	maxAge := fs.Duration("kek-max-age", def.KEK.MaxAge.Duration, "replace the local KEK after this age")
	maxUses := fs.Uint64("kek-max-uses", def.KEK.MaxUses, "replace the local KEK after this many encryptions")
	cacheSize := fs.Int("kek-cache-size", def.KEK.CacheSize, "unwrapped local KEKs kept in memory")
	logFormat := fs.String("log-format", def.Log.Format, "json or console")
	logLevel := fs.String("log-level", def.Log.Level, "debug, info, warn or error")
	shutdown := fs.Duration("shutdown-timeout", def.ShutdownTimeout.Duration, "how long SIGTERM waits for in-flight requests")
	applyAzure := azureFlags(fs)

	return func() (config.Config, error) {
		cfg := def
		if *path != "" {
			var err error
			if cfg, err = config.Load(*path); err != nil {
				return cfg, err
			}
		}
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "endpoint":
				cfg.Endpoint = *endpoint
			case "socket-group":
				cfg.SocketGroup = *socketGroup
			case "provider":
				cfg.Provider = *prov
			case "local-keyset":
				cfg.Local.KeysetPath = *keyset
			case "http-addr":
				cfg.HTTPAddr = *httpAddr
			case "provider-poll-interval":
				cfg.ProviderPollInterval.Duration = *poll
			case "kek-max-age":
				cfg.KEK.MaxAge.Duration = *maxAge
			case "kek-max-uses":
				cfg.KEK.MaxUses = *maxUses
			case "kek-cache-size":
				cfg.KEK.CacheSize = *cacheSize
			case "log-format":
				cfg.Log.Format = *logFormat
			case "log-level":
				cfg.Log.Level = *logLevel
			case "shutdown-timeout":
				cfg.ShutdownTimeout.Duration = *shutdown
			}
		})
		applyAzure(&cfg)
		if err := cfg.Validate(); err != nil {
			return cfg, fmt.Errorf("invalid configuration: %s", strings.ReplaceAll(err.Error(), "\n", "; "))
		}
		return cfg, nil
	}
}

// newProvider builds the configured key store.
func newProvider(cfg config.Config) (provider.Provider, error) {
	switch cfg.Provider {
	case config.ProviderLocal:
		return local.New(local.Config{Path: cfg.Local.KeysetPath, Create: true})
	case config.ProviderAzureKeyVault:
		p, _, err := newAzureProvider(cfg.Azure, nil)
		if err != nil {
			return nil, err
		}
		return p, nil
	default:
		return nil, fmt.Errorf("provider: unknown provider %q", cfg.Provider)
	}
}

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kms-plugin serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	loadConfig := configFlags(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	cfg, err := loadConfig()
	if err != nil {
		return err
	}
	log, err := logging.New(stderr, cfg.Log.Format, cfg.Log.Level)
	if err != nil {
		return err
	}
	defer log.Sync() //nolint:errcheck // nothing to do about a failed flush
	return serve(ctx, cfg, log)
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

// serve runs the plugin until ctx ends: the key hierarchy's poll loop, the
// gRPC server and the admin HTTP server. If any part fails, all stop.
func serve(ctx context.Context, cfg config.Config, log *zap.Logger) error {
	socketPath, err := config.SocketPath(cfg.Endpoint)
	if err != nil {
		return err
	}
	store, err := newProvider(cfg)
	if err != nil {
		return err
	}

	reg := prometheus.NewRegistry()
	var svc *envelope.Service
	m, err := metrics.New(reg, func() envelope.Stats { return svc.Stats() })
	if err != nil {
		return fmt.Errorf("metrics: %w", err)
	}
	svc, err = envelope.New(envelope.Config{
		Provider:     m.InstrumentProvider(store),
		PollInterval: cfg.ProviderPollInterval.Duration,
		KEKMaxAge:    cfg.KEK.MaxAge.Duration,
		KEKMaxUses:   cfg.KEK.MaxUses,
		CacheSize:    cfg.KEK.CacheSize,
		Logger:       log.Named("envelope"),
	})
	if err != nil {
		return err
	}
	grpcSrv, err := server.New(server.Config{
		SocketPath:      socketPath,
		SocketGroup:     cfg.SocketGroup,
		Service:         svc,
		Observer:        m,
		Logger:          log.Named("grpc"),
		ShutdownTimeout: cfg.ShutdownTimeout.Duration,
	})
	if err != nil {
		return err
	}
	var adminSrv *admin.Server
	if cfg.HTTPAddr != "" {
		httpLog := log.Named("http")
		if adminSrv, err = admin.New(admin.Config{
			Addr:     cfg.HTTPAddr,
			Stats:    svc.Stats,
			Gatherer: reg,
			Version:  version,
			Logger:   httpLog,
			Refresh:  requestedRefresh(svc, httpLog),
			Observer: m,
		}); err != nil {
			return err
		}
		if err := adminSrv.Listen(); err != nil {
			return err
		}
	}

	log.Info("starting", zap.String("version", version), zap.String("provider", store.Name()),
		zap.String("endpoint", cfg.Endpoint), zap.String("httpAddr", cfg.HTTPAddr),
		zap.Duration("providerPollInterval", cfg.ProviderPollInterval.Duration))
	// A first poll before the socket opens, so kube-apiserver's first Status
	// is already healthy; Run keeps retrying if the key store is down.
	if err := svc.Refresh(ctx); err != nil {
		log.Warn("key store not reachable at start; Status reports not ready until it answers", zap.Error(err))
	}
	if err := grpcSrv.Listen(); err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	goRun := func(name string, f func(context.Context) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := f(ctx)
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("%s: %w", name, err)
				}
				mu.Unlock()
			}
			cancel() // one part stopping stops all
		}()
	}
	goRun("key store poll", svc.Run)
	goRun("grpc", grpcSrv.Serve)
	if adminSrv != nil {
		goRun("http", adminSrv.Serve)
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
