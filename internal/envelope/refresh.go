package envelope

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"time"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

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
	noUsableVersion := revocation(err) // the store's word on the key as a whole
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
		// encrypting with it and forget what it unwrapped: every version
		// when the store has no usable version of the key at all (every
		// version disabled, or the key deleted), else the active one.
		a := s.active.Swap(nil)
		n := 0
		switch {
		case noUsableVersion:
			n = s.cache.clear()
		case a != nil:
			n = s.cache.evict([]string{a.entry.remoteVersion})
		}
		if a != nil || n > 0 {
			s.log.Warn("the key store revoked the key; encrypting nothing until a usable version exists",
				zap.Int("evicted", n), zap.Error(err))
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
