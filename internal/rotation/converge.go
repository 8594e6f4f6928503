package rotation

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"go.uber.org/zap"

	"github.com/kms-plugin/kms-plugin/internal/envelope"
)

// converge waits until every plugin preflight found reports the new
// key_id, then until every apiserver it found encrypts with it (the
// canary, or without etcd a fixed wait).
func (x *run) converge(ctx context.Context, f found) (stageResult, error) {
	plugins := f.plugins
	if len(plugins) == 0 {
		return stageResult{}, errors.New("no plugin targets (preflight did not run)")
	}
	cctx, cancel := context.WithTimeout(ctx, x.cfg.ConvergeTimeout)
	defer cancel()
	newHash := envelope.KeyIDHash(x.rot.NewKeyID)
	if err := x.waitPlugins(cctx, ctx, plugins); err != nil {
		return stageResult{}, err
	}
	x.log.Info("every plugin reports the new key_id", zap.String("keyIDHash", newHash), zap.Int("plugins", len(plugins)))

	canaryRes := x.canaryResource()
	if x.cfg.Etcd == nil || canaryRes == "" {
		why := "no etcd configured"
		if x.cfg.Etcd != nil {
			why = "neither secrets nor configmaps are among the resources, so there is no canary"
		}
		x.log.Info("waiting for the apiservers to pick up the new key_id", zap.String("why", why), zap.Duration("wait", x.cfg.ConvergeWait))
		if err := sleep(ctx, x.cfg.ConvergeWait); err != nil {
			return stageResult{}, err
		}
		return stageResult{note: fmt.Sprintf("%s: waited %s after every plugin reported the new key_id", why, x.cfg.ConvergeWait)}, nil
	}
	apis := f.apiservers
	if len(apis) == 0 {
		return stageResult{}, errors.New("no apiserver to write the canary through (preflight did not run)")
	}
	for _, a := range apis {
		if err := x.waitCanary(cctx, ctx, a, canaryRes); err != nil {
			return stageResult{}, err
		}
	}
	var names []string
	for _, a := range apis {
		names = append(names, a.Name)
	}
	return stageResult{note: fmt.Sprintf("%s and %s (%s; canary %s read back from etcd) on key_id hash %s",
		plural(len(plugins), "plugin"), plural(len(apis), "apiserver"), strings.Join(names, ", "), canaryRes, newHash)}, nil
}

// waitPlugins waits, within cctx (converge's timeout), until every plugin
// reports the new key_id. It first asks every plugin to re-read its key
// store now rather than at its next poll (a minute by default), then
// nudges only the laggards.
func (x *run) waitPlugins(cctx, ctx context.Context, plugins []PluginTarget) error {
	newHash := envelope.KeyIDHash(x.rot.NewKeyID)
	src := x.pluginSource()
	lastMsg := ""
	nudge := plugins
	for {
		var statuses []PluginStatus
		if len(nudge) > 0 {
			statuses = x.refreshPlugins(cctx, src, nudge)
		}
		statuses = append(statuses, src.Ask(cctx, without(plugins, nudge))...)
		var lagging []string
		nudge = nil
		for _, s := range statuses {
			if !s.Healthy() || s.KeyID() != x.rot.NewKeyID {
				lagging = append(lagging, s.describe())
				if s.Err == "" {
					nudge = append(nudge, s.PluginTarget)
				}
			}
		}
		if len(lagging) == 0 {
			return nil
		}
		msg := strings.Join(lagging, "; ")
		if msg != lastMsg {
			x.log.Info("waiting for plugins to report the new key_id", zap.String("want", newHash), zap.Strings("lagging", lagging))
			lastMsg = msg
		}
		if err := sleep(cctx, x.cfg.PollInterval); err != nil {
			if ctx.Err() != nil {
				return context.Cause(ctx)
			}
			return fmt.Errorf("not every plugin reports the new key_id (hash %s) after %s: %s", newHash, x.cfg.ConvergeTimeout, msg)
		}
	}
}

// refreshPlugins asks targets to re-read their key store (POST /refresh)
// and, for those that could not (an older plugin, one that refreshed moments
// ago, a key store error), what GET /status says. Refusals are logged, not
// fatal: such a plugin still picks up the new version at its next poll.
func (x *run) refreshPlugins(ctx context.Context, src PluginSource, targets []PluginTarget) []PluginStatus {
	out := src.Refresh(ctx, targets)
	var retry []PluginTarget
	for _, s := range out {
		if s.Err != "" {
			x.log.Info("plugin did not refresh on request; waiting for its own poll", zap.String("node", s.Node), zap.String("reason", s.Err))
			retry = append(retry, s.PluginTarget)
		}
	}
	if len(retry) == 0 {
		return out
	}
	asked := src.Ask(ctx, retry)
	for i, j := 0, 0; i < len(out); i++ {
		if out[i].Err != "" {
			out[i] = asked[j]
			j++
		}
	}
	return out
}

// without returns the targets of all that are not in some.
func without(all, some []PluginTarget) []PluginTarget {
	if len(some) == 0 {
		return all
	}
	out := make([]PluginTarget, 0, len(all))
	for _, t := range all {
		if !slices.Contains(some, t) {
			out = append(out, t)
		}
	}
	return out
}
