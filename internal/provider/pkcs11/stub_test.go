//go:build !pkcs11

package pkcs11

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// TestOpenWithoutTheBuildTag: a static build parses the settings and fails
// to open them with one line naming the build to use.
func TestOpenWithoutTheBuildTag(t *testing.T) {
	s := validSettings()
	if err := s.Validate(); err != nil {
		t.Fatal(err)
	}
	_, err := s.Open(context.Background(), provider.OpenOptions{Create: true})
	if !errors.Is(err, ErrNotBuilt) || strings.Contains(err.Error(), "\n") || !strings.Contains(err.Error(), "-tags pkcs11") {
		t.Fatalf("Open = %v; want the one-line ErrNotBuilt", err)
	}
	if Built {
		t.Fatal("Built is true without the pkcs11 tag")
	}
}
