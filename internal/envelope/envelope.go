// Package envelope is the plugin's key hierarchy: it wraps kube-apiserver's
// DEK seeds with local key-encryption keys (KEKs) held only in memory, and
// has each local KEK wrapped once by the remote key of a provider.Provider.
//
// The wrapped local KEK travels with every ciphertext in the KMS v2
// annotations, so any node that can reach the key store can decrypt, and
// nothing secret is written to disk. Remote calls are O(local KEKs), not
// O(seeds) or O(objects): Decrypt unwraps a local KEK once and caches it, and
// Encrypt never calls the key store at all. A key-store outage therefore
// stops neither writes nor reads of anything already cached.
//
// The promise: every ciphertext this package ever wrote stays readable for as
// long as the provider can unwrap its local KEK. Format changes add a version;
// they never change one (see format.go and the golden vectors in testdata/).
//
// Service implements k8s.io/kms/pkg/service.Service with plain Go types; the
// gRPC server lives in internal/server.
package envelope

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Error values returned by Service. The gRPC server maps them to status codes.
var (
	// ErrInvalidInput means a request is malformed, tampered with or does
	// not belong to its key_id (gRPC InvalidArgument).
	ErrInvalidInput = errors.New("invalid input")
	// ErrNotReady means no local KEK exists yet because the key store has
	// not answered since start (gRPC Unavailable).
	ErrNotReady = errors.New("no key-encryption key yet")
)

// ErrRevoked means the key store reported the version of the current local
// KEK disabled, expired or deleted, and no usable version replaced it: the
// plugin encrypts nothing until one does (gRPC FailedPrecondition).
var ErrRevoked = fmt.Errorf("%w: the key store revoked the current key version and reports no usable one", provider.ErrKeyDisabled)

var errKeyIDMismatch = fmt.Errorf("%w: key_id does not belong to the key that wrapped this ciphertext (unknown key_id, or ciphertext moved to another key_id)", ErrInvalidInput)

// Defaults for Config fields left zero.
const (
	DefaultPollInterval  = 60 * time.Second
	DefaultRetryInterval = 10 * time.Second
	DefaultKEKMaxAge     = 7 * 24 * time.Hour
	DefaultKEKMaxUses    = 1 << 20
	DefaultCacheSize     = 10000
	DefaultCacheTTL      = 3 * time.Hour
	DefaultRemoteTimeout = 10 * time.Second

	// hardKEKMaxUses is where a local KEK stops encrypting even when a new
	// one cannot be made: 2^32 random 96-bit nonces under one AES-GCM key.
	hardKEKMaxUses = 1 << 32
)

// Config configures a Service. Zero values are safe defaults.
type Config struct {
	// Provider holds the remote KEK. Required.
	Provider provider.Provider
	// PollInterval is how often Run asks the provider for its current key
	// version. Default 60 s.
	PollInterval time.Duration
	// RetryInterval is how soon Run polls again after a failed poll.
	// Default 10 s, never more than PollInterval.
	RetryInterval time.Duration
	// KEKMaxAge and KEKMaxUses bound how long and how often one local KEK
	// encrypts before a new one is made. Defaults 7 days and 2^20.
	KEKMaxAge  time.Duration
	KEKMaxUses uint64
	// CacheSize bounds the number of unwrapped local KEKs kept. Default 10000.
	CacheSize int
	// CacheTTL bounds how long an unwrapped local KEK is kept: after it, the
	// next Decrypt that needs it unwraps it again, so the store's word on
	// its version counts at least that often. Default 3 h.
	CacheTTL time.Duration
	// RemoteTimeout bounds each call to the provider. Default 10 s. The
	// unwrap a Decrypt starts runs on its own deadline of this length, so a
	// caller that gives up does not cancel it for the others waiting on it.
	RemoteTimeout time.Duration
	// NegativeCacheTTL is how long a refused unwrap (unknown, disabled or
	// refused key version; a wrapped key that does not authenticate) is
	// remembered, by the hash of its wrapped local KEK, so that replaying
	// it costs the key store nothing. An unreachable store is never
	// remembered. Default 30 s.
	NegativeCacheTTL time.Duration
	// NegativeCacheSize bounds the refused unwraps remembered. Default 4096.
	NegativeCacheSize int
	// MaxConcurrentUnwraps bounds remote unwraps in flight. Default 8.
	MaxConcurrentUnwraps int
	// UnwrapRate and UnwrapBurst bound remote unwraps per second (a token
	// bucket). A cache miss that cannot get a token before its deadline
	// fails with ErrUnwrapThrottled. Defaults 100/s and 200: far below a
	// cloud vault's own throttling, and a cold start with 1,000 distinct
	// local KEKs still takes about 8 s. Cache hits are
	// never limited.
	UnwrapRate  float64
	UnwrapBurst int
	// Now returns the current time. Default time.Now.
	Now func() time.Time
	// Rand is the source of keys and nonces. Default crypto/rand.Reader.
	Rand io.Reader
	// Logger receives key lifecycle events. Default: no logging.
	Logger *zap.Logger
}

// Service is the key hierarchy. Its methods are safe for concurrent use.
// Run keeps its view of the provider fresh; Status, Encrypt and Decrypt of
// cached local KEKs never call the provider.
type Service struct {
	cfg      Config
	provider provider.Provider
	log      *zap.Logger

	active  atomic.Pointer[localKEK]
	refresh sync.Mutex // serializes whole Refresh calls, so health only moves forward
	rotate  sync.Mutex // serializes making new local KEKs
	cache   *kekCache
	flights flights
	guard   *unwrapGuard
	health  atomic.Pointer[health]
	wake    chan struct{} // Status asks Run to poll now while not ready

	cacheHits, cacheMisses, unwraps, keksCreated   atomic.Uint64
	negativeHits, unwrapFailures, unwrapsThrottled atomic.Uint64
	versionsRefused                                atomic.Uint64
}

var _ kmsservice.Service = (*Service)(nil)

// localKEK is the local KEK that Encrypt uses now.
type localKEK struct {
	entry      *cacheEntry
	annotation []byte // the lkek annotation value
	created    time.Time
	uses       atomic.Uint64
}

// health is the outcome of the last provider poll.
type health struct {
	attempt       time.Time
	success       time.Time
	err           error
	remoteVersion string
	// revoked is set when the store reported the current version unusable
	// and the active local KEK was dropped.
	revoked error
}

// New returns a Service. It makes no remote call: call Refresh or Run.
func New(cfg Config) (*Service, error) {
	if cfg.Provider == nil {
		return nil, errors.New("envelope: no provider")
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultPollInterval
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = DefaultRetryInterval
	}
	cfg.RetryInterval = min(cfg.RetryInterval, cfg.PollInterval)
	if cfg.KEKMaxAge <= 0 {
		cfg.KEKMaxAge = DefaultKEKMaxAge
	}
	if cfg.KEKMaxUses == 0 {
		cfg.KEKMaxUses = DefaultKEKMaxUses
	}
	cfg.KEKMaxUses = min(cfg.KEKMaxUses, hardKEKMaxUses)
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = DefaultCacheSize
	}
	if cfg.CacheTTL <= 0 {
		cfg.CacheTTL = DefaultCacheTTL
	}
	if cfg.RemoteTimeout <= 0 {
		cfg.RemoteTimeout = DefaultRemoteTimeout
	}
	if cfg.NegativeCacheTTL <= 0 {
		cfg.NegativeCacheTTL = DefaultNegativeCacheTTL
	}
	if cfg.NegativeCacheSize <= 0 {
		cfg.NegativeCacheSize = DefaultNegativeCacheSize
	}
	if cfg.MaxConcurrentUnwraps <= 0 {
		cfg.MaxConcurrentUnwraps = DefaultMaxConcurrentUnwraps
	}
	if cfg.UnwrapRate <= 0 {
		cfg.UnwrapRate = DefaultUnwrapRate
	}
	if cfg.UnwrapBurst <= 0 {
		cfg.UnwrapBurst = DefaultUnwrapBurst
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	s := &Service{
		cfg:      cfg,
		provider: cfg.Provider,
		log:      cfg.Logger,
		cache:    newKEKCache(cfg.CacheSize),
		guard:    newUnwrapGuard(cfg),
		wake:     make(chan struct{}, 1),
	}
	s.health.Store(&health{})
	return s, nil
}

// Status implements kmsservice.Service from state kept by Refresh. It never
// calls the provider. It reports "ok" while a local KEK exists, so a key
// store outage does not stop writes; /readyz reports the outage.
func (s *Service) Status(ctx context.Context) (*kmsservice.StatusResponse, error) {
	a := s.active.Load()
	if a == nil {
		s.wakeUp()
		if s.health.Load().revoked != nil {
			return &kmsservice.StatusResponse{Version: "v2", Healthz: "not ready: the key store revoked the current key version and reports no usable one", KeyID: "revoked"}, nil
		}
		return &kmsservice.StatusResponse{Version: "v2", Healthz: "not ready: the key store has not answered since start", KeyID: "pending"}, nil
	}
	return &kmsservice.StatusResponse{Version: "v2", Healthz: "ok", KeyID: a.entry.keyID}, nil
}

// Encrypt implements kmsservice.Service: it encrypts a DEK seed with the
// current local KEK. It calls the provider only when the local KEK reached its
// usage limit.
func (s *Service) Encrypt(ctx context.Context, uid string, plaintext []byte) (*kmsservice.EncryptResponse, error) {
	if len(plaintext) == 0 {
		return nil, fmt.Errorf("%w: plaintext is empty", ErrInvalidInput)
	}
	if len(plaintext) > MaxPlaintextSize {
		return nil, fmt.Errorf("%w: plaintext is %d bytes, more than %d", ErrInvalidInput, len(plaintext), MaxPlaintextSize)
	}
	a, err := s.kekForEncrypt(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 1+nonceSize, 1+nonceSize+len(plaintext)+tagSize)
	out[0] = FormatVersion
	if _, err := io.ReadFull(s.cfg.Rand, out[1:]); err != nil {
		return nil, fmt.Errorf("generate nonce: %w", err)
	}
	out = a.entry.aead.Seal(out, out[1:], plaintext, ciphertextAAD(a.entry.keyID, a.entry.ref))
	return &kmsservice.EncryptResponse{
		Ciphertext: out,
		KeyID:      a.entry.keyID,
		Annotations: map[string][]byte{
			AnnotationVersion:  []byte(formatVersionText),
			AnnotationLocalKEK: a.annotation,
		},
	}, nil
}

// kekForEncrypt returns the active local KEK, replacing it first when it
// reached its usage or age limit. When no replacement can be made it keeps
// the current one up to the hard AES-GCM limit.
func (s *Service) kekForEncrypt(ctx context.Context) (*localKEK, error) {
	a := s.active.Load()
	if a == nil {
		if s.health.Load().revoked != nil {
			return nil, ErrRevoked
		}
		return nil, ErrNotReady
	}
	uses := a.uses.Add(1)
	if uses <= s.cfg.KEKMaxUses && s.cfg.Now().Sub(a.created) < s.cfg.KEKMaxAge {
		return a, nil
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.RemoteTimeout)
	defer cancel()
	next, err := s.newLocalKEK(rctx, a)
	if err == nil {
		next.uses.Add(1)
		return next, nil
	}
	if uses >= hardKEKMaxUses {
		return nil, fmt.Errorf("local KEK reached %d uses and no new one could be made: %w", uint64(hardKEKMaxUses), err)
	}
	s.log.Warn("could not replace the local KEK at its limit; still using it", zap.Error(err))
	return a, nil
}

// Stats is a snapshot of the Service for /status and metrics.
type Stats struct {
	Provider       string
	KeyID          string
	RemoteVersion  string
	Ready          bool
	LastAttempt    time.Time
	LastSuccess    time.Time
	LastError      string
	LocalKEKAge    time.Duration
	LocalKEKUses   uint64
	LocalKEKs      uint64 // created since start
	CacheEntries   int
	CacheCapacity  int
	CacheHits      uint64
	CacheMisses    uint64
	ProviderUnwrap uint64
	// UnwrapFailures counts remote unwraps that failed; NegativeHits the
	// Decrypts answered from the negative cache without a remote call;
	// UnwrapsThrottled the cache misses refused by the unwrap limits.
	UnwrapFailures   uint64
	NegativeHits     uint64
	UnwrapsThrottled uint64
	// VersionsRefused counts the Decrypts refused for a version spelling
	// the store never writes, before any remote call.
	VersionsRefused uint64
	NegativeEntries int
}

// Stats returns a snapshot. Ready means a local KEK exists, the last poll of
// the provider succeeded and it is no older than three poll intervals.
func (s *Service) Stats() Stats {
	now := s.cfg.Now()
	h := s.health.Load()
	st := Stats{
		Provider:       s.provider.Name(),
		RemoteVersion:  h.remoteVersion,
		LastAttempt:    h.attempt,
		LastSuccess:    h.success,
		LocalKEKs:      s.keksCreated.Load(),
		CacheEntries:   s.cache.len(),
		CacheCapacity:  s.cfg.CacheSize,
		CacheHits:      s.cacheHits.Load(),
		CacheMisses:    s.cacheMisses.Load(),
		ProviderUnwrap: s.unwraps.Load(),

		UnwrapFailures:   s.unwrapFailures.Load(),
		NegativeHits:     s.negativeHits.Load(),
		UnwrapsThrottled: s.unwrapsThrottled.Load(),
		VersionsRefused:  s.versionsRefused.Load(),
		NegativeEntries:  s.guard.neg.len(),
	}
	if h.err != nil {
		st.LastError = h.err.Error()
	}
	if a := s.active.Load(); a != nil {
		st.KeyID = a.entry.keyID
		st.LocalKEKAge = now.Sub(a.created)
		st.LocalKEKUses = a.uses.Load()
		st.Ready = h.err == nil && !h.success.IsZero() && now.Sub(h.success) <= 3*s.cfg.PollInterval
	}
	return st
}
