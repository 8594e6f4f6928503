package azurekv

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// maxClockSkew is the clock difference doctor reports as a problem: Entra
// ID refuses client assertions outside a 5-minute window, and token
// lifetimes assume roughly synchronized clocks.
const maxClockSkew = 2 * time.Minute

// Doctor implements provider.Doctor: it checks the credential, the vault's
// reachability and tenant, the clock and a token, in that order.
func (a *Settings) Doctor(ctx context.Context, c provider.Checklist, o provider.OpenOptions) provider.Provider {
	p, desc, err := a.open(o)
	if err != nil {
		c.Fail("credential", err, "fix the azure.credential settings; credential files must exist, be readable by the plugin and by no one else (mode 0600 or 0400, owned by the plugin's user or root)")
		c.Skip("vault", "needs a credential")
		return nil
	}
	c.OK("credential", desc)

	probe, err := p.Probe(ctx)
	if err != nil {
		c.Fail("vault", err, Remedy(err))
		c.Skip("token, key, round trip", "need the vault")
		return nil
	}
	c.OK("vault", fmt.Sprintf("%s answers; tenant %s, resource %s", p.VaultURL(), probe.TenantID, probe.Resource))
	if t := a.Credential.TenantID; t != "" && !strings.EqualFold(t, probe.TenantID) {
		c.Fail("tenant", fmt.Errorf("the credential is for tenant %s but the vault belongs to tenant %s", t, probe.TenantID),
			"set azure.credential.tenantID to "+probe.TenantID+", or use a vault of tenant "+t)
	}

	switch skew := probe.Skew; {
	case probe.ServerTime.IsZero():
		c.Skip("clock", "the vault sent no Date header")
	case skew > maxClockSkew || skew < -maxClockSkew:
		dir := "behind"
		if skew < 0 {
			dir = "ahead of"
		}
		c.Fail("clock", fmt.Errorf("this node's clock is %s %s the vault's", abs(skew).Round(time.Second), dir),
			"synchronize the clock (chronyc tracking, timedatectl show-timesync): Entra ID refuses client assertions more than 5 minutes off")
	default:
		c.OK("clock", fmt.Sprintf("%s off the vault's Date header", abs(skew).Round(time.Second)))
	}

	if err := p.CheckCredential(ctx, probe); err != nil {
		c.Fail("token", err, Remedy(err))
		c.Skip("key, round trip", "need a token")
		return nil
	}
	c.OK("token", "got an access token for "+probe.Resource)
	return p
}

// Remedy implements provider.Doctor with the package's Remedy.
func (a *Settings) Remedy(err error) string { return Remedy(err) }

func abs(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}
