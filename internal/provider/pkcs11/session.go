//go:build pkcs11

package pkcs11

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// session is one open session of the pool.
type session struct {
	h   p11.SessionHandle
	gen uint64 // module generation it was opened in
}

// pool holds up to n open sessions: idle ones in idle, one token in open
// per session open (idle or in use).
type pool struct {
	idle chan *session
	open chan struct{}
}

func (pl *pool) init(n int) {
	pl.idle = make(chan *session, n)
	pl.open = make(chan struct{}, n)
}

// get returns an idle session of the module's current generation, or opens
// one (and logs in) while fewer than n are open, or waits for one.
func (pl *pool) get(ctx context.Context, p *Provider) (*session, error) {
	for {
		var s *session
		select {
		case s = <-pl.idle:
		default:
			select {
			case s = <-pl.idle:
			case pl.open <- struct{}{}:
				s, err := p.openSession()
				if err != nil {
					<-pl.open
					return nil, err
				}
				return s, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
		if s.gen == p.mod.generation() {
			return s, nil
		}
		<-pl.open // its handle died with the previous generation
	}
}

// put returns a healthy session to the pool, or drops a broken one.
func (pl *pool) put(p *Provider, s *session, broken bool) {
	if !broken {
		pl.idle <- s
		return
	}
	_ = p.mod.call(func(c *p11.Ctx, gen uint64) error {
		if gen == s.gen {
			p.calls.add(opCloseSession)
			_ = c.CloseSession(s.h)
		}
		return nil
	})
	<-pl.open
}

// closeAll closes the idle sessions.
func (pl *pool) closeAll(p *Provider) {
	for {
		select {
		case s := <-pl.idle:
			pl.put(p, s, true)
		default:
			return
		}
	}
}

// openSession opens a read-write session on the token and logs in unless
// the application is logged in already (a login holds for every session
// of the application on the token).
func (p *Provider) openSession() (*session, error) {
	var s *session
	err := p.mod.call(func(c *p11.Ctx, gen uint64) error {
		slot, err := p.slotFor(c, gen)
		if err != nil {
			return err
		}
		p.calls.add(opOpenSession)
		h, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			return err
		}
		p.calls.add(opGetSessionInfo)
		info, err := c.GetSessionInfo(h)
		if err == nil && info.State != p11.CKS_RW_USER_FUNCTIONS {
			err = p.login(c, h)
		}
		if err != nil {
			p.calls.add(opCloseSession)
			_ = c.CloseSession(h)
			return err
		}
		s = &session{h: h, gen: gen}
		return nil
	})
	return s, err
}

// slotFor returns the configured token's slot in generation gen, looking
// it up again (by label) after every initialization of the module.
func (p *Provider) slotFor(c *p11.Ctx, gen uint64) (uint, error) {
	p.slotMu.Lock()
	defer p.slotMu.Unlock()
	if p.slotGen == gen {
		return p.slot, nil
	}
	if p.cfg.Slot != nil {
		p.calls.add(opGetTokenInfo)
		if _, err := c.GetTokenInfo(*p.cfg.Slot); err != nil {
			return 0, fmt.Errorf("slot %d has no usable token: %w", *p.cfg.Slot, err)
		}
		p.slot, p.slotGen = *p.cfg.Slot, gen
		return p.slot, nil
	}
	p.calls.add(opGetSlotList)
	slots, err := c.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("list slots: %w", err)
	}
	var found []uint
	var labels []string
	for _, sl := range slots {
		p.calls.add(opGetTokenInfo)
		ti, err := c.GetTokenInfo(sl)
		if err != nil {
			continue
		}
		labels = append(labels, strconv.Quote(ti.Label))
		if ti.Label == p.cfg.TokenLabel {
			found = append(found, sl)
		}
	}
	switch len(found) {
	case 0:
		return 0, &tokenError{label: p.cfg.TokenLabel, labels: labels}
	case 1:
		p.slot, p.slotGen = found[0], gen
		return p.slot, nil
	}
	return 0, fmt.Errorf("%d tokens are labelled %q (slots %v): set pkcs11.slot instead: %w", len(found), p.cfg.TokenLabel, found, errAmbiguous)
}

var errAmbiguous = errors.New("ambiguous token label")

// tokenError is a token label no slot has.
type tokenError struct {
	label  string
	labels []string
}

func (e *tokenError) Error() string {
	return fmt.Sprintf("no token labelled %q (tokens present: %v)", e.label, e.labels)
}

// resolveSlot finds the token in generation gen.
func (p *Provider) resolveSlot() (uint, error) {
	var slot uint
	err := p.mod.call(func(c *p11.Ctx, g uint64) error {
		var err error
		slot, err = p.slotFor(c, g)
		return err
	})
	if err != nil {
		return 0, p.mapErr("find the token", err)
	}
	return slot, nil
}

// pinState is the PIN and whether the token refused it.
type pinState struct {
	mu         sync.Mutex // held across C_Login: one attempt at a time
	pin, file  string
	refused    string // the PIN the token refused, "" when none
	refusedErr error
	// refusedFlag mirrors refused != "" for ReportState, without the lock.
	refusedFlag atomic.Bool
}

// current returns the PIN to log in with, or the refusal when the token
// refused the PIN the file still holds: a refused PIN is never sent
// twice.
func (ps *pinState) current() (string, error) {
	ps.mu.Lock()
	defer ps.mu.Unlock()
	return ps.currentLocked()
}

func (ps *pinState) currentLocked() (string, error) {
	if ps.refused == "" {
		return ps.pin, nil
	}
	if ps.file == "" {
		return "", ps.refusedErr
	}
	pin, err := readPIN(ps.file)
	if err != nil {
		return "", fmt.Errorf("%w; and reading the PIN file again failed: %v", ps.refusedErr, err)
	}
	if pin == ps.refused {
		return "", ps.refusedErr
	}
	ps.pin, ps.refused, ps.refusedErr = pin, "", nil
	ps.refusedFlag.Store(false)
	return pin, nil
}

// login logs session h in as the user, once per PIN.
func (p *Provider) login(c *p11.Ctx, h p11.SessionHandle) error {
	ps := &p.pin
	ps.mu.Lock()
	defer ps.mu.Unlock()
	pin, err := ps.currentLocked()
	if err != nil {
		return err
	}
	p.calls.add(opLogin)
	err = c.Login(h, p11.CKU_USER, pin)
	switch {
	case err == nil, errors.Is(err, p11.Error(p11.CKR_USER_ALREADY_LOGGED_IN)):
		return nil
	case classOf(err) == classPIN:
		src := "the configured PIN"
		if ps.file != "" {
			src = "the PIN in " + ps.file
		}
		what := "refused " + src
		if errors.Is(err, p11.Error(p11.CKR_PIN_LOCKED)) {
			what = "has locked the user PIN"
		}
		ps.refused = pin
		ps.refusedFlag.Store(true)
		ps.refusedErr = fmt.Errorf("log in: the token %s (%v); it is not tried again until the PIN file changes: %w", what, err, provider.ErrPermissionDenied)
		return ps.refusedErr
	}
	return fmt.Errorf("log in: %w", err)
}

// withSession runs fn on a session of the pool, bounded by the context and
// Timeout. A session or token failure is retried once on a new session
// (after re-initializing the module for a token failure); a refused PIN,
// never.
func (p *Provider) withSession(ctx context.Context, what string, fn func(*p11.Ctx, *session) error) error {
	if _, err := p.pin.current(); err != nil {
		return fmt.Errorf("pkcs11: %s: %w", what, err)
	}
	var err error
	for attempt := 0; attempt < 2; attempt++ {
		err = p.runOnce(ctx, fn)
		cl := classOf(err)
		var te *tokenError
		if errors.As(err, &te) {
			cl = classToken
		}
		if cl == classToken {
			p.lost.Store(true)
		}
		if attempt > 0 || ctx.Err() != nil || (cl != classSession && cl != classToken) || errors.Is(err, provider.ErrPermissionDenied) {
			break
		}
		if cl == classToken {
			p.maybeReinit()
		}
	}
	return p.mapErr(what, err)
}

// errTimeout is a call that did not return within Timeout.
var errTimeout = errors.New("the module did not answer in time")

func (p *Provider) runOnce(ctx context.Context, fn func(*p11.Ctx, *session) error) error {
	done := make(chan error, 1)
	go func() {
		s, err := p.pool.get(ctx, p)
		if err != nil {
			done <- err
			return
		}
		err = p.mod.call(func(c *p11.Ctx, gen uint64) error {
			if gen != s.gen {
				return p11.Error(p11.CKR_SESSION_HANDLE_INVALID)
			}
			err := fn(c, s)
			var de *decryptError
			if errors.As(err, &de) && classOf(de.err) == classGeneral {
				// SoftHSM reports a tag mismatch as CKR_GENERAL_ERROR: call it
				// a bad ciphertext only if the session is demonstrably well.
				p.calls.add(opGetSessionInfo)
				if info, perr := c.GetSessionInfo(s.h); perr == nil && info.State == p11.CKS_RW_USER_FUNCTIONS {
					return fmt.Errorf("the token could not authenticate the wrapped key (%v; the session is healthy): %w", de.err, provider.ErrInvalidCiphertext)
				}
				return p11.Error(p11.CKR_DEVICE_ERROR)
			}
			return err
		})
		cl := classOf(err)
		p.pool.put(p, s, cl == classSession || cl == classToken)
		done <- err
	}()
	timer := time.NewTimer(p.cfg.Timeout)
	defer timer.Stop()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return fmt.Errorf("%w (%s)", errTimeout, p.cfg.Timeout)
	}
}

// mapErr wraps err, from the library or this package, with the provider
// error it means.
func (p *Provider) mapErr(what string, err error) error {
	if err == nil {
		return nil
	}
	for _, known := range []error{provider.ErrPermissionDenied, provider.ErrKeyDisabled, provider.ErrKeyNotFound,
		provider.ErrInvalidCiphertext, provider.ErrUnavailable, context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, known) {
			return fmt.Errorf("pkcs11: %s: %w", what, err)
		}
	}
	var kind error
	var te *tokenError
	switch cl := classOf(err); {
	case errors.As(err, &te), errors.Is(err, errTimeout), errors.Is(err, errAmbiguous):
		kind = provider.ErrUnavailable
	case cl == classPIN:
		kind = provider.ErrPermissionDenied
	case cl == classDisabled:
		kind = provider.ErrKeyDisabled
	case cl == classHandle:
		kind = provider.ErrKeyNotFound
	case cl == classData:
		kind = provider.ErrInvalidCiphertext
	default:
		kind = provider.ErrUnavailable
	}
	return fmt.Errorf("pkcs11: %s: %w: %w", what, err, kind)
}
