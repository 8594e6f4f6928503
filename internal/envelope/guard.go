package envelope

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Defaults of the unwrap guard, for Config fields left zero.
const (
	DefaultNegativeCacheTTL     = 30 * time.Second
	DefaultNegativeCacheSize    = 4096
	DefaultMaxConcurrentUnwraps = 8
	DefaultUnwrapRate           = 100 // remote unwraps per second
	DefaultUnwrapBurst          = 200
)

// ErrUnwrapThrottled means a cache miss could not get a remote unwrap within
// its deadline because the unwrap rate or concurrency limit was reached
// (gRPC Unavailable: kube-apiserver retries).
var ErrUnwrapThrottled = fmt.Errorf("%w: too many remote unwraps; retry later", provider.ErrUnavailable)

// unwrapGuard bounds what cache misses can cost the key store, whoever sends
// them: a bounded negative cache remembers refused wrapped KEKs (by the hash
// of their annotation) for a short time, and remote unwraps share a
// concurrency limit and a rate limit. Warm Decrypts (cache hits) never pass
// through it.
type unwrapGuard struct {
	sem     chan struct{}
	limiter *rate.Limiter
	neg     *negativeCache
}

func newUnwrapGuard(cfg Config) *unwrapGuard {
	return &unwrapGuard{
		sem:     make(chan struct{}, cfg.MaxConcurrentUnwraps),
		limiter: rate.NewLimiter(rate.Limit(cfg.UnwrapRate), cfg.UnwrapBurst),
		neg:     newNegativeCache(cfg.NegativeCacheSize, cfg.NegativeCacheTTL),
	}
}

// acquire waits, within ctx, for a rate token and a concurrency slot. The
// caller calls the returned release when its remote call is done. A wait
// that would outlast ctx fails at once with ErrUnwrapThrottled.
func (g *unwrapGuard) acquire(ctx context.Context) (release func(), err error) {
	if err := g.limiter.Wait(ctx); err != nil {
		if ctx.Err() != nil && !errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, ctx.Err()
		}
		return nil, ErrUnwrapThrottled
	}
	select {
	case g.sem <- struct{}{}:
		return func() { <-g.sem }, nil
	case <-ctx.Done():
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return nil, ErrUnwrapThrottled
		}
		return nil, ctx.Err()
	}
}

// negativeCacheable reports whether a failed unwrap is remembered: answers
// that will not change by asking again soon (unknown, disabled or refused
// key version; a wrapped key that does not authenticate). An unreachable
// store or a timeout is not remembered, so recovery follows the store.
func negativeCacheable(err error) bool {
	switch {
	case errors.Is(err, provider.ErrUnavailable), errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
		return false
	case errors.Is(err, provider.ErrKeyNotFound), errors.Is(err, provider.ErrKeyDisabled),
		errors.Is(err, provider.ErrPermissionDenied), errors.Is(err, provider.ErrInvalidCiphertext),
		errors.Is(err, ErrInvalidInput):
		return true
	}
	return false
}

// negativeCache remembers failed unwraps by the hash of the wrapped KEK's
// annotation. It is bounded: when full, the oldest entry goes.
type negativeCache struct {
	mu       sync.Mutex
	ttl      time.Duration
	capacity int
	order    *list.List // front = newest; values are *negativeEntry
	entries  map[[32]byte]*list.Element
}

type negativeEntry struct {
	ref     [32]byte
	err     error
	expires time.Time
}

func newNegativeCache(capacity int, ttl time.Duration) *negativeCache {
	return &negativeCache{ttl: ttl, capacity: capacity, order: list.New(), entries: make(map[[32]byte]*list.Element)}
}

// get returns the remembered error for ref, if any and not expired.
func (c *negativeCache) get(ref [32]byte, now time.Time) (error, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.entries[ref]
	if !ok {
		return nil, false
	}
	e := el.Value.(*negativeEntry)
	if !now.Before(e.expires) {
		c.order.Remove(el)
		delete(c.entries, ref)
		return nil, false
	}
	return e.err, true
}

// add remembers err for ref until now + TTL.
func (c *negativeCache) add(ref [32]byte, err error, now time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[ref]; ok {
		c.order.Remove(el)
	}
	c.entries[ref] = c.order.PushFront(&negativeEntry{ref: ref, err: err, expires: now.Add(c.ttl)})
	for c.order.Len() > c.capacity {
		last := c.order.Back()
		c.order.Remove(last)
		delete(c.entries, last.Value.(*negativeEntry).ref)
	}
}

// clear forgets every remembered failure.
func (c *negativeCache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.order.Init()
	clear(c.entries)
}

// len returns the number of remembered failures, expired ones included.
func (c *negativeCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.order.Len()
}
