//go:build pkcs11

package pkcs11

import "github.com/kms-plugin/kms-plugin/internal/provider"

var _ provider.StateReporter = (*Provider)(nil)

// ReportState implements provider.StateReporter: no breaker (a refused PIN
// and a lost token have their own gauges), the sessions open, whether the
// token refused the PIN (the plugin waits for the PIN file to change) and
// whether the token or its key objects are missing. It makes no call and
// takes no lock.
func (p *Provider) ReportState() provider.StoreState {
	return provider.StoreState{
		Breaker: provider.BreakerNone,
		Gauges: []provider.Gauge{
			{Name: "pkcs11_sessions_open", Help: "Sessions the PKCS#11 provider holds open on the token.", Value: float64(len(p.pool.open))},
			{Name: "pkcs11_pin_refused", Help: "1 when the token refused the PIN in the PIN file; the plugin does not try it again until the file changes.", Value: b2f(p.pin.refusedFlag.Load())},
			{Name: "pkcs11_token_lost", Help: "1 when the token or the key's objects went missing; the plugin re-initializes the module until they are back.", Value: b2f(p.lost.Load())},
		},
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
