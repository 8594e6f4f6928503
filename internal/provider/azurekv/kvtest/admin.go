package kvtest

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// State describes a running Server for a test in another process.
type State struct {
	VaultURL      string `json:"vaultURL"`
	VaultHost     string `json:"vaultHost"`
	AuthorityHost string `json:"authorityHost"`
	TenantID      string `json:"tenantID"`
	ProxyURL      string `json:"proxyURL"`
	TLSAddr       string `json:"tlsAddr"`
	IMDSAddr      string `json:"imdsAddr"`
	// AdminURL and CAFile are filled in by kvtestd.
	AdminURL string `json:"adminURL,omitempty"`
	CAFile   string `json:"caFile,omitempty"`
}

// State returns the server's addresses.
func (s *Server) State() State {
	return State{
		VaultURL: s.VaultURL(), VaultHost: s.VaultHost(), AuthorityHost: s.AuthorityHost(), TenantID: s.TenantID(),
		ProxyURL: s.ProxyURL(), TLSAddr: s.TLSAddr(), IMDSAddr: s.IMDSAddr(),
	}
}

// AdminHandler drives the server over HTTP, for tests that run it in
// another process (kvtestd). Every endpoint takes query parameters and
// answers JSON; errors are 400 with {"error": "..."}.
//
//	GET  /state
//	GET  /calls                                  per-operation counters
//	POST /calls/reset
//	POST /keys?name=N&kty=RSA|RSA-HSM|oct-HSM&bits=B   create a key or version
//	POST /rotate?name=N                          new version like the newest
//	POST /enable?name=N&version=V&enabled=true|false
//	POST /latency?d=20ms
//	POST /throttle?n=N&retryAfter=1s             n<0: until n=0
//	POST /fail?n=N&status=503
//	POST /outage?on=true|false
//	POST /secret?clientID=C&secret=S              register an app secret
//	POST /identity?clientID=C&resourceID=R       assign a managed identity
//	POST /permissions?principal=P&perms=get,wrapKey
func (s *Server) AdminHandler() http.Handler {
	mux := http.NewServeMux()
	ok := func(w http.ResponseWriter, v any) { writeJSON(w, http.StatusOK, v) }
	fail := func(w http.ResponseWriter, err error) {
		writeJSON(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
	}
	q := func(r *http.Request, k string) string { return r.URL.Query().Get(k) }
	dur := func(r *http.Request, k string) (time.Duration, error) {
		if v := q(r, k); v != "" {
			return time.ParseDuration(v)
		}
		return 0, nil
	}
	num := func(r *http.Request, k string) (int, error) {
		if v := q(r, k); v != "" {
			return strconv.Atoi(v)
		}
		return 0, nil
	}
	mux.HandleFunc("GET /state", func(w http.ResponseWriter, r *http.Request) { ok(w, s.State()) })
	mux.HandleFunc("GET /calls", func(w http.ResponseWriter, r *http.Request) {
		calls := s.AllCalls()
		calls["vault"] = s.VaultCalls()
		ok(w, calls)
	})
	mux.HandleFunc("POST /calls/reset", func(w http.ResponseWriter, r *http.Request) { s.ResetCalls(); ok(w, map[string]bool{"ok": true}) })
	mux.HandleFunc("POST /keys", func(w http.ResponseWriter, r *http.Request) {
		bits, err := num(r, "bits")
		if err != nil {
			fail(w, err)
			return
		}
		kty := q(r, "kty")
		if kty == "" {
			kty = KeyTypeRSA
		}
		kid, err := s.CreateKey(q(r, "name"), kty, bits)
		if err != nil {
			fail(w, err)
			return
		}
		ok(w, map[string]string{"kid": kid})
	})
	mux.HandleFunc("POST /rotate", func(w http.ResponseWriter, r *http.Request) {
		kid, err := s.NewVersion(q(r, "name"))
		if err != nil {
			fail(w, err)
			return
		}
		ok(w, map[string]string{"kid": kid})
	})
	mux.HandleFunc("POST /enable", func(w http.ResponseWriter, r *http.Request) {
		if err := s.SetEnabled(q(r, "name"), q(r, "version"), q(r, "enabled") != "false"); err != nil {
			fail(w, err)
			return
		}
		ok(w, map[string]bool{"ok": true})
	})
	mux.HandleFunc("POST /latency", func(w http.ResponseWriter, r *http.Request) {
		d, err := dur(r, "d")
		if err != nil {
			fail(w, err)
			return
		}
		s.SetLatency(d)
		ok(w, map[string]bool{"ok": true})
	})
	mux.HandleFunc("POST /throttle", func(w http.ResponseWriter, r *http.Request) {
		n, err1 := num(r, "n")
		d, err2 := dur(r, "retryAfter")
		if err1 != nil || err2 != nil {
			fail(w, errorsJoin(err1, err2))
			return
		}
		s.Throttle(n, d)
		ok(w, map[string]bool{"ok": true})
	})
	mux.HandleFunc("POST /fail", func(w http.ResponseWriter, r *http.Request) {
		n, err1 := num(r, "n")
		status, err2 := num(r, "status")
		if err1 != nil || err2 != nil {
			fail(w, errorsJoin(err1, err2))
			return
		}
		s.Fail(n, status)
		ok(w, map[string]bool{"ok": true})
	})
	mux.HandleFunc("POST /outage", func(w http.ResponseWriter, r *http.Request) {
		s.SetOutage(q(r, "on") == "true")
		ok(w, map[string]bool{"ok": true})
	})
	mux.HandleFunc("POST /secret", func(w http.ResponseWriter, r *http.Request) {
		s.AddClientSecret(q(r, "clientID"), q(r, "secret"))
		ok(w, map[string]bool{"ok": true})
	})
	mux.HandleFunc("POST /identity", func(w http.ResponseWriter, r *http.Request) {
		s.AddManagedIdentity(q(r, "clientID"), q(r, "resourceID"))
		ok(w, map[string]bool{"ok": true})
	})
	mux.HandleFunc("POST /permissions", func(w http.ResponseWriter, r *http.Request) {
		var perms []Permission
		for _, p := range strings.Split(q(r, "perms"), ",") {
			if p != "" {
				perms = append(perms, Permission(p))
			}
		}
		s.SetPermissions(q(r, "principal"), perms...)
		ok(w, map[string]bool{"ok": true})
	})
	return mux
}

func errorsJoin(errs ...error) error {
	for _, err := range errs {
		if err != nil {
			return err
		}
	}
	return nil
}

// MarshalState encodes st as indented JSON.
func MarshalState(st State) ([]byte, error) { return json.MarshalIndent(st, "", "  ") }
