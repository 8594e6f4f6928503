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
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
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

// Run polls the provider until ctx ends: every PollInterval, or every
// RetryInterval after a failure (sooner when the store's error says when to
// retry, such as a circuit breaker's half-open time). While no local KEK
// exists, a Status call wakes it up early, at most once a second, so a
// plugin started during an outage recovers within seconds of the store. A
// Refresh made just before Run counts as its first poll. Run returns nil
// when ctx is canceled.
func (s *Service) Run(ctx context.Context) error {
	wait := time.Duration(0)
	if h := s.health.Load(); !h.attempt.IsZero() {
		wait = s.nextPollIn(h.err)
	}
	for {
		if wait > 0 {
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			case <-s.wake:
				t.Stop()
			}
		}
		err := s.Refresh(ctx)
		if err != nil && ctx.Err() != nil {
			return nil
		}
		wait = s.nextPollIn(err)
		if err != nil {
			msg := "key store poll failed; serving from the current local KEK"
			if s.active.Load() == nil {
				msg = "key store poll failed; no local KEK yet, so Encrypt is refused until the store answers"
			}
			s.log.Warn(msg, zap.Error(err), zap.Duration("retryIn", wait))
		}
	}
}

// minWakeInterval is the least time between two polls started by Status
// calls while not ready.
const minWakeInterval = time.Second

// nextPollIn is the wait before the next poll after one that returned err.
func (s *Service) nextPollIn(err error) time.Duration {
	if err == nil {
		return s.cfg.PollInterval
	}
	wait := s.cfg.RetryInterval
	var ra interface{ RetryAfter() time.Duration }
	if errors.As(err, &ra) {
		if d := ra.RetryAfter(); d > 0 && d < wait {
			wait = max(d, minWakeInterval/10)
		}
	}
	return wait
}

// wakeUp makes Run poll now unless it polled less than minWakeInterval ago.
func (s *Service) wakeUp() {
	if h := s.health.Load(); s.cfg.Now().Sub(h.attempt) < minWakeInterval {
		return
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Refresh asks the provider for its current key version and makes a new
// local KEK when the version changed or the current one reached its age
// limit. Status answers from what Refresh last saw.
//
// Refresh is safe for concurrent use (Run and an operator's request may call
// it at once): calls run one after the other, so a slow call never overwrites
// the outcome of a later one. Time spent waiting for another call does not
// count against RemoteTimeout. A call that fails because ctx ended (the
// caller gave up, not the key store) returns ctx's error and leaves the last
// outcome in place.
func (s *Service) Refresh(ctx context.Context) error {
	s.refresh.Lock()
	defer s.refresh.Unlock()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("refresh: %w", err)
	}
	rctx, cancel := context.WithTimeout(ctx, s.cfg.RemoteTimeout)
	defer cancel()
	attempt := s.cfg.Now()
	prev := s.health.Load()
	version, err := s.provider.CurrentVersion(rctx)
	if err == nil {
		a := s.active.Load()
		if a == nil || a.entry.remoteVersion != version || s.expired(a, attempt) {
			_, err = s.newLocalKEK(rctx, a)
		}
	}
	if err == nil {
		err = s.dropRevoked(rctx)
	}
	if err != nil && ctx.Err() != nil {
		return fmt.Errorf("refresh: %w", err)
	}
	h := &health{attempt: attempt, success: prev.success, err: err, remoteVersion: prev.remoteVersion, revoked: prev.revoked}
	switch {
	case err == nil:
		if prev.revoked != nil {
			// The store answers again after a revocation (a version was
			// re-enabled or made): what it refused may be usable now.
			s.guard.neg.clear()
		}
		h.success, h.remoteVersion, h.revoked = attempt, version, nil
	case revocation(err):
		// Not an outage: the store says the key may not be used. Stop
		// encrypting with it and forget what it unwrapped.
		if a := s.active.Swap(nil); a != nil {
			n := s.cache.evict([]string{a.entry.remoteVersion})
			s.log.Warn("the key store revoked the current key version; encrypting nothing until a usable version exists",
				zap.String("keyIDHash", KeyIDHash(a.entry.keyID)), zap.Int("evicted", n), zap.Error(err))
		}
		h.revoked = err
	}
	s.health.Store(h)
	if err != nil {
		return fmt.Errorf("refresh: %w", err)
	}
	return nil
}

// revocation reports whether a poll error is the store's word that the key
// may not be used (not an outage, which keeps the current local KEK).
func revocation(err error) bool {
	return errors.Is(err, provider.ErrKeyDisabled) || errors.Is(err, provider.ErrKeyNotFound)
}

// dropRevoked asks a provider.VersionChecker which versions of the cached
// local KEKs it revoked and evicts them, so revocation reaches running
// nodes within one poll. An error of the check is returned; the cache is
// then left as it is.
func (s *Service) dropRevoked(ctx context.Context) error {
	vc, ok := s.provider.(provider.VersionChecker)
	if !ok {
		return nil
	}
	versions := s.cache.versions()
	if len(versions) == 0 {
		return nil
	}
	revoked, err := vc.RevokedVersions(ctx, versions)
	if err != nil {
		return fmt.Errorf("check cached key versions: %w", err)
	}
	if len(revoked) == 0 {
		return nil
	}
	n := s.cache.evict(revoked)
	s.log.Info("dropped local KEKs of key versions the store revoked", zap.Int("evicted", n), zap.Int("versions", len(revoked)))
	return nil
}

// expired reports whether a has reached its configured age or usage limit.
func (s *Service) expired(a *localKEK, now time.Time) bool {
	return now.Sub(a.created) >= s.cfg.KEKMaxAge || a.uses.Load() >= s.cfg.KEKMaxUses
}

// newLocalKEK makes a local KEK, has the provider wrap it and makes it
// active, unless another caller already replaced old.
func (s *Service) newLocalKEK(ctx context.Context, old *localKEK) (*localKEK, error) {
	s.rotate.Lock()
	defer s.rotate.Unlock()
	if cur := s.active.Load(); cur != old {
		return cur, nil
	}
	key := make([]byte, localKEKSize)
	if _, err := io.ReadFull(s.cfg.Rand, key); err != nil {
		return nil, fmt.Errorf("generate local KEK: %w", err)
	}
	w, err := s.provider.Wrap(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("wrap local KEK: %w", err)
	}
	if w.Version == "" || len(w.Version) > maxRemoteVersionSize || len(w.Ciphertext) == 0 || len(w.Ciphertext) > maxWrappedKEKSize {
		return nil, fmt.Errorf("wrap local KEK: provider %s returned a wrapped key outside the supported sizes", s.provider.Name())
	}
	aead, err := newAEAD(key)
	if err != nil {
		return nil, err
	}
	clear(key)
	annotation := encodeLocalKEK(w.Version, w.Ciphertext)
	e := &cacheEntry{
		ref:           sha256.Sum256(annotation),
		aead:          aead,
		remoteVersion: w.Version,
		keyID:         DeriveKeyID(s.provider.Name(), w.Version),
		unwrapped:     s.cfg.Now(),
	}
	s.cache.add(e)
	next := &localKEK{entry: e, annotation: annotation, created: s.cfg.Now()}
	s.active.Store(next)
	s.keksCreated.Add(1)
	fields := []zap.Field{zap.String("keyIDHash", KeyIDHash(e.keyID)), zap.String("remoteVersion", w.Version)}
	switch {
	case old == nil:
		s.log.Info("local KEK created", fields...)
	case old.entry.remoteVersion != w.Version:
		s.log.Info("remote key version changed; new key_id", append(fields, zap.String("previousKeyIDHash", KeyIDHash(old.entry.keyID)))...)
	default:
		s.log.Info("local KEK replaced after its age or usage limit", fields...)
	}
	return next, nil
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

// Decrypt implements kmsservice.Service. It finds the local KEK named by the
// annotations in the cache, or unwraps it once through the provider
// (concurrent misses share one call), and opens the ciphertext.
func (s *Service) Decrypt(ctx context.Context, uid string, req *kmsservice.DecryptRequest) ([]byte, error) {
	if req == nil {
		return nil, fmt.Errorf("%w: empty request", ErrInvalidInput)
	}
	if err := validateDecrypt(req); err != nil {
		return nil, err
	}
	annotation := req.Annotations[AnnotationLocalKEK]
	remoteVersion, wrapped, err := decodeLocalKEK(annotation)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidInput, err)
	}
	ref := sha256.Sum256(annotation)
	e, ok := s.cached(ref)
	if !ok {
		// A spelling of the version the store never writes is forged: refuse
		// it before it costs a remote call or a place in the unwrap limits.
		if vv, isVV := s.provider.(provider.VersionValidator); isVV {
			if err := vv.ValidVersion(remoteVersion); err != nil {
				s.versionsRefused.Add(1)
				return nil, fmt.Errorf("%w: %w", ErrInvalidInput, err)
			}
		}
		// Check the key_id before any remote call; a cached entry carries
		// the key_id derived from the same annotation, so a hit compares
		// with it instead.
		if req.KeyID != DeriveKeyID(s.provider.Name(), remoteVersion) {
			return nil, errKeyIDMismatch
		}
		if err, ok := s.guard.neg.get(ref, s.cfg.Now()); ok {
			s.negativeHits.Add(1)
			return nil, err
		}
		if e, err = s.lookup(ctx, ref, provider.WrappedKey{Version: remoteVersion, Ciphertext: wrapped}); err != nil {
			return nil, err
		}
	}
	if req.KeyID != e.keyID {
		return nil, errKeyIDMismatch
	}
	ct := req.Ciphertext
	plaintext, err := e.aead.Open(nil, ct[1:1+nonceSize], ct[1+nonceSize:], ciphertextAAD(req.KeyID, ref))
	if err != nil {
		return nil, fmt.Errorf("%w: ciphertext does not authenticate with its key_id and annotations", ErrInvalidInput)
	}
	return plaintext, nil
}

func validateDecrypt(req *kmsservice.DecryptRequest) error {
	switch {
	case req.KeyID == "":
		return fmt.Errorf("%w: key_id is empty", ErrInvalidInput)
	case len(req.KeyID) > maxKeyIDSize:
		return fmt.Errorf("%w: key_id is %d bytes, more than %d", ErrInvalidInput, len(req.KeyID), maxKeyIDSize)
	case len(req.Ciphertext) == 0:
		return fmt.Errorf("%w: ciphertext is empty", ErrInvalidInput)
	case len(req.Ciphertext) > maxCiphertextSize:
		return fmt.Errorf("%w: ciphertext is %d bytes, more than %d", ErrInvalidInput, len(req.Ciphertext), maxCiphertextSize)
	case req.Ciphertext[0] != FormatVersion:
		return fmt.Errorf("%w: ciphertext has unsupported format version %d", ErrInvalidInput, req.Ciphertext[0])
	case len(req.Ciphertext) < 1+nonceSize+tagSize+1:
		return fmt.Errorf("%w: ciphertext is truncated (%d bytes)", ErrInvalidInput, len(req.Ciphertext))
	case annotationsSize(req.Annotations) > maxAnnotationsSize:
		return fmt.Errorf("%w: annotations are larger than %d bytes", ErrInvalidInput, maxAnnotationsSize)
	}
	v, ok := req.Annotations[AnnotationVersion]
	switch {
	case !ok:
		return fmt.Errorf("%w: annotation %s is missing", ErrInvalidInput, AnnotationVersion)
	case string(v) != formatVersionText:
		return fmt.Errorf("%w: annotation %s names an unsupported format version", ErrInvalidInput, AnnotationVersion)
	}
	if _, ok := req.Annotations[AnnotationLocalKEK]; !ok {
		return fmt.Errorf("%w: annotation %s is missing", ErrInvalidInput, AnnotationLocalKEK)
	}
	return nil
}

// cached returns the unwrapped local KEK for ref when it is the active one
// or in the cache, counting the hit.
func (s *Service) cached(ref [32]byte) (*cacheEntry, bool) {
	if a := s.active.Load(); a != nil && a.entry.ref == ref {
		s.cacheHits.Add(1)
		return a.entry, true
	}
	if e, ok := s.cache.get(ref, s.cfg.Now(), s.cfg.CacheTTL); ok {
		s.cacheHits.Add(1)
		return e, true
	}
	return nil, false
}

// lookup unwraps the local KEK for ref after a cache miss. Concurrent misses for one ref share a single provider call, which runs
// on its own deadline so that one caller giving up does not fail the others.
func (s *Service) lookup(ctx context.Context, ref [32]byte, w provider.WrappedKey) (*cacheEntry, error) {
	s.cacheMisses.Add(1)
	fl, leader := s.flights.start(ref)
	if leader {
		// Admission waits on the caller's deadline (at most RemoteTimeout),
		// so a flood of misses fails fast instead of queueing goroutines.
		actx, cancel := context.WithTimeout(ctx, s.cfg.RemoteTimeout)
		release, err := s.guard.acquire(actx)
		cancel()
		if err != nil {
			s.unwrapsThrottled.Add(1)
			err = fmt.Errorf("unwrap local KEK: %w", err)
			s.flights.finish(ref, fl, nil, err)
			return nil, err
		}
		go func() {
			defer release()
			rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.RemoteTimeout)
			defer cancel()
			e, err := s.unwrap(rctx, ref, w)
			s.flights.finish(ref, fl, e, err)
		}()
	}
	select {
	case <-fl.done:
		return fl.entry, fl.err
	case <-ctx.Done():
		return nil, fmt.Errorf("unwrap local KEK: %w", ctx.Err())
	}
}

// unwrap asks the provider for the local KEK of ref, within the slot lookup
// acquired. Only a successful unwrap enters the cache; a refusal enters the
// negative cache.
func (s *Service) unwrap(ctx context.Context, ref [32]byte, w provider.WrappedKey) (*cacheEntry, error) {
	if e, ok := s.cache.get(ref, s.cfg.Now(), s.cfg.CacheTTL); ok { // filled while this flight was starting
		return e, nil
	}
	if err, ok := s.guard.neg.get(ref, s.cfg.Now()); ok { // refused while this flight was starting
		s.negativeHits.Add(1)
		return nil, err
	}
	s.unwraps.Add(1)
	key, err := s.provider.Unwrap(ctx, w)
	if err == nil && len(key) != localKEKSize {
		clear(key)
		err = fmt.Errorf("%w: unwrapped local KEK has %d bytes, want %d", ErrInvalidInput, len(key), localKEKSize)
	}
	if err != nil {
		s.unwrapFailures.Add(1)
		err = fmt.Errorf("unwrap local KEK: %w", err)
		if negativeCacheable(err) {
			s.guard.neg.add(ref, err, s.cfg.Now())
		}
		return nil, err
	}
	defer clear(key)
	aead, err := newAEAD(key)
	if err != nil {
		return nil, err
	}
	e := &cacheEntry{ref: ref, aead: aead, remoteVersion: w.Version, keyID: DeriveKeyID(s.provider.Name(), w.Version), unwrapped: s.cfg.Now()}
	s.cache.add(e)
	return e, nil
}

func newAEAD(key []byte) (cipher.AEAD, error) {
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("local KEK cipher: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("local KEK cipher: %w", err)
	}
	return aead, nil
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
