package envelope

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"fmt"

	kmsservice "k8s.io/kms/pkg/service"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

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
