//go:build pkcs11

package pkcs11

import (
	"errors"
	"fmt"
	"os"
	"sync"

	p11 "github.com/miekg/pkcs11"
)

// A PKCS#11 module may be initialized once per process (C_Initialize
// again fails with CKR_CRYPTOKI_ALREADY_INITIALIZED, and dlopen of the same
// path returns the same library), so the loaded modules are the one piece
// of process-wide state of this package: every store of one process using
// the same module path shares one *module, counted by refs and finalized
// when the last store closes.
var (
	modulesMu sync.Mutex
	modules   = map[string]*module{}
)

// module is one loaded PKCS#11 library.
type module struct {
	path string
	refs int // under modulesMu

	// mu is held shared by every call into the library and exclusively to
	// (re-)initialize it: C_Finalize invalidates every session and object
	// handle, so a call must never straddle it.
	mu    sync.RWMutex
	ctx   *p11.Ctx
	ready bool   // C_Initialize succeeded and no C_Finalize since
	gen   uint64 // incremented by every successful C_Initialize
}

// errNotReady is a call into a module whose last C_Initialize failed.
var errNotReady = errors.New("the module is not initialized (its last C_Initialize failed)")

// acquireModule loads the library at path (or shares the loaded one) and
// initializes it.
func acquireModule(path string, c *counters) (*module, error) {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	if m, ok := modules[path]; ok {
		m.refs++
		return m, nil
	}
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("pkcs11: load module: %w", err)
	}
	ctx := p11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("pkcs11: load module %s: dlopen failed: not a PKCS#11 library for this architecture, or one of its own libraries is missing (ldd %s)", path, path)
	}
	m := &module{path: path, ctx: ctx, refs: 1}
	c.add(opInitialize)
	if err := ctx.Initialize(); err != nil && !errors.Is(err, p11.Error(p11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		ctx.Destroy()
		return nil, fmt.Errorf("pkcs11: initialize module %s: %w", path, err)
	}
	m.ready, m.gen = true, 1
	modules[path] = m
	return m, nil
}

// release drops one reference, finalizing and unloading the library with
// the last.
func (m *module) release() {
	modulesMu.Lock()
	defer modulesMu.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules, m.path)
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ready {
		_ = m.ctx.Finalize()
	}
	m.ctx.Destroy()
	m.ready = false
}

// call runs fn with the library while no re-initialization can happen,
// and returns the generation fn ran under.
func (m *module) call(fn func(ctx *p11.Ctx, gen uint64) error) error {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if !m.ready {
		return errNotReady
	}
	return fn(m.ctx, m.gen)
}

// generation returns the current generation, 0 when not ready.
func (m *module) generation() uint64 {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if !m.ready {
		return 0
	}
	return m.gen
}

// reinit finalizes and initializes the library again, unless another
// caller already did since generation seen: tokens inserted, restored or
// re-initialized since the last C_Initialize then become visible (SoftHSM
// reads its token directory only there). Every session and object handle
// of the previous generation is gone afterwards.
func (m *module) reinit(seen uint64, c *counters) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ready && m.gen != seen {
		return nil
	}
	if m.ready {
		c.add(opFinalize)
		_ = m.ctx.Finalize()
		m.ready = false
	}
	c.add(opInitialize)
	if err := m.ctx.Initialize(); err != nil && !errors.Is(err, p11.Error(p11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) {
		return fmt.Errorf("pkcs11: initialize module %s again: %w", m.path, err)
	}
	m.ready = true
	m.gen++
	return nil
}
