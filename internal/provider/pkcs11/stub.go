//go:build !pkcs11

package pkcs11

import (
	"context"
	"errors"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// ErrNotBuilt is what Open and Doctor report in a binary built without the
// pkcs11 tag.
var ErrNotBuilt = errors.New("pkcs11: this kms-plugin binary is built without PKCS#11 support; use kms-plugin-pkcs11 (make build-pkcs11, i.e. CGO_ENABLED=1 go build -tags pkcs11 ./cmd/kms-plugin)")

// Built reports whether this binary has the PKCS#11 store (the pkcs11
// build tag).
const Built = false

func openStore(context.Context, *Settings, provider.OpenOptions) (provider.Provider, error) {
	return nil, ErrNotBuilt
}

func doctorStore(_ context.Context, _ *Settings, c provider.Checklist, _ provider.OpenOptions) provider.Provider {
	c.Fail("module", ErrNotBuilt, "run the kms-plugin-pkcs11 binary (make build-pkcs11), or its image")
	return nil
}

// Remedy returns a fix for an error of this package, or "".
func Remedy(err error) string {
	if errors.Is(err, ErrNotBuilt) {
		return "run the kms-plugin-pkcs11 binary (make build-pkcs11), or its image"
	}
	return pinRemedy(err)
}
