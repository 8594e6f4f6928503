// Package local is the provider backed by a Tink keyset in a file that only
// its owner may read: the embedded default, for single nodes, demos and tests.
//
// Every key of the keyset is an AES-256-GCM key. The primary key wraps; any
// enabled key unwraps. Rotation adds a key and makes it primary; retiring a
// key disables it in the keyset (its material stays, so it can be enabled
// again). Every change rewrites the file atomically (temporary file, fsync,
// rename) under an exclusive lock, so a crash leaves either the old keyset or
// the new one, never a torn file. A running plugin notices a changed file
// (its inode, size or modification time) the next time it polls
// CurrentVersion, or when asked to unwrap with a version it does not know.
package local

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/tink-crypto/tink-go/v2/aead"
	"github.com/tink-crypto/tink-go/v2/keyset"
	tinkpb "github.com/tink-crypto/tink-go/v2/proto/tink_go_proto"
	"github.com/tink-crypto/tink-go/v2/tink"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Name is the provider name used in metrics, logs and configuration.
const Name = "local"

// wrapAssociatedData binds every wrap of this provider to its purpose.
var wrapAssociatedData = []byte("kms-plugin local provider: wrapped local KEK v1")

// tinkPrefix is the first byte of a Tink ciphertext made with a TINK output
// prefix, followed by the 4-byte big-endian key ID.
const (
	tinkPrefixByte = 0x01
	tinkPrefixLen  = 5
)

// Config configures a Provider. The zero value of every field but Path is a
// safe default.
type Config struct {
	// Path is the keyset file. Required.
	Path string
	// Create makes New write a fresh keyset (one key) when Path does not
	// exist. Without it a missing file is an error.
	Create bool
}

// Provider is the local keyset provider. It is safe for concurrent use.
type Provider struct {
	path string

	// mu serializes reloads; readers use state without it.
	mu    sync.Mutex
	state atomic.Pointer[keysetState]
}

// keysetState is one loaded version of the keyset file.
type keysetState struct {
	file    fileID
	primary uint32
	aead    tink.AEAD
	keys    map[uint32]tinkpb.KeyStatusType
}

var (
	_ provider.Provider      = (*Provider)(nil)
	_ provider.Rotator       = (*Provider)(nil)
	_ provider.Retirer       = (*Provider)(nil)
	_ provider.HealthChecker = (*Provider)(nil)
	_ provider.VersionLister = (*Provider)(nil)
)

// New loads the keyset at cfg.Path, creating it first when cfg.Create is set
// and the file does not exist.
func New(cfg Config) (*Provider, error) {
	if cfg.Path == "" {
		return nil, errors.New("local: keyset path is empty")
	}
	p := &Provider{path: cfg.Path}
	if cfg.Create {
		if err := p.createIfMissing(); err != nil {
			return nil, err
		}
	}
	if _, err := p.reload(true); err != nil {
		return nil, err
	}
	return p, nil
}

// Name implements provider.Provider.
func (p *Provider) Name() string { return Name }

// NodeLocal implements provider.NodeLocal: the keyset file is this node's
// own, so a key added here exists on no other node unless the file is
// shared.
func (p *Provider) NodeLocal() bool { return true }

// Path returns the keyset file path.
func (p *Provider) Path() string { return p.path }

// CurrentVersion implements provider.Provider. It reloads the keyset when the
// file has changed.
func (p *Provider) CurrentVersion(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	st, err := p.reload(false)
	if err != nil {
		return "", err
	}
	return formatVersion(st.primary), nil
}

// Wrap implements provider.Provider.
func (p *Provider) Wrap(ctx context.Context, key []byte) (provider.WrappedKey, error) {
	if err := ctx.Err(); err != nil {
		return provider.WrappedKey{}, err
	}
	st := p.state.Load()
	ct, err := st.aead.Encrypt(key, wrapAssociatedData)
	if err != nil {
		return provider.WrappedKey{}, fmt.Errorf("local: wrap with version %d: %w", st.primary, err)
	}
	return provider.WrappedKey{Version: formatVersion(st.primary), Ciphertext: ct}, nil
}

// Unwrap implements provider.Provider.
func (p *Provider) Unwrap(ctx context.Context, w provider.WrappedKey) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	id, err := parseVersion(w.Version)
	if err != nil {
		return nil, fmt.Errorf("local: unwrap: %w", err)
	}
	st := p.state.Load()
	status, ok := st.keys[id]
	if !ok {
		// Another process may have rotated the keyset: look again once.
		if st, err = p.reload(false); err != nil {
			return nil, err
		}
		status, ok = st.keys[id]
	}
	switch {
	case !ok:
		return nil, fmt.Errorf("local: unwrap with version %d: %w", id, provider.ErrKeyNotFound)
	case status != tinkpb.KeyStatusType_ENABLED:
		return nil, fmt.Errorf("local: unwrap with version %d: %w", id, provider.ErrKeyDisabled)
	}
	if len(w.Ciphertext) <= tinkPrefixLen || w.Ciphertext[0] != tinkPrefixByte ||
		binary.BigEndian.Uint32(w.Ciphertext[1:tinkPrefixLen]) != id {
		return nil, fmt.Errorf("local: unwrap with version %d: ciphertext was not made by this version: %w", id, provider.ErrInvalidCiphertext)
	}
	key, err := st.aead.Decrypt(w.Ciphertext, wrapAssociatedData)
	if err != nil {
		return nil, fmt.Errorf("local: unwrap with version %d: authentication failed: %w", id, provider.ErrInvalidCiphertext)
	}
	return key, nil
}

// Health implements provider.HealthChecker: the keyset file must still be
// readable and parse.
func (p *Provider) Health(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	_, err := p.reload(false)
	return err
}

// Versions implements provider.VersionLister, ordered by key ID.
func (p *Provider) Versions(ctx context.Context) ([]provider.VersionInfo, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	st, err := p.reload(false)
	if err != nil {
		return nil, err
	}
	out := make([]provider.VersionInfo, 0, len(st.keys))
	for id, status := range st.keys {
		state := provider.VersionEnabled
		if status != tinkpb.KeyStatusType_ENABLED {
			state = provider.VersionDisabled
		}
		out = append(out, provider.VersionInfo{Version: formatVersion(id), State: state, Current: id == st.primary})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out, nil
}

// Rotate implements provider.Rotator: it adds an AES-256-GCM key, makes it
// primary and rewrites the file.
func (p *Provider) Rotate(ctx context.Context) (string, error) {
	var newID uint32
	err := p.update(ctx, func(m *keyset.Manager) error {
		id, err := m.Add(aead.AES256GCMKeyTemplate())
		if err != nil {
			return fmt.Errorf("add key: %w", err)
		}
		if err := m.SetPrimary(id); err != nil {
			return fmt.Errorf("set primary %d: %w", id, err)
		}
		newID = id
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("local: rotate: %w", err)
	}
	return formatVersion(newID), nil
}

// Retire implements provider.Retirer: it disables version in the keyset.
func (p *Provider) Retire(ctx context.Context, version string) error {
	id, err := parseVersion(version)
	if err != nil {
		return fmt.Errorf("local: retire: %w", err)
	}
	err = p.update(ctx, func(m *keyset.Manager) error {
		h, err := m.Handle()
		if err != nil {
			return err
		}
		info := h.KeysetInfo()
		if info.GetPrimaryKeyId() == id {
			return fmt.Errorf("version %d is the current version; rotate first", id)
		}
		if !hasKey(info, id) {
			return fmt.Errorf("version %d: %w", id, provider.ErrKeyNotFound)
		}
		return m.Disable(id)
	})
	if err != nil {
		return fmt.Errorf("local: retire: %w", err)
	}
	return nil
}

// update applies change to the keyset under an exclusive file lock and writes
// the result atomically.
func (p *Provider) update(ctx context.Context, change func(*keyset.Manager) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	unlock, err := lockFile(p.path + ".lock")
	if err != nil {
		return err
	}
	defer unlock()

	h, _, err := readKeyset(p.path)
	if err != nil {
		return err
	}
	m := keyset.NewManagerFromHandle(h)
	if err := change(m); err != nil {
		return err
	}
	nh, err := m.Handle()
	if err != nil {
		return fmt.Errorf("build keyset: %w", err)
	}
	if err := writeKeyset(p.path, nh); err != nil {
		return err
	}
	_, err = p.reload(true)
	return err
}

func (p *Provider) createIfMissing() error {
	if _, err := os.Lstat(p.path); err == nil {
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("local: stat keyset %s: %w", p.path, err)
	}
	if err := os.MkdirAll(filepath.Dir(p.path), 0o700); err != nil {
		return fmt.Errorf("local: create keyset directory: %w", err)
	}
	unlock, err := lockFile(p.path + ".lock")
	if err != nil {
		return err
	}
	defer unlock()
	if _, err := os.Lstat(p.path); err == nil {
		return nil // created meanwhile by another process
	}
	h, err := keyset.NewHandle(aead.AES256GCMKeyTemplate())
	if err != nil {
		return fmt.Errorf("local: generate keyset: %w", err)
	}
	return writeKeyset(p.path, h)
}

// reload re-reads the keyset file when it changed since the last load, or
// always when force is set, and returns the state now in use.
func (p *Provider) reload(force bool) (*keysetState, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cur := p.state.Load()
	if !force && cur != nil {
		id, err := statFile(p.path)
		if err != nil {
			return nil, err
		}
		if id == cur.file {
			return cur, nil
		}
	}
	h, id, err := readKeyset(p.path)
	if err != nil {
		return nil, err
	}
	primitive, err := aead.New(h)
	if err != nil {
		return nil, fmt.Errorf("local: keyset %s: %w", p.path, err)
	}
	info := h.KeysetInfo()
	keys := make(map[uint32]tinkpb.KeyStatusType, len(info.GetKeyInfo()))
	for _, k := range info.GetKeyInfo() {
		if k.GetOutputPrefixType() != tinkpb.OutputPrefixType_TINK {
			return nil, fmt.Errorf("local: keyset %s: key %d has output prefix %s; want TINK", p.path, k.GetKeyId(), k.GetOutputPrefixType())
		}
		keys[k.GetKeyId()] = k.GetStatus()
	}
	st := &keysetState{file: id, primary: info.GetPrimaryKeyId(), aead: primitive, keys: keys}
	p.state.Store(st)
	return st, nil
}

func hasKey(info *tinkpb.KeysetInfo, id uint32) bool {
	for _, k := range info.GetKeyInfo() {
		if k.GetKeyId() == id {
			return true
		}
	}
	return false
}

func formatVersion(id uint32) string { return strconv.FormatUint(uint64(id), 10) }

// parseVersion accepts exactly one spelling per version, the one
// formatVersion writes (decimal, no sign, no leading zeros), so that a
// forged variant of a genuine version never reaches the keyset.
func parseVersion(v string) (uint32, error) {
	id, err := strconv.ParseUint(v, 10, 32)
	if err != nil || formatVersion(uint32(id)) != v {
		return 0, fmt.Errorf("version %q is not a local keyset key ID: %w", v, provider.ErrKeyNotFound)
	}
	return uint32(id), nil
}
