package kvtest

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1" //nolint:gosec // RSA-OAEP (SHA-1) is a Key Vault algorithm
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"math/big"
	"net/http"
	"net/url"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// Key types.
const (
	KeyTypeRSA    = "RSA"
	KeyTypeRSAHSM = "RSA-HSM"
	KeyTypeOctHSM = "oct-HSM"
)

// Permission is a key permission of a Key Vault access policy.
type Permission string

// Key permissions.
const (
	PermGet       Permission = "get"
	PermList      Permission = "list"
	PermWrapKey   Permission = "wrapKey"
	PermUnwrapKey Permission = "unwrapKey"
	PermEncrypt   Permission = "encrypt"
	PermDecrypt   Permission = "decrypt"
	PermCreate    Permission = "create"
	PermRotate    Permission = "rotate"
	PermUpdate    Permission = "update"
)

// AllPermissions is what a principal without SetPermissions may do.
func AllPermissions() []Permission {
	return []Permission{PermGet, PermList, PermWrapKey, PermUnwrapKey, PermEncrypt, PermDecrypt, PermCreate, PermRotate, PermUpdate}
}

// rbacAction is the Azure RBAC data action of each permission.
var rbacAction = map[Permission]string{
	PermGet: "keys/read", PermList: "keys/read",
	PermWrapKey: "keys/wrap/action", PermUnwrapKey: "keys/unwrap/action",
	PermEncrypt: "keys/encrypt/action", PermDecrypt: "keys/decrypt/action",
	PermCreate: "keys/create/action", PermRotate: "keys/rotate/action", PermUpdate: "keys/update/action",
}

// vaultOps are the call counter names of vault operations.
var vaultOps = []string{"get", "list", "wrapkey", "unwrapkey", "encrypt", "decrypt", "create", "rotate", "update", "unknown"}

// key is one named key and its versions, oldest first.
type key struct {
	name     string
	versions []*version
}

// version is one key version. Its material never changes; its attributes
// are guarded by Server.mu.
type version struct {
	id      string
	kty     string
	rsa     *rsa.PrivateKey
	aes     []byte
	ops     []string
	enabled bool
	created int64
	updated int64
	nbf     *int64
	exp     *int64
}

var keyNameRE = regexp.MustCompile(`^[0-9a-zA-Z-]{1,127}$`)

// CreateKey creates a key (or a new version of it) of type kty
// (KeyTypeRSA, KeyTypeRSAHSM, KeyTypeOctHSM) and size in bits (0: 2048 for
// RSA, 256 for AES), and returns its versioned key ID.
func (s *Server) CreateKey(name, kty string, bits int) (string, error) {
	v, err := s.generate(kty, bits)
	if err != nil {
		return "", err
	}
	return s.addVersion(name, v)
}

// ImportKey adds a version holding material (*rsa.PrivateKey, or []byte
// for an AES key) to key name and returns its versioned key ID.
func (s *Server) ImportKey(name string, material any) (string, error) {
	v := &version{}
	switch m := material.(type) {
	case *rsa.PrivateKey:
		v.kty, v.rsa = KeyTypeRSA, m
		if s.opts.ManagedHSM {
			v.kty = KeyTypeRSAHSM
		}
	case []byte:
		if len(m) != 16 && len(m) != 24 && len(m) != 32 {
			return "", fmt.Errorf("kvtest: AES key of %d bytes", len(m))
		}
		v.kty, v.aes = KeyTypeOctHSM, append([]byte(nil), m...)
	default:
		return "", fmt.Errorf("kvtest: cannot import %T", material)
	}
	v.ops = defaultOps(v.kty)
	return s.addVersion(name, v)
}

// NewVersion creates a new version of key name of the same type and size as
// its newest one, as Key Vault's rotate does, and returns its key ID.
func (s *Server) NewVersion(name string) (string, error) {
	s.mu.Lock()
	k := s.keys[strings.ToLower(name)]
	var last *version
	if k != nil {
		last = k.versions[len(k.versions)-1]
	}
	s.mu.Unlock()
	if last == nil {
		return "", fmt.Errorf("kvtest: no key %q", name)
	}
	bits := len(last.aes) * 8
	if last.rsa != nil {
		bits = last.rsa.N.BitLen()
	}
	return s.CreateKey(name, last.kty, bits)
}

// SetEnabled enables or disables one version of key name ("" is the newest).
func (s *Server) SetEnabled(name, versionID string, enabled bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, _, status := s.findLocked(name, versionID)
	if status != 0 {
		return fmt.Errorf("kvtest: key %s/%s not found", name, versionID)
	}
	v.enabled = enabled
	v.updated = time.Now().Unix()
	return nil
}

// KeyID returns the versioned key ID of a version of key name ("" is the
// newest).
func (s *Server) KeyID(name, versionID string) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, k, status := s.findLocked(name, versionID)
	if status != 0 {
		return "", fmt.Errorf("kvtest: key %s/%s not found", name, versionID)
	}
	return s.kid(k, v), nil
}

// VersionIDs lists the version IDs of key name, oldest first.
func (s *Server) VersionIDs(name string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.keys[strings.ToLower(name)]
	if k == nil {
		return nil
	}
	out := make([]string, len(k.versions))
	for i, v := range k.versions {
		out[i] = v.id
	}
	return out
}

// SetPermissions replaces what principal (App, SystemIdentity,
// ManagedIdentity) may do. Principals never set have AllPermissions.
func (s *Server) SetPermissions(principal string, perms ...Permission) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := map[Permission]bool{}
	for _, p := range perms {
		m[p] = true
	}
	s.perms[principal] = m
}

// SetKeyPermissions replaces what principal may do with key name only, as
// a role assignment scoped to one key does; it overrides SetPermissions
// for that key.
func (s *Server) SetKeyPermissions(principal, name string, perms ...Permission) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := map[Permission]bool{}
	for _, p := range perms {
		m[p] = true
	}
	if s.keyPerms[principal] == nil {
		s.keyPerms[principal] = map[string]map[Permission]bool{}
	}
	s.keyPerms[principal][strings.ToLower(name)] = m
}

// DeleteKey deletes key name and all its versions, as Key Vault's delete
// (then purge) does: every request for it answers 404 KeyNotFound.
func (s *Server) DeleteKey(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.keys[strings.ToLower(name)] == nil {
		return fmt.Errorf("kvtest: no key %q", name)
	}
	delete(s.keys, strings.ToLower(name))
	return nil
}

// SetValidity sets one version's not-before and expiry times ("" version:
// the newest); a nil time clears it.
func (s *Server) SetValidity(name, versionID string, notBefore, expires *time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, _, status := s.findLocked(name, versionID)
	if status != 0 {
		return fmt.Errorf("kvtest: key %s/%s not found", name, versionID)
	}
	unix := func(t *time.Time) *int64 {
		if t == nil {
			return nil
		}
		u := t.Unix()
		return &u
	}
	v.nbf, v.exp = unix(notBefore), unix(expires)
	v.updated = time.Now().Unix()
	return nil
}

func defaultOps(kty string) []string {
	if kty == KeyTypeOctHSM {
		return []string{"encrypt", "decrypt", "wrapKey", "unwrapKey"}
	}
	return []string{"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"}
}

func (s *Server) generate(kty string, bits int) (*version, error) {
	v := &version{kty: kty, ops: defaultOps(kty)}
	switch kty {
	case KeyTypeRSA, KeyTypeRSAHSM:
		if bits == 0 {
			bits = 2048
		}
		if bits != 2048 && bits != 3072 && bits != 4096 {
			return nil, fmt.Errorf("kvtest: RSA key size %d", bits)
		}
		k, err := rsa.GenerateKey(rand.Reader, bits)
		if err != nil {
			return nil, err
		}
		v.rsa = k
	case KeyTypeOctHSM:
		if !s.opts.ManagedHSM {
			return nil, errors.New("kvtest: oct-HSM keys need a Managed HSM server")
		}
		if bits == 0 {
			bits = 256
		}
		if bits != 128 && bits != 192 && bits != 256 {
			return nil, fmt.Errorf("kvtest: AES key size %d", bits)
		}
		v.aes = make([]byte, bits/8)
		if _, err := rand.Read(v.aes); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("kvtest: unsupported key type %q", kty)
	}
	return v, nil
}

func (s *Server) addVersion(name string, v *version) (string, error) {
	if !keyNameRE.MatchString(name) {
		return "", fmt.Errorf("kvtest: invalid key name %q", name)
	}
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return "", err
	}
	v.id = hex.EncodeToString(id)
	v.enabled = true
	s.mu.Lock()
	defer s.mu.Unlock()
	k := s.keys[strings.ToLower(name)]
	if k == nil {
		k = &key{name: name}
		s.keys[strings.ToLower(name)] = k
	}
	// Creation times are whole seconds, as in Key Vault; keep them strictly
	// increasing so that "newest" is well defined.
	v.created = time.Now().Unix()
	if n := len(k.versions); n > 0 && v.created <= k.versions[n-1].created {
		v.created = k.versions[n-1].created + 1
	}
	v.updated = v.created
	k.versions = append(k.versions, v)
	return s.kid(k, v), nil
}

func (s *Server) kid(k *key, v *version) string {
	return "https://" + s.opts.VaultHost + "/keys/" + k.name + "/" + v.id
}

// findLocked returns the version versionID ("" for the newest) of key name,
// or an HTTP status.
func (s *Server) findLocked(name, versionID string) (*version, *key, int) {
	k := s.keys[strings.ToLower(name)]
	if k == nil {
		return nil, nil, http.StatusNotFound
	}
	if versionID == "" {
		return k.versions[len(k.versions)-1], k, 0
	}
	for _, v := range k.versions {
		if strings.EqualFold(v.id, versionID) {
			return v, k, 0
		}
	}
	return nil, k, http.StatusNotFound
}

// route is a parsed vault request.
type route struct {
	op      string // call counter name
	perm    Permission
	name    string
	version string
}

var cryptoOps = map[string]Permission{
	"wrapkey": PermWrapKey, "unwrapkey": PermUnwrapKey, "encrypt": PermEncrypt, "decrypt": PermDecrypt,
}

// parseRoute maps a method and escaped path to an operation.
func parseRoute(method, path string) (route, bool) {
	seg := strings.Split(strings.TrimPrefix(path, "/"), "/")
	if len(seg) < 2 || seg[0] != "keys" || seg[1] == "" {
		return route{op: "unknown"}, false
	}
	name, err := url.PathUnescape(seg[1])
	if err != nil {
		return route{op: "unknown"}, false
	}
	rest := seg[2:]
	if len(rest) == 1 && rest[0] == "" {
		rest = nil
	}
	r := route{name: name}
	switch {
	case len(rest) == 0 && method == http.MethodGet:
		r.op, r.perm = "get", PermGet
	case len(rest) == 0 && method == http.MethodPatch:
		r.op, r.perm = "update", PermUpdate
	case len(rest) == 1 && rest[0] == "versions" && method == http.MethodGet:
		r.op, r.perm = "list", PermList
	case len(rest) == 1 && method == http.MethodPost && rest[0] == "create":
		r.op, r.perm = "create", PermCreate
	case len(rest) == 1 && method == http.MethodPost && rest[0] == "rotate":
		r.op, r.perm = "rotate", PermRotate
	case len(rest) == 1 && method == http.MethodPost && cryptoOps[rest[0]] != "":
		r.op, r.perm = rest[0], cryptoOps[rest[0]]
	case len(rest) == 1 && method == http.MethodGet:
		r.op, r.perm, r.version = "get", PermGet, rest[0]
	case len(rest) == 1 && method == http.MethodPatch:
		r.op, r.perm, r.version = "update", PermUpdate, rest[0]
	case len(rest) == 2 && method == http.MethodPost && cryptoOps[rest[1]] != "":
		r.op, r.perm, r.version = rest[1], cryptoOps[rest[1]], rest[0]
	default:
		return route{op: "unknown"}, false
	}
	return r, true
}

// takeFaults returns the faults that apply to one vault request and
// consumes the counted ones.
func (s *Server) takeFaults() (f faults, throttled, failed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f = s.faults
	if s.faults.throttle != 0 {
		throttled = true
		if s.faults.throttle > 0 {
			s.faults.throttle--
		}
	} else if s.faults.failRemaining != 0 && s.faults.failStatus != 0 {
		failed = true
		if s.faults.failRemaining > 0 {
			s.faults.failRemaining--
		}
	}
	return f, throttled, failed
}

func (s *Server) serveVault(w http.ResponseWriter, r *http.Request) {
	rt, ok := parseRoute(r.Method, r.URL.EscapedPath())
	s.count(rt.op)
	f, throttled, failed := s.takeFaults()
	if f.outage {
		_ = drop(w)
		return
	}
	if f.latency > 0 {
		t := time.NewTimer(f.latency)
		select {
		case <-r.Context().Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
	s.setDate(w)
	w.Header().Set("x-ms-keyvault-service-version", "1.9.0.0")
	switch {
	case throttled:
		secs := int((f.retryAfter + time.Second - 1) / time.Second)
		w.Header().Set("Retry-After", strconv.Itoa(secs))
		if f.retryAfter%time.Second != 0 {
			w.Header().Set("retry-after-ms", strconv.FormatInt(f.retryAfter.Milliseconds(), 10))
		}
		writeVaultError(w, http.StatusTooManyRequests, "Throttled", "Request was not processed because too many requests were received. Reason: VaultRequestTypeLimitReached", "")
		return
	case failed:
		writeVaultError(w, f.failStatus, http.StatusText(f.failStatus), "kvtest: injected failure", "")
		return
	case !ok:
		writeVaultError(w, http.StatusNotFound, "NotFound", "unsupported request "+r.Method+" "+r.URL.Path, "")
		return
	}
	if r.URL.Query().Get("api-version") == "" {
		writeVaultError(w, http.StatusBadRequest, "BadParameter", "The api-version query parameter is required.", "")
		return
	}
	principal, appID, err := s.authenticate(r)
	if err != nil {
		// The challenge: Key Vault's way of telling clients which tenant
		// and resource to get a token for.
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer authorization="https://%s/%s", resource="%s"`, s.opts.LoginHost, s.opts.TenantID, s.opts.Resource))
		writeVaultError(w, http.StatusUnauthorized, "Unauthorized", err.Error(), "")
		return
	}
	s.mu.Lock()
	s.lastSeen = principal
	allowed := true
	if perms, ok := s.perms[principal]; ok {
		allowed = perms[rt.perm]
	}
	if perms, ok := s.keyPerms[principal][strings.ToLower(rt.name)]; ok {
		allowed = perms[rt.perm]
	}
	s.mu.Unlock()
	if !allowed {
		s.writeDenied(w, rt.perm, appID)
		return
	}
	switch rt.op {
	case "get":
		s.handleGet(w, rt)
	case "list":
		s.handleList(w, r, rt)
	case "update":
		s.handleUpdate(w, r, rt)
	case "create", "rotate":
		s.handleCreate(w, r, rt)
	default:
		s.handleCrypto(w, r, rt)
	}
}

func (s *Server) writeDenied(w http.ResponseWriter, perm Permission, appID string) {
	if s.opts.RBAC {
		kind := "vaults"
		if s.opts.ManagedHSM {
			kind = "managedHsm"
		}
		msg := fmt.Sprintf("Caller is not authorized to perform action on resource.\r\nIf role assignments, deny assignments or role definitions were changed recently, please observe propagation time.\r\nCaller: appid=%s\r\nAction: 'Microsoft.KeyVault/%s/%s'\r\nResource: '/subscriptions/00000000-0000-0000-0000-000000000000/resourcegroups/kvtest/providers/microsoft.keyvault/%s/%s'\r\nAssignment: (not found)\r\nDenyAssignmentId: null\r\nDecisionReason: null \r\nVault: %s;location=westeurope\r\n",
			appID, kind, rbacAction[perm], strings.ToLower(kind), s.vaultName(), s.vaultName())
		writeVaultError(w, http.StatusForbidden, "Forbidden", msg, "ForbiddenByRbac")
		return
	}
	msg := fmt.Sprintf("The user, group or application 'appid=%s;oid=%s;iss=https://sts.windows.net/%s/' does not have keys %s permission on key vault '%s;location=westeurope'. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125287",
		appID, appID, s.opts.TenantID, perm, s.vaultName())
	writeVaultError(w, http.StatusForbidden, "Forbidden", msg, "AccessDenied")
}

func (s *Server) vaultName() string {
	name, _, _ := strings.Cut(s.opts.VaultHost, ".")
	return name
}

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

func writeNotFound(w http.ResponseWriter, rt route) {
	id := rt.name
	if rt.version != "" {
		id += "/" + rt.version
	}
	writeVaultError(w, http.StatusNotFound, "KeyNotFound", fmt.Sprintf("A key with (name/id) %s was not found in this key vault. If you recently deleted this key you may be able to recover it using the correct recovery command. For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182", id), "")
}

// vaultError is Key Vault's error body.
type vaultError struct {
	Error vaultErrorDetail `json:"error"`
}

type vaultErrorDetail struct {
	Code       string      `json:"code"`
	Message    string      `json:"message"`
	InnerError *innerError `json:"innererror,omitempty"`
}

type innerError struct {
	Code string `json:"code"`
}

func writeVaultError(w http.ResponseWriter, status int, code, message, inner string) {
	body := vaultError{Error: vaultErrorDetail{Code: code, Message: message}}
	if inner != "" {
		body.Error.InnerError = &innerError{Code: inner}
	}
	writeJSON(w, status, body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
