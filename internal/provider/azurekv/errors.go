package azurekv

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// operation is one kind of call to the vault or to the identity provider,
// with the permission it needs.
type operation struct {
	name   string // as in messages: "get", "wrapKey", ...
	policy string // Key Vault access policy key permission
	action string // Azure RBAC data action, after Microsoft.KeyVault/{vaults|managedHsm}/
}

var (
	opGet    = operation{"get", "get", "keys/read"}
	opList   = operation{"list", "list", "keys/read"}
	opWrap   = operation{"wrapKey", "wrapKey", "keys/wrap/action"}
	opUnwrap = operation{"unwrapKey", "unwrapKey", "keys/unwrap/action"}
	opRotate = operation{"rotate", "rotate", "keys/rotate/action"}
	opUpdate = operation{"update", "update", "keys/update/action"}
	opToken  = operation{name: "token"}
	opProbe  = operation{name: "probe"}
)

// Error is a failed call to Key Vault, Managed HSM or the identity provider.
// It wraps one of the provider error values (Kind) when one applies, so
// errors.Is(err, provider.ErrPermissionDenied) and friends work, and it
// carries what an operator needs to fix the problem. It never holds a token
// or a secret.
type Error struct {
	// Op is the failed operation: get, list, wrapKey, unwrapKey, rotate,
	// update, token (getting an access token) or probe.
	Op string
	// Vault is the vault's host name (with its port, unless 443).
	Vault string
	// Key is the key name the call used.
	Key string
	// Version is the key ID (versioned) the call used, if any.
	Version string
	// Status is the HTTP status of the answer, 0 when there was none.
	Status int
	// Code and InnerCode are Key Vault's error codes (Forbidden,
	// KeyDisabled, ForbiddenByRbac, ...) or Entra's (invalid_client and
	// the AADSTS number).
	Code, InnerCode string
	// Message is the server's explanation, shortened, on one line.
	Message string
	// Permission names what a 403 lacked: the access policy permission
	// ("keys/unwrapKey") and the RBAC data action.
	Permission, RBACAction string
	// HSM is set when the vault is a Managed HSM.
	HSM bool
	// Kind is provider.ErrPermissionDenied, ErrKeyNotFound, ErrKeyDisabled,
	// ErrUnavailable, ErrInvalidCiphertext, or nil.
	Kind error
	// Err is the underlying error.
	Err error

	retryAfter time.Duration
}

// RetryAfter is how long until the circuit breaker lets a call through
// again when this failure opened it, or 0 (no hint). A caller that polls
// on a timer (the plugin's envelope) waits that long rather than its own
// retry interval.
func (e *Error) RetryAfter() time.Duration { return e.retryAfter }

// Error implements error.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("azurekv: ")
	b.WriteString(e.Op)
	// A key that is missing altogether is not a missing key version.
	keyMissing := e.Version == "" && e.Key != "" && errors.Is(e.Kind, provider.ErrKeyNotFound)
	switch {
	case e.Version != "":
		b.WriteString(" with version ")
		b.WriteString(e.Version)
	case e.Vault != "" && e.Op != "token" && !keyMissing:
		b.WriteString(" on ")
		b.WriteString(e.Vault)
	}
	switch {
	case keyMissing:
		fmt.Fprintf(&b, ": key %s not found in vault https://%s", e.Key, e.Vault)
	case e.Kind != nil:
		b.WriteString(": ")
		b.WriteString(e.Kind.Error())
	}
	if e.Permission != "" {
		fmt.Fprintf(&b, ": the identity lacks key permission %s (access policy) or data action %s (RBAC)", e.Permission, e.RBACAction)
	}
	switch {
	case e.Status != 0:
		fmt.Fprintf(&b, ": HTTP %d", e.Status)
		if e.Code != "" {
			b.WriteString(" " + e.Code)
		}
		if e.InnerCode != "" {
			b.WriteString(" (" + e.InnerCode + ")")
		}
		if e.Message != "" {
			b.WriteString(": " + e.Message)
		}
	case e.Message != "":
		b.WriteString(": " + e.Message)
	case e.Err != nil:
		b.WriteString(": " + oneLine(e.Err.Error(), 300))
	}
	return b.String()
}

// Unwrap returns Kind and Err.
func (e *Error) Unwrap() []error {
	var out []error
	if e.Kind != nil {
		out = append(out, e.Kind)
	}
	if e.Err != nil {
		out = append(out, e.Err)
	}
	return out
}

// errCircuitOpen is returned, wrapped with provider.ErrUnavailable, while
// the circuit breaker fails calls fast (see circuitOpenError).
var errCircuitOpen = errors.New("circuit open")
