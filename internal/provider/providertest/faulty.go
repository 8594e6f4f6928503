package providertest

import (
	"context"
	"sync"
	"sync/atomic"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Faulty wraps a real provider to count its calls, slow them down and make
// them fail on demand. Tests and benchmarks use it to stand for a distant or
// failing key store while the real store does the cryptography.
type Faulty struct {
	provider.Provider

	// Delay is added before every call.
	Delay time.Duration

	mu  sync.Mutex
	err error // returned by every call while set

	CurrentVersionCalls, WrapCalls, UnwrapCalls atomic.Int64
}

var _ provider.Provider = (*Faulty)(nil)

// NewFaulty wraps p.
func NewFaulty(p provider.Provider) *Faulty { return &Faulty{Provider: p} }

// SetError makes every following call return err (nil restores service).
func (f *Faulty) SetError(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.err = err
}

func (f *Faulty) before(ctx context.Context) error {
	if f.Delay > 0 {
		t := time.NewTimer(f.Delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C:
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// CurrentVersion implements provider.Provider.
func (f *Faulty) CurrentVersion(ctx context.Context) (string, error) {
	f.CurrentVersionCalls.Add(1)
	if err := f.before(ctx); err != nil {
		return "", err
	}
	return f.Provider.CurrentVersion(ctx)
}

// Wrap implements provider.Provider.
func (f *Faulty) Wrap(ctx context.Context, key []byte) (provider.WrappedKey, error) {
	f.WrapCalls.Add(1)
	if err := f.before(ctx); err != nil {
		return provider.WrappedKey{}, err
	}
	return f.Provider.Wrap(ctx, key)
}

// Unwrap implements provider.Provider.
func (f *Faulty) Unwrap(ctx context.Context, w provider.WrappedKey) ([]byte, error) {
	f.UnwrapCalls.Add(1)
	if err := f.before(ctx); err != nil {
		return nil, err
	}
	return f.Provider.Unwrap(ctx, w)
}

// Rotate forwards to the wrapped provider's Rotator.
func (f *Faulty) Rotate(ctx context.Context) (string, error) {
	return f.Provider.(provider.Rotator).Rotate(ctx)
}
