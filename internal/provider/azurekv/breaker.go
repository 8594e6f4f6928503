package azurekv

import (
	"fmt"
	"sync"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// outcome is how a vault call counts for the circuit breaker.
type outcome int

const (
	// neutral: the call says nothing about the vault's health (the caller
	// gave up, a bad request, a missing key).
	neutral outcome = iota
	success
	failure // the vault is unreachable, throttling or failing
)

type breakerState int

const (
	closed breakerState = iota
	open
	halfOpen
)

// breaker is a circuit breaker: after threshold consecutive failures it
// opens and fails calls fast for openFor; then it lets one probe call
// through (half-open): success closes it, failure opens it again.
type breaker struct {
	threshold int
	openFor   time.Duration

	mu       sync.Mutex
	state    breakerState
	failures int
	until    time.Time
	probing  bool
	lastErr  error
}

func newBreaker(threshold int, openFor time.Duration) *breaker {
	return &breaker{threshold: threshold, openFor: openFor}
}

// allow reports whether a call may go to the vault now. probe is set when
// the call is the half-open probe; the caller must pass it to done.
func (b *breaker) allow(now time.Time) (probe bool, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch b.state {
	case closed:
		return false, nil
	case open:
		if now.Before(b.until) {
			return false, b.openError(now)
		}
		b.state = halfOpen
		fallthrough
	default: // halfOpen
		if b.probing {
			return false, b.openError(now)
		}
		b.probing = true
		return true, nil
	}
}

func (b *breaker) openError(now time.Time) error {
	wait := b.until.Sub(now)
	if wait < 0 || b.state == halfOpen {
		wait = 0 // a probe is in flight: no hint
	}
	return &circuitOpenError{failures: b.failures, wait: wait, last: b.lastErr}
}

// circuitOpenError is a call failed fast by the open breaker. It is
// provider.ErrUnavailable and errCircuitOpen, and says when the breaker
// lets a probe through (RetryAfter), so that a caller polling on a timer,
// such as a plugin started during an outage, tries again as soon as the
// breaker allows rather than after a fixed retry interval.
type circuitOpenError struct {
	failures int
	wait     time.Duration
	last     error
}

func (e *circuitOpenError) Error() string {
	return fmt.Sprintf("azurekv: %v: %v after %d consecutive failures, next try in %s (last: %v)",
		provider.ErrUnavailable, errCircuitOpen, e.failures, e.wait.Round(time.Second), e.last)
}

// Unwrap returns provider.ErrUnavailable and errCircuitOpen.
func (e *circuitOpenError) Unwrap() []error { return []error{provider.ErrUnavailable, errCircuitOpen} }

// RetryAfter is the time until the breaker lets a probe through, or 0 (no
// hint) while a probe is in flight.
func (e *circuitOpenError) RetryAfter() time.Duration { return e.wait }

// done records the outcome of a call that allow let through.
func (b *breaker) done(now time.Time, probe bool, o outcome, err error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if probe {
		b.probing = false
	}
	switch o {
	case success:
		b.state, b.failures, b.lastErr = closed, 0, nil
	case failure:
		b.failures++
		b.lastErr = err
		if (b.state == halfOpen && probe) || (b.state == closed && b.failures >= b.threshold) {
			b.state = open
			b.until = now.Add(b.openFor)
		}
	}
}

// retryIn is how long until an open breaker lets a probe through, or 0
// when it is not open.
func (b *breaker) retryIn(now time.Time) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.state != open || !now.Before(b.until) {
		return 0
	}
	return b.until.Sub(now)
}

// isOpen reports whether calls are being failed fast.
func (b *breaker) isOpen() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.state != closed
}

// report is the breaker's state for metrics at now: open while it fails
// calls fast, half-open once the next call would be the probe (or the
// probe is in flight), else closed.
func (b *breaker) report(now time.Time) provider.BreakerState {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case b.state == closed:
		return provider.BreakerClosed
	case b.state == open && now.Before(b.until):
		return provider.BreakerOpen
	default:
		return provider.BreakerHalfOpen
	}
}

var _ provider.StateReporter = (*Provider)(nil)

// ReportState implements provider.StateReporter: the circuit breaker's
// state, read without calling the vault.
func (p *Provider) ReportState() provider.StoreState {
	return provider.StoreState{Breaker: p.breaker.report(p.cfg.Now())}
}
