package vault

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/vault/api"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Operations, as they appear in Error.Op and in messages.
const (
	opRead    = "read key"
	opEncrypt = "encrypt"
	opDecrypt = "decrypt"
	opRotate  = "rotate"
	opConfig  = "config"
	opLogin   = "login"
	opRenew   = "renew token"
	opLookup  = "lookup token"
	opCaps    = "capabilities"
	opHealth  = "health"
)

// Error is a failed call to Vault. It wraps one of the provider error
// values (Kind) when one applies, so errors.Is(err,
// provider.ErrPermissionDenied) and friends work, and it says what failed
// where. It never holds a token, a secret ID or a JWT.
type Error struct {
	// Op is the failed operation: read key, encrypt, decrypt, rotate,
	// config, login, renew token, lookup token, capabilities or health.
	Op string
	// Path is the Vault API path of the call, such as transit/decrypt/k.
	Path string
	// Version is the key version the call used, if any.
	Version string
	// Status is the HTTP status of Vault's answer, 0 when there was none.
	Status int
	// Message is Vault's explanation (its errors joined), shortened, on one
	// line; or what went wrong on the way to Vault.
	Message string
	// Kind is provider.ErrPermissionDenied, ErrKeyNotFound,
	// ErrKeyDisabled, ErrUnavailable, ErrInvalidCiphertext, or nil.
	Kind error
	// Err is the underlying error.
	Err error

	invalidToken bool          // Vault refused the token itself
	retryAfter   time.Duration // set when this failure opened the breaker
}

// Error implements error.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("vault: ")
	b.WriteString(e.Op)
	if e.Version != "" {
		b.WriteString(" with key version ")
		b.WriteString(e.Version)
	}
	if e.Path != "" {
		b.WriteString(" (" + e.Path + ")")
	}
	if e.Kind != nil {
		b.WriteString(": " + e.Kind.Error())
	}
	if e.Status != 0 {
		fmt.Fprintf(&b, ": HTTP %d", e.Status)
	}
	switch {
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

// RetryAfter is how long until the circuit breaker lets a call through
// again when this failure opened it, or 0.
func (e *Error) RetryAfter() time.Duration { return e.retryAfter }

// classify turns an error of the Vault client into an *Error. parent is
// the caller's context: when it ended, the caller gave up and the error
// says so instead of blaming Vault.
func classify(parent context.Context, op, path, version string, err error) error {
	if err == nil {
		return nil
	}
	if perr := parent.Err(); perr != nil {
		return fmt.Errorf("vault: %s: %w", op, perr)
	}
	var already *Error
	if errors.As(err, &already) {
		return err
	}
	e := &Error{Op: op, Path: path, Version: version, Err: err}
	var re *api.ResponseError
	switch {
	case errors.As(err, &re):
		e.Status = re.StatusCode
		e.Message = oneLine(strings.Join(re.Errors, "; "), 300)
		classifyResponse(e)
	case errors.Is(err, context.DeadlineExceeded):
		e.Kind, e.Message = provider.ErrUnavailable, "no answer in time"
	case isNetworkError(err):
		e.Kind, e.Message = provider.ErrUnavailable, networkMessage(err)
	default:
		// An answer the client could not parse (a proxy's error page), or
		// something unexpected on the way: Vault is not usable now.
		e.Kind = provider.ErrUnavailable
	}
	return e
}

// classifyResponse sets e.Kind from Vault's status and message. Vault
// answers 400 for most failures of a transit call, so the message decides.
func classifyResponse(e *Error) {
	m := strings.ToLower(e.Message)
	switch {
	case e.Status == http.StatusForbidden:
		e.Kind = provider.ErrPermissionDenied
		e.invalidToken = strings.Contains(m, "invalid token") || strings.Contains(m, "token is expired") ||
			strings.Contains(m, "bad token")
	case e.Status == http.StatusUnauthorized:
		e.Kind = provider.ErrPermissionDenied
	case e.Status == http.StatusTooManyRequests, e.Status == http.StatusPreconditionFailed, e.Status >= 500:
		// 429: rate limit quota or a standby asked to answer; 412: a
		// performance standby behind on writes; 5xx: sealed, standby
		// without a leader, overloaded, failing.
		e.Kind = provider.ErrUnavailable
	case strings.Contains(m, "too old"), strings.Contains(m, "disallowed by policy"),
		strings.Contains(m, "less than the minimum encryption key version"):
		e.Kind = provider.ErrKeyDisabled
	case strings.Contains(m, "key not found"), strings.Contains(m, "version is too new"),
		strings.Contains(m, "higher than the latest key version"), e.Status == http.StatusNotFound:
		e.Kind = provider.ErrKeyNotFound
	case strings.Contains(m, "message authentication failed"), strings.Contains(m, "cipher:"),
		strings.Contains(m, "invalid ciphertext"), strings.Contains(m, "could not decode base64"),
		strings.Contains(m, "invalid ciphertext length"):
		e.Kind = provider.ErrInvalidCiphertext
	}
}

func isNetworkError(err error) bool {
	var ne net.Error
	var ue *url.Error
	var oe *net.OpError
	var ce *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	return errors.As(err, &ne) || errors.As(err, &ue) || errors.As(err, &oe) ||
		errors.As(err, &ce) || errors.As(err, &ua) || errors.As(err, &hn) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET)
}

// networkMessage says in a few words why Vault could not be reached.
func networkMessage(err error) string {
	var dnsErr *net.DNSError
	var ce *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	switch {
	case errors.As(err, &dnsErr):
		return "cannot resolve " + dnsErr.Name
	case errors.As(err, &ce), errors.As(err, &ua), errors.As(err, &hn):
		return "TLS certificate not trusted: " + oneLine(err.Error(), 200)
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "connection reset"
	}
	return oneLine(err.Error(), 200)
}

// oneLine shortens s to n bytes on one line.
func oneLine(s string, n int) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > n {
		s = s[:n] + "..."
	}
	return s
}
