package vault

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// errBackoff marks a call failed fast, without a request, while Vault is
// unavailable.
var errBackoff = errors.New("Vault is unavailable; calls are paused")

// breaker spaces out calls while Vault is unavailable (sealed, down,
// unreachable, answering 5xx): after threshold consecutive unavailable
// failures it fails calls fast for a backoff that doubles from minWait up
// to maxWait at each failed probe, then lets one probe call through. A
// success closes it. So an outage costs Vault one request per backoff,
// whatever the plugin's load, and recovery takes at most maxWait after
// Vault is back.
type breaker struct {
	threshold        int
	minWait, maxWait time.Duration

	mu       sync.Mutex
	failures int
	wait     time.Duration // current backoff once open
	until    time.Time     // no call before this while open
	open     bool
	probing  bool
	lastErr  error
}

func newBreaker(threshold int, minWait, maxWait time.Duration) *breaker {
	return &breaker{threshold: threshold, minWait: minWait, maxWait: maxWait}
}

// allow reports whether a call may go to Vault now. probe is set when the
// call is the probe of an open breaker; the caller passes it to done.
func (b *breaker) allow(now time.Time) (probe bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.open {
		return false, nil
	}
	if now.Before(b.until) || b.probing {
		wait := b.until.Sub(now)
		if b.probing || wait < 0 {
			wait = 0
		}
		return false, &backoffError{failures: b.failures, wait: wait, last: b.lastErr}
	}
	b.probing = true
	return true, nil
}

// done records the outcome of a call allow let through: ok (Vault
// answered), unavailable (it did not), or neither (the caller gave up).
func (b *breaker) done(now time.Time, probe bool, ok, unavailable bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if probe {
		b.probing = false
	}
	switch {
	case ok:
		b.open, b.failures, b.wait, b.lastErr = false, 0, 0, nil
	case unavailable:
		b.failures++
		b.lastErr = err
		switch {
		case b.open && probe:
			b.wait = min(2*b.wait, b.maxWait)
			b.until = now.Add(b.wait)
		case !b.open && b.failures >= b.threshold:
			b.open, b.wait = true, b.minWait
			b.until = now.Add(b.wait)
		}
	}
}

// retryIn is how long until an open breaker lets a probe through, or 0.
func (b *breaker) retryIn(now time.Time) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.open || !now.Before(b.until) {
		return 0
	}
	return b.until.Sub(now)
}

// report is the breaker's state for metrics.
func (b *breaker) report(now time.Time) provider.BreakerState {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case !b.open:
		return provider.BreakerClosed
	case now.Before(b.until) && !b.probing:
		return provider.BreakerOpen
	default:
		return provider.BreakerHalfOpen
	}
}

// backoffError is a call failed fast by the open breaker: provider.
// ErrUnavailable, with the time until the next probe (RetryAfter) so that
// the plugin's poll comes back exactly then.
type backoffError struct {
	failures int
	wait     time.Duration
	last     error
}

func (e *backoffError) Error() string {
	return fmt.Sprintf("vault: %v: %v after %d consecutive failures, next try in %s (last: %v)",
		provider.ErrUnavailable, errBackoff, e.failures, e.wait.Round(100*time.Millisecond), e.last)
}

// Unwrap returns provider.ErrUnavailable and errBackoff.
func (e *backoffError) Unwrap() []error { return []error{provider.ErrUnavailable, errBackoff} }

// RetryAfter is the time until the breaker lets a probe through, or 0.
func (e *backoffError) RetryAfter() time.Duration { return e.wait }
