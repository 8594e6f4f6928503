// Package provider defines the boundary between kms-plugin and a key store
// that holds the remote key-encryption key (KEK): a local Tink keyset, Azure
// Key Vault, a PKCS#11 HSM, Vault transit.
//
// A store only ever wraps and unwraps small keys (the plugin's local KEKs);
// it never sees kube-apiserver's data keys or any Kubernetes object. Every
// store implements Provider. Stores that can do more implement the small
// optional interfaces (Rotator, Retirer, HealthChecker, VersionLister), which
// callers discover with a type assertion.
//
// This package imports only the standard library.
package provider

import (
	"context"
	"errors"
	"time"
)

// Errors returned by providers. Implementations wrap them with context
// ("local: unwrap with version 123: %w") so that callers can test them with
// errors.Is and people can read where they came from.
var (
	// ErrKeyNotFound means the key version named by a wrapped key is unknown
	// to the store (never existed, deleted, or from another store).
	ErrKeyNotFound = errors.New("key version not found")
	// ErrKeyDisabled means the key version exists but may not be used.
	ErrKeyDisabled = errors.New("key version disabled")
	// ErrPermissionDenied means the store refused the caller's identity.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrUnavailable means the store could not be reached or did not answer
	// in time; the call may succeed later.
	ErrUnavailable = errors.New("key store unavailable")
	// ErrInvalidCiphertext means the wrapped key failed authentication or is
	// malformed.
	ErrInvalidCiphertext = errors.New("invalid wrapped key")
)

// WrappedKey is a key wrapped by a store, together with the key version that
// wrapped it. Both fields are public: they travel in clear in etcd.
type WrappedKey struct {
	// Version identifies the remote key version that wrapped Ciphertext.
	// It is opaque to callers, stable, and never reused by a store.
	Version string
	// Ciphertext is the wrapped key as the store returned it.
	Ciphertext []byte
}

// Provider is a key store holding versioned remote KEKs.
//
// Implementations are safe for concurrent use.
type Provider interface {
	// Name returns a short, stable name of the store kind, such as "local".
	// It appears in metrics labels and logs.
	Name() string

	// CurrentVersion returns the key version that Wrap uses now. Callers
	// poll it to notice rotations. It returns ErrUnavailable when the store
	// cannot be reached and ErrPermissionDenied when it refuses the caller.
	CurrentVersion(ctx context.Context) (string, error)

	// Wrap wraps key with the current key version and reports which version
	// it used. It returns ErrUnavailable or ErrPermissionDenied like
	// CurrentVersion.
	Wrap(ctx context.Context, key []byte) (WrappedKey, error)

	// Unwrap returns the key inside w, using exactly w.Version. It returns
	// ErrKeyNotFound for an unknown version, ErrKeyDisabled for a disabled
	// one, ErrInvalidCiphertext when w does not authenticate, and
	// ErrUnavailable or ErrPermissionDenied like CurrentVersion.
	Unwrap(ctx context.Context, w WrappedKey) ([]byte, error)
}

// Rotator is a store that can create a new key version and make it current.
type Rotator interface {
	// Rotate creates a new key version, makes it the one Wrap uses, and
	// returns it. Older versions stay usable for Unwrap.
	Rotate(ctx context.Context) (string, error)
}

// Retirer is a store that can take old key versions out of use.
type Retirer interface {
	// Retire disables version so that Unwrap refuses it with ErrKeyDisabled.
	// It never deletes key material. It returns ErrKeyNotFound for an
	// unknown version and an error when version is the current one.
	Retire(ctx context.Context, version string) error
}

// HealthChecker is a store that can check, cheaply, that it is usable.
type HealthChecker interface {
	// Health returns nil when the store answers and the key is usable.
	Health(ctx context.Context) error
}

// VersionState says whether a key version may be used.
type VersionState string

// Version states.
const (
	VersionEnabled  VersionState = "enabled"
	VersionDisabled VersionState = "disabled"
)

// VersionInfo describes one key version of a store.
type VersionInfo struct {
	Version string
	State   VersionState
	Current bool
	// Created is the zero time where the store does not record it.
	Created time.Time
}

// VersionLister is a store that can list its key versions.
type VersionLister interface {
	// Versions lists every key version the store knows, current included.
	Versions(ctx context.Context) ([]VersionInfo, error)
}

// NodeLocal is a store whose key material lives on each node separately,
// such as a keyset file: a version that Rotate creates through one node's
// store does not exist on the other nodes unless the operator shares the
// material (shared storage, or a copy made by hand). Rotation refuses to
// rotate such a store on a control plane of several nodes unless told the
// material is shared. Stores that do not implement NodeLocal, or whose
// NodeLocal returns false, are shared by every node (a vault, an HSM
// cluster, Vault transit): a new version is usable everywhere at once.
type NodeLocal interface {
	// NodeLocal reports whether the key material is local to this node.
	NodeLocal() bool
}

// IsNodeLocal reports whether p's key material is local to each node.
func IsNodeLocal(p Provider) bool {
	nl, ok := p.(NodeLocal)
	return ok && nl.NodeLocal()
}
