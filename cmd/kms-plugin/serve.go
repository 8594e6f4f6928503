package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/adminauth"
	"github.com/kms-plugin/kms-plugin/internal/config"
	"github.com/kms-plugin/kms-plugin/internal/logging"
	"github.com/kms-plugin/kms-plugin/internal/plugin"
	"github.com/kms-plugin/kms-plugin/internal/provider"
	"github.com/kms-plugin/kms-plugin/internal/provider/registry"
)

// configFlags registers the flags that override config file fields, the
// key stores' flags among them, and returns a function that loads the file
// (if any), applies the flags that were set, and validates the result.
func configFlags(fs *flag.FlagSet) func() (config.Config, error) {
	stores := registry.Builtin()
	def := stores.Default()
	path := fs.String("config", "", "YAML config file; flags override its fields")
	endpoint := fs.String("endpoint", def.Endpoint, "gRPC listen address, unix:///ABSOLUTE/PATH")
	socketGroup := fs.String("socket-group", "", "group (name or gid) given to the socket, which then gets mode 0660")
	prov := fs.String("provider", def.Provider, "key store: "+stores.Usage())
	httpAddr := fs.String("http-addr", def.HTTPAddr, "HOST:PORT for /livez, /readyz, /metrics, /status and /refresh (empty disables)")
	tlsCert := fs.String("http-tls-cert-file", "", "admin port: serving certificate (PEM); makes it HTTPS. Required off loopback")
	tlsKey := fs.String("http-tls-key-file", "", "admin port: serving certificate's key (PEM)")
	clientCA := fs.String("http-client-ca-file", "", "admin port: CA whose client certificates (CommonName kms-plugin-admin) may call /status and /refresh")
	tokenFile := fs.String("http-token-file", "", "admin port: file holding the bearer token for /status and /refresh (mode 0600)")
	poll := fs.Duration("provider-poll-interval", def.ProviderPollInterval.Duration, "how often to ask the key store for its current key version")
	maxAge := fs.Duration("kek-max-age", def.KEK.MaxAge.Duration, "replace the local KEK after this age")
	maxUses := fs.Uint64("kek-max-uses", def.KEK.MaxUses, "replace the local KEK after this many encryptions")
	cacheSize := fs.Int("kek-cache-size", def.KEK.CacheSize, "unwrapped local KEKs kept in memory")
	cacheTTL := fs.Duration("kek-cache-ttl", 0, "unwrap a cached local KEK again after this long (default 3h)")
	unwrapRate := fs.Float64("kek-unwrap-rate", 0, "remote unwraps per second at most; cached Decrypts are never limited (default 100)")
	unwrapBurst := fs.Int("kek-unwrap-burst", 0, "remote unwrap burst (default 200)")
	logFormat := fs.String("log-format", def.Log.Format, "json or console")
	logLevel := fs.String("log-level", def.Log.Level, "debug, info, warn or error")
	shutdown := fs.Duration("shutdown-timeout", def.ShutdownTimeout.Duration, "how long SIGTERM waits for in-flight requests")
	applyStore := stores.Flags(fs)

	return func() (config.Config, error) {
		cfg := def
		if *path != "" {
			var err error
			if cfg, err = config.Load(*path, def); err != nil {
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
			case "http-addr":
				cfg.HTTPAddr = *httpAddr
			case "http-tls-cert-file":
				cfg.HTTPTLS.CertFile = *tlsCert
			case "http-tls-key-file":
				cfg.HTTPTLS.KeyFile = *tlsKey
			case "http-client-ca-file":
				cfg.HTTPTLS.ClientCAFile = *clientCA
			case "http-token-file":
				cfg.HTTPAuth.TokenFile = *tokenFile
			case "provider-poll-interval":
				cfg.ProviderPollInterval.Duration = *poll
			case "kek-max-age":
				cfg.KEK.MaxAge.Duration = *maxAge
			case "kek-max-uses":
				cfg.KEK.MaxUses = *maxUses
			case "kek-cache-size":
				cfg.KEK.CacheSize = *cacheSize
			case "kek-cache-ttl":
				cfg.KEK.CacheTTL.Duration = *cacheTTL
			case "kek-unwrap-rate":
				cfg.KEK.UnwrapRate = *unwrapRate
			case "kek-unwrap-burst":
				cfg.KEK.UnwrapBurst = *unwrapBurst
			case "log-format":
				cfg.Log.Format = *logFormat
			case "log-level":
				cfg.Log.Level = *logLevel
			case "shutdown-timeout":
				cfg.ShutdownTimeout.Duration = *shutdown
			}
		})
		if err := applyStore(&cfg); err != nil {
			return cfg, fmt.Errorf("config %s: %s", *path, strings.ReplaceAll(err.Error(), "\n", "; "))
		}
		if err := stores.Validate(cfg); err != nil {
			return cfg, fmt.Errorf("invalid configuration: %s", strings.ReplaceAll(err.Error(), "\n", "; "))
		}
		return cfg, nil
	}
}

// newProvider builds the configured key store for serve, the one command
// that may create missing key material (the local keyset on first start).
// serve calls it before it starts anything, and no built-in store makes a
// network call to open, hence context.Background.
func newProvider(cfg config.Config) (provider.Provider, error) {
	return registry.Builtin().Open(context.Background(), cfg, provider.OpenOptions{Create: true})
}

func runServe(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("kms-plugin serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), "Usage: kms-plugin serve [FLAGS]\n\nRuns the KMS v2 plugin: answers kube-apiserver on a Unix socket, with the\nadmin HTTP server for probes, metrics and /refresh, until SIGTERM.\n\nFlags:\n")
		fs.PrintDefaults()
	}
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

// serve runs the plugin until ctx ends: the key hierarchy's poll loop, the
// gRPC server and the admin HTTP server. If any part fails, all stop.
func serve(ctx context.Context, cfg config.Config, log *zap.Logger) error {
	store, err := newProvider(cfg)
	if err != nil {
		return err
	}
	p, err := plugin.New(plugin.Config{
		Provider:    store,
		Endpoint:    cfg.Endpoint,
		SocketGroup: cfg.SocketGroup,
		HTTPAddr:    cfg.HTTPAddr,
		AdminTLS: adminauth.ServerConfig{
			CertFile: cfg.HTTPTLS.CertFile, KeyFile: cfg.HTTPTLS.KeyFile,
			ClientCAFile: cfg.HTTPTLS.ClientCAFile, ClientNames: cfg.HTTPTLS.ClientNames,
			TokenFile: cfg.HTTPAuth.TokenFile,
		},
		ProtectMetrics:  cfg.HTTPAuth.ProtectMetrics,
		PollInterval:    cfg.ProviderPollInterval.Duration,
		KEKMaxAge:       cfg.KEK.MaxAge.Duration,
		KEKMaxUses:      cfg.KEK.MaxUses,
		KEKCacheSize:    cfg.KEK.CacheSize,
		KEKCacheTTL:     cfg.KEK.CacheTTL.Duration,
		UnwrapRate:      cfg.KEK.UnwrapRate,
		UnwrapBurst:     cfg.KEK.UnwrapBurst,
		ShutdownTimeout: cfg.ShutdownTimeout.Duration,
		Version:         version,
		Logger:          log,
		Registerer:      prometheus.NewRegistry(),
	})
	if err != nil {
		return err
	}
	return p.Run(ctx)
}
