package kvtest

import (
	"net/http"
	"strconv"
	"strings"
	"time"
)

// serveIMDS answers managed identity token requests as the Azure Instance
// Metadata Service does.
func (s *Server) serveIMDS(w http.ResponseWriter, r *http.Request) {
	s.count("imds")
	s.setDate(w)
	if r.URL.Path != "/metadata/identity/oauth2/token" {
		http.NotFound(w, r)
		return
	}
	if r.Header.Get("Metadata") != "true" {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "invalid_request", "error_description": "Required metadata header not specified"})
		return
	}
	if s.tokenOutage() {
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"error": "service_unavailable", "error_description": "IMDS is temporarily unavailable"})
		return
	}
	q := r.URL.Query()
	resource := q.Get("resource")
	if resource == "" {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "invalid_request", "error_description": "Required query variable 'resource' is missing"})
		return
	}
	s.mu.Lock()
	principal, clientID := "", ""
	switch {
	case q.Has("client_id"):
		if id, ok := s.identity[q.Get("client_id")]; ok {
			principal, clientID = ManagedIdentity(id.clientID), id.clientID
		}
	case q.Has("mi_res_id") || q.Has("msi_res_id"):
		want := q.Get("mi_res_id") + q.Get("msi_res_id")
		for _, id := range s.identity {
			if strings.EqualFold(id.resourceID, want) {
				principal, clientID = ManagedIdentity(id.clientID), id.clientID
			}
		}
	case q.Has("object_id"):
		// Not modelled.
	case !s.systemOff:
		principal, clientID = SystemIdentity, "00000000-0000-0000-0000-0000005y5tem"
	}
	s.mu.Unlock()
	if principal == "" {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": "invalid_request", "error_description": "Identity not found"})
		return
	}
	now := time.Now()
	tok := issueToken(tokenClaims{Aud: resource, Tid: s.opts.TenantID, Sub: principal, AppID: clientID, Exp: now.Add(tokenLifetime).Unix()})
	secs := strconv.Itoa(int(tokenLifetime.Seconds()))
	writeJSON(w, http.StatusOK, map[string]string{
		"access_token": tok, "client_id": clientID, "expires_in": secs, "ext_expires_in": secs,
		"expires_on": strconv.FormatInt(now.Add(tokenLifetime).Unix(), 10), "not_before": strconv.FormatInt(now.Unix(), 10),
		"resource": resource, "token_type": "Bearer",
	})
}
