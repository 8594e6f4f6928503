//go:build pkcs11

package pkcs11

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Built reports whether this binary has the PKCS#11 store (the pkcs11
// build tag).
const Built = true

// Defaults of Config fields left zero.
const (
	// DefaultRelistAfter is how old the listing of key objects may be
	// before an unknown version or CurrentVersion lists them again: a
	// flood of forged versions costs at most one listing per interval.
	DefaultRelistAfter = time.Second
	// DefaultReinitAfter is the least time between two re-initializations
	// of the module after the token or its key objects went missing.
	DefaultReinitAfter = 10 * time.Second
)

// Config configures a Provider. Zero values of the optional fields are safe
// defaults.
type Config struct {
	// Module is the PKCS#11 library's path. Required.
	Module string
	// TokenLabel or Slot selects the token; exactly one is set.
	TokenLabel string
	Slot       *uint
	// PIN is the user PIN; PINFile is where it came from, read again only
	// after the token refused PIN (so that a corrected file is used
	// without a restart, and a refused PIN is never tried twice). PIN is
	// kept in memory only and never logged.
	PIN     string
	PINFile string
	// KeyLabel is the CKA_LABEL of every version. Required.
	KeyLabel string
	// HSMGeneratedIV lets the HSM choose the GCM IV.
	HSMGeneratedIV bool
	// Sessions is the size of the session pool. Default DefaultSessions.
	Sessions int
	// NodeLocal reports the key material as this node's own.
	NodeLocal bool
	// Create generates the first version when the token has none.
	Create bool
	// Timeout bounds each call. Default DefaultTimeout.
	Timeout time.Duration
	// RelistAfter and ReinitAfter: see DefaultRelistAfter and
	// DefaultReinitAfter. Negative means zero.
	RelistAfter time.Duration
	ReinitAfter time.Duration
	// Now returns the current time. Default time.Now.
	Now func() time.Time
	// Rand is the source of IVs and CKA_ID suffixes. Default crypto/rand.
	Rand io.Reader
}

// Provider is the PKCS#11 store. It is safe for concurrent use.
type Provider struct {
	cfg   Config
	mod   *module
	calls counters
	pin   pinState
	pool  pool

	slotMu   sync.Mutex
	slotGen  uint64 // generation slot was resolved in
	slot     uint
	tokenSer string

	listMu sync.Mutex // serializes listings
	keys   atomic.Pointer[keyTable]

	reinitMu   sync.Mutex
	lastReinit time.Time
	lost       atomic.Bool // the token or the key's objects went missing

	closeOnce sync.Once
}

var (
	_ provider.Provider         = (*Provider)(nil)
	_ provider.Rotator          = (*Provider)(nil)
	_ provider.Retirer          = (*Provider)(nil)
	_ provider.HealthChecker    = (*Provider)(nil)
	_ provider.VersionLister    = (*Provider)(nil)
	_ provider.NodeLocal        = (*Provider)(nil)
	_ provider.VersionChecker   = (*Provider)(nil)
	_ provider.VersionValidator = (*Provider)(nil)
)

// keyObj is one version's object as last listed.
type keyObj struct {
	handle      p11.ObjectHandle
	id          versionID
	version     string
	encrypt     bool
	decrypt     bool
	sensitive   bool
	extractable bool
}

// keyTable is one listing of the key's objects.
type keyTable struct {
	gen       uint64 // module generation of the handles
	at        time.Time
	byVersion map[string]*keyObj
	ordered   []*keyObj // oldest first
	current   *keyObj   // newest with CKA_ENCRYPT; nil when none
	dupes     []string  // CKA_IDs held by several objects: not used
	others    int       // objects with the label that are not AES-256 keys
}

// New loads the module, finds the token, opens a session and logs in. A
// PIN the token refuses does not fail New: the provider then answers
// ErrPermissionDenied without asking the token again until the PIN file
// changes, so that a restart loop cannot lock the token. The caller
// closes the provider when done.
func New(ctx context.Context, cfg Config) (*Provider, error) {
	p, err := newProvider(cfg)
	if err != nil {
		return nil, err
	}
	m, err := acquireModule(cfg.Module, &p.calls)
	if err != nil {
		return nil, err
	}
	p.mod = m
	if _, err := p.resolveSlot(); err != nil {
		p.Close()
		return nil, err
	}
	// Log in now: a token that refuses the PIN is reported by the first
	// call, without a second attempt.
	err = p.login0(ctx)
	if err != nil && !errors.Is(err, provider.ErrPermissionDenied) {
		p.Close()
		return nil, err
	}
	if err == nil {
		if _, err := p.refresh(ctx, 0); err != nil && !errors.Is(err, provider.ErrKeyNotFound) {
			p.Close()
			return nil, err
		}
	}
	return p, nil
}

// login0 opens the first session, logging in.
func (p *Provider) login0(ctx context.Context) error {
	return p.withSession(ctx, "open a session", func(*p11.Ctx, *session) error { return nil })
}

// newProvider checks cfg and applies its defaults; the module is not
// loaded yet.
func newProvider(cfg Config) (*Provider, error) {
	switch {
	case cfg.Module == "":
		return nil, errors.New("pkcs11: module path is empty")
	case cfg.KeyLabel == "":
		return nil, errors.New("pkcs11: key label is empty")
	case (cfg.TokenLabel == "") == (cfg.Slot == nil):
		return nil, errors.New("pkcs11: set a token label or a slot")
	}
	if cfg.Sessions <= 0 {
		cfg.Sessions = DefaultSessions
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.RelistAfter == 0 {
		cfg.RelistAfter = DefaultRelistAfter
	}
	if cfg.ReinitAfter == 0 {
		cfg.ReinitAfter = DefaultReinitAfter
	}
	cfg.RelistAfter, cfg.ReinitAfter = max(cfg.RelistAfter, 0), max(cfg.ReinitAfter, 0)
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	p := &Provider{cfg: cfg}
	p.pin.pin, p.pin.file = cfg.PIN, cfg.PINFile
	p.pool.init(cfg.Sessions)
	return p, nil
}

// Close closes the sessions and releases the module.
func (p *Provider) Close() error {
	p.closeOnce.Do(func() {
		p.pool.closeAll(p)
		if p.mod != nil {
			p.mod.release()
		}
	})
	return nil
}

// Name implements provider.Provider.
func (p *Provider) Name() string { return Name }

// NodeLocal implements provider.NodeLocal: as configured (pkcs11.nodeLocal,
// default true).
func (p *Provider) NodeLocal() bool { return p.cfg.NodeLocal }

// Calls returns the calls made into the library so far, per function.
func (p *Provider) Calls() Calls { return p.calls.snapshot() }

// CurrentVersion implements provider.Provider: it lists the key's objects
// (at most once per RelistAfter) and returns the newest version with
// CKA_ENCRYPT. It returns ErrKeyNotFound when the token holds no version
// and ErrKeyDisabled when none may encrypt.
func (p *Provider) CurrentVersion(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	t, err := p.refresh(ctx, p.cfg.RelistAfter)
	if err != nil {
		return "", err
	}
	if t.current == nil {
		return "", p.noCurrent(t)
	}
	return t.current.version, nil
}

func (p *Provider) noCurrent(t *keyTable) error {
	if len(t.ordered) == 0 {
		return fmt.Errorf("pkcs11: no AES-256 key labelled %q on the token: %w", p.cfg.KeyLabel, provider.ErrKeyNotFound)
	}
	return fmt.Errorf("pkcs11: no version of key %q may encrypt (CKA_ENCRYPT is false on all %d): %w", p.cfg.KeyLabel, len(t.ordered), provider.ErrKeyDisabled)
}

// Wrap implements provider.Provider: AES-256-GCM in the token with the
// current version. A version the token refuses to encrypt with (retired
// by another node since the last listing) makes it list again and retry
// once with the new current version.
func (p *Provider) Wrap(ctx context.Context, key []byte) (provider.WrappedKey, error) {
	if err := ctx.Err(); err != nil {
		return provider.WrappedKey{}, err
	}
	if len(key) == 0 || len(key) > MaxKeySize {
		return provider.WrappedKey{}, fmt.Errorf("pkcs11: wrap: key of %d bytes (want 1..%d)", len(key), MaxKeySize)
	}
	for attempt := 0; ; attempt++ {
		maxAge := time.Duration(-1) // any listing of this generation
		if attempt > 0 {
			maxAge = 0
		}
		t, err := p.refresh(ctx, maxAge)
		if err != nil {
			return provider.WrappedKey{}, err
		}
		if t.current == nil {
			return provider.WrappedKey{}, p.noCurrent(t)
		}
		w, err := p.wrapWith(ctx, t.current, key)
		switch {
		case err == nil:
			return w, nil
		case attempt == 0 && (errors.Is(err, provider.ErrKeyDisabled) || errors.Is(err, provider.ErrKeyNotFound)):
			continue
		}
		return provider.WrappedKey{}, err
	}
}

func (p *Provider) wrapWith(ctx context.Context, k *keyObj, key []byte) (provider.WrappedKey, error) {
	iv := make([]byte, IVSize)
	if !p.cfg.HSMGeneratedIV {
		if _, err := io.ReadFull(p.cfg.Rand, iv); err != nil {
			return provider.WrappedKey{}, fmt.Errorf("pkcs11: wrap: draw IV: %w", err)
		}
	}
	var sealed, used []byte
	err := p.withSession(ctx, "wrap with version "+k.version, func(c *p11.Ctx, s *session) error {
		params := p11.NewGCMParams(iv, AssociatedData(SchemeAESGCM, k.version), TagSize*8)
		defer params.Free()
		p.calls.add(opEncryptInit)
		if err := c.EncryptInit(s.h, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}, k.handle); err != nil {
			return err
		}
		p.calls.add(opEncrypt)
		out, err := c.Encrypt(s.h, key)
		if err != nil {
			return err
		}
		sealed, used = out, params.IV()
		return nil
	})
	if err != nil {
		return provider.WrappedKey{}, err
	}
	switch {
	case len(used) != IVSize:
		return provider.WrappedKey{}, fmt.Errorf("pkcs11: wrap with version %s: the token used a %d-byte IV; want %d", k.version, len(used), IVSize)
	case p.cfg.HSMGeneratedIV && bytes.Equal(used, make([]byte, IVSize)):
		// An HSM that generates IVs writes its IV back; one that does not
		// (SoftHSM) used the zero IV we passed: never ship that.
		return provider.WrappedKey{}, fmt.Errorf("pkcs11: wrap with version %s: pkcs11.hsmGeneratedIV is set but the token did not generate an IV (it returned the zero IV): unset hsmGeneratedIV for this token", k.version)
	case len(sealed) != len(key)+TagSize:
		return provider.WrappedKey{}, fmt.Errorf("pkcs11: wrap with version %s: the token returned %d bytes for a %d-byte key; want the ciphertext and a %d-byte tag", k.version, len(sealed), len(key), TagSize)
	}
	return provider.WrappedKey{Version: k.version, Ciphertext: EncodeWrapped(used, sealed)}, nil
}

// Unwrap implements provider.Provider with exactly w.Version. A version
// spelled otherwise than this provider writes it costs no call; one not in
// the last listing costs at most one listing per RelistAfter. The token
// refusing to decrypt (CKA_DECRYPT false) is ErrKeyDisabled. A ciphertext
// that does not authenticate is ErrInvalidCiphertext: SoftHSM reports it
// as CKR_GENERAL_ERROR, so that code counts as a bad ciphertext only when
// the session still answers C_GetSessionInfo afterwards, and as
// ErrUnavailable otherwise.
func (p *Provider) Unwrap(ctx context.Context, w provider.WrappedKey) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if _, err := ParseVersion(w.Version); err != nil {
		return nil, fmt.Errorf("pkcs11: unwrap: %w", err)
	}
	iv, sealed, err := DecodeWrapped(w.Ciphertext)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: unwrap with version %s: %w", w.Version, err)
	}
	for attempt := 0; ; attempt++ {
		k, err := p.lookup(ctx, w.Version, attempt > 0)
		if err != nil {
			return nil, err
		}
		if !k.decrypt {
			return nil, fmt.Errorf("pkcs11: unwrap with version %s: CKA_DECRYPT is false (the version is disabled): %w", w.Version, provider.ErrKeyDisabled)
		}
		var key []byte
		err = p.withSession(ctx, "unwrap with version "+w.Version, func(c *p11.Ctx, s *session) error {
			params := p11.NewGCMParams(iv, AssociatedData(SchemeAESGCM, w.Version), TagSize*8)
			defer params.Free()
			p.calls.add(opDecryptInit)
			if err := c.DecryptInit(s.h, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_GCM, params)}, k.handle); err != nil {
				return err
			}
			p.calls.add(opDecrypt)
			out, err := c.Decrypt(s.h, sealed)
			if err != nil {
				return &decryptError{err: err}
			}
			key = out
			return nil
		})
		if err == nil {
			return key, nil
		}
		if attempt == 0 && errors.Is(err, provider.ErrKeyNotFound) {
			continue // a stale handle: list again, once
		}
		return nil, err
	}
}

// decryptError marks a failure of C_Decrypt itself, which withSession
// judges with a probe of the session.
type decryptError struct{ err error }

func (e *decryptError) Error() string { return e.err.Error() }
func (e *decryptError) Unwrap() error { return e.err }

// lookup returns version's object from the listing, listing again (at most
// once per RelistAfter, or now with fresh) when it is not there.
func (p *Provider) lookup(ctx context.Context, version string, fresh bool) (*keyObj, error) {
	maxAge := time.Duration(-1)
	if fresh {
		maxAge = 0
	}
	t, err := p.refresh(ctx, maxAge)
	if err != nil {
		return nil, err
	}
	if k, ok := t.byVersion[version]; ok {
		return k, nil
	}
	if !fresh {
		if t, err = p.refresh(ctx, p.cfg.RelistAfter); err != nil {
			return nil, err
		}
		if k, ok := t.byVersion[version]; ok {
			return k, nil
		}
	}
	return nil, fmt.Errorf("pkcs11: version %s: no AES-256 key labelled %q has this CKA_ID: %w", version, p.cfg.KeyLabel, provider.ErrKeyNotFound)
}

// Rotate implements provider.Rotator: it generates a new version in the
// token (sensitive, never extractable, a token object) with the next
// counter, then retires the versions it supersedes (CKA_ENCRYPT false;
// they still decrypt).
func (p *Provider) Rotate(ctx context.Context) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	p.listMu.Lock()
	defer p.listMu.Unlock()
	var version string
	var retireErr error
	err := p.withSession(ctx, "rotate", func(c *p11.Ctx, s *session) error {
		t, err := p.list(c, s, s.gen)
		if err != nil {
			return err
		}
		v, _, err := p.generate(c, s, t)
		if err != nil {
			return err
		}
		version = v
		for _, k := range t.ordered {
			if k.encrypt {
				p.calls.add(opSetAttributeValue)
				if err := c.SetAttributeValue(s.h, k.handle, []*p11.Attribute{p11.NewAttribute(p11.CKA_ENCRYPT, false)}); err != nil {
					retireErr = fmt.Errorf("pkcs11: rotate: version %s is current, but retiring version %s (CKA_ENCRYPT false) failed: %w", v, k.version, err)
				}
			}
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("pkcs11: rotate: %w", err)
	}
	t, err := p.refreshLocked(ctx)
	if err != nil {
		return "", err
	}
	if t.current == nil || t.current.version != version {
		return "", fmt.Errorf("pkcs11: rotate: generated version %s, but the token's newest version that may encrypt is another", version)
	}
	return version, retireErr
}

// generate creates the version after those in t, in session s.
func (p *Provider) generate(c *p11.Ctx, s *session, t *keyTable) (string, p11.ObjectHandle, error) {
	var counter uint32
	for _, k := range t.ordered {
		counter = max(counter, k.id.counter)
	}
	for _, d := range t.dupes {
		if id, err := ParseVersion(d); err == nil {
			counter = max(counter, parseID(id).counter)
		}
	}
	if counter == ^uint32(0) {
		return "", 0, errors.New("the version counter is exhausted")
	}
	rnd := make([]byte, idRandom)
	if _, err := io.ReadFull(p.cfg.Rand, rnd); err != nil {
		return "", 0, fmt.Errorf("draw CKA_ID: %w", err)
	}
	id := newVersionID(counter+1, p.cfg.Now(), rnd)
	p.calls.add(opGenerateKey)
	h, err := c.GenerateKey(s.h, []*p11.Mechanism{p11.NewMechanism(p11.CKM_AES_KEY_GEN, nil)}, keyTemplate(p.cfg.KeyLabel, id))
	if err != nil {
		return "", 0, err
	}
	return formatVersion(id), h, nil
}

// keyTemplate is the template of a new version: AES-256, a private token
// object, sensitive and never extractable, for encryption and decryption
// only, its attributes modifiable so that it can be retired and disabled.
func keyTemplate(label string, id []byte) []*p11.Attribute {
	return []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, p11.CKK_AES),
		p11.NewAttribute(p11.CKA_VALUE_LEN, 32),
		p11.NewAttribute(p11.CKA_TOKEN, true),
		p11.NewAttribute(p11.CKA_PRIVATE, true),
		p11.NewAttribute(p11.CKA_SENSITIVE, true),
		p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		p11.NewAttribute(p11.CKA_MODIFIABLE, true),
		p11.NewAttribute(p11.CKA_ENCRYPT, true),
		p11.NewAttribute(p11.CKA_DECRYPT, true),
		p11.NewAttribute(p11.CKA_WRAP, false),
		p11.NewAttribute(p11.CKA_UNWRAP, false),
		p11.NewAttribute(p11.CKA_SIGN, false),
		p11.NewAttribute(p11.CKA_VERIFY, false),
		p11.NewAttribute(p11.CKA_DERIVE, false),
		p11.NewAttribute(p11.CKA_LABEL, label),
		p11.NewAttribute(p11.CKA_ID, id),
	}
}

// Retire implements provider.Retirer: it disables version, setting
// CKA_ENCRYPT and CKA_DECRYPT false, so that the token itself refuses to
// unwrap with it. Nothing is destroyed: setting CKA_DECRYPT true again
// re-enables it. It refuses the current version.
func (p *Provider) Retire(ctx context.Context, version string) error {
	if _, err := ParseVersion(version); err != nil {
		return fmt.Errorf("pkcs11: retire: %w", err)
	}
	p.listMu.Lock()
	defer p.listMu.Unlock()
	t, err := p.refreshLocked(ctx)
	if err != nil {
		return err
	}
	k, ok := t.byVersion[version]
	switch {
	case !ok:
		return fmt.Errorf("pkcs11: retire: version %s: %w", version, provider.ErrKeyNotFound)
	case t.current == k:
		return fmt.Errorf("pkcs11: retire: version %s is the current version; rotate first", version)
	}
	err = p.withSession(ctx, "retire version "+version, func(c *p11.Ctx, s *session) error {
		p.calls.add(opSetAttributeValue)
		return c.SetAttributeValue(s.h, k.handle, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_ENCRYPT, false), p11.NewAttribute(p11.CKA_DECRYPT, false),
		})
	})
	if err != nil {
		return fmt.Errorf("pkcs11: retire: %w", err)
	}
	_, err = p.refreshLocked(ctx)
	return err
}

// Versions implements provider.VersionLister: a version is enabled while
// it may decrypt (CKA_DECRYPT); a retired version (CKA_ENCRYPT false) is
// still enabled. Created comes from the CKA_ID of versions this provider
// made.
func (p *Provider) Versions(ctx context.Context) ([]provider.VersionInfo, error) {
	t, err := p.refresh(ctx, p.cfg.RelistAfter)
	if err != nil {
		return nil, err
	}
	out := make([]provider.VersionInfo, 0, len(t.ordered))
	for _, k := range t.ordered {
		vi := provider.VersionInfo{Version: k.version, State: provider.VersionDisabled, Current: k == t.current, Created: k.id.created}
		if k.decrypt {
			vi.State = provider.VersionEnabled
		}
		out = append(out, vi)
	}
	return out, nil
}

// Health implements provider.HealthChecker: a listing (at most one per
// RelistAfter) that finds a current version.
func (p *Provider) Health(ctx context.Context) error {
	_, err := p.CurrentVersion(ctx)
	return err
}

// RevokedVersions implements provider.VersionChecker: of versions, those
// whose object is gone or has CKA_DECRYPT false, judged from a listing at
// most RelistAfter old (the poll's own, at steady state: no extra call).
func (p *Provider) RevokedVersions(ctx context.Context, versions []string) ([]string, error) {
	t, err := p.refresh(ctx, 2*p.cfg.RelistAfter)
	if err != nil {
		return nil, fmt.Errorf("pkcs11: check versions: %w", err)
	}
	var out []string
	for _, v := range versions {
		if _, err := ParseVersion(v); err != nil {
			continue
		}
		if k, ok := t.byVersion[v]; !ok || !k.decrypt {
			out = append(out, v)
		}
	}
	return out, nil
}

// ValidVersion implements provider.VersionValidator (ParseVersion).
func (p *Provider) ValidVersion(version string) error {
	if _, err := ParseVersion(version); err != nil {
		return fmt.Errorf("pkcs11: %w", err)
	}
	return nil
}

// refresh returns the listing, listing again when it is older than maxAge
// (0: always; negative: any listing of the module's current generation
// will do).
func (p *Provider) refresh(ctx context.Context, maxAge time.Duration) (*keyTable, error) {
	if t := p.fresh(maxAge); t != nil {
		return t, nil
	}
	p.listMu.Lock()
	defer p.listMu.Unlock()
	if t := p.fresh(maxAge); t != nil {
		return t, nil // listed meanwhile
	}
	return p.refreshLocked(ctx)
}

func (p *Provider) fresh(maxAge time.Duration) *keyTable {
	t := p.keys.Load()
	if t == nil || p.lost.Load() || t.gen != p.mod.generation() || maxAge == 0 {
		return nil
	}
	if maxAge > 0 && p.cfg.Now().Sub(t.at) >= maxAge {
		return nil
	}
	return t
}

// refreshLocked lists the key's objects, with listMu held. Once the
// objects or the token went missing, every listing first re-initializes
// the module (at most once per ReinitAfter): tokens restored, re-inserted
// or re-initialized only become visible that way (SoftHSM reads its token
// directory at C_Initialize). With Config.Create it generates the first
// version of a token that never had one in this process's sight; a token
// whose objects vanished later gets none (that would hide the loss).
func (p *Provider) refreshLocked(ctx context.Context) (*keyTable, error) {
	if p.lost.Load() {
		p.maybeReinit()
	}
	var t *keyTable
	err := p.withSession(ctx, "list key objects", func(c *p11.Ctx, s *session) error {
		var err error
		t, err = p.list(c, s, s.gen)
		if err != nil || len(t.ordered) > 0 || !p.cfg.Create || p.keys.Load() != nil {
			return err
		}
		if _, _, err := p.generate(c, s, t); err != nil {
			return fmt.Errorf("generate the first version of key %q: %w", p.cfg.KeyLabel, err)
		}
		t, err = p.list(c, s, s.gen)
		return err
	})
	if err != nil {
		return nil, err
	}
	prev := p.keys.Load()
	switch {
	case len(t.ordered) == 0 && (p.lost.Load() || (prev != nil && len(prev.ordered) > 0)):
		// The objects vanished: a re-initialized or replaced token, or a
		// module that shows a stale view until initialized again.
		if !p.lost.Swap(true) {
			p.maybeReinit()
		}
	case len(t.ordered) > 0:
		p.lost.Store(false)
	}
	p.keys.Store(t)
	return t, nil
}

// list lists the AES secret keys labelled KeyLabel in session s.
func (p *Provider) list(c *p11.Ctx, s *session, gen uint64) (*keyTable, error) {
	tmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_SECRET_KEY),
		p11.NewAttribute(p11.CKA_LABEL, p.cfg.KeyLabel),
	}
	p.calls.add(opFindObjectsInit)
	if err := c.FindObjectsInit(s.h, tmpl); err != nil {
		return nil, err
	}
	var handles []p11.ObjectHandle
	var findErr error
	for {
		p.calls.add(opFindObjects)
		hs, _, err := c.FindObjects(s.h, 64)
		if err != nil {
			findErr = err
			break
		}
		handles = append(handles, hs...)
		if len(hs) < 64 {
			break
		}
	}
	p.calls.add(opFindObjectsFinal)
	if err := c.FindObjectsFinal(s.h); err != nil && findErr == nil {
		findErr = err
	}
	if findErr != nil {
		return nil, findErr
	}
	t := &keyTable{gen: gen, at: p.cfg.Now(), byVersion: map[string]*keyObj{}}
	seen := map[string]int{}
	var objs []*keyObj
	for _, h := range handles {
		p.calls.add(opGetAttributeValue)
		attrs, err := c.GetAttributeValue(s.h, h, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_ID, nil), p11.NewAttribute(p11.CKA_KEY_TYPE, nil), p11.NewAttribute(p11.CKA_VALUE_LEN, nil),
			p11.NewAttribute(p11.CKA_ENCRYPT, nil), p11.NewAttribute(p11.CKA_DECRYPT, nil),
			p11.NewAttribute(p11.CKA_SENSITIVE, nil), p11.NewAttribute(p11.CKA_EXTRACTABLE, nil),
		})
		if classOf(err) == classHandle {
			continue // destroyed by someone else meanwhile
		}
		if err != nil {
			return nil, err
		}
		k := &keyObj{handle: h}
		var keyType, valueLen uint64
		for _, a := range attrs {
			switch a.Type {
			case p11.CKA_ID:
				k.id = parseID(a.Value)
			case p11.CKA_KEY_TYPE:
				keyType = ulong(a.Value)
			case p11.CKA_VALUE_LEN:
				valueLen = ulong(a.Value)
			case p11.CKA_ENCRYPT:
				k.encrypt = boolean(a.Value)
			case p11.CKA_DECRYPT:
				k.decrypt = boolean(a.Value)
			case p11.CKA_SENSITIVE:
				k.sensitive = boolean(a.Value)
			case p11.CKA_EXTRACTABLE:
				k.extractable = boolean(a.Value)
			}
		}
		if keyType != p11.CKK_AES || valueLen != 32 || len(k.id.raw) == 0 || len(k.id.raw) > maxIDSize {
			t.others++
			continue
		}
		k.version = formatVersion(k.id.raw)
		seen[k.version]++
		objs = append(objs, k)
	}
	dup := map[string]bool{}
	for _, k := range objs {
		if seen[k.version] > 1 {
			if !dup[k.version] {
				t.dupes = append(t.dupes, k.version)
				dup[k.version] = true
			}
			continue
		}
		t.byVersion[k.version] = k
		t.ordered = append(t.ordered, k)
	}
	sort.Slice(t.ordered, func(i, j int) bool { return t.ordered[j].id.newer(t.ordered[i].id) })
	for i := len(t.ordered) - 1; i >= 0; i-- {
		if t.ordered[i].encrypt {
			t.current = t.ordered[i]
			break
		}
	}
	return t, nil
}

// ulong decodes a CK_ULONG attribute (native byte order and size).
func ulong(b []byte) uint64 {
	var v uint64
	switch len(b) {
	case 8:
		for i := 7; i >= 0; i-- {
			v = v<<8 | uint64(b[i])
		}
	case 4:
		for i := 3; i >= 0; i-- {
			v = v<<8 | uint64(b[i])
		}
	}
	return v
}

func boolean(b []byte) bool { return len(b) == 1 && b[0] != 0 }

// maybeReinit re-initializes the module unless it was done within
// ReinitAfter.
func (p *Provider) maybeReinit() {
	p.reinitMu.Lock()
	defer p.reinitMu.Unlock()
	now := p.cfg.Now()
	if !p.lastReinit.IsZero() && now.Sub(p.lastReinit) < p.cfg.ReinitAfter {
		return
	}
	p.lastReinit = now
	_ = p.mod.reinit(p.mod.generation(), &p.calls)
}
