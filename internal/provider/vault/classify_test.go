package vault

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"
	"testing"

	"github.com/hashicorp/vault/api"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Vault's answers, as the transit engine and the core word them (v1.21),
// map onto the provider errors.
func TestClassify(t *testing.T) {
	resp := func(status int, msgs ...string) error {
		return &api.ResponseError{HTTPMethod: "PUT", URL: "https://v/v1/transit/decrypt/k", StatusCode: status, Errors: msgs}
	}
	tests := []struct {
		name         string
		err          error
		want         error
		invalidToken bool
	}{
		{"unknown key", resp(400, "encryption key not found"), provider.ErrKeyNotFound, false},
		{"version too new", resp(400, "invalid ciphertext: version is too new"), provider.ErrKeyNotFound, false},
		{"encrypt version above latest", resp(400, "requested version for encryption is higher than the latest key version"), provider.ErrKeyNotFound, false},
		{"too old", resp(400, "ciphertext or signature version is disallowed by policy (too old)"), provider.ErrKeyDisabled, false},
		{"below min encryption", resp(400, "requested version for encryption is less than the minimum encryption key version"), provider.ErrKeyDisabled, false},
		{"auth failed", resp(400, "cipher: message authentication failed"), provider.ErrInvalidCiphertext, false},
		{"bad base64", resp(400, "invalid ciphertext: could not decode base64"), provider.ErrInvalidCiphertext, false},
		{"policy", resp(403, "1 error occurred:\n\t* permission denied\n\n"), provider.ErrPermissionDenied, false},
		{"bad token", resp(403, "2 errors occurred:\n\t* permission denied\n\t* invalid token\n\n"), provider.ErrPermissionDenied, true},
		{"sealed", resp(503, "Vault is sealed"), provider.ErrUnavailable, false},
		{"standby", resp(429), provider.ErrUnavailable, false},
		{"perf standby behind", resp(412), provider.ErrUnavailable, false},
		{"internal", resp(500, "internal error"), provider.ErrUnavailable, false},
		{"refused", &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, provider.ErrUnavailable, false},
		{"timeout", fmt.Errorf("do: %w", context.DeadlineExceeded), provider.ErrUnavailable, false},
		{"no such key (404)", resp(404), provider.ErrKeyNotFound, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := classify(context.Background(), opDecrypt, "transit/decrypt/k", "1", tt.err)
			if !errors.Is(err, tt.want) {
				t.Fatalf("classify = %v; want %v", err, tt.want)
			}
			var e *Error
			if errors.As(err, &e) && e.invalidToken != tt.invalidToken {
				t.Fatalf("invalidToken = %v; want %v", e.invalidToken, tt.invalidToken)
			}
			if Remedy(err) == "" {
				t.Fatalf("no remedy for %v", err)
			}
		})
	}
	// The caller giving up is not Vault's fault.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := classify(ctx, opDecrypt, "p", "", resp(503)); errors.Is(err, provider.ErrUnavailable) || !errors.Is(err, context.Canceled) {
		t.Fatalf("classify with a canceled context = %v", err)
	}
}
