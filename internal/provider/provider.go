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
// Each store also describes its configuration with a Registration: its
// name, the YAML section and flags of its Settings, and how Settings open
// the store. Settings may implement small optional interfaces too (Doctor,
// Describer, HostPather) for kms-plugin doctor and install. The one table
// of registrations is internal/provider/registry.
//
// This package imports only the standard library.
package provider

import (
	"context"
	"errors"
	"flag"
	"net/http"
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

// Registration describes one kind of key store to the commands that
// configure and build stores (serve, rotate, doctor, keyset, install). A
// store package returns its Registration from a function; the registry
// lists them.
type Registration struct {
	// Name identifies the store kind: the value of the config file's
	// provider field and of --provider, and what Provider.Name of the built
	// store returns (metrics label, key_id input), such as "local".
	Name string
	// Section is the config file's key holding the store's settings, such
	// as "local" or "azure".
	Section string
	// Summary says in a few words what the store is, for --provider's help.
	Summary string
	// NewSettings returns the store's settings with their defaults, ready
	// for the section to be decoded over them (as JSON, unknown fields
	// refused). Settings must survive a JSON round trip: the registry
	// stores them back into the config once flags are applied.
	NewSettings func() Settings
	// Flags registers the store's flags on fs and returns a function that
	// applies the ones set on the command line over settings returned by
	// NewSettings (and decoded from the file). Nil means no flags.
	Flags func(fs *flag.FlagSet) func(Settings)
}

// Settings are one store's configuration: the section of the config file
// named by Registration.Section, decoded over Registration.NewSettings.
type Settings interface {
	// Validate checks every field and returns one error per bad field (an
	// errors.Join), each starting with the field's YAML path, such as
	// "azure.keyName: ...".
	Validate() error
	// Open builds the store the settings describe. Settings are valid
	// (Validate returned nil). It fails when the store's key material is
	// missing, unless o.Create is set and the store can create it.
	Open(ctx context.Context, o OpenOptions) (Provider, error)
}

// OpenOptions are what the command building a store decides, as opposed to
// what is configured.
type OpenOptions struct {
	// Create lets Open create missing key material, such as the local
	// keyset on the plugin's first start. Only serve sets it: rotate,
	// doctor and keyset must work on the material the plugin uses.
	Create bool
	// Transport carries the store's HTTP requests; nil means the store's
	// default client. Tests set it to reach a fake server.
	Transport Transport
}

// Transport sends one HTTP request; *http.Client implements it.
type Transport interface {
	Do(req *http.Request) (*http.Response, error)
}

// Describer is Settings that can summarize themselves in one line for
// kms-plugin doctor's header, such as "vault https://v.vault.azure.net, key
// k". The line holds no secret.
type Describer interface {
	Describe() string
}

// Doctor is Settings with their own checks for kms-plugin doctor, step by
// step from the configuration to the first call to the key. Stores without
// it get doctor's generic checks: open, key version, round trip, health.
type Doctor interface {
	// Doctor opens the store as Open does, with o (o.Create is never set),
	// checks what must work before a key can be used (a credential, the
	// network path, a token), reporting every step to c, and returns the
	// store. It returns nil when a step failed; that failure is in c.
	// Doctor then checks the key and a round trip with the returned store.
	Doctor(ctx context.Context, c Checklist, o OpenOptions) Provider
	// Remedy suggests a fix for an error of the store, or "" when it has
	// none.
	Remedy(err error) string
}

// Checklist is where doctor checks report, one line per check.
type Checklist interface {
	// OK reports that check passed; detail says what was found.
	OK(check, detail string)
	// Fail reports that check failed with err; fix says what to do, or "".
	Fail(check string, err error, fix string)
	// Skip reports that check did not run, and why.
	Skip(check, why string)
}

// HostPather is Settings that make the plugin use paths on the node. The
// installer mounts them into the plugin's static pod and lets its systemd
// unit write the directories.
type HostPather interface {
	HostPaths() HostPaths
}

// HostPaths are the paths on the node that a store's settings name.
type HostPaths struct {
	// Read are files the plugin reads, such as credential files: mounted
	// read-only.
	Read []HostPath
	// Write are directories the plugin writes, such as the keyset's:
	// mounted read-write, created when missing.
	Write []HostPath
	// PerNode are files of key material that each node keeps on its own
	// (see NodeLocal): every control-plane node needs the same copy before
	// the plugin starts there.
	PerNode []string
	// MustSet are the YAML paths of fields whose default depends on the
	// environment of kms-plugin serve (its user's state directory), such as
	// "local.keysetPath": a config that the installer writes must set them.
	MustSet []string
}

// HostPath is one path on the node.
type HostPath struct {
	// Name names the path's volume in the plugin's static pod, a DNS label
	// such as "keyset-dir" or "credential-0".
	Name string
	// Path is absolute.
	Path string
}

// VersionChecker is a store that can say, cheaply, which of some key
// versions may no longer unwrap. The plugin asks it after each poll about
// the versions of the local KEKs it holds unwrapped, and drops those the
// store reports disabled, expired or deleted, so that a revoked version
// stops decrypting on every node within one poll interval.
type VersionChecker interface {
	// RevokedVersions returns the subset of versions that the store reports
	// disabled, expired or deleted. A version it cannot judge (another
	// store's, malformed) is not in the result. It returns ErrUnavailable
	// or ErrPermissionDenied like CurrentVersion; the caller then keeps
	// what it has.
	RevokedVersions(ctx context.Context, versions []string) ([]string, error)
}

// VersionValidator is a store that can tell, without calling the key
// store, whether a version string is spelled exactly as the store writes
// its versions. The plugin asks it before anything else about a wrapped
// key, so that a forged spelling of a genuine version (leading zeros, a
// fragment the store would ignore) is refused at once and costs neither a
// remote call nor a place in the unwrap limits.
type VersionValidator interface {
	// ValidVersion returns nil for a canonical version, else an error
	// wrapping ErrKeyNotFound that says what is wrong. It makes no call.
	ValidVersion(version string) error
}

// StateReporter is a store that reports its own condition for the plugin's
// metrics: its circuit breaker, and gauges of its own (such as when a
// credential expires). The plugin reads it at every scrape, so it must be
// cheap, make no call and hold no lock for long.
type StateReporter interface {
	ReportState() StoreState
}

// StoreState is what a StateReporter reports.
type StoreState struct {
	// Breaker is the state of the store's circuit breaker; BreakerNone when
	// it has none.
	Breaker BreakerState
	// Gauges are store-specific measurements, each exported as
	// kms_plugin_provider_<Name>{provider}. A value must not be a secret.
	Gauges []Gauge
}

// BreakerState is the state of a store's circuit breaker.
type BreakerState string

// Breaker states.
const (
	// BreakerNone: the store has no circuit breaker.
	BreakerNone BreakerState = ""
	// BreakerClosed: calls go to the store.
	BreakerClosed BreakerState = "closed"
	// BreakerOpen: calls fail fast without reaching the store.
	BreakerOpen BreakerState = "open"
	// BreakerHalfOpen: one probe call may reach the store; its outcome
	// closes or reopens the breaker.
	BreakerHalfOpen BreakerState = "half_open"
)

// BreakerStates lists the states of a circuit breaker, BreakerNone excluded.
func BreakerStates() []BreakerState {
	return []BreakerState{BreakerClosed, BreakerOpen, BreakerHalfOpen}
}

// Gauge is one store-specific measurement.
type Gauge struct {
	// Name is the metric name's suffix, fixed by the store: lowercase
	// letters, digits and underscores, with the unit last, such as
	// "token_expiry_timestamp_seconds". Names a store reports must not
	// change from one call to the next, so that the metric stays a series.
	Name string
	// Help says what the value means, for the metric's HELP line.
	Help  string
	Value float64
}
