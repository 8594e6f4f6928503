package rotation

import (
	"errors"
	"fmt"
	"time"
)

// Errors.
var (
	// ErrCrashed is what a test hook (Config.Hooks) returns to stop a run
	// as a crash would; Run then returns it as it is.
	ErrCrashed = errors.New("rotation: crashed at the test hook")
	// ErrLostLease stops a run whose Lease could not be renewed.
	ErrLostLease = errors.New("rotation: lost the Lease")
)

// LeaseHeldError is returned by Run when another run holds the Lease.
type LeaseHeldError struct {
	Namespace, Name string
	Holder          string
	RenewTime       time.Time
	Expires         time.Time
	Now             time.Time
}

func (e *LeaseHeldError) Error() string {
	msg := fmt.Sprintf("another rotation or re-encryption is running: Lease %s/%s is held by %s", e.Namespace, e.Name, e.Holder)
	if !e.RenewTime.IsZero() {
		msg += fmt.Sprintf(" (renewed %s ago, expires in %s)", HumanDuration(e.Now.Sub(e.RenewTime)), HumanDuration(e.Expires.Sub(e.Now)))
	}
	return msg + "; run again later or with --wait"
}

// StageError is a run that stopped at a stage. No key version was disabled
// that anything depends on, and the next run resumes at stage Resume.
type StageError struct {
	Stage  Stage
	Resume Stage
	Err    error
	// Op names the run in the message: "" for a rotation, "re-encryption"
	// for `kms-plugin reencrypt`.
	Op string
}

func (e *StageError) Error() string {
	resume := e.Resume
	if resume == "" {
		resume = e.Stage
	}
	op := e.Op
	if op == "" {
		op = "rotation"
	}
	return fmt.Sprintf("%s stopped at stage %s: %v (all keys intact; the next run resumes at %s)", op, e.Stage, e.Err, resume)
}

func (e *StageError) Unwrap() error { return e.Err }

// hookError carries the error a test hook returned up to Run, which
// returns err as it is and leaves the Lease and the state as a killed
// process would.
type hookError struct{ err error }

func (e *hookError) Error() string { return e.err.Error() }
func (e *hookError) Unwrap() error { return e.err }

// permanentError is an error retrying will not fix.
type permanentError struct{ err error }

func (e *permanentError) Error() string { return e.err.Error() }
func (e *permanentError) Unwrap() error { return e.err }
