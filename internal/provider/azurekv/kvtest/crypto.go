package kvtest

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1" //nolint:gosec // RSA-OAEP (SHA-1) is a Key Vault algorithm
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/http"
	"strings"
)

func (s *Server) handleCrypto(w http.ResponseWriter, r *http.Request, rt route) {
	var p keyOperationParams
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&p); err != nil {
		writeVaultError(w, http.StatusBadRequest, "BadParameter", "invalid JSON body: "+err.Error(), "")
		return
	}
	value, err := b64.DecodeString(p.Value)
	if err != nil {
		// Key Vault's base64url has no padding; a padded value is an error.
		writeVaultError(w, http.StatusBadRequest, "BadParameter", "value is not base64url without padding", "")
		return
	}
	s.mu.Lock()
	v, k, status := s.findLocked(rt.name, rt.version)
	var kid string
	var enabled bool
	var opAllowed bool
	if status == 0 {
		kid, enabled = s.kid(k, v), v.enabled
		for _, o := range v.ops {
			if strings.EqualFold(o, string(rt.perm)) {
				opAllowed = true
			}
		}
	}
	s.mu.Unlock()
	switch {
	case status != 0:
		writeNotFound(w, rt)
		return
	case !enabled:
		writeVaultError(w, http.StatusForbidden, "Forbidden", fmt.Sprintf("Operation %s is not allowed on a disabled key.", rt.perm), "KeyDisabled")
		return
	case !opAllowed:
		writeVaultError(w, http.StatusForbidden, "Forbidden", fmt.Sprintf("Operation %s is not permitted on this key.", rt.perm), "KeyOperationForbidden")
		return
	}
	res := keyOperationResult{KID: kid}
	var out []byte
	if v.rsa != nil {
		out, err = rsaOp(v.rsa, rt.op, p.Alg, value)
	} else {
		out, res, err = aesOp(v.aes, rt.op, p, value, res)
	}
	if err != nil {
		writeVaultError(w, http.StatusBadRequest, "BadParameter", err.Error(), "")
		return
	}
	res.Value = b64.EncodeToString(out)
	writeJSON(w, http.StatusOK, res)
}

func rsaOp(priv *rsa.PrivateKey, op, alg string, value []byte) ([]byte, error) {
	var h hash.Hash
	switch alg {
	case "RSA-OAEP-256":
		h = sha256.New()
	case "RSA-OAEP":
		h = sha1.New() //nolint:gosec // Key Vault's RSA-OAEP uses SHA-1
	default:
		return nil, fmt.Errorf("algorithm %q is not supported for RSA keys here", alg)
	}
	switch op {
	case "wrapkey", "encrypt":
		out, err := rsa.EncryptOAEP(h, rand.Reader, &priv.PublicKey, value, nil)
		if err != nil {
			return nil, fmt.Errorf("%s failed: %v", op, err)
		}
		return out, nil
	default:
		out, err := rsa.DecryptOAEP(h, nil, priv, value, nil)
		if err != nil {
			return nil, fmt.Errorf("%s failed: the ciphertext could not be decrypted", op)
		}
		return out, nil
	}
}

func aesOp(k []byte, op string, p keyOperationParams, value []byte, res keyOperationResult) ([]byte, keyOperationResult, error) {
	switch {
	case (op == "wrapkey" || op == "unwrapkey") && p.Alg == fmt.Sprintf("A%dKW", len(k)*8):
		var out []byte
		var err error
		if op == "wrapkey" {
			out, err = WrapKey(k, value)
		} else {
			out, err = UnwrapKey(k, value)
		}
		if err != nil {
			return nil, res, fmt.Errorf("%s failed: %v", op, err)
		}
		return out, res, nil
	case (op == "encrypt" || op == "decrypt") && p.Alg == fmt.Sprintf("A%dGCM", len(k)*8):
		block, err := aes.NewCipher(k)
		if err != nil {
			return nil, res, err
		}
		gcm, err := cipher.NewGCM(block)
		if err != nil {
			return nil, res, err
		}
		aad, err := b64.DecodeString(p.AAD)
		if err != nil {
			return nil, res, errors.New("aad is not base64url without padding")
		}
		if op == "encrypt" {
			iv := make([]byte, gcm.NonceSize())
			if _, err := rand.Read(iv); err != nil {
				return nil, res, err
			}
			sealed := gcm.Seal(nil, iv, value, aad)
			n := len(sealed) - gcm.Overhead()
			res.IV, res.Tag, res.AAD = b64.EncodeToString(iv), b64.EncodeToString(sealed[n:]), p.AAD
			return sealed[:n], res, nil
		}
		iv, err1 := b64.DecodeString(p.IV)
		tag, err2 := b64.DecodeString(p.Tag)
		if err1 != nil || err2 != nil || len(iv) != gcm.NonceSize() {
			return nil, res, errors.New("decrypt needs a 12-byte iv and a tag")
		}
		out, err := gcm.Open(nil, iv, append(append([]byte(nil), value...), tag...), aad)
		if err != nil {
			return nil, res, errors.New("decrypt failed: authentication tag mismatch")
		}
		return out, res, nil
	}
	return nil, res, fmt.Errorf("algorithm %q is not supported for operation %s on a %d-bit oct-HSM key", p.Alg, op, len(k)*8)
}
