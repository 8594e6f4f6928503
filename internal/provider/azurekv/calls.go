package azurekv

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

type deniedEntry struct {
	until time.Time
	err   error
}

// call runs one vault operation on key name (and version, a canonical key
// ID, or "" for an operation on the key) under the per-call timeout, the
// remembered permission denials and the circuit breaker, and classifies
// its error.
func (p *Provider) call(ctx context.Context, op operation, name, version string, f func(context.Context) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("azurekv: %s: %w", op.name, err)
	}
	target := targetScope(op, name, version)
	if err := p.deniedErr(target); err != nil {
		return err
	}
	probe, err := p.breaker.allow(p.cfg.Now())
	if err != nil {
		return err
	}
	cctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	err = f(cctx)
	cancel()
	err = p.classify(ctx, op, name, version, err)
	o := neutral
	switch {
	case err == nil:
		o = success
	case ctx.Err() != nil:
		// The caller gave up: that says nothing about the vault.
	case errors.Is(err, provider.ErrUnavailable):
		o = failure
	default:
		// The vault answered (403, 404, 400...): it is reachable.
		var e *Error
		if errors.As(err, &e) && e.Status != 0 && e.Op != opToken.name {
			o = success
		}
	}
	p.breaker.done(p.cfg.Now(), probe, o, err)
	var e *Error
	if o == failure && errors.As(err, &e) {
		// The failure that opens the breaker says when it lets a probe
		// through, as the breaker's own errors do.
		e.retryAfter = p.breaker.retryIn(p.cfg.Now())
	}
	if errors.Is(err, provider.ErrPermissionDenied) {
		p.rememberDenied(deniedScope(target, err), err)
	}
	return err
}

// identityScope is where a denial of the identity as a whole is
// remembered: a refused token, a 401, the vault's firewall.
const identityScope = "identity"

// maxDenied bounds the denials remembered: version strings come from
// etcd, so their number is not the plugin's to choose.
const maxDenied = 1024

// targetScope is where a 403 of op on one key version (or on the key) is
// remembered, so that a version string naming a key the identity may not
// use blocks nothing else.
func targetScope(op operation, name, version string) string {
	if version != "" {
		return op.name + " " + strings.ToLower(version)
	}
	return op.name + " key " + strings.ToLower(name)
}

// deniedScope is where err, a denial of a call on target, is remembered.
func deniedScope(target string, err error) string {
	var e *Error
	if errors.As(err, &e) && (e.Op == opToken.name || e.Status == http.StatusUnauthorized ||
		e.InnerCode == "ForbiddenByFirewall" || e.InnerCode == "ForbiddenByConnection") {
		return identityScope
	}
	return target
}

// deniedErr returns the remembered denial that applies to a call on
// target, if any.
func (p *Provider) deniedErr(target string) error {
	p.deniedMu.Lock()
	defer p.deniedMu.Unlock()
	now := p.cfg.Now()
	for _, scope := range []string{identityScope, target} {
		d, ok := p.denied[scope]
		if !ok {
			continue
		}
		if !now.Before(d.until) {
			delete(p.denied, scope)
			continue
		}
		return fmt.Errorf("%w (remembered; the vault is asked again in %s)", d.err, d.until.Sub(now).Round(time.Second))
	}
	return nil
}

func (p *Provider) rememberDenied(scope string, err error) {
	p.deniedMu.Lock()
	defer p.deniedMu.Unlock()
	now := p.cfg.Now()
	if len(p.denied) >= maxDenied {
		for k, d := range p.denied {
			if !now.Before(d.until) {
				delete(p.denied, k)
			}
		}
		for k := range p.denied {
			if len(p.denied) < maxDenied {
				break
			}
			if k != identityScope {
				delete(p.denied, k)
			}
		}
	}
	p.denied[scope] = deniedEntry{until: now.Add(p.cfg.DeniedBackoff), err: err}
}
