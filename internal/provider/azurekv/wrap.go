package azurekv

import (
	"context"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"

	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/kms-plugin/kms-plugin/internal/provider"
)

// Wrapped key schemes: the first byte of every wrapped key.
const (
	schemeRSAOAEP256 = 0x01
	schemeA256KW     = 0x02
)

// Wrap implements provider.Provider. RSA keys wrap locally with the cached
// public key unless WrapInVault is set; oct-HSM keys wrap in the HSM. It
// uses only a version the vault reported usable within stateFreshFor, asking
// again otherwise (see the package comment): it returns ErrKeyDisabled when
// no version is usable, ErrKeyNotFound when the key is gone, and
// ErrUnavailable or ErrPermissionDenied when the vault cannot tell.
func (p *Provider) Wrap(ctx context.Context, key []byte) (provider.WrappedKey, error) {
	if err := ctx.Err(); err != nil {
		return provider.WrappedKey{}, err
	}
	st := p.cur.Load()
	if st == nil || p.cfg.Now().Sub(st.checked) >= stateFreshFor {
		var err error
		if st, err = p.refresh(ctx); err != nil {
			return provider.WrappedKey{}, err
		}
	}
	w, err := p.wrapWith(ctx, st, key)
	if errors.Is(err, provider.ErrKeyDisabled) {
		// The vault refused the version: disabled since it was checked.
		// Use what is usable now, once.
		next, rerr := p.refresh(ctx)
		if rerr != nil {
			return provider.WrappedKey{}, rerr
		}
		if next.kid != st.kid {
			return p.wrapWith(ctx, next, key)
		}
	}
	return w, err
}

// wrapWith wraps key with the version of st.
func (p *Provider) wrapWith(ctx context.Context, st *keyState, key []byte) (provider.WrappedKey, error) {
	switch {
	case isRSA(st.kty) && !p.cfg.WrapInVault:
		ct, err := rsa.EncryptOAEP(sha256.New(), p.cfg.Rand, st.pub, key, nil)
		if err != nil {
			return provider.WrappedKey{}, fmt.Errorf("azurekv: wrap locally with version %s: %w", st.kid, err)
		}
		return provider.WrappedKey{Version: st.version, Ciphertext: append([]byte{schemeRSAOAEP256}, ct...)}, nil
	case isRSA(st.kty):
		ct, err := p.vaultWrap(ctx, st, azkeys.EncryptionAlgorithmRSAOAEP256, key)
		if err != nil {
			return provider.WrappedKey{}, err
		}
		return provider.WrappedKey{Version: st.version, Ciphertext: append([]byte{schemeRSAOAEP256}, ct...)}, nil
	default:
		ct, err := p.vaultWrap(ctx, st, azkeys.EncryptionAlgorithmA256KW, pad(key))
		if err != nil {
			return provider.WrappedKey{}, err
		}
		return provider.WrappedKey{Version: st.version, Ciphertext: append([]byte{schemeA256KW}, ct...)}, nil
	}
}

func (p *Provider) vaultWrap(ctx context.Context, st *keyState, alg azkeys.EncryptionAlgorithm, value []byte) ([]byte, error) {
	var res azkeys.WrapKeyResponse
	err := p.call(ctx, opWrap, st.name, st.kid, func(ctx context.Context) error {
		var err error
		res, err = p.client.WrapKey(ctx, st.name, st.id, azkeys.KeyOperationParameters{Algorithm: &alg, Value: value}, nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	if res.KID == nil || !strings.EqualFold(string(*res.KID), st.kid) || len(res.Result) == 0 {
		return nil, fmt.Errorf("azurekv: wrapKey with version %s: the vault answered for another key version", st.kid)
	}
	return res.Result, nil
}

// Unwrap implements provider.Provider: one unwrapkey call with exactly the
// version in w.Version, which may name any key of the configured vault (so
// that data survives a change of key name). It returns ErrKeyNotFound for a
// version that is not a key ID of this vault in its one accepted spelling
// (refused before any call; see version.go) or that the vault does not
// know, ErrKeyDisabled for a disabled version, ErrInvalidCiphertext when the
// vault cannot unwrap the ciphertext, and ErrPermissionDenied or
// ErrUnavailable.
func (p *Provider) Unwrap(ctx context.Context, w provider.WrappedKey) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ref, err := p.parseVersion(w.Version)
	if err != nil {
		return nil, fmt.Errorf("azurekv: unwrap: %w", err)
	}
	if len(w.Ciphertext) < 2 {
		return nil, fmt.Errorf("azurekv: unwrapKey with version %s: wrapped key is empty: %w", ref.kid, provider.ErrInvalidCiphertext)
	}
	var alg azkeys.EncryptionAlgorithm
	switch w.Ciphertext[0] {
	case schemeRSAOAEP256:
		alg = azkeys.EncryptionAlgorithmRSAOAEP256
	case schemeA256KW:
		alg = azkeys.EncryptionAlgorithmA256KW
	default:
		return nil, fmt.Errorf("azurekv: unwrapKey with version %s: unknown wrap scheme %#x: %w", ref.kid, w.Ciphertext[0], provider.ErrInvalidCiphertext)
	}
	if err := p.admit(ctx, ref); err != nil {
		return nil, fmt.Errorf("azurekv: unwrap: %w", err)
	}
	var res azkeys.UnwrapKeyResponse
	err = p.call(ctx, opUnwrap, ref.name, ref.kid, func(ctx context.Context) error {
		var err error
		res, err = p.client.UnwrapKey(ctx, ref.name, ref.id, azkeys.KeyOperationParameters{Algorithm: &alg, Value: w.Ciphertext[1:]}, nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	if res.KID != nil {
		// The vault names the version it used in its own spelling: learn
		// it, and refuse any other spelling, so that one version has one
		// key_id.
		name, id, ok := p.splitKID(string(*res.KID))
		if !ok || name != ref.name || id != ref.id {
			clear(res.Result)
			if ok {
				p.book.saw(name, id)
			}
			return nil, fmt.Errorf("azurekv: unwrapKey with version %s: the vault answered for %s; only the vault's spelling of a version is accepted: %w", ref.kid, *res.KID, provider.ErrKeyNotFound)
		}
		p.book.saw(name, id)
	}
	if w.Ciphertext[0] == schemeA256KW {
		key, err := unpad(res.Result)
		if err != nil {
			return nil, fmt.Errorf("azurekv: unwrapKey with version %s: %w: %w", ref.kid, err, provider.ErrInvalidCiphertext)
		}
		return key, nil
	}
	return res.Result, nil
}

// pad pads a key for AES key wrap: 0x80, then zeros up to a multiple of 8
// bytes, at least 16 (ISO/IEC 7816-4).
func pad(key []byte) []byte {
	n := max(16, (len(key)+1+7)/8*8)
	out := make([]byte, n)
	copy(out, key)
	out[len(key)] = 0x80
	return out
}

func unpad(b []byte) ([]byte, error) {
	i := len(b) - 1
	for i >= 0 && b[i] == 0 {
		i--
	}
	if i < 0 || b[i] != 0x80 || len(b) < 16 || len(b)%8 != 0 {
		return nil, errors.New("bad key padding")
	}
	return b[:i], nil
}
