package kvtest

import (
	"errors"
	"net/http"
	"time"
)

// faults are the knobs that make the vault misbehave.
type faults struct {
	latency       time.Duration
	throttle      int // remaining 429 answers; <0 means until cleared
	retryAfter    time.Duration
	failStatus    int
	failRemaining int // <0 means until cleared
	outage        bool
	dateOffset    time.Duration
	tokenOutage   bool
	assertionSkew time.Duration
}

// SetLatency delays every vault answer by d.
func (s *Server) SetLatency(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.latency = d
}

// Throttle answers the next n vault requests with 429 and a Retry-After of
// retryAfter (whole seconds in Retry-After when it is a whole number of
// seconds, else retry-after-ms as well). n < 0 throttles until Throttle(0, 0).
func (s *Server) Throttle(n int, retryAfter time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.throttle, s.faults.retryAfter = n, retryAfter
}

// Fail answers the next n vault requests with status (500, 502, 503...).
// n < 0 fails until Fail(0, 0).
func (s *Server) Fail(n, status int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.failRemaining, s.faults.failStatus = n, status
}

// SetOutage drops every vault connection without an answer while on, as an
// unreachable vault does.
func (s *Server) SetOutage(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.outage = on
}

// SetTokenOutage makes Entra and IMDS answer 503 while on.
func (s *Server) SetTokenOutage(on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.tokenOutage = on
}

// SetClockSkew makes the server's clock run d ahead of the client's: the
// Date header says so, and Entra judges client assertions by it.
func (s *Server) SetClockSkew(d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults.dateOffset = d
	s.faults.assertionSkew = d
}

func (s *Server) now() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return time.Now().Add(s.faults.dateOffset)
}

func (s *Server) setDate(w http.ResponseWriter) {
	w.Header().Set("Date", s.now().UTC().Format(http.TimeFormat))
}

// errClosed is returned by a hijacked connection that was dropped.
var errClosed = errors.New("kvtest: connection dropped")

// drop closes the client connection without an answer.
func drop(w http.ResponseWriter) error {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler) // aborts the stream
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		return err
	}
	_ = conn.Close()
	return errClosed
}
