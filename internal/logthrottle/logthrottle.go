// Package logthrottle decides which of many similar failures are logged:
// the first of each cause per interval, then one line per interval that
// carries the count of those held back. The plugin's gRPC server and admin
// HTTP server use it so that a flood of bad requests costs at most one log
// line per cause per interval; callers keep causes bounded (a method and a
// status code, an endpoint), so its memory is O(1) too.
package logthrottle

import (
	"sync"
	"time"
)

// Throttle is safe for concurrent use.
type Throttle struct {
	interval time.Duration
	now      func() time.Time

	mu     sync.Mutex
	causes map[string]*cause
}

type cause struct {
	logged     time.Time
	suppressed uint64
}

// New returns a Throttle that logs each cause at most once per interval,
// on the clock now (time.Now when nil).
func New(interval time.Duration, now func() time.Time) *Throttle {
	if now == nil {
		now = time.Now
	}
	return &Throttle{interval: interval, now: now, causes: make(map[string]*cause)}
}

// Admit reports whether to log this failure of cause, and how many of the
// same cause were held back since its last line. A clock that stepped back
// logs.
func (t *Throttle) Admit(name string) (ok bool, suppressed uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := t.now()
	c := t.causes[name]
	if c == nil {
		c = &cause{}
		t.causes[name] = c
	}
	if d := now.Sub(c.logged); !c.logged.IsZero() && d >= 0 && d < t.interval {
		c.suppressed++
		return false, 0
	}
	suppressed, c.suppressed, c.logged = c.suppressed, 0, now
	return true, suppressed
}
