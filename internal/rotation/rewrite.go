package rotation

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"
	apierrors "k8s.io/apimachinery/pkg/api/errors"

	"github.com/kms-plugin/kms-plugin/internal/etcdscan"
)

// maxAttempts bounds the tries of one object's update.
const maxAttempts = 6

// outcome is what became of one object handed to a worker.
type outcome int

const (
	// outcomeStopped: the run is stopping; the object was left alone.
	outcomeStopped outcome = iota
	outcomeRewritten
	outcomeDeleted
	outcomeFailed
)

// rewriteOne does the no-op update of one object: with the object as
// listed, then, after a conflict, as read again. It counts what it did in
// p.live.
func (p *pipeline) rewriteOne(ctx context.Context, obj *storedObject) outcome {
	cur := obj
	var lastErr error
	for attempt := 1; ; attempt++ {
		if err := p.limiter.Wait(ctx); err != nil {
			return outcomeStopped
		}
		err := p.store.update(ctx, cur)
		switch {
		case err == nil:
			p.live.rewritten.Add(1)
			return outcomeRewritten
		case apierrors.IsNotFound(err):
			p.live.deleted.Add(1)
			return outcomeDeleted
		case apierrors.IsConflict(err) && attempt < maxAttempts:
			p.live.conflictsRetried.Add(1)
			fresh, gerr := p.store.get(ctx, obj)
			switch {
			case apierrors.IsNotFound(gerr):
				p.live.deleted.Add(1)
				return outcomeDeleted
			case gerr != nil:
				lastErr = gerr
				cur = obj
				if sleep(ctx, backoff(attempt)) != nil {
					return outcomeStopped
				}
			default:
				cur = fresh
			}
			continue
		case transient(err) && attempt < maxAttempts:
			lastErr = err
			if sleep(ctx, backoff(attempt)) != nil {
				return outcomeStopped
			}
			continue
		default:
			if ctx.Err() != nil {
				return outcomeStopped
			}
			if lastErr != nil && apierrors.IsConflict(err) {
				err = fmt.Errorf("%w (after %v)", err, lastErr)
			}
			p.live.failed.Add(1)
			p.x.log.Warn("could not rewrite an object", zap.String("resource", p.res), zap.String("namespace", obj.namespace), zap.String("name", obj.name), zap.Error(err))
			return outcomeFailed
		}
	}
}

// transient reports whether err may go away by itself.
func transient(err error) bool {
	return apierrors.IsTooManyRequests(err) || apierrors.IsServerTimeout(err) || apierrors.IsTimeout(err) ||
		apierrors.IsInternalError(err) || apierrors.IsServiceUnavailable(err) || apierrors.IsUnexpectedServerError(err) ||
		errors.Is(err, context.DeadlineExceeded) || isConnectionError(err)
}

func isConnectionError(err error) bool {
	if err == nil {
		return false
	}
	s := err.Error()
	return strings.Contains(s, "connection refused") || strings.Contains(s, "connection reset") || strings.Contains(s, "EOF") || strings.Contains(s, "http2: ")
}

func backoff(attempt int) time.Duration {
	return min(time.Duration(1<<min(attempt, 6))*100*time.Millisecond, 5*time.Second)
}

// retry runs f until it succeeds, fails for good, or maxAttempts pass.
func retry(ctx context.Context, f func() error) error {
	for attempt := 1; ; attempt++ {
		err := f()
		if err == nil || !transient(err) || attempt >= maxAttempts {
			return err
		}
		if serr := sleep(ctx, backoff(attempt)); serr != nil {
			return err
		}
	}
}

// current tells, per listed object, whether etcd already holds it under
// the new key_id, so it need not be rewritten. Without etcd, or when etcd
// cannot say, nothing is current and every object is rewritten.
func (p *pipeline) current(ctx context.Context, items []*storedObject) []bool {
	cfg := &p.x.cfg
	out := make([]bool, len(items))
	if cfg.Etcd == nil || len(items) == 0 {
		return out
	}
	sc := etcdscan.New(cfg.Etcd, 100)
	for _, prefix := range etcdscan.KeyPrefixes(cfg.EtcdPrefix, p.res) {
		idx := make(map[string]int, len(items))
		lo, hi := "", ""
		for i, o := range items {
			k := prefix + o.path()
			idx[k] = i
			if lo == "" || k < lo {
				lo = k
			}
			if k > hi {
				hi = k
			}
		}
		found := 0
		_, err := sc.ScanRange(ctx, lo, hi+"\x00", 0, func(kv etcdscan.KeyValue) error {
			i, ok := idx[string(kv.Key)]
			if !ok {
				return nil
			}
			found++
			e, err := etcdscan.Classify(kv.Value)
			switch {
			case err != nil:
			case p.isCurrent != nil:
				out[i] = p.isCurrent(e)
			default:
				out[i] = e.Kind == etcdscan.KindKMSv2 && e.Provider == cfg.ProviderName && e.KeyID == p.newKeyID
			}
			return nil
		})
		if err != nil {
			p.x.log.Warn("could not read etcd to skip objects already under the new key_id; rewriting this page", zap.String("resource", p.res), zap.Error(err))
			return make([]bool, len(items))
		}
		if found > 0 {
			break
		}
	}
	return out
}
