package kvtest

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// tokenKey signs test tokens. It is fixed so that tokens stay valid across
// Servers (MSAL caches managed identity tokens per process).
const tokenKey = "kvtest: fixed HMAC key for test access tokens only"

// tokenLifetime is how long issued access tokens are valid.
const tokenLifetime = time.Hour

type tokenClaims struct {
	Aud   string `json:"aud"`
	Tid   string `json:"tid"`
	Sub   string `json:"sub"`
	AppID string `json:"appid"`
	Exp   int64  `json:"exp"`
}

func issueToken(c tokenClaims) string {
	body, _ := json.Marshal(c)
	mac := hmac.New(sha256.New, []byte(tokenKey))
	mac.Write(body)
	return "kvt1." + b64.EncodeToString(body) + "." + b64.EncodeToString(mac.Sum(nil))
}

func parseToken(tok string) (tokenClaims, error) {
	var c tokenClaims
	parts := strings.Split(tok, ".")
	if len(parts) != 3 || parts[0] != "kvt1" {
		return c, errors.New("AKV10000: the access token is malformed")
	}
	body, err1 := b64.DecodeString(parts[1])
	sig, err2 := b64.DecodeString(parts[2])
	if err1 != nil || err2 != nil {
		return c, errors.New("AKV10000: the access token is malformed")
	}
	mac := hmac.New(sha256.New, []byte(tokenKey))
	mac.Write(body)
	if !hmac.Equal(sig, mac.Sum(nil)) {
		return c, errors.New("AKV10005: the access token signature is invalid")
	}
	if err := json.Unmarshal(body, &c); err != nil {
		return c, errors.New("AKV10000: the access token is malformed")
	}
	return c, nil
}

// authenticate checks a vault request's bearer token and returns its
// principal and application ID.
func (s *Server) authenticate(r *http.Request) (principal, appID string, err error) {
	auth := r.Header.Get("Authorization")
	tok, ok := strings.CutPrefix(auth, "Bearer ")
	if !ok || tok == "" {
		return "", "", errors.New("AKV10000: Request is missing a Bearer or PoP token.")
	}
	c, err := parseToken(tok)
	if err != nil {
		return "", "", err
	}
	if !strings.EqualFold(strings.TrimSuffix(c.Aud, "/"), strings.TrimSuffix(s.opts.Resource, "/")) {
		return "", "", fmt.Errorf("AKV10022: Invalid audience. Expected %s, found: %s.", s.opts.Resource, c.Aud)
	}
	if !strings.EqualFold(c.Tid, s.opts.TenantID) {
		return "", "", fmt.Errorf("AKV10032: Invalid issuer. Expected one of https://sts.windows.net/%s/, found https://sts.windows.net/%s/.", s.opts.TenantID, c.Tid)
	}
	if time.Now().Unix() >= c.Exp {
		return "", "", errors.New("AKV10021: the access token has expired")
	}
	return c.Sub, c.AppID, nil
}
