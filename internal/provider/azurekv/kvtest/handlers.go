package kvtest

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Wire types, with Key Vault's JSON field names. Binary fields are
// base64url without padding.
type (
	jsonWebKey struct {
		KID    string   `json:"kid"`
		Kty    string   `json:"kty"`
		KeyOps []string `json:"key_ops"`
		N      string   `json:"n,omitempty"`
		E      string   `json:"e,omitempty"`
	}
	keyAttributes struct {
		Enabled         bool   `json:"enabled"`
		NotBefore       *int64 `json:"nbf,omitempty"`
		Expires         *int64 `json:"exp,omitempty"`
		Created         int64  `json:"created"`
		Updated         int64  `json:"updated"`
		RecoveryLevel   string `json:"recoveryLevel"`
		RecoverableDays int    `json:"recoverableDays"`
	}
	keyBundle struct {
		Key        jsonWebKey    `json:"key"`
		Attributes keyAttributes `json:"attributes"`
	}
	keyItem struct {
		KID        string        `json:"kid"`
		Attributes keyAttributes `json:"attributes"`
	}
	keyList struct {
		Value    []keyItem `json:"value"`
		NextLink *string   `json:"nextLink"`
	}
	keyOperationParams struct {
		Alg   string `json:"alg"`
		Value string `json:"value"`
		IV    string `json:"iv,omitempty"`
		AAD   string `json:"aad,omitempty"`
		Tag   string `json:"tag,omitempty"`
	}
	keyOperationResult struct {
		KID   string `json:"kid"`
		Value string `json:"value"`
		IV    string `json:"iv,omitempty"`
		AAD   string `json:"aad,omitempty"`
		Tag   string `json:"tag,omitempty"`
	}
	updateParams struct {
		Attributes *struct {
			Enabled   *bool  `json:"enabled"`
			NotBefore *int64 `json:"nbf"`
			Expires   *int64 `json:"exp"`
		} `json:"attributes"`
		KeyOps []string `json:"key_ops"`
	}
	createParams struct {
		Kty     string `json:"kty"`
		KeySize int    `json:"key_size"`
	}
)

var b64 = base64.RawURLEncoding

func (s *Server) attributesLocked(v *version) keyAttributes {
	return keyAttributes{
		Enabled: v.enabled, NotBefore: v.nbf, Expires: v.exp, Created: v.created, Updated: v.updated,
		RecoveryLevel: "Recoverable+Purgeable", RecoverableDays: 90,
	}
}

func (s *Server) bundleLocked(k *key, v *version) keyBundle {
	jwk := jsonWebKey{KID: s.kid(k, v), Kty: v.kty, KeyOps: v.ops}
	if v.rsa != nil {
		jwk.N = b64.EncodeToString(v.rsa.N.Bytes())
		jwk.E = b64.EncodeToString(big.NewInt(int64(v.rsa.E)).Bytes())
	}
	return keyBundle{Key: jwk, Attributes: s.attributesLocked(v)}
}

func (s *Server) handleGet(w http.ResponseWriter, rt route) {
	s.mu.Lock()
	v, k, status := s.findLocked(rt.name, rt.version)
	if status != 0 {
		s.mu.Unlock()
		writeNotFound(w, rt)
		return
	}
	if !v.enabled && s.opts.DisabledGetForbidden {
		s.mu.Unlock()
		writeVaultError(w, http.StatusForbidden, "Forbidden", "Operation get is not allowed on a disabled key.", "KeyDisabled")
		return
	}
	b := s.bundleLocked(k, v)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, b)
}

func (s *Server) handleList(w http.ResponseWriter, r *http.Request, rt route) {
	q := r.URL.Query()
	size := s.opts.PageSize
	if m, err := strconv.Atoi(q.Get("maxresults")); err == nil && m > 0 && m < size {
		size = m
	}
	skip, _ := strconv.Atoi(q.Get("$skiptoken"))
	s.mu.Lock()
	k := s.keys[strings.ToLower(rt.name)]
	if k == nil {
		s.mu.Unlock()
		writeNotFound(w, rt)
		return
	}
	out := keyList{Value: []keyItem{}}
	for i := skip; i < len(k.versions) && i < skip+size; i++ {
		v := k.versions[i]
		out.Value = append(out.Value, keyItem{KID: s.kid(k, v), Attributes: s.attributesLocked(v)})
	}
	if skip+size < len(k.versions) {
		next := fmt.Sprintf("https://%s/keys/%s/versions?api-version=%s&$skiptoken=%d&maxresults=%d", s.opts.VaultHost, url.PathEscape(k.name), APIVersion, skip+size, size)
		out.NextLink = &next
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) handleUpdate(w http.ResponseWriter, r *http.Request, rt route) {
	var p updateParams
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&p); err != nil {
		writeVaultError(w, http.StatusBadRequest, "BadParameter", "invalid JSON body: "+err.Error(), "")
		return
	}
	s.mu.Lock()
	v, k, status := s.findLocked(rt.name, rt.version)
	if status != 0 {
		s.mu.Unlock()
		writeNotFound(w, rt)
		return
	}
	if a := p.Attributes; a != nil {
		if a.Enabled != nil {
			v.enabled = *a.Enabled
		}
		if a.NotBefore != nil {
			v.nbf = a.NotBefore
		}
		if a.Expires != nil {
			v.exp = a.Expires
		}
	}
	if p.KeyOps != nil {
		v.ops = p.KeyOps
	}
	v.updated = time.Now().Unix()
	b := s.bundleLocked(k, v)
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, b)
}

func (s *Server) handleCreate(w http.ResponseWriter, r *http.Request, rt route) {
	var kid string
	var err error
	if rt.op == "rotate" {
		s.mu.Lock()
		exists := s.keys[strings.ToLower(rt.name)] != nil
		s.mu.Unlock()
		if !exists {
			writeNotFound(w, rt)
			return
		}
		kid, err = s.NewVersion(rt.name)
	} else {
		var p createParams
		if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&p); err != nil {
			writeVaultError(w, http.StatusBadRequest, "BadParameter", "invalid JSON body: "+err.Error(), "")
			return
		}
		kid, err = s.CreateKey(rt.name, p.Kty, p.KeySize)
	}
	if err != nil {
		writeVaultError(w, http.StatusBadRequest, "BadParameter", err.Error(), "")
		return
	}
	versionID := kid[strings.LastIndex(kid, "/")+1:]
	s.handleGet(w, route{op: "get", name: rt.name, version: versionID})
}
