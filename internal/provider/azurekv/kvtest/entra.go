package kvtest

import (
	"crypto"
	"crypto/hmac"
	"crypto/rsa"
	"crypto/sha1" //nolint:gosec // x5t thumbprints are SHA-1 by definition
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// Principals: who a token was issued to.
const (
	// SystemIdentity is the system-assigned managed identity.
	SystemIdentity = "mi:system"
)

// App is the principal of an application (service principal) authenticated
// with a secret, a certificate or a federated token.
func App(clientID string) string { return "app:" + clientID }

// ManagedIdentity is the principal of a user-assigned managed identity.
func ManagedIdentity(clientID string) string { return "mi:" + clientID }

// AddClientSecret registers an application that authenticates with secret.
func (s *Server) AddClientSecret(clientID, secret string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.secrets[clientID] = secret
}

// presentedCredential is what an application last presented to the token
// endpoint.
type presentedCredential struct {
	secret string
	cert   *x509.Certificate
}

// LastClientSecret returns the client secret clientID last presented to
// the token endpoint, right or wrong, or "".
func (s *Server) LastClientSecret(clientID string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.presented[clientID].secret
}

// LastClientCertificate returns the registered certificate whose key
// signed clientID's last accepted client assertion, or nil.
func (s *Server) LastClientCertificate(clientID string) *x509.Certificate {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.presented[clientID].cert
}

// SetClientCertificates replaces the certificates registered for
// clientID, as removing an old certificate from an app registration does.
func (s *Server) SetClientCertificates(clientID string, certs ...*x509.Certificate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.certs[clientID] = append([]*x509.Certificate(nil), certs...)
}

// AddClientCertificate registers an application that authenticates with a
// certificate assertion signed by cert's key.
func (s *Server) AddClientCertificate(clientID string, cert *x509.Certificate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.certs[clientID] = append(s.certs[clientID], cert)
}

// AddFederatedToken registers an application whose workload identity
// federation trusts the (service account) token.
func (s *Server) AddFederatedToken(clientID, token string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.federated[clientID] == nil {
		s.federated[clientID] = map[string]bool{}
	}
	s.federated[clientID][token] = true
}

// AddManagedIdentity assigns a user-assigned managed identity to "this VM".
func (s *Server) AddManagedIdentity(clientID, resourceID string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.identity[clientID] = managedIdentity{clientID: clientID, resourceID: resourceID}
}

// SetSystemIdentity enables (the default) or removes the VM's
// system-assigned identity.
func (s *Server) SetSystemIdentity(enabled bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.systemOff = !enabled
}

// writeEntraError answers with Entra ID's OAuth error body.
func writeEntraError(w http.ResponseWriter, status int, code string, aadsts int, description string) {
	now := time.Now().UTC().Format("2006-01-02 15:04:05Z")
	writeJSON(w, status, map[string]any{
		"error":             code,
		"error_description": fmt.Sprintf("AADSTS%d: %s\r\nTrace ID: 00000000-0000-0000-0000-000000000000\r\nCorrelation ID: 00000000-0000-0000-0000-000000000000\r\nTimestamp: %s", aadsts, description, now),
		"error_codes":       []int{aadsts},
		"timestamp":         now,
		"error_uri":         fmt.Sprintf("https://login.microsoftonline.com/error?code=%d", aadsts),
	})
}

func (s *Server) tokenOutage() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.faults.tokenOutage
}

// serveEntra answers instance discovery, tenant discovery and the token
// endpoint of the authority host.
func (s *Server) serveEntra(w http.ResponseWriter, r *http.Request) {
	s.setDate(w)
	seg := strings.Split(strings.Trim(r.URL.Path, "/"), "/")
	base := "https://" + s.opts.LoginHost
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/common/discovery/instance":
		s.count("discovery")
		writeJSON(w, http.StatusOK, map[string]any{
			"tenant_discovery_endpoint": base + "/" + s.opts.TenantID + "/v2.0/.well-known/openid-configuration",
			"api-version":               "1.1",
			"metadata": []map[string]any{{
				"preferred_network": s.opts.LoginHost, "preferred_cache": s.opts.LoginHost, "aliases": []string{s.opts.LoginHost},
			}},
		})
	case r.Method == http.MethodGet && len(seg) == 4 && seg[1] == "v2.0" && seg[2] == ".well-known" && seg[3] == "openid-configuration":
		s.count("discovery")
		if !strings.EqualFold(seg[0], s.opts.TenantID) {
			writeEntraError(w, http.StatusBadRequest, "invalid_tenant", 90002, fmt.Sprintf("Tenant '%s' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud.", seg[0]))
			return
		}
		t := base + "/" + seg[0]
		writeJSON(w, http.StatusOK, map[string]any{
			"token_endpoint":                        t + "/oauth2/v2.0/token",
			"authorization_endpoint":                t + "/oauth2/v2.0/authorize",
			"issuer":                                t + "/v2.0",
			"token_endpoint_auth_methods_supported": []string{"client_secret_post", "private_key_jwt", "client_secret_basic"},
			"jwks_uri":                              t + "/discovery/v2.0/keys",
		})
	case r.Method == http.MethodPost && len(seg) == 4 && seg[1] == "oauth2" && seg[2] == "v2.0" && seg[3] == "token":
		s.count("token")
		if s.tokenOutage() {
			writeEntraError(w, http.StatusServiceUnavailable, "temporarily_unavailable", 50196, "The server is temporarily unavailable.")
			return
		}
		s.serveToken(w, r, seg[0])
	default:
		writeEntraError(w, http.StatusNotFound, "invalid_request", 900561, "unsupported endpoint "+r.URL.Path)
	}
}

func (s *Server) serveToken(w http.ResponseWriter, r *http.Request, tenant string) {
	if err := r.ParseForm(); err != nil {
		writeEntraError(w, http.StatusBadRequest, "invalid_request", 900144, "The request body must contain the following parameter: 'grant_type'.")
		return
	}
	if !strings.EqualFold(tenant, s.opts.TenantID) {
		writeEntraError(w, http.StatusBadRequest, "invalid_tenant", 90002, fmt.Sprintf("Tenant '%s' not found.", tenant))
		return
	}
	if r.PostForm.Get("grant_type") != "client_credentials" {
		writeEntraError(w, http.StatusBadRequest, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
		return
	}
	clientID := r.PostForm.Get("client_id")
	// MSAL adds openid, offline_access and profile to the resource's scope.
	resource := ""
	for _, sc := range strings.Fields(r.PostForm.Get("scope")) {
		if res, ok := strings.CutSuffix(sc, "/.default"); ok {
			resource = res
		}
	}
	if resource == "" {
		writeEntraError(w, http.StatusBadRequest, "invalid_scope", 1002012, "The provided value for scope is not valid: a client credential flow needs a RESOURCE/.default scope.")
		return
	}
	s.mu.Lock()
	secret, hasSecret := s.secrets[clientID]
	certs := s.certs[clientID]
	federated := s.federated[clientID]
	skew := s.faults.assertionSkew
	s.mu.Unlock()
	if !hasSecret && len(certs) == 0 && len(federated) == 0 {
		writeEntraError(w, http.StatusBadRequest, "unauthorized_client", 700016, fmt.Sprintf("Application with identifier '%s' was not found in the directory '%s'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant.", clientID, tenant))
		return
	}
	switch {
	case r.PostForm.Has("client_secret"):
		s.mu.Lock()
		s.presented[clientID] = presentedCredential{secret: r.PostForm.Get("client_secret")}
		s.mu.Unlock()
		if !hasSecret || !hmac.Equal([]byte(secret), []byte(r.PostForm.Get("client_secret"))) {
			writeEntraError(w, http.StatusUnauthorized, "invalid_client", 7000215, fmt.Sprintf("Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '%s'.", clientID))
			return
		}
	case r.PostForm.Get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
		assertion := r.PostForm.Get("client_assertion")
		if federated[assertion] {
			break
		}
		if len(certs) == 0 {
			writeEntraError(w, http.StatusBadRequest, "invalid_request", 70021, "No matching federated identity record found for presented assertion. Check the issuer, subject and audience of the federated credential.")
			return
		}
		endpoint := "https://" + s.opts.LoginHost + "/" + tenant + "/oauth2/v2.0/token"
		cert, code, msg := verifyAssertion(assertion, clientID, endpoint, certs, time.Now().Add(skew))
		if code != 0 {
			writeEntraError(w, http.StatusUnauthorized, "invalid_client", code, msg)
			return
		}
		s.mu.Lock()
		s.presented[clientID] = presentedCredential{cert: cert}
		s.mu.Unlock()
	default:
		writeEntraError(w, http.StatusUnauthorized, "invalid_client", 7000218, "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.")
		return
	}
	tok := issueToken(tokenClaims{Aud: resource, Tid: s.opts.TenantID, Sub: App(clientID), AppID: clientID, Exp: time.Now().Add(tokenLifetime).Unix()})
	writeJSON(w, http.StatusOK, map[string]any{
		"token_type": "Bearer", "expires_in": int(tokenLifetime.Seconds()), "ext_expires_in": int(tokenLifetime.Seconds()), "access_token": tok,
	})
}

// verifyAssertion checks a client certificate assertion (a JWT signed with
// PS256 or RS256, naming its certificate by thumbprint) and returns the
// certificate, or an AADSTS code and message when it is not acceptable.
func verifyAssertion(assertion, clientID, endpoint string, certs []*x509.Certificate, now time.Time) (*x509.Certificate, int, string) {
	parts := strings.Split(assertion, ".")
	if len(parts) != 3 {
		return nil, 50027, "Invalid JWT token. The token is malformed."
	}
	var header struct {
		Alg     string `json:"alg"`
		X5T     string `json:"x5t"`
		X5TS256 string `json:"x5t#S256"`
	}
	var claims struct {
		Aud string      `json:"aud"`
		Iss string      `json:"iss"`
		Sub string      `json:"sub"`
		Exp json.Number `json:"exp"`
		Nbf json.Number `json:"nbf"`
	}
	hb, err1 := b64.DecodeString(parts[0])
	cb, err2 := b64.DecodeString(parts[1])
	sig, err3 := b64.DecodeString(parts[2])
	if err1 != nil || err2 != nil || err3 != nil || json.Unmarshal(hb, &header) != nil || json.Unmarshal(cb, &claims) != nil {
		return nil, 50027, "Invalid JWT token. The token is malformed."
	}
	var cert *x509.Certificate
	for _, c := range certs {
		s256 := sha256.Sum256(c.Raw)
		s1 := sha1.Sum(c.Raw) //nolint:gosec // x5t is SHA-1 by definition
		if header.X5TS256 == base64.StdEncoding.EncodeToString(s256[:]) || header.X5TS256 == b64.EncodeToString(s256[:]) ||
			header.X5T == base64.StdEncoding.EncodeToString(s1[:]) || header.X5T == b64.EncodeToString(s1[:]) {
			cert = c
		}
	}
	if cert == nil {
		return nil, 700027, fmt.Sprintf("The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '%s%s']", header.X5TS256, header.X5T)
	}
	pub, ok := cert.PublicKey.(*rsa.PublicKey)
	if !ok {
		return nil, 700027, "Client assertion failed signature validation: the certificate key is not RSA."
	}
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	var err error
	switch header.Alg {
	case "PS256":
		err = rsa.VerifyPSS(pub, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto})
	case "RS256":
		err = rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig)
	default:
		err = fmt.Errorf("algorithm %q", header.Alg)
	}
	if err != nil {
		return nil, 700027, "Client assertion failed signature validation."
	}
	if claims.Aud != endpoint || claims.Iss != clientID || claims.Sub != clientID {
		return nil, 700021, "Client assertion audience claim does not match Realm issuer."
	}
	exp, _ := claims.Exp.Int64()
	nbf, _ := claims.Nbf.Int64()
	const allowedSkew = 5 * 60
	if n := now.Unix(); n > exp+allowedSkew || n+allowedSkew < nbf {
		return nil, 700024, fmt.Sprintf("Client assertion is not within its valid time range. Current time: %s, assertion valid from %s, expiry time of assertion %s.",
			now.UTC().Format(time.RFC3339), time.Unix(nbf, 0).UTC().Format(time.RFC3339), time.Unix(exp, 0).UTC().Format(time.RFC3339))
	}
	return cert, 0, ""
}
