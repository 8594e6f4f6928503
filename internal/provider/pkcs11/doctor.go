//go:build pkcs11

package pkcs11

import (
	"context"
	"errors"
	"fmt"
	"strings"

	p11 "github.com/miekg/pkcs11"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// doctorStore checks, in order, that the module loads, the token is
// there, the PIN file is sound, the token accepts the PIN, the key has a
// version that may encrypt, and that every version is sensitive and never
// extractable. Doctor's generic checks then make a round trip.
func doctorStore(ctx context.Context, s *Settings, c provider.Checklist, o provider.OpenOptions) provider.Provider {
	cfg := Config{
		Module: s.Module, TokenLabel: s.TokenLabel, Slot: s.Slot, PINFile: s.PINFile, KeyLabel: s.KeyLabel,
		HSMGeneratedIV: s.HSMGeneratedIV, Sessions: s.Sessions, NodeLocal: s.NodeLocal, Timeout: s.timeout(),
	}
	if err := s.setEnv(); err != nil {
		c.Fail("module", err, "fix pkcs11.moduleEnv")
		return nil
	}
	p, err := newProvider(cfg)
	if err != nil {
		c.Fail("module", err, "fix the pkcs11 settings")
		return nil
	}
	m, err := acquireModule(s.Module, &p.calls)
	if err != nil {
		c.Fail("module", err, Remedy(err))
		c.Skip("token, login, key", "need the module")
		return nil
	}
	p.mod = m
	var info p11.Info
	_ = m.call(func(ctx *p11.Ctx, _ uint64) error { info, err = ctx.GetInfo(); return err })
	c.OK("module", fmt.Sprintf("%s: %s %s, library %d.%d, Cryptoki %d.%d", s.Module, strings.TrimSpace(info.ManufacturerID),
		strings.TrimSpace(info.LibraryDescription), info.LibraryVersion.Major, info.LibraryVersion.Minor,
		info.CryptokiVersion.Major, info.CryptokiVersion.Minor))

	slot, err := p.resolveSlot()
	if err != nil {
		p.Close()
		c.Fail("token", err, Remedy(err))
		c.Skip("login, key", "need the token")
		return nil
	}
	var ti p11.TokenInfo
	_ = m.call(func(ctx *p11.Ctx, _ uint64) error { ti, err = ctx.GetTokenInfo(slot); return err })
	c.OK("token", fmt.Sprintf("slot %d: %q, %s %s, serial %s", slot, ti.Label, strings.TrimSpace(ti.ManufacturerID), strings.TrimSpace(ti.Model), strings.TrimSpace(ti.SerialNumber)))

	pin, err := readPIN(s.PINFile)
	if err != nil {
		p.Close()
		c.Fail("PIN file", err, Remedy(err))
		c.Skip("login, key", "need the PIN")
		return nil
	}
	p.pin.pin = pin
	if err := p.login0(ctx); err != nil {
		p.Close()
		c.Fail("login", err, Remedy(err))
		c.Skip("key objects", "needs a login")
		return nil
	}
	c.OK("login", "the token accepted the PIN in "+s.PINFile)

	t, err := p.refresh(ctx, 0)
	if err != nil {
		p.Close()
		c.Fail("key objects", err, Remedy(err))
		return nil
	}
	if len(t.ordered) == 0 {
		err := fmt.Errorf("pkcs11: no AES-256 secret key labelled %q on the token (%d other objects have the label): %w", s.KeyLabel, t.others, provider.ErrKeyNotFound)
		c.Fail("key objects", err, Remedy(err))
		p.Close()
		return nil
	}
	if t.current == nil {
		c.Fail("key objects", p.noCurrent(t), "set CKA_ENCRYPT true on the newest version, or make a new one: kms-plugin keyset rotate (same configuration)")
		p.Close()
		return nil
	}
	detail := fmt.Sprintf("%d versions, current %s", len(t.ordered), t.current.version)
	if len(t.ordered) == 1 {
		detail = "1 version, current " + t.current.version
	}
	if len(t.dupes) > 0 {
		detail += fmt.Sprintf("; ignored, CKA_ID held by several objects: %s", strings.Join(t.dupes, ", "))
	}
	c.OK("key objects", detail)

	bad := false
	for _, k := range t.ordered {
		var what []string
		if !k.sensitive {
			what = append(what, "CKA_SENSITIVE is false")
		}
		if k.extractable {
			what = append(what, "CKA_EXTRACTABLE is true")
		}
		if len(what) == 0 {
			continue
		}
		bad = true
		c.Fail("attributes", fmt.Errorf("pkcs11: version %s: %s: its key material can leave the token", k.version, strings.Join(what, " and ")),
			"make a new version that never leaves the token (kms-plugin keyset rotate, or kms-plugin rotate), re-encrypt, then retire this one (kms-plugin keyset retire "+k.version+"); such a key may already have been copied")
	}
	if !bad {
		c.OK("attributes", fmt.Sprintf("every version is sensitive and never extractable (%d)", len(t.ordered)))
	}
	return p
}

// Remedy returns a concrete fix for an error of this package, or "".
func Remedy(err error) string {
	var te *tokenError
	switch {
	case err == nil:
		return ""
	case pinRemedy(err) != "":
		return pinRemedy(err)
	case errors.As(err, &te):
		return "no token has pkcs11.tokenLabel: compare it with the tokens present (pkcs11-tool --module MODULE --list-slots); SoftHSM reads its tokens from the directory in SOFTHSM2_CONF (set it in pkcs11.moduleEnv)"
	case errors.Is(err, errAmbiguous):
		return "several tokens share the label: select one with pkcs11.slot"
	case strings.Contains(err.Error(), "load module"):
		return "check pkcs11.module: the vendor's PKCS#11 library must exist at that path in the plugin's mount namespace (mounted read-only into the static pod), be built for this architecture, and find its own libraries (ldd)"
	case strings.Contains(err.Error(), "initialize module"):
		return "the module failed to initialize: check its configuration (SoftHSM: SOFTHSM2_CONF and its directories.tokendir; Luna: Chrystoki.conf; set them in pkcs11.moduleEnv) and, for a network HSM, its client's connection"
	case errors.Is(err, p11.Error(p11.CKR_PIN_LOCKED)):
		return "the token locked the user PIN: the security officer must unlock or reset it (softhsm2-util cannot; pkcs11-tool --login --login-type so --init-pin), then restart the plugin"
	case errors.Is(err, provider.ErrPermissionDenied):
		return "write the token's user PIN to pkcs11.pinFile: a refused PIN is never tried twice (each try counts toward the token's lockout), the plugin reads the file again when it changes"
	case errors.Is(err, provider.ErrKeyDisabled):
		return "the key version may not be used (CKA_ENCRYPT or CKA_DECRYPT false): make a new version with kms-plugin keyset rotate, or set CKA_DECRYPT true again on a version that still wraps stored data"
	case errors.Is(err, provider.ErrKeyNotFound):
		return "no version of pkcs11.keyLabel on the token: kms-plugin serve generates the first one at its first start; check pkcs11.keyLabel and the token (pkcs11-tool --module MODULE --login --list-objects --type secrkey)"
	case errors.Is(err, provider.ErrUnavailable):
		return "the module or token did not answer: check the device (USB token plugged in, PCIe card), the network HSM client's connection, and the module's log"
	}
	return ""
}
