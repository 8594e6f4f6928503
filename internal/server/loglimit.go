package server

import (
	"sync"
	"time"
)

// DefaultFailureLogInterval is how often one cause of failed requests is
// logged at most.
const DefaultFailureLogInterval = 10 * time.Second

// failureLog decides which failed requests are logged: the first of each
// cause (method and gRPC code) per interval, then one line per interval
// with the count of those it held back. Its state is one small entry per
// cause, and causes are bounded (three methods, seventeen codes), so a
// flood of bad requests costs O(1) memory and at most one line per cause
// per interval.
type failureLog struct {
	interval time.Duration
	now      func() time.Time

	mu     sync.Mutex
	causes map[string]*causeState
}

type causeState struct {
	logged     time.Time
	suppressed uint64
}

func newFailureLog(interval time.Duration, now func() time.Time) *failureLog {
	return &failureLog{interval: interval, now: now, causes: make(map[string]*causeState)}
}

// admit reports whether to log this failure of cause, and how many of the
// same cause were held back since the last line.
func (l *failureLog) admit(cause string) (ok bool, suppressed uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	c := l.causes[cause]
	if c == nil {
		c = &causeState{}
		l.causes[cause] = c
	}
	if !c.logged.IsZero() && now.Sub(c.logged) < l.interval {
		c.suppressed++
		return false, 0
	}
	suppressed, c.suppressed, c.logged = c.suppressed, 0, now
	return true, suppressed
}
