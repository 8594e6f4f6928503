package kvtest

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// vaultOps are the call counter names of vault operations.
var vaultOps = []string{"get", "list", "wrapkey", "unwrapkey", "encrypt", "decrypt", "create", "rotate", "update", "unknown"}

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
