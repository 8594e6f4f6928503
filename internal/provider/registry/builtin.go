package registry

import (
	"github.com/kms-plugin/kms-plugin/internal/provider/azurekv"
	"github.com/kms-plugin/kms-plugin/internal/provider/local"
	"github.com/kms-plugin/kms-plugin/internal/provider/pkcs11"
	"github.com/kms-plugin/kms-plugin/internal/provider/vault"
)

// Builtin returns the key stores kms-plugin is built with, the default one
// first. Adding a store adds its line here and nowhere else.
func Builtin() Registry {
	return Registry{
		local.Registration(),
		azurekv.Registration(),
		pkcs11.Registration(),
		vault.Registration(),
	}
}
